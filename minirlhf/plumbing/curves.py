"""A run's curves from out_dir/metrics.jsonl: gold and proxy reward against sqrt(KL to SFT) at
each evaluation, as the report draws them (over-optimisation shows as gold turning down while the
proxy keeps rising). One line per PPO run; a run of rounds (stages name_r1, name_r2, ...) is one
line."""
import math
import os
import re

from .runtime import read_jsonl


def runs(rows):
    """{run: its evaluations in order}: the rows of metrics.jsonl that hold a gold evaluation,
    grouped by stage, a run of rounds' stages joined."""
    out = {}
    for r in rows:
        if "eval/gold" in r:
            out.setdefault(re.sub(r"_r\d+$", "", r["stage"]), []).append(r)
    return out


def draw(out_dir):
    """out_dir/curves.png from out_dir/metrics.jsonl (needs matplotlib); returns its path."""
    import matplotlib  # optional: the `plot` extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for name, evals in runs(read_jsonl(os.path.join(out_dir, "metrics.jsonl"))).items():
        x = [math.sqrt(max(0.0, r["eval/kl"])) for r in evals]
        for ax, key in zip(axes, ("eval/gold", "eval/proxy")):
            ax.plot(x, [r[key] for r in evals], marker=".", lw=1.5, label=name)
    for ax, title in zip(axes, ("gold reward", "proxy reward")):
        ax.set_xlabel("sqrt(KL to SFT)")
        ax.set_ylabel(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
