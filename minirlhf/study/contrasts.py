"""The pre-registered analysis (ALGORITHMS.md §4.3): each run's primary endpoints, the
paired contrasts between methods with Holm's adjustment, how each contrast reads, and what that
says about each paper's claim. report.py formats the result."""
import zlib

from .stats import holm, mean_ci, sign_flip_p


def gold_at_kl(history, target_kl):
    """Gold interpolated linearly at the first point where the evaluated KL reaches `target_kl`
    (evaluations in iteration order); None if the run never got that far from SFT."""
    for a, b in zip(history, history[1:]):
        if a["eval/kl"] <= target_kl <= b["eval/kl"]:
            w = (0.0 if b["eval/kl"] == a["eval/kl"]
                 else (target_kl - a["eval/kl"]) / (b["eval/kl"] - a["eval/kl"]))
            return a["eval/gold"] + w * (b["eval/gold"] - a["eval/gold"])
    return None


def kl_grid_mean(curve, K):
    """Primary endpoint 1: the mean of gold over the KL grid 1, 2, ..., K, interpolated along the
    run (None if the run does not reach K)."""
    golds = [gold_at_kl(curve, k) for k in range(1, K + 1)]
    return None if K < 1 or None in golds else sum(golds) / K


def key_halves(keys):
    """The split-half peak's halves (pre-registered for v3, docs/protocol.md): the distinct prompt
    keys ranked by a stable hash go to halves 0 and 1 in turn, and every prompt to its key's half,
    so that no prompt (nor a reordering of it) is in both. Returns each prompt's half."""
    ranked = sorted(set(keys), key=lambda k: (zlib.crc32(k.encode()), k))
    half = {k: i % 2 for i, k in enumerate(ranked)}
    return [half[k] for k in keys]


def split_half_peak(run):
    """Primary endpoint 2: the evaluation of a run (a summary: its curve and its evaluation
    prompts' keys) with the best gold on half 0 of the prompt keys, reported on half 1, so that
    the peak is not chosen on the prompts that measure it (None without per-prompt gold, or
    with fewer than two keys)."""
    points = [p for p in run["curve"] if p.get("gold_per_prompt")]
    keys = run.get("prompt_keys") or []
    if not points or len(set(keys)) < 2:
        return None
    halves = key_halves(keys)

    def half(point, h):
        gold = [g for g, x in zip(point["gold_per_prompt"], halves) if x == h]
        return sum(gold) / len(gold)
    return half(max(points, key=lambda p: half(p, 0)), 1)


def grid_end(a, b):
    """K of the KL grid (pre-registered for v3, docs/protocol.md): the largest integer KL that
    both runs' curves end at or above, so that one evaluation's spike does not set it (v2 took
    the largest KL both runs ever reached)."""
    return int(min(a[-1]["eval/kl"], b[-1]["eval/kl"]))


def endpoints(a, b):
    """Two runs' endpoints on a common footing (a run: its summary, with its curve and prompt
    keys): (KL-grid mean up to grid_end, split-half peak, gold at KL 2), as (a's, b's) pairs;
    None where not measurable."""
    K = grid_end(a["curve"], b["curve"])
    return {"KL-grid mean": (kl_grid_mean(a["curve"], K), kl_grid_mean(b["curve"], K)),
            "split-half peak": (split_half_peak(a), split_half_peak(b)),
            "gold at KL 2": (gold_at_kl(a["curve"], 2.0), gold_at_kl(b["curve"], 2.0))}


# The pre-registered contrasts (ALGORITHMS.md §4.3): (method, baseline). Every method against
# vanilla PPO and against its matching control: the one-shot RLP rounds against `control`, the
# iterated ones against `control-iter`, MetaRM against its eta = 0 rounds. (The iterated RLP
# methods' rows were added before any result of the 16-seed run was read: docs/protocol.md.)
CONTRASTS = (("oracle-iter", "control-iter"), ("gold-ppo", "ppo"), ("big-rm", "ppo"),
             ("uml", "ppo"), ("spg", "ppo"), ("uml+spg", "ppo"), ("oracle", "ppo"),
             ("ensemble-mean", "ppo"), ("ensemble-min", "ppo"), ("metarm", "ppo"),
             ("uml", "control"), ("spg", "control"), ("uml+spg", "control"), ("oracle", "control"),
             ("metarm", "vanilla-rounds"),
             ("uml-iter", "ppo"), ("spg-iter", "ppo"), ("uml+spg-iter", "ppo"),
             ("oracle-iter", "ppo"),
             ("uml-iter", "control-iter"), ("spg-iter", "control-iter"),
             ("uml+spg-iter", "control-iter"))

