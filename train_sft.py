"""Stage 1 of RLHF: supervised fine-tuning on demonstrations (minirlhf/sft.py).

    python train_sft.py                     # the embedded `reviews` task, CPU-sized
    python train_sft.py --preset=smoke      # seconds
    python train_sft.py --task=arith --sft_steps=800
    python train_sft.py --help              # every option, this stage's first

Writes out_dir/sft.pt, tokenizer.json, metrics.jsonl and summary.json.
"""
from minirlhf.data.sources import get_source
from minirlhf.plumbing.config import SFTConfig
from minirlhf.plumbing.runtime import main, setup
from minirlhf.plumbing.validate import validate
from minirlhf.sft import train_sft


def run(cfg):
    device = setup(cfg)
    train_sft(cfg, get_source(cfg, new_sft=True), device)


if __name__ == "__main__":
    main(run, SFTConfig, validate)
