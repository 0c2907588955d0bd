"""What one seed of the report costs (`bench.py --only=report-seed`): every method of the report
run on one tuning seed, the core-minutes of each, and where the time goes.

The profile charges every second to one part: the outermost of generation, the PPO update and RM
training (each holds forward and backward passes of its own), else to log-prob and score passes
(any other GPT forward: reference log-probs, critic values, RM and gold scores), gold judging (the
embedded task's rubric) or, for the rest, Python and everything unlabelled.
"""
import sys
import tempfile
import time
from dataclasses import replace

from .. import generate, metarm, ppo_trainer, rlp, rm
from ..data.tasks import Task
from ..model import GPT
from ..pipeline import prepare_rl
from ..plumbing.config import parse_args
from .cells import METHODS, run_cell
from .config import ReportConfig

# part -> the functions charged to it, and whether calls inside them stay charged to it
PARTS = {"generation": ([(generate, "generate")], True),
         "PPO update": ([(ppo_trainer, "ppo_update")], True),
         "RM training": ([(rm, "fit_rm"), (rlp, "uml_rm"), (metarm, "meta_rm")], True),
         "log-prob and score passes": ([(GPT, "forward")], False),
         "gold judging": ([(Task, "golds")], False)}
REST = "Python and the rest"


class Profile:
    """Exclusive seconds per part: a call into a part pauses the part it was called from."""

    def __init__(self):
        self.seconds, self.stack = {part: 0.0 for part in (*PARTS, REST)}, [(REST, False)]
        self.since, self.originals = time.perf_counter(), []

    def switch(self):
        now = time.perf_counter()
        self.seconds[self.stack[-1][0]] += now - self.since
        self.since = now

    def charged(self, fn, part, sticky):
        def wrapped(*args, **kwargs):
            if self.stack[-1][1]:  # inside a sticky part: its own passes are part of it
                return fn(*args, **kwargs)
            self.switch()
            self.stack.append((part, sticky))
            try:
                return fn(*args, **kwargs)
            finally:
                self.switch()
                self.stack.pop()
        return wrapped

    def __enter__(self):
        """Charge every reference to a part's functions, wherever minirlhf imported it."""
        for part, (targets, sticky) in PARTS.items():
            for owner, name in targets:
                fn = getattr(owner, name)
                wrapped = self.charged(fn, part, sticky)
                holders = [owner] + [m for key, m in sys.modules.items()
                                     if key.startswith("minirlhf") and m is not owner
                                     and getattr(m, name, None) is fn]
                for holder in holders:
                    self.originals.append((holder, name, fn))
                    setattr(holder, name, wrapped)
        self.since = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.switch()
        for holder, name, fn in reversed(self.originals):
            setattr(holder, name, fn)


def report_seed_cost(cfg):
    """Every method of the report on seed cfg.seed of cfg.task under cfg.preset, in a scratch
    folder: core-minutes (process CPU time) and wall minutes of the shared SFT and proxy RM and of
    each method, in all, and the profile's seconds per part."""
    with tempfile.TemporaryDirectory() as out_dir:
        seed_cfg = parse_args([f"--preset={cfg.preset}", f"--task={cfg.task}",
                               f"--seed={cfg.seed}", f"--threads={cfg.threads}"], ReportConfig)
        seed_cfg = replace(seed_cfg, out_dir=out_dir)
        costs = {}
        with Profile() as profile:
            for step in ("SFT and proxy RM", *METHODS):
                cpu, wall = time.process_time(), time.perf_counter()
                if step in METHODS:
                    run_cell(seed_cfg, step)
                else:
                    prepare_rl(seed_cfg)
                costs[step] = {"core_min": (time.process_time() - cpu) / 60,
                               "wall_min": (time.perf_counter() - wall) / 60}
    return {"task": cfg.task, "seed": cfg.seed, "preset": cfg.preset, "threads": cfg.threads,
            "core_min": sum(c["core_min"] for c in costs.values()),
            "wall_min": sum(c["wall_min"] for c in costs.values()), "steps": costs,
            "profile_s": profile.seconds}
