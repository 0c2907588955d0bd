"""The reproduction report: report.md (tables over seeds, the pre-registered contrasts and
claims), curves.csv and curves.png, from results.json."""
import csv
import math
import os

from ..evaluate import win_tie_lose
from .contrasts import SMALLEST_EFFECT, claims, gold_at_kl, paired_differences
from .stats import DRAWS, EXACT_UP_TO, mean_ci

MATCHED_KL = (1.0, 2.0, 4.0, 8.0)


def fmt(mean, half, n, digits=3, signed=False):
    """'mean ± half-width', or the bare value when there is one seed (no interval to show); with
    `signed`, a difference's sign is always shown (+0.5, not 0.5)."""
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{m} ± {half:.{digits}f}" if n > 1 else m


# the names readers know the methods by (results.json and curves.csv keep the method keys)
LABELS = {"ppo": "PPO", "bon": "best-of-n", "gold-ppo": "gold-PPO (ceiling: PPO on the gold RM)",
          "big-rm": "big-RM (ceiling: proxy on 10x the pairs)", "uml": "RLP-UML",
          "spg": "RLP-SPG", "uml+spg": "RLP-UML+SPG", "oracle": "oracle", "control": "control",
          "uml-iter": "RLP-UML iterated", "spg-iter": "RLP-SPG iterated",
          "uml+spg-iter": "RLP-UML+SPG iterated", "oracle-iter": "oracle iterated",
          "control-iter": "control iterated", "ensemble-mean": "ensemble (mean)",
          "ensemble-min": "ensemble (min)", "metarm": "MetaRM",
          "vanilla-rounds": "MetaRM eta=0 (its control)"}


def method_of(name):
    """The method a policy name belongs to: 'metarm r2' -> 'metarm' (a name without a round is
    its method)."""
    return name.split(" r")[0]


def label(name):
    """A policy's name as report.md shows it: 'uml-iter r3' -> 'RLP-UML iterated r3'."""
    method = method_of(name)
    return LABELS.get(method, method) + name[len(method):]


def better(diffs):
    """Seeds better out of all, exact ties counted apart: '9/16', '9/16 (2 tied)'."""
    ties = sum(x == 0 for x in diffs)
    return f"{sum(x > 0 for x in diffs)}/{len(diffs)}" + (f" ({ties} tied)" if ties else "")


