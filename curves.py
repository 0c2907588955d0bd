"""Draw a run's curves: gold and proxy reward against sqrt(KL to SFT) at every evaluation, from
out_dir/metrics.jsonl (minirlhf/plumbing/curves.py). Needs matplotlib (pip install -e ".[plot]").

    python curves.py                    # out/metrics.jsonl -> out/curves.png
    python curves.py --out_dir=out_hh   # any out_dir a script wrote, while it runs or after
"""
import importlib.util
import os
from dataclasses import dataclass

from minirlhf.plumbing.config import UsageError
from minirlhf.plumbing.curves import draw, runs
from minirlhf.plumbing.runtime import main, read_jsonl


@dataclass
class CurvesConfig:
    out_dir: str = "out"
    """The folder whose metrics.jsonl to draw; curves.png is written beside it."""


def run(cfg):
    print(f"wrote {draw(cfg.out_dir)}")


def check(cfg):
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"--out_dir={cfg.out_dir!r}: no metrics.jsonl there")
    if not runs(read_jsonl(path)):
        raise UsageError(f"--out_dir={cfg.out_dir!r}: {path} holds no gold evaluation yet")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("curves.py needs the optional matplotlib (pip install -e \".[plot]\")")


if __name__ == "__main__":
    main(run, CurvesConfig, check, lock=False)
