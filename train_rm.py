"""Stage 2 of RLHF: a proxy reward model from a limited budget of preference pairs (minirlhf/rm.py).

    python train_rm.py                                   # embedded task: gold-labelled pairs of
                                                         # SFT samples
    python train_rm.py --ensemble=3                      # Coste et al.: 3 RMs from different seeds
    python train_rm.py --data=path/to/test.jsonl.gz --block_size=256 --max_new_tokens=128
                                # HH-RLHF file: a gold RM on all its pairs plays the human
                                # (out_dir/gold_rm.pt), the proxy learns from rm_pairs of its labels

Initialises from out_dir/sft.pt (training SFT first if missing). Reports held-out accuracy on noisy
labels and on clean gold labels, normalises the RM on SFT samples and saves out_dir/rm.pt
(ensemble members as rm_1.pt, ...).
"""
from minirlhf.pipeline import prepare_judged
from minirlhf.plumbing.config import RMConfig
from minirlhf.plumbing.runtime import main
from minirlhf.plumbing.validate import validate
from minirlhf.rm import train_rm


def run(cfg):
    device, source, sft = prepare_judged(cfg)
    return train_rm(cfg, source, sft, device)


if __name__ == "__main__":
    main(run, RMConfig, validate)