def paired_lines(per_seed, names, delta):
    """report.md's paired-difference section, each pre-registered contrast on each endpoint (mean
    difference with its paired 95% t-interval, seeds better, sign-flip p, Holm's p and the reading),
    and its claims section: what the readings say about each paper's claim."""
    # a run of rounds is its last round, whose curve holds all of them
    runs = {method_of(name): per_seed[name] for name in trajectories(names)}
    rows = paired_differences(runs, delta)
    most = max((len(r["diffs"]) for r in rows), default=0)
    test = ("exact: every sign pattern" if most <= EXACT_UP_TO else
            f"{DRAWS:,} random sign patterns beyond {EXACT_UP_TO} seeds, standard error "
            f"≤ {0.5 / math.sqrt(DRAWS):.4f}")
    lines = ["", "## Paired differences (pre-registered contrasts; docs/protocol.md)", "",
             "Per seed, the method's run minus its baseline's on the same seed (same SFT, proxy RM "
             "and evaluation prompts). KL-grid mean: mean gold at KL 1, 2, ..., K, K the "
             "largest integer KL both runs end at or above; split-half peak: the best evaluation "
             "on half the prompt keys, measured on the other half. Seeds better: differences "
             "> 0, exact ties counted apart. p: two-sided sign-flip test "
             f"({test}); Holm: adjusted "
             "over the contrasts x the two primary endpoints (gold at KL 2 is secondary, "
             "unadjusted). Reading (pre-registered): better or worse when Holm's p < 0.05, "
             f"equivalent when the 95% interval lies inside ±{delta:.2g} gold, else undecided.",
             "",
             "| contrast | endpoint | mean difference ± 95% CI | seeds better | p | p (Holm) "
             "| reading |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["diffs"]
        holm_p = f"{r['holm']:.3f}" if "holm" in r else "—"
        reading = r.get("reading", "—")
        if reading == "equivalent":
            reading += f" (±{delta:.2g})"
        lines.append(f"| {label(r['method'])} − {label(r['baseline'])} | {r['endpoint']} "
                     f"| {fmt(*mean_ci(d), len(d), signed=True)} "
                     f"| {better(d)} | {r['p']:.3f} | {holm_p} "
                     f"| {reading} |")
    found = claims(rows)
    if found:
        lines += ["", "## Claims (pre-registered reading; docs/protocol.md)", "",
                  "A paper's claim that its method helps reproduces when the method reads better "
                  "on at least one primary endpoint and worse on none, both against PPO and "
                  "against its matching control; it is contradicted when, against PPO or against "
                  "that control, it reads equivalent or worse on both; anything else this "
                  "testbed cannot decide at this many seeds. The numbers are in the table above.",
                  "",
                  "| method | matching control | claim |", "|---|---|---|"]
        lines += [f"| {label(m)} | {label(c)} | {reading} |" for m, c, reading in found]
    return lines


def bon_curve_lines(bon):
    """report.md's best-of-n section: its curve (proxy and gold at each n) over seeds."""
    lines = ["", "## Best-of-n against the proxy (KL = log n - (n-1)/n)", "",
             "| n | KL | proxy | gold |", "|---|---|---|---|"]
    for i, row in enumerate(next(iter(bon.values()))["curve"]):
        proxy, gold = ([b["curve"][i][k] for b in bon.values()] for k in ("proxy", "gold"))
        lines.append(f"| {row['n']} | {row['kl']:.2f} | {fmt(*mean_ci(proxy), len(bon))} | "
                     f"{fmt(*mean_ci(gold), len(bon))} |")
    return lines


def bon_lines(per_seed, names, bon):
    """report.md's RL-vs-best-of-n section: each trajectory's gold at best-of-n's KL for n >= 4,
    minus best-of-n's gold on the same seed (paired; Gao et al. find RL less KL-efficient)."""
    rows = next(iter(bon.values()))["curve"]
    ns = [i for i, row in enumerate(rows) if row["n"] >= 4]
    lines = ["", "## Each policy minus best-of-n at best-of-n's KL (paired over seeds)", "",
             "Gold interpolated along the run at KL(best-of-n) = log n - (n-1)/n, minus the "
             "best-of-n gold of the same seed: mean ± 95% CI (seeds better / seeds reaching "
             "that KL).", "",
             "| policy | " + " | ".join(f"n={rows[i]['n']} (KL {rows[i]['kl']:.2f})" for i in ns)
             + " |", "|---" * (len(ns) + 1) + "|"]

    def minus_bon(name, i):  # one difference per seed whose run reaches best-of-n's i-th KL
        d = []
        for s, summ in per_seed[name].items():
            gold = gold_at_kl(summ["curve"], bon[s]["curve"][i]["kl"]) if s in bon else None
            if gold is not None:
                d.append(gold - bon[s]["curve"][i]["gold"])
        return d

    for name in trajectories(names):
        cols = []
        for i in ns:
            d = minus_bon(name, i)
            cols.append(f"{fmt(*mean_ci(d), len(d), signed=True)} ({better(d)})" if d else "n/a")
        lines.append(f"| {label(name)} | " + " | ".join(cols) + " |")
    return lines


def policies(cell, method):
    """(name, PPO summary) of every policy a cell produced: one, or one per round
    (none if not run yet)."""
    if method == "bon" or not cell:
        return []
    if "rounds" not in cell:
        return [(method, cell)]
    out, curve = [], []
    # round r continues round r-1's policy, so its curve continues that line
    for r in cell["rounds"]:
        start = curve[-1]["iter"] if curve else 0
        curve = curve + [{**p, "iter": start + p["iter"]} for p in r["curve"]]
        out.append((f"{method} r{r['round']}", {**r, "curve": curve}))
    return out


def show(outcomes):
    """Win/tie/lose fractions (per seed) as 'w/t/l' percentages, averaged over seeds."""
    if not outcomes:
        return "n/a"
    return "/".join(f"{100 * sum(x[i] for x in outcomes) / len(outcomes):.0f}" for i in range(3))


def trajectories(names):
    """The policy names that end a trajectory: every name but a round that a later round continues
    ('metarm r1' when 'metarm r2' exists)."""
    last = {method_of(name): name for name in names}  # report order: rounds ascend
    return [name for name in names if last[method_of(name)] == name]


def agg(by_seed, get, n_seeds, digits=3):
    """'mean ± CI' of get(summary) over a policy's seeds, '(n=k)' when only k of n_seeds have it.
    get returns None for not measured, NaN for nothing to measure (e.g. RM accuracy when every
    pair of samples is a gold tie): both are left out."""
    vals = [v for v in map(get, by_seed.values()) if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    return (fmt(*mean_ci(vals), len(vals), digits)
            + (f" (n={len(vals)})" if len(vals) < n_seeds else ""))


def summary_lines(cfg, per_seed, names, n_seeds):
    """The title and the final/peak table, SFT first (vanilla PPO's iteration 0)."""
    distinct = [len(set(x["prompt_keys"])) for by_seed in per_seed.values()
                for x in by_seed.values() if x.get("prompt_keys")]
    keys = ""
    if distinct:
        lo, hi = min(distinct), max(distinct)
        span = f"{lo}" if lo == hi else f"{lo}–{hi}"
        keys = f" ({span} distinct prompt keys a seed: the prompts repeat)"
    lines = [f"# minirlhf reproduction report: `{cfg.task}`, {n_seeds} seed(s)", "",
             f"Mean ± 95% t-interval over seeds. Gold = the task's gold reward on "
             f"{cfg.eval_prompts} held-out prompts{keys}; win-rate vs SFT counts ties as half. "
             "'final' is the last PPO iteration, 'peak' the best-gold evaluation. Round r (of "
             "MetaRM or an iterated method) continues round r-1's policy: its curve and "
             "matched-KL gold cover rounds 1..r, its peak round r alone.", "",
             "## Gold win-rate vs SFT and gold reward", "",
             "| policy | win-rate vs SFT % (final) | gold (final) | gold (peak) | KL at peak "
             "| KL (final) |",
             "|---|---|---|---|---|---|"]
    rows = {name: per_seed[name] for name in names}
    sft = {s: summ["sft"] for s, summ in per_seed.get("ppo", {}).items()}
    if sft:
        rows = {"SFT": {s: {"final": h, "peak_gold": h} for s, h in sft.items()}, **rows}
    cols = [lambda x: 100 * x["final"]["eval/win_rate"], lambda x: x["final"]["eval/gold"],
            lambda x: x["peak_gold"]["eval/gold"], lambda x: x["peak_gold"]["eval/kl"],
            lambda x: x["final"]["eval/kl"]]
    for name, by_seed in rows.items():
        lines.append(f"| {label(name)} | " + " | ".join(
            agg(by_seed, c, n_seeds, 1 if i == 0 else 3) for i, c in enumerate(cols)) + " |")
    return lines


def win_tie_lose_lines(per_seed, names):
    lines = ["", "## Win / tie / lose (%) of each final policy vs SFT and vs vanilla PPO "
             "(per prompt, mean over seeds)", "", "| policy | vs SFT | vs vanilla PPO |",
             "|---|---|---|"]
    for name in names:
        vs_sft, vs_ppo = [], []
        for s, x in per_seed[name].items():
            f = x["final"]
            vs_sft.append((f["eval/win"], f["eval/tie"], f["eval/lose"]))
            if "ppo" in per_seed and s in per_seed["ppo"]:
                w = win_tie_lose(f["gold_per_prompt"],
                                 per_seed["ppo"][s]["final"]["gold_per_prompt"])
                vs_ppo.append((w["win"], w["tie"], w["lose"]))
        lines.append(f"| {label(name)} | {show(vs_sft)} | {show(vs_ppo)} |")
    return lines


def matched_kl_lines(per_seed, names, n_seeds):
    lines = ["", "## Gold at matched KL (interpolated along each run) ", "",
             "A run of rounds is one trajectory: its row is its last round, whose curve holds the "
             "earlier rounds (a row per round would repeat the first round's crossings).", "",
             "| policy | " + " | ".join(f"KL={k:g}" for k in MATCHED_KL) + " |",
             "|---" * (len(MATCHED_KL) + 1) + "|"]
    for name in trajectories(names):
        lines.append(f"| {label(name)} | " + " | ".join(
            agg(per_seed[name], lambda x, k=k: gold_at_kl(x["curve"], k), n_seeds)
            for k in MATCHED_KL) + " |")
    return lines


def diagnostics_lines(per_seed, names, n_seeds):
    lines = ["", "## Diagnostics", "",
             "Like for like: 'held-out SFT pairs' are the same gold-labelled pairs for every RM; "
             "'vanilla-PPO pairs' are the same gold-labelled pairs of vanilla PPO's samples for "
             "the proxy (before) and each one-shot RLP round's RM (after). The other columns are "
             "measured on each policy's own final samples, against the RM it was trained on "
             "(n/a for ensembles), so they differ in the samples as much as in the RM.", "",
             "| policy | RM acc held-out SFT pairs | RM acc vanilla-PPO pairs, before → after "
             "| RM acc own pairs | proxy-gold corr | reward-diff std | SPG acceptance "
             "| SPG gold agreement |",
             "|---|---|---|---|---|---|---|---|"]

    def on_ppo_pairs(when):  # only the one-shot RLP rounds measure an RM on vanilla PPO's pairs
        return lambda x: (x[when].get("rm_acc_policy_pairs") if "rm_before" in x else None)
    cols = [lambda x: x["final"]["eval/rm_acc_policy_pairs"],
            lambda x: x["final"]["eval/proxy_gold_corr"],
            lambda x: x["final"]["eval/proxy_diff_std"], lambda x: x.get("spg/acceptance"),
            lambda x: x.get("spg/gold_agreement")]
    for name in names:
        by_seed = per_seed[name]
        before = agg(by_seed, on_ppo_pairs("rm_before"), n_seeds)
        after = agg(by_seed, on_ppo_pairs("rm_after"), n_seeds)
        cells = [agg(by_seed, lambda x: x.get("rm_after", x).get("held_out_acc_gold"), n_seeds),
                 "n/a" if after == "n/a" else f"{before} → {after}",
                 *(agg(by_seed, c, n_seeds) for c in cols)]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    return lines


def short_runs_of_rounds(task, seeds, methods, cell):
    """Refuse a run of rounds with fewer rounds than the same method's other seeds: it would drop
    out of every contrast unseen (a contrast pairs each run's last round)."""
    for m in methods:
        rounds = {s: len(cell[(s, m)]["rounds"]) for s in seeds
                  if cell[(s, m)] and "rounds" in cell[(s, m)]}
        most = max(rounds.values(), default=0)
        for s, n in rounds.items():
            if n < most:
                raise ValueError(f"results.json cell {task}/{s}/{m}: {n} rounds where other seeds "
                                 f"have {most}: rerun it (a run cut short is not left out of the "
                                 "contrasts silently)")


def write_report(cfg, results, methods):
    """out_dir/<task>/report.md and curves.csv (and curves.png) from results.json's
    cells of `methods`."""
    seeds = sorted({k.split("/")[1] for k in results if k.startswith(cfg.task + "/")})
    cell = {(s, m): results.get(f"{cfg.task}/{s}/{m}") for s in seeds for m in methods}
    names = []  # every policy name in report order, and its summaries per seed
    per_seed = {}
    for m in methods:
        for s in seeds:
            for name, summ in policies(cell[(s, m)], m):
                if name not in per_seed:
                    names.append(name)
                per_seed.setdefault(name, {})[s] = summ
    short_runs_of_rounds(cfg.task, seeds, methods, cell)
    for (s, m), c in cell.items():
        if any("prompt_keys" not in summ for _, summ in policies(c, m)):
            raise ValueError(f"results.json cell {cfg.task}/{s}/{m}: no prompt_keys (a cell from "
                             "before measurement v3): commit f1b2926 rebuilds its report "
                             "(docs/protocol.md)")
    bon = {s: cell[(s, "bon")] for s in seeds if cell[(s, "bon")]}
    lines = (summary_lines(cfg, per_seed, names, len(seeds))
             + (bon_curve_lines(bon) + bon_lines(per_seed, names, bon) if bon else [])
             + win_tie_lose_lines(per_seed, names)
             + matched_kl_lines(per_seed, names, len(seeds))
             + paired_lines(per_seed, names, SMALLEST_EFFECT[cfg.task])
             + diagnostics_lines(per_seed, names, len(seeds)))
    # results.json alone regenerates the report
    os.makedirs(os.path.join(cfg.out_dir, cfg.task), exist_ok=True)
    with open(os.path.join(cfg.out_dir, cfg.task, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_curves(cfg, seeds, per_seed, names, bon)


def write_curves(cfg, seeds, per_seed, names, bon):
    """curves.csv (always) and curves.png (with matplotlib): gold and proxy vs sqrt(KL)
    per method, and BoN."""
    rows = [{"method": name, "seed": s, "iter": p["iter"], "kl": p["eval/kl"],
             "sqrt_kl": math.sqrt(max(0.0, p["eval/kl"])), "proxy": p["eval/proxy"],
             "gold": p["eval/gold"]}
            for name in names for s, x in per_seed[name].items() for p in x["curve"]]
    rows += [{"method": "best-of-n", "seed": s, "iter": r["n"], "kl": r["kl"],
              "sqrt_kl": math.sqrt(r["kl"]), "proxy": r["proxy"], "gold": r["gold"]}
             for s, b in bon.items() for r in b["curve"]]
    path = os.path.join(cfg.out_dir, cfg.task, "curves.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "iter", "kl", "sqrt_kl", "proxy",
                                          "gold"])
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
    # One line per method: the pointwise mean over seeds (every seed evaluates at the
    # same iterations). A run of rounds is drawn once, as its last round, whose curve holds the
    # earlier rounds. Top row: the one-shot refinements and the ensembles; bottom row: the
    # iterated ones and MetaRM. Vanilla PPO (red), the ceilings (black, dotted) and best-of-n
    # (dashed) are on both.
    methods = list({method_of(name): name for name in names}.values())
    iterated = ("-iter", "metarm", "vanilla-rounds")
    shared = [m for m in methods if m in ("ppo", "gold-ppo", "big-rm")] + ["best-of-n"]
    rows_of_methods = [[m for m in methods if m not in shared and not any(
                            k in m for k in iterated)],
                       [m for m in methods if any(k in m for k in iterated)]]
    ceiling_style = {"gold-ppo": dict(color="black", ls=":"), "big-rm": dict(color="grey", ls=":"),
                     "best-of-n": dict(color="black", ls="--"), "ppo": dict(color="tab:red")}
    palette = [plt.get_cmap("tab10")(i) for i in range(10) if i != 3]  # 3 is PPO's red
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    for row, family in enumerate(rows_of_methods):
        for c, method in enumerate(family + shared):
            runs = [pts for (m, _), pts in by_run.items() if m == method]
            if not runs:
                continue
            mean = [{k: sum(run[i][k] for run in runs) / len(runs)
                     for k in ("sqrt_kl", "gold", "proxy")}
                    for i in range(min(map(len, runs)))]
            base = method_of(method)  # a run of rounds is named by its method alone
            style = ceiling_style.get(base, dict(color=palette[c % len(palette)], ls="-"))
            for ax, key in zip(axes[row], ("gold", "proxy")):
                ax.plot([p["sqrt_kl"] for p in mean], [p[key] for p in mean], marker=".",
                        lw=1.5, label=label(base), **style)
        for ax, key in zip(axes[row], ("gold reward", "proxy reward")):
            ax.set_ylabel(f"{key} (mean over {len(seeds)} seeds)")
        axes[row][0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("sqrt(KL to SFT)")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, cfg.task, "curves.png"), dpi=120)
