"""What every script needs around its loop: device, seeding, autocast, LR schedule, metrics files, NaN guard."""
import contextlib
import json
import math
import os
import random
from dataclasses import asdict

import numpy as np
import torch

from .checkpoint import atomic_write_json


def setup(cfg):
    """Seed every RNG, pick the device and thread count; returns the torch.device."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


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


def check_finite(loss, what, step):
    """NaN guard: stop with a message instead of writing a poisoned checkpoint."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: non-finite loss {loss.item()} at step {step}; "
                                 "the last checkpoint was kept (lower the learning rate?)")


class Metrics:
    """Appends one JSON object per line to out_dir/<name>.jsonl (truncated when a run starts fresh)."""

    def __init__(self, out_dir, name="metrics", fresh=True):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, f"{name}.jsonl")
        if fresh and os.path.exists(self.path):
            os.remove(self.path)

    def truncate(self, keep):
        """Keep only the rows for which keep(row) is true (a resumed run replays the rest)."""
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [line for line in f if keep(json.loads(line))]
            with open(self.path, "w") as f:
                f.writelines(rows)

    def log(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}) + "\n")


def write_summary(cfg, stage, values):
    """Merge `values` under `stage` into out_dir/summary.json, with the config that produced them."""
    path = os.path.join(cfg.out_dir, "summary.json")
    summary = {}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    summary[stage] = {**values, "config": asdict(cfg)}
    atomic_write_json(summary, path)


def print_table(rows, columns):
    """A plain-text table; rows are dicts, floats printed with 3 decimals."""
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
