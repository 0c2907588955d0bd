"""Benchmarks: generation, a PPO iteration, SFT/RM training throughput and MFU, peak memory
(minirlhf/benchmark.py); side by side with TRL and HF generate (minirlhf/benchmark_peers.py).

    python bench.py                      # CPU or GPU, whichever is there; ~2-3 min on 2 CPU cores
    python bench.py --sizes=default      # only the default-preset model
    # TRL's PPO iteration at shape (a), as one JSON line:
    python bench.py --only=ppo --n_layer=4 --n_embd=128 --n_head=4 --vocab=256 --batch=64 \\
        --prompt_len=16 --new_tokens=48 --threads=1 --json
    python bench.py --only=generate --weights=DIR --new_tokens=48 --threads=1 --json
"""
import json
import os

import torch

from minirlhf.benchmark import (SIZES, bench_generation, bench_ppo, bench_training, peak_flops,
                                peak_memory)
from minirlhf.benchmark_peers import bench_generate_peer, bench_ppo_peer
from minirlhf.config import BenchConfig, UsageError, parse_args
from minirlhf.model import GPT, GPTConfig
from minirlhf.runtime import main, print_table, setup
from minirlhf.validate import validate

UNUSED = ("resume", "reuse", "ckpt_every", "data", "init_from", "tokenizer", "bpe_vocab",
          "sft_steps", "sft_batch", "sft_lr", "warmup", "weight_decay", "eval_prompts", "iters",
          "eval_every", "eval_dense", "sample_every", "bon_max", "ppo_lr", "critic_lr")


def run(cfg):
    device = setup(cfg)
    if cfg.only:
        result = (bench_ppo_peer if cfg.only == "ppo" else bench_generate_peer)(cfg)
        print(json.dumps(result) if cfg.json else json.dumps(result, indent=2))
        return
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    gen_rows, train_rows = [], []
    peak = peak_flops(device)
    print(f"measured peak matmul throughput: {peak / 1e9:.1f} GFLOP/s")
    for name in cfg.sizes.split(","):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**SIZES[name])).to(device).eval()
        gen_rows += bench_generation(name, model, device)
        train_rows += bench_training(name, SIZES[name], device, peak)
    print("\n== generation (each path checked against the plain one first) ==")
    print_table(gen_rows, ["size", "generator", "mode", "batch", "new_tokens", "tokens/s",
                           "ours_speedup"])
    print("\n== training throughput ==")
    print_table(train_rows, ["size", "stage", "batch x T", "tokens/s", "MFU"])
    print(f"\n== one PPO iteration ({cfg.preset} preset's shapes, {cfg.task}) ==")
    print_table(bench_ppo(device, cfg), ["part", "seconds"])
    print(f"\npeak memory: {peak_memory(device)}")


def check(cfg):
    # options every script shares that bench.py has no use for: refused, not silently ignored
    plain = parse_args([f"--preset={cfg.preset}"], BenchConfig)
    for name in UNUSED:
        if getattr(cfg, name) != getattr(plain, name):
            raise UsageError(f"--{name}={getattr(cfg, name)!r}: bench.py does not use it (it "
                             "times random-weight models, trains nothing and writes nothing)")
    validate(cfg)
    unknown = [s for s in cfg.sizes.split(",") if s not in SIZES]
    if unknown:
        raise UsageError(f"--sizes={cfg.sizes!r}: unknown size {unknown[0]!r}, expected a "
                         f"comma-separated list of {', '.join(SIZES)}")
    if cfg.only not in ("", "ppo", "generate"):
        raise UsageError(f"--only={cfg.only!r}: expected 'ppo' or 'generate'")
    if cfg.json and not cfg.only:
        raise UsageError("--json=True: is for --only=ppo or --only=generate (the default table is "
                         "text)")
    if cfg.only == "ppo" and cfg.batch % 4:
        raise UsageError(f"--batch={cfg.batch}: must be a multiple of 4 (4 minibatches)")
    if cfg.only == "generate" and not os.path.isfile(os.path.join(cfg.weights, "prompts.pt")):
        raise UsageError(f"--weights={cfg.weights!r}: no prompts.pt there (write it with "
                         "hf_generate.py --save_dir DIR)")


if __name__ == "__main__":
    main(run, BenchConfig, check, lock=False)
