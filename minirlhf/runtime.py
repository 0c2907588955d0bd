"""What every script needs around its loop: device, seeding, autocast, LR schedule, metrics files, NaN guard."""
import contextlib
import json
import math
import os
import random
import sys
from dataclasses import asdict

import numpy as np
import torch

from . import dist
from .checkpoint import atomic_write_json
from .config import parse_args
from .data import DataError


def setup(cfg):
    """Seed every RNG, pick the device and thread count; returns the torch.device."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    dist.init(device)
    return device


def autocast(cfg, device):
    """bf16 autocast on CUDA when asked; a no-op context on CPU."""
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_lr(step, total, peak, warmup):
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_finite(value, what, step, name="loss"):
    """NaN guard: stop with a message instead of taking a poisoned step or writing a poisoned checkpoint."""
    if not torch.isfinite(torch.as_tensor(value)):
        raise FloatingPointError(f"{what}: non-finite {name} {float(value)} at step {step}; "
                                 "the last checkpoint was kept (lower the learning rate?)")


def clip_and_check(params, max_norm, what, step):
    """Clip the gradient norm, and refuse to step on a non-finite gradient."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    check_finite(norm, what, step, "gradient norm")
    return norm


def main(run, **script_defaults):
    """A script's entry point: bad input ends in one clear line on stderr and exit code 1, not a traceback."""
    try:
        run(parse_args(**script_defaults))
    except (DataError, ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


class Metrics:
    """One metrics file per run, out_dir/metrics.jsonl: a JSON object per line, tagged with its stage ('sft',
    'rm', 'ppo', 'ppo_uml', ...). A stage that starts fresh drops its own earlier rows; a resumed stage keeps the
    rows before its checkpoint (`keep_steps`) and replays the rest. Rank 0 only."""

    def __init__(self, out_dir, stage, keep_steps=0, step_key="step"):
        os.makedirs(out_dir, exist_ok=True)
        self.path, self.stage = os.path.join(out_dir, "metrics.jsonl"), stage
        if os.path.exists(self.path) and dist.is_main():
            with open(self.path) as f:
                rows = [line for line in f
                        if json.loads(line)["stage"] != stage or json.loads(line).get(step_key, 0) < keep_steps]
            with open(self.path, "w") as f:
                f.writelines(rows)

    def log(self, **row):
        if not dist.is_main():
            return
        row = {"stage": self.stage, **row}
        with open(self.path, "a") as f:
            f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}) + "\n")

    def rows(self):
        """This stage's rows so far."""
        with open(self.path) as f:
            return [r for r in map(json.loads, f) if r["stage"] == self.stage]


def read_summary(cfg):
    """out_dir/summary.json as a dict ({} before any stage wrote it)."""
    path = os.path.join(cfg.out_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_summary(cfg, stage, values):
    """Merge `values` under `stage` into out_dir/summary.json, with the config that produced them."""
    summary = read_summary(cfg)
    summary[stage] = {**values, "config": asdict(cfg)}
    atomic_write_json(summary, os.path.join(cfg.out_dir, "summary.json"))


def print_table(rows, columns):
    """A plain-text table; rows are dicts, floats printed with 3 decimals."""
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
