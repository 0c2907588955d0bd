"""Stage 1 of RLHF: supervised fine-tuning on demonstrations (minirlhf/sft.py).

    python train_sft.py                     # the embedded `reviews` task, CPU-sized
    python train_sft.py --preset=smoke      # seconds
    python train_sft.py --task=arith --sft_steps=800
    python train_sft.py --help              # every option, this stage's first

Writes out_dir/sft.pt, tokenizer.json, metrics.jsonl and summary.json.
"""
from minirlhf.data.sources import get_source
from minirlhf.plumbing import dist
from minirlhf.plumbing.config import SFTConfig, UsageError
from minirlhf.plumbing.export import export_policy
from minirlhf.plumbing.runtime import main, setup
from minirlhf.plumbing.validate import validate
from minirlhf.sft import train_sft


def run(cfg):
    device = setup(cfg)
    source = get_source(cfg, new_sft=True)
    policy = train_sft(cfg, source, device)
    if cfg.export and dist.is_main():
        export_policy(policy, source.tokenizer, cfg.export, cfg)


def check(cfg):
    validate(cfg)
    if cfg.export_sft:
        raise UsageError(f"--export_sft={cfg.export_sft!r}: is for train_ppo.py and refine.py; "
                         "train_sft.py's --export writes its SFT policy")


if __name__ == "__main__":
    main(run, SFTConfig, check)