# The smallest difference in gold worth calling an effect, a third of the gate's bar for what
# perfect on-policy labels must buy (ALGORITHMS.md §4.3). Pre-registered before any result of the
# 16-seed run was read.
SMALLEST_EFFECT = {"reviews": 0.1, "arith": 0.05 / 3}


def verdict(diffs, holm_p, delta):
    """The pre-registered reading of one contrast on one primary endpoint: 'better' or 'worse'
    when the Holm-adjusted p is below 0.05, 'equivalent' when the paired 95% interval lies inside
    (-delta, delta), else 'undecided' (as with one seed: no interval)."""
    mean, half = mean_ci(diffs)
    if holm_p < 0.05:
        return "better" if mean > 0 else "worse"
    if len(diffs) > 1 and -delta < mean - half and mean + half < delta:
        return "equivalent"
    return "undecided"


PRIMARY = ("KL-grid mean", "split-half peak")


def paired_differences(runs, delta):
    """Every pre-registered contrast whose two methods ran: `runs` maps a method to its run's
    summary per seed ({seed: summary}, a run of rounds joined). One row per contrast and endpoint
    (primary ones first in each contrast, then gold at KL 2): dict(method, baseline, endpoint,
    diffs over common seeds, p, and for the primary endpoints the Holm-adjusted p over contrasts
    x primary endpoints and the reading)."""
    rows = []
    for a, b in CONTRASTS:
        if a not in runs or b not in runs:
            continue
        diffs = {}
        for s in sorted(set(runs[a]) & set(runs[b])):
            for endpoint, (x, y) in endpoints(runs[a][s], runs[b][s]).items():
                if x is not None and y is not None:
                    diffs.setdefault(endpoint, []).append(x - y)
        for endpoint in PRIMARY + ("gold at KL 2",):
            if diffs.get(endpoint):
                rows.append(dict(method=a, baseline=b, endpoint=endpoint, diffs=diffs[endpoint],
                                 p=sign_flip_p(diffs[endpoint])))
    primary = [r for r in rows if r["endpoint"] in PRIMARY]
    for r, p in zip(primary, holm([r["p"] for r in primary])):
        r["holm"], r["reading"] = p, verdict(r["diffs"], p, delta)
    return rows


# Each paper's claim that its method beats vanilla PPO, and the matching control that does the
# same RM training without what the method adds. RLP's Algorithm 1 is one-shot; the iterated mode
# is this testbed's extension of the same claim (ALGORITHMS.md §4.3).
CLAIMS = (("uml", "control"), ("spg", "control"), ("uml+spg", "control"),
          ("uml-iter", "control-iter"), ("spg-iter", "control-iter"),
          ("uml+spg-iter", "control-iter"), ("metarm", "vanilla-rounds"))


def claim_reading(vs_ppo, vs_control):
    """The pre-registered reading of a claim from its two contrasts' readings ({endpoint:
    reading}): it reproduces when the method is better on at least one primary endpoint and worse
    on none, against PPO and against its control; it is contradicted when against either it is
    equivalent or worse on both; anything else the testbed cannot decide."""
    words = [set(readings.values()) for readings in (vs_ppo, vs_control)]
    if all("better" in w and "worse" not in w for w in words):
        return "reproduces"
    if any(len(r) == len(PRIMARY) and w <= {"equivalent", "worse"}
           for w, r in zip(words, (vs_ppo, vs_control))):
        return "contradicted"
    return "cannot decide"


def claims(rows):
    """(method, control, reading) for every claim whose method, PPO and control all ran."""
    readings = {}
    for r in rows:
        if "reading" in r:
            readings.setdefault((r["method"], r["baseline"]), {})[r["endpoint"]] = r["reading"]
    return [(m, c, claim_reading(readings[(m, "ppo")], readings[(m, c)]))
            for m, c in CLAIMS if (m, "ppo") in readings and (m, c) in readings]
