"""Benchmarks: generation, a PPO iteration, SFT/RM training throughput and MFU, peak memory
(minirlhf/bench/table.py); side by side with TRL and HF generate (minirlhf/bench/peers.py).

    python bench.py                      # CPU or GPU, whichever is there; ~2-3 min on 2 CPU cores
    python bench.py --sizes=default      # only the default-preset model
    # TRL's PPO iteration at shape (a), as one JSON line:
    python bench.py --only=ppo --n_layer=4 --n_embd=128 --n_head=4 --vocab=256 --batch=64 \\
        --prompt_len=16 --new_tokens=48 --threads=1 --json
    python bench.py --only=generate --weights=DIR --new_tokens=48 --threads=1 --json
    # what one seed of the report costs, per method, and where its time goes (a tuning seed;
    # about 90 core-minutes on `reviews`)
    python bench.py --only=report-seed --preset=report --task=reviews --seed=100 --threads=1
"""
import contextlib
import json
import os
import sys
from dataclasses import fields

import torch

from minirlhf.bench.config import BenchConfig
from minirlhf.bench.peers import PROMPT_FIELDS, bench_generate_peer, bench_ppo_peer
from minirlhf.bench.table import (SIZES, bench_generation, bench_ppo, bench_training, peak_flops,
                                  peak_memory)
from minirlhf.model import GPT, GPTConfig
from minirlhf.plumbing.checkpoint import load
from minirlhf.plumbing.config import UsageError, parse_args
from minirlhf.plumbing.runtime import main, print_table, setup
from minirlhf.plumbing.validate import validate
from minirlhf.study.cost import report_seed_cost

# what each mode reads besides --threads, --only and --json (and --preset, --out_dir: a bundle of
# defaults, and a folder it writes nothing to); any other option set is refused, not ignored
# (--only's modes run on the CPU, as their peers do)
READS = {"": ("sizes", "device", "task", "rollout_batch", "minibatch", "ppo_epochs",
              "max_new_tokens", "temperature", "gamma", "lam", "no_eos_penalty", "clip",
              "grad_clip", "vf_clip", "vf_coef"),
         "ppo": ("n_layer", "n_head", "n_embd", "vocab", "batch", "prompt_len", "new_tokens",
                 "reps", "seed"),
         "generate": ("weights", "new_tokens", "reps", "seed"),
         "report-seed": ("task", "seed")}


def run(cfg):
    device = setup(cfg)
    if cfg.only == "report-seed":
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(
                quiet if cfg.json else sys.stdout):  # the runs' own printing
            result = report_seed_cost(cfg)
        if not cfg.json:
            print_table([{"step": k, **v} for k, v in result["steps"].items()],
                        ["step", "core_min", "wall_min"])
            print_table([{"part": k, "seconds": v} for k, v in result["profile_s"].items()],
                        ["part", "seconds"])
        print(json.dumps(result))
        return
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
    if cfg.only not in READS:
        raise UsageError(f"--only={cfg.only!r}: expected 'ppo', 'generate' or 'report-seed'")
    if cfg.only == "report-seed" and cfg.seed < 100:
        raise UsageError(f"--seed={cfg.seed}: --only=report-seed runs on a tuning seed (>= 100), "
                         "never on one the report measures")
    plain = parse_args([f"--preset={cfg.preset}"], BenchConfig)
    reads = READS[cfg.only] + ("threads", "only", "json", "preset", "out_dir")
    for f in fields(cfg):
        if f.name not in reads and getattr(cfg, f.name) != getattr(plain, f.name):
            mode = f"--only={cfg.only}" if cfg.only else "the default table"
            raise UsageError(f"--{f.name}={getattr(cfg, f.name)!r}: bench.py does not use it "
                             f"with {mode}")
    validate(cfg)
    unknown = [s for s in cfg.sizes.split(",") if s not in SIZES]
    if unknown:
        raise UsageError(f"--sizes={cfg.sizes!r}: unknown size {unknown[0]!r}, expected a "
                         f"comma-separated list of {', '.join(SIZES)}")
    if cfg.json and not cfg.only:
        raise UsageError("--json=True: is for --only=ppo, generate or report-seed (the default "
                         "table is text)")
    if cfg.only == "ppo" and cfg.batch % 4:
        raise UsageError(f"--batch={cfg.batch}: must be a multiple of 4 (4 minibatches)")
    if cfg.only == "ppo" and cfg.vocab < 3:
        raise UsageError(f"--vocab={cfg.vocab}: must be >= 3 (random prompts avoid ids 0 and 1, "
                         "pad and EOS)")
    if cfg.only == "generate":
        prompts = os.path.join(cfg.weights, "prompts.pt")
        if not os.path.isfile(prompts):
            raise UsageError(f"--weights={cfg.weights!r}: no prompts.pt there (write it with "
                             "hf_generate.py --save_dir DIR)")
        try:
            load(prompts, fields=PROMPT_FIELDS)
        except ValueError as e:
            raise UsageError(f"--weights={cfg.weights!r}: {e}") from None


if __name__ == "__main__":
    main(run, BenchConfig, check, lock=False)
