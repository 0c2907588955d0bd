"""KL spikes (an evaluation > 3 nats above both neighbouring evaluations, a run of rounds joined)
and the KL jump at each round start, in a results.json; for docs/protocol.md.

    python results/spikes.py results/pilot/results.json ppo,control-iter,oracle-iter,gold-ppo 102,103,104,106,107,108
"""
import json, os, statistics, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minirlhf.study.report import policies
path, methods = sys.argv[1], sys.argv[2].split(",")
SEEDS = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else range(102, 110)
R = json.load(open(path))
for task in ("reviews", "arith"):
    for m in methods:
        runs = spikes = at_start = 0; jumps = []
        for key, cell in sorted(R.items()):
            t, s, mm = key.split("/")
            if t != task or mm != m or not cell: continue
            seed = int(s[4:])
            if seed not in SEEDS: continue
            runs += 1
            if "rounds" in cell:
                starts, n = set(), 0
                for r in cell["rounds"][:-1]:
                    n += len(r["curve"]); starts.add(n)  # index of the next round's first evaluation
                curve = policies(cell, m)[-1][1]["curve"]
                for r_prev, r in zip(cell["rounds"], cell["rounds"][1:]):
                    jumps.append(r["curve"][0]["eval/kl"] - r_prev["curve"][-1]["eval/kl"])
            else:
                starts, curve = set(), cell["curve"]
            kl = [p["eval/kl"] for p in curve]
            for i in range(1, len(kl) - 1):
                if kl[i] > kl[i - 1] + 3 and kl[i] > kl[i + 1] + 3:
                    spikes += 1; at_start += i in starts
        j = (f", round-start jump mean {statistics.mean(jumps):+.2f} (max {max(jumps):+.2f}, n={len(jumps)})" if jumps else "")
        print(f"{task:8s} {m:13s} runs {runs:2d}: spikes {spikes} ({at_start} at a round's first evaluation){j}")
