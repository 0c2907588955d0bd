"""The v3 analysis definitions applied to the committed v2 results (results/results.json):
which numbers and readings each definition moves. One-off, for docs/protocol.md."""
import collections, json, os, random, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minirlhf.data.tasks import get_task
from minirlhf.study import contrasts as C, stats as S
from minirlhf.study.report import policies, trajectories, method_of

# a v2 results.json: the report's (default) or the v2 pilot's (results/pilot/results.json)
R = json.load(open(sys.argv[1] if len(sys.argv) > 1 else
                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")))
T95_V2 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
          10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
def t95_v2(df):
    if df >= 30: return 1.96 if df > 120 else T95_V2[30]
    return T95_V2[max(k for k in T95_V2 if k <= df)]

def v2_keys(task, seed):  # v2's evaluation prompts: random.Random(seed + PPO_EVAL = 2), 512, "eval"
    t = get_task(task)
    ps = t.sample_prompts(512, random.Random(seed + 2), "eval")
    return ps, [t.prompt_key(p) for p in ps]

def index_split_peak(run):
    pts = [p for p in run["curve"] if p.get("gold_per_prompt")]
    half = lambda p, k: sum(p["gold_per_prompt"][k::2]) / len(p["gold_per_prompt"][k::2])
    return half(max(pts, key=lambda p: half(p, 0)), 1)

def v2_K(a, b):
    return int(min(max(p["eval/kl"] for p in a), max(p["eval/kl"] for p in b)))

def ci(d, t):
    n = len(d); m = sum(d) / n
    sd = (sum((x - m) ** 2 for x in d) / (n - 1)) ** 0.5
    return m, t(n - 1) * sd / n ** 0.5

def analyse(task, K_rule, split_rule, t_rule):
    seeds = sorted({k.split("/")[1] for k in R if k.startswith(task + "/")}, key=lambda s: int(s[4:]))
    runs = {}
    for key, cell in R.items():
        t, s, m = key.split("/")
        if t != task: continue
        pol = policies(cell, m)
        if pol:
            run = dict(pol[-1][1]); run["prompt_keys"] = v2_keys(task, int(s[4:]))[1]
            runs.setdefault(m, {})[s] = run
    rows = []
    for a, b in C.CONTRASTS:
        if a not in runs or b not in runs: continue
        diffs = collections.defaultdict(list); Ks = []
        for s in seeds:
            if s not in runs[a] or s not in runs[b]: continue
            ra, rb = runs[a][s], runs[b][s]
            K = K_rule(ra["curve"], rb["curve"]); Ks.append((s, K))
            x, y = C.kl_grid_mean(ra["curve"], K), C.kl_grid_mean(rb["curve"], K)
            if x is not None and y is not None: diffs["KL-grid mean"].append(x - y)
            x, y = split_rule(ra), split_rule(rb)
            diffs["split-half peak"].append(x - y)
        for e in C.PRIMARY:
            rows.append(dict(method=a, baseline=b, endpoint=e, diffs=diffs[e], p=S.sign_flip_p(diffs[e]), Ks=Ks))
    for r, p in zip(rows, S.holm([r["p"] for r in rows])):
        m, h = ci(r["diffs"], t_rule)
        r["holm"], r["mean"], r["half"] = p, m, h
        delta = C.SMALLEST_EFFECT[task]
        r["reading"] = ("better" if m > 0 else "worse") if p < 0.05 else (
            "equivalent" if -delta < m - h and m + h < delta else "undecided")
    return rows

v2k = lambda a, b: v2_K(a, b)
v3k = lambda a, b: C.grid_end(a, b)
idx = index_split_peak
key = C.split_half_peak
for task in ("reviews", "arith"):
    print(f"\n===== {task}")
    # distinct prompts
    present = sorted({int(k.split("/")[1][4:]) for k in R if k.startswith(task + "/")})
    dist = [(len(set(v2_keys(task, s)[0])), len(set(v2_keys(task, s)[1]))) for s in present]
    print("distinct eval prompt strings / keys per seed: strings %d-%d, keys %d-%d" % (
        min(d[0] for d in dist), max(d[0] for d in dist), min(d[1] for d in dist), max(d[1] for d in dist)))
    variants = {"v2": (v2k, idx, t95_v2), "t exact": (v2k, idx, S.t95), "K robust": (v3k, idx, t95_v2),
                "split by key": (v2k, key, t95_v2), "v3 (all)": (v3k, key, S.t95)}
    res = {name: analyse(task, *v) for name, v in variants.items()}
    base = res["v2"]
    n_ties = sum(1 for r in base if any(x == 0 for x in r["diffs"]))
    print("primary rows with exact ties:", n_ties, "of", len(base),
          "; tied diffs in all:", sum(sum(x == 0 for x in r["diffs"]) for r in base))
    kchg = sum(1 for r in base if r["endpoint"] == "KL-grid mean" for (s, K), (_, K3) in
               zip(r["Ks"], next(x for x in res["K robust"] if x["method"] == r["method"] and x["baseline"] == r["baseline"] and x["endpoint"] == r["endpoint"])["Ks"]) if K != K3)
    npairs = sum(len(r["Ks"]) for r in base if r["endpoint"] == "KL-grid mean")
    print(f"(contrast, seed) pairs whose K changes: {kchg} of {npairs}")
    for name, rows in res.items():
        if name == "v2": continue
        moved = [(b["method"], b["baseline"], b["endpoint"], b["reading"], r["reading"]) for b, r in zip(base, rows) if b["reading"] != r["reading"]]
        maxdm = max(abs(b["mean"] - r["mean"]) for b, r in zip(base, rows))
        maxdh = max(abs(b["half"] - r["half"]) for b, r in zip(base, rows))
        print(f"-- {name}: readings moved {len(moved)}; max |Δmean| {maxdm:.3f}, max |Δhalf-width| {maxdh:.3f}")
        for m in moved: print("   ", m)
    for name in ("v2", "v3 (all)"):
        print(f"-- {name} gate/headline rows:")
        for r in res[name]:
            if (r["method"], r["baseline"]) in (("oracle-iter", "control-iter"), ("gold-ppo", "ppo"), ("uml", "control"), ("metarm", "vanilla-rounds")):
                d = r["diffs"]
                print(f"   {r['method']} − {r['baseline']} | {r['endpoint']} | {r['mean']:+.3f} ± {r['half']:.3f} | {sum(x>0 for x in d)}/{len(d)} ({sum(x==0 for x in d)} tied) | p {r['p']:.4f} | holm {r['holm']:.3f} | {r['reading']}")
    # claims
    for name in ("v2", "v3 (all)"):
        rd = {}
        for r in res[name]: rd.setdefault((r["method"], r["baseline"]), {})[r["endpoint"]] = r["reading"]
        cl = [(m, c, C.claim_reading(rd[(m, "ppo")], rd[(m, c)])) for m, c in C.CLAIMS if (m, "ppo") in rd and (m, c) in rd]
        print(f"-- {name} claims:", collections.Counter(x[2] for x in cl))
