"""Benchmarks: generation, a PPO iteration, SFT/RM training throughput and MFU, peak memory
(minirlhf/benchmark.py).

    python bench.py                      # CPU or GPU, whichever is there; ~2-3 min on 2 CPU cores
    python bench.py --sizes=default      # only the default-preset model
"""
import torch

from minirlhf.benchmark import (SIZES, bench_generation, bench_ppo, bench_training, peak_flops,
                                peak_memory)
from minirlhf.config import BenchConfig, UsageError
from minirlhf.model import GPT, GPTConfig
from minirlhf.runtime import main, print_table
from minirlhf.validate import validate


def run(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    gen_rows, train_rows = [], []
    peak = peak_flops(device)
    print(f"measured peak matmul throughput: {peak / 1e9:.1f} GFLOP/s")
    for name in cfg.sizes.split(","):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**SIZES[name])).to(device).eval()
        if device.type == "cuda":
            model = model.to(torch.bfloat16)
        gen_rows += bench_generation(name, model, device)
        train_rows += bench_training(name, SIZES[name], device, peak)
    print("\n== generation (greedy, outputs checked equal) ==")
    print_table(gen_rows, ["size", "generator", "batch", "new_tokens", "tokens/s", "ours_speedup"])
    print("\n== training throughput ==")
    print_table(train_rows, ["size", "stage", "batch x T", "tokens/s", "MFU"])
    print("\n== one PPO iteration, default preset ==")
    print_table(bench_ppo(device, cfg), ["part", "seconds"])
    print(f"\npeak memory: {peak_memory(device)}")


def check(cfg):
    validate(cfg)
    unknown = [s for s in cfg.sizes.split(",") if s not in SIZES]
    if unknown:
        raise UsageError(f"--sizes={cfg.sizes!r}: unknown size {unknown[0]!r}, "
                         f"expected a comma-separated list of {', '.join(SIZES)}")


if __name__ == "__main__":
    main(run, BenchConfig, check, lock=False)
