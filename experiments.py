"""The reproduction report (TASK.md's comparison protocol): every method x several seeds, in one command.

    python experiments.py --seeds=5                  # the embedded `reviews` task, preset 'report'
    python experiments.py --seeds=5 --task=arith
    python experiments.py --preset=smoke --seeds=1   # seconds: every output file, meaningless numbers
    python experiments.py --first_seed=3 --seeds=2   # seeds 3 and 4 only, e.g. in a second process beside one
                                                     # running --seeds=3 on the same out_dir

Per seed, one SFT policy and one proxy RM (out_dir/<task>/seed<k>/) serve every method, each with the same PPO
budget (--iters). Finished cells are kept in out_dir/results.json and never rerun, so a killed report resumes.
Writes out_dir/<task>/report.md, curves.csv and, when matplotlib is installed (extra `plot`), curves.png.
"""
import csv
import json
import math
import os
from dataclasses import replace

from tqdm import tqdm

import refine
from minirlhf.checkpoint import atomic_write_json
from minirlhf.evaluate import win_tie_lose
from minirlhf.report import fmt, gold_at_kl, mean_ci
from minirlhf.runtime import main, read_summary
from train_ppo import best_of_n, rl_setup, summarize, train_ppo
from train_rm import ensure_rm, load_preferences

RLP = ("uml", "spg", "uml+spg", "oracle", "control")
METHODS = ("bon", "ppo") + RLP + ("ensemble-mean", "ensemble-min", "metarm", "vanilla-rounds")
MATCHED_KL = (1.0, 2.0, 4.0, 8.0)


def run_cell(cfg, method):
    """One method on one seed; returns what the report needs (JSON-able)."""
    device, source, sft, rm = rl_setup(cfg)
    if method == "bon":
        return {"curve": best_of_n(cfg, source, sft, rm, device)}
    if method == "ppo":
        refine.vanilla_policy(cfg, source, sft, rm, device)
        return read_summary(cfg)["ppo"]
    prefs = load_preferences(cfg)
    if method in RLP:
        return refine.rlp(replace(cfg, method=method), source, sft, rm, prefs, device)
    if method.startswith("ensemble"):  # Coste et al.: 3 RMs from different seeds (member 0 is the proxy itself)
        ens_cfg = replace(cfg, ensemble=3, ensemble_agg=method.split("-")[1])
        _, history = train_ppo(ens_cfg, source, sft, ensure_rm(ens_cfg, device), device, name=f"ppo_{method}")
        return summarize(history)
    eta = cfg.meta_eta if method == "metarm" else 0.0
    return {"rounds": refine.meta_rounds(replace(cfg, method=method), source, sft, prefs, device, eta)}


def policies(cell, method):
    """(name, PPO summary) of every policy a cell produced: one, or one per MetaRM round (none if not run yet)."""
    if method == "bon" or not cell:
        return []
    if "rounds" not in cell:
        return [(method, cell)]
    out, curve = [], []
    for r in cell["rounds"]:  # round r continues round r-1's policy, so its curve continues that line
        start = curve[-1]["iter"] if curve else 0
        curve = curve + [{**p, "iter": start + p["iter"]} for p in r["curve"]]
        out.append((f"{method} r{r['round']}", {**r, "curve": curve}))
    return out


