"""What every script needs around its loop: its entry point (bad input in one line, Ctrl-C, a lock
on out_dir), device, seeding, autocast, LR schedule, metrics files, NaN guard."""
import contextlib
import json
import math
import os
import random
import socket
import sys
from dataclasses import asdict

import numpy as np
import torch

from ..data.hh import DataError
from . import dist, seeds
from .checkpoint import atomic_write_json
from .config import UsageError, parse_args, print_help


def setup(cfg):
    """Seed every RNG, pick the device and thread count; returns the torch.device."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    s = seeds.stream(cfg.seed, seeds.GLOBAL)
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                          else cfg.device)
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


def adamw(params, **kw):
    """AdamW with the fused kernel: one pass over all parameters, about 4x faster than the
    per-tensor loop on a CPU (where it is a tenth of a PPO iteration at 14M parameters)."""
    return torch.optim.AdamW(params, fused=True, **kw)


def check_finite(value, what, step=None, name="loss"):
    """NaN guard: stop with a message instead of taking a poisoned step or writing a
    poisoned checkpoint (`step` where the caller knows it)."""
    if not torch.isfinite(torch.as_tensor(value)):
        at = "" if step is None else f" at step {step}"
        raise FloatingPointError(f"{what}: non-finite {name} {float(value)}{at}; "
                                 "the last checkpoint was kept (lower the learning rate?)")


def clip_and_check(params, max_norm, what, step=None):
    """Clip the gradient norm, and refuse to step on a non-finite gradient."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    check_finite(norm, what, step, "gradient norm")
    return norm


def main(run, cls, validate=None, lock=True):
    """A script's entry point. `--help` lists its options. The whole config is checked
    (`validate(cfg)`) before any work; a bad option ends in one line on stderr and exit code 2, bad
    data or a failed run in one line and exit code 1, Ctrl-C in one line and exit code 130: only a
    bug in minirlhf shows a traceback. With `lock`, out_dir has one writer."""
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print_help(cls, os.path.basename(sys.argv[0]))
        sys.exit(0)
    try:
        cfg = parse_args(argv, cls)
        if validate is not None:
            validate(cfg)
        with (lock_out_dir(cfg.out_dir) if lock and os.environ.get("RANK", "0") == "0"
              else contextlib.nullcontext()):
            run(cfg)
        dist.finish()
    except UsageError as e:
        fail(e, 2)
    except (DataError, ValueError, OSError, FloatingPointError) as e:
        fail(e, 1)
    except KeyboardInterrupt:
        fail("interrupted; resume with --resume=True", 130)


def fail(message, code):
    print(f"error: {message}" if code != 130 else str(message), file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def lock_out_dir(out_dir):
    """out_dir/LOCK names the one process writing there; a second writer is refused in one line
    naming the holder. A lock whose process is gone (killed) is taken over. A folder this run
    created and left empty is removed."""
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "LOCK")
    holder = f"pid {os.getpid()} on {socket.gethostname()}: python {' '.join(sys.argv)}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            with open(path) as f:
                other = f.read().strip()
            if _alive(other):
                raise UsageError(f"--out_dir={out_dir} is in use by {other} "
                                 f"(remove {path} if that process is gone)") from None
            os.remove(path)  # a stale lock: its process no longer runs
    else:
        raise UsageError(f"--out_dir={out_dir}: could not take {path}")
    with os.fdopen(fd, "w") as f:
        f.write(holder + "\n")
    try:
        yield
    finally:
        os.remove(path)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)


def _alive(holder):
    """Whether the process named by a LOCK line ('pid N on HOST: ...') still runs (another
    host: assume so)."""
    try:
        pid, host = int(holder.split()[1]), holder.split()[3].rstrip(":")
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Metrics:
    """One metrics file per run, out_dir/metrics.jsonl: a JSON object per line, tagged with its
    stage ('sft', 'rm', 'ppo', 'ppo_uml', ...). A stage that starts fresh drops its own earlier
    rows; a resumed stage keeps the rows before its checkpoint (`keep_steps`) and replays the
    rest. With `tensorboard`, every number is also a scalar of out_dir/tensorboard/<stage>, under
    the same name, at the row's `step_key`. Rank 0 only."""

    def __init__(self, out_dir, stage, keep_steps=0, step_key="step", tensorboard=False):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.stage, self.step_key = stage, step_key
        if os.path.exists(self.path) and dist.is_main():
            rows = [r for r in read_jsonl(self.path)
                    if r["stage"] != stage or r.get(step_key, 0) < keep_steps]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        self.board = None
        if tensorboard and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter  # optional: validate checked it
            self.board = SummaryWriter(os.path.join(out_dir, "tensorboard", stage))

    def log(self, **row):
        if not dist.is_main():
            return
        row = {"stage": self.stage, **row}
        with open(self.path, "a") as f:
            f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v)
                                for k, v in row.items()}) + "\n")
        if self.board is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != self.step_key:
                    self.board.add_scalar(k, v, row.get(self.step_key, 0))
            self.board.flush()  # a person watches it while the run goes on

    def rows(self):
        """This stage's rows so far."""
        return [r for r in read_jsonl(self.path) if r["stage"] == self.stage]


def read_jsonl(path):
    """The rows of a JSON-lines file. A torn last line (a run killed mid-write) is dropped with a
    warning; a bad line elsewhere is an error naming the file and line."""
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                print(f"warning: {path}:{lineno}: dropped a torn last line ({e.msg})",
                      file=sys.stderr)
                continue
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return rows


def read_summary(cfg):
    """out_dir/summary.json as a dict ({} before any stage wrote it)."""
    path = os.path.join(cfg.out_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_summary(cfg, stage, values):
    """Merge `values` under `stage` into out_dir/summary.json, with the config
    that produced them."""
    summary = read_summary(cfg)
    summary[stage] = {**values, "config": asdict(cfg)}
    atomic_write_json(summary, os.path.join(cfg.out_dir, "summary.json"))


def print_table(rows, columns, max_text=100):
    """A plain-text table; rows are dicts, floats printed with 3 decimals. A text (a dialogue from a
    file) shows on one line, its middle cut to fit `max_text` characters."""
    def text(v):
        v = " ".join(str(v).split())
        half = (max_text - 3) // 2
        return v if len(v) <= max_text else v[:half] + "..." + v[-half:]
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else text(r[c]) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