def write_report(cfg, results):
    """out_dir/<task>/report.md and curves.csv (and curves.png) from results.json."""
    seeds = sorted({k.split("/")[1] for k in results if k.startswith(cfg.task + "/")})
    cell = {(s, m): results.get(f"{cfg.task}/{s}/{m}") for s in seeds for m in METHODS}
    names = []  # every policy name in report order, and its summaries per seed
    per_seed = {}
    for m in METHODS[1:]:
        for s in seeds:
            for name, summ in policies(cell[(s, m)], m):
                if name not in per_seed:
                    names.append(name)
                per_seed.setdefault(name, {})[s] = summ
    lines = [f"# minirlhf reproduction report: `{cfg.task}`, {len(seeds)} seed(s)", "",
             f"Mean ± 95% t-interval over seeds. Gold = the task's gold reward on {cfg.eval_prompts} held-out "
             "prompts; win-rate vs SFT counts ties as half. 'final' is the last PPO iteration, 'peak' the best-gold "
             "evaluation. MetaRM round r continues round r-1's policy: its curve and matched-KL gold cover rounds "
             "1..r, its peak round r alone.", "",
             "## Gold win-rate vs SFT and gold reward", "",
             "| policy | win-rate vs SFT % (final) | gold (final) | gold (peak) | KL at peak | KL (final) |",
             "|---|---|---|---|---|---|"]

    def agg(name, get, digits=3):
        # None: not measured; NaN: nothing to measure (e.g. RM accuracy when every pair of samples is a gold tie)
        vals = [v for v in map(get, per_seed[name].values()) if v is not None and not math.isnan(v)]
        if not vals:
            return "n/a"
        return fmt(*mean_ci(vals), len(vals), digits) + (f" (n={len(vals)})" if len(vals) < len(seeds) else "")

    sft_row = {s: summ["sft"] for s, summ in per_seed.get("ppo", {}).items()}
    if sft_row:
        per_seed["SFT"] = {s: {"final": h, "peak_gold": h} for s, h in sft_row.items()}
    for name in (["SFT"] if sft_row else []) + names:
        cols = [lambda x: 100 * x["final"]["eval/win_rate"], lambda x: x["final"]["eval/gold"],
                lambda x: x["peak_gold"]["eval/gold"], lambda x: x["peak_gold"]["eval/kl"],
                lambda x: x["final"]["eval/kl"]]
        lines.append(f"| {name} | " + " | ".join(agg(name, c, 1 if i == 0 else 3) for i, c in enumerate(cols)) + " |")
    bon = {s: cell[(s, "bon")] for s in seeds if cell[(s, "bon")]}
    if bon:
        lines += ["", "## Best-of-n against the proxy (KL = log n - (n-1)/n)", "", "| n | KL | proxy | gold |",
                  "|---|---|---|---|"]
        for i, row in enumerate(next(iter(bon.values()))["curve"]):
            proxy, gold = ([b["curve"][i][k] for b in bon.values()] for k in ("proxy", "gold"))
            lines.append(f"| {row['n']} | {row['kl']:.2f} | {fmt(*mean_ci(proxy), len(bon))} | "
                         f"{fmt(*mean_ci(gold), len(bon))} |")
    lines += ["", "## Win / tie / lose (%) of each final policy vs SFT and vs vanilla PPO (per prompt, mean over "
              "seeds)", "", "| policy | vs SFT | vs vanilla PPO |", "|---|---|---|"]
    for name in names:
        vs_sft, vs_ppo = [], []
        for s, x in per_seed[name].items():
            f = x["final"]
            vs_sft.append((f["eval/win"], f["eval/tie"], f["eval/lose"]))
            if "ppo" in per_seed and s in per_seed["ppo"]:
                w = win_tie_lose(f["gold_per_prompt"], per_seed["ppo"][s]["final"]["gold_per_prompt"])
                vs_ppo.append((w["win"], w["tie"], w["lose"]))
        show = lambda t: "/".join(f"{100 * sum(x[i] for x in t) / len(t):.0f}" for i in range(3)) if t else "n/a"
        lines.append(f"| {name} | {show(vs_sft)} | {show(vs_ppo)} |")
    lines += ["", "## Gold at matched KL (interpolated along each run) ", "",
              "| policy | " + " | ".join(f"KL={k:g}" for k in MATCHED_KL) + " |", "|---" * (len(MATCHED_KL) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(agg(name, lambda x, k=k: gold_at_kl(x["curve"], k))
                                                 for k in MATCHED_KL) + " |")
    for s, x in per_seed.get("ppo", {}).items():  # the proxy's accuracy, measured before the control's retrain
        if cell[(s, "control")]:
            per_seed["ppo"][s] = {**x, "rm_after": cell[(s, "control")]["rm_before"]}
    lines += ["", "## Diagnostics (final policy; RM = the one it was trained against, n/a for ensembles)", "",
              "| policy | RM acc held-out SFT pairs | RM acc policy pairs | proxy-gold corr | reward-diff std | "
              "SPG acceptance | SPG gold agreement |", "|---|---|---|---|---|---|---|"]
    for name in names:
        cols = [lambda x: x.get("rm_after", x).get("held_out_acc_gold"),
                lambda x: x["final"]["eval/rm_acc_policy_pairs"], lambda x: x["final"]["eval/proxy_gold_corr"],
                lambda x: x["final"]["eval/proxy_diff_std"], lambda x: x.get("spg/acceptance"),
                lambda x: x.get("spg/gold_agreement")]
        lines.append(f"| {name} | " + " | ".join(agg(name, c) for c in cols) + " |")
    os.makedirs(os.path.join(cfg.out_dir, cfg.task), exist_ok=True)  # results.json alone regenerates the report
    with open(os.path.join(cfg.out_dir, cfg.task, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_curves(cfg, seeds, per_seed, names, bon)


def write_curves(cfg, seeds, per_seed, names, bon):
    """curves.csv (always) and curves.png (with matplotlib): gold and proxy vs sqrt(KL) per method, and BoN."""
    rows = [{"method": name, "seed": s, "iter": p["iter"], "kl": p["eval/kl"],
             "sqrt_kl": math.sqrt(max(0.0, p["eval/kl"])), "proxy": p["eval/proxy"], "gold": p["eval/gold"]}
            for name in names for s, x in per_seed[name].items() for p in x["curve"]]
    rows += [{"method": "best-of-n", "seed": s, "iter": r["n"], "kl": r["kl"], "sqrt_kl": math.sqrt(r["kl"]),
              "proxy": r["proxy"], "gold": r["gold"]} for s, b in bon.items() for r in b["curve"]]
    path = os.path.join(cfg.out_dir, cfg.task, "curves.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "iter", "kl", "sqrt_kl", "proxy", "gold"])
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    by_run = {}  # (method, seed) -> its points in evaluation order
    for r in rows:
        by_run.setdefault((r["method"], r["seed"]), []).append(r)
    # One line per method: the pointwise mean over seeds (every seed evaluates at the same iterations). A MetaRM
    # run is drawn once, as its last round, whose curve holds the earlier rounds.
    methods = list({name.split(" r")[0]: name for name in names}.values()) + ["best-of-n"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for c, method in enumerate(methods):
        runs = [pts for (m, _), pts in by_run.items() if m == method]
        if not runs:
            continue
        mean = [{k: sum(run[i][k] for run in runs) / len(runs) for k in ("sqrt_kl", "gold", "proxy")}
                for i in range(min(map(len, runs)))]
        for ax, key in zip(axes, ("gold", "proxy")):
            ax.plot([p["sqrt_kl"] for p in mean], [p[key] for p in mean], marker=".", lw=1.5, label=method,
                    color=plt.get_cmap("tab20")(c % 20), ls="--" if method == "best-of-n" else "-")
    for ax, key in zip(axes, ("gold reward", "proxy reward")):
        ax.set_xlabel("sqrt(KL to SFT)")
        ax.set_ylabel(f"{key} (mean over {len(seeds)} seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, cfg.task, "curves.png"), dpi=120)


def load_results(out_dir):
    """Every finished cell: results.json merged with out_dir/cells/, where each cell lands as its own file the
    moment it finishes (so processes that split the seeds with --first_seed can share one out_dir)."""
    path, cells = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "cells")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    for name in sorted(os.listdir(cells)) if os.path.isdir(cells) else []:
        if not name.endswith(".json"):  # another process's temp file, mid-write
            continue
        with open(os.path.join(cells, name)) as f:
            results.update(json.load(f))
    atomic_write_json(results, path)
    return results


def run(cfg):
    refine.check_rounds(cfg)
    results = load_results(cfg.out_dir)
    cells = [(k, m) for k in range(cfg.first_seed, cfg.first_seed + cfg.seeds) for m in METHODS]
    for k, method in tqdm(cells, desc=f"report {cfg.task}"):
        key = f"{cfg.task}/seed{k}/{method}"
        if key not in results:  # finished cells are never rerun
            seed_cfg = replace(cfg, seed=k, out_dir=os.path.join(cfg.out_dir, cfg.task, f"seed{k}"))
            cell = {key: run_cell(seed_cfg, method)}
            atomic_write_json(cell, os.path.join(cfg.out_dir, "cells", key.replace("/", "-") + ".json"))
            results.update(cell)
    results = load_results(cfg.out_dir)
    write_report(cfg, results)
    print(f"wrote {cfg.out_dir}/results.json and {cfg.out_dir}/{cfg.task}/report.md, curves.csv")
    return results


if __name__ == "__main__":
    main(run, out_dir="out_report", preset="report")
