import json
import math
import os
import subprocess
import sys

import pytest

from minirlhf.study.contrasts import gold_at_kl
from minirlhf.study.report import fmt
from minirlhf.study.stats import mean_ci, t95

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mean_ci_by_hand():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert math.isclose(half, 2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel_tol=1e-7)  # t(0.975, df=4)
    assert mean_ci([7.0]) == (7.0, 0.0)
    # the exact quantiles (v2 took the nearest tabulated df at or below: 2.228 for df 14)
    for df, t in ((1, 12.7062047), (2, 4.3026527), (7, 2.3646243), (14, 2.1447867), (29, 2.0452296),
                  (200, 1.9718962)):
        assert t95(df) == pytest.approx(t, abs=1e-6)
    assert fmt(1.0, 0.5, 3) == "1.000 ± 0.500" and fmt(1.0, 0.0, 1) == "1.000"
    assert fmt(0.25, 0.5, 3, signed=True) == "+0.250 ± 0.500" and fmt(-0.25, 0.0, 1, signed=True) == "-0.250"


def test_gold_at_matched_kl_interpolates_first_crossing():
    curve = [{"eval/kl": 0.0, "eval/gold": 1.0}, {"eval/kl": 2.0, "eval/gold": 3.0},
             {"eval/kl": 1.0, "eval/gold": 0.0}, {"eval/kl": 4.0, "eval/gold": -1.0}]
    assert gold_at_kl(curve, 1.0) == pytest.approx(2.0)  # between the first two evaluations
    assert gold_at_kl(curve, 3.0) == pytest.approx(-2 / 3)  # the 1.0 -> 4.0 segment: 0 + (2/3) * (-1)
    assert gold_at_kl(curve, 9.0) is None


def test_experiments_smoke_writes_every_file(tmp_path):
    from minirlhf.plumbing.config import parse_args
    from minirlhf.study.cells import METHODS, run_report
    from minirlhf.study.config import ReportConfig
    out = tmp_path / "rep"
    cfg = parse_args(["--preset=smoke", "--seeds=1", f"--out_dir={out}", "--rounds=1", "--iters=2", "--bon_max=2",
                      "--rm_pairs=48", "--eval_prompts=8"], ReportConfig)
    results = run_report(cfg)
    assert set(k.split("/")[-1] for k in results) == set(METHODS)
    for name in ("results.json", "reviews/report.md", "reviews/curves.csv"):
        assert os.path.getsize(out / name) > 0
    report = (out / "reviews" / "report.md").read_text()
    for section in ("win-rate vs SFT", "Best-of-n", "vs vanilla PPO", "matched KL", "Diagnostics", "MetaRM r1",
                    "Paired differences", "| oracle iterated − control iterated | split-half peak |",
                    "| RLP-UML | control | cannot decide |"):
        assert section in report
    with open(out / "results.json") as f:
        assert json.load(f) == results
    again = run_report(cfg)  # resumes: every cell is already there, nothing reruns
    assert again == results
    same = ["--preset=smoke", "--seeds=1", f"--out_dir={out}", "--rounds=1", "--iters=2", "--bon_max=2",
            "--rm_pairs=48", "--eval_prompts=8"]
    cli = subprocess.run([sys.executable, "experiments.py", *same], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0 and "wrote" in cli.stdout, cli.stderr  # the report rebuilt, from the cells alone
    with open(out / "results.json") as f:
        assert json.load(f) == results
    # finished cells are reused by key alone: adding cells under other settings is refused before any work
    cli = subprocess.run([sys.executable, "experiments.py", *same, "--iters=3", "--seeds=2"], cwd=ROOT,
                         capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [
        f"error: {out / 'reviews' / 'settings.json'} was made with --iters=2, this run asks for --iters=3: use "
        "another --out_dir, or --reuse=True to use it anyway"], cli.stderr
    assert not (out / "reviews" / "seed1").exists()


def test_verdict_reads_a_contrast_by_the_pre_registered_rule():
    from minirlhf.study.contrasts import verdict
    assert verdict([0.5, 0.6, 0.4, 0.5], 0.01, delta=0.1) == "better"
    assert verdict([-0.5, -0.6, -0.4, -0.5], 0.01, delta=0.1) == "worse"
    # not significant, interval inside +-delta: a difference too small to matter
    assert verdict([0.01, -0.01, 0.02, 0.0], 0.5, delta=0.1).startswith("equivalent")
    # not significant, interval reaching past delta: the seeds cannot tell
    assert verdict([0.3, -0.2, 0.25, -0.1], 0.5, delta=0.1) == "undecided"
    assert verdict([0.01], 1.0, delta=0.1) == "undecided"  # one seed has no interval


def test_a_claim_reads_by_the_pre_registered_rule():
    from minirlhf.study.contrasts import claim_reading
    better, worse, same, unsure = "better", "worse", "equivalent", "undecided"
    both = lambda a, b: {"KL-grid mean": a, "split-half peak": b}
    assert claim_reading(both(better, unsure), both(unsure, better)) == "reproduces"
    # better than PPO is not enough: the control, doing the same RM training, must be beaten too
    assert claim_reading(both(better, better), both(unsure, unsure)) == "cannot decide"
    assert claim_reading(both(better, worse), both(better, better)) == "cannot decide"
    assert claim_reading(both(better, better), both(same, worse)) == "contradicted"
    assert claim_reading(both(same, same), both(better, better)) == "contradicted"
    assert claim_reading(both(same, unsure), both(same, unsure)) == "cannot decide"
    assert claim_reading({"KL-grid mean": same}, both(unsure, unsure)) == "cannot decide"


def test_claims_come_from_the_paired_contrasts():
    from minirlhf.study.contrasts import claims, paired_differences
    def run(gold):  # a run whose gold is `gold` all along its way to KL 3
        return {"curve": [{"eval/kl": float(k), "eval/gold": gold, "gold_per_prompt": [gold] * 4}
                          for k in range(4)], "prompt_keys": ["a", "b", "c", "d"]}
    seeds = [f"seed{i}" for i in range(10)]
    curves = {m: {s: run(g + 0.01 * i) for i, s in enumerate(seeds)}
              for m, g in (("ppo", 1.0), ("control", 1.0), ("uml", 2.0), ("spg", 1.0))}
    rows = paired_differences(curves, delta=0.1)
    assert {(r["method"], r["baseline"]) for r in rows} == {(m, b) for m in ("uml", "spg") for b in ("ppo", "control")}
    # UML ahead on all 10 seeds: p = 2/1024 in each of the 4 of 8 primary tests, Holm's x 8 at most
    uml = [r for r in rows if r["method"] == "uml" and "holm" in r]
    assert len(uml) == 4 and all(r["holm"] == pytest.approx(16 / 1024) for r in uml)
    assert claims(rows) == [("uml", "control", "reproduces"), ("spg", "control", "contradicted")]
    from minirlhf.study.report import paired_lines
    text = "\n".join(paired_lines(curves, list(curves), 0.1))
    assert ("| RLP-SPG − control | KL-grid mean | +0.000 ± 0.000 | 0/10 (10 tied) | 1.000 | 1.000 "
            "| equivalent (±0.1) |") in text
    assert "| RLP-SPG | control | contradicted |" in text
    curves["uml"]["seed0"] = run(0.0)  # one seed behind: the interval still excludes 0, Holm's p does not
    assert claims(paired_differences(curves, delta=0.1))[0] == ("uml", "control", "cannot decide")
    assert claims(paired_differences({m: c for m, c in curves.items() if m != "control"}, 0.1)) == []


def test_results_merge_cells_of_processes_that_split_the_seeds(tmp_path):
    from minirlhf.study.cells import load_results
    (tmp_path / "cells").mkdir()
    (tmp_path / "results.json").write_text(json.dumps({"reviews/seed0/ppo": {"x": 1}}))
    cell = {"reviews/seed3/ppo": {"x": 2, "curve": [{"gold": 1.5499999999999998, "kl": 1234567.89}]}}
    (tmp_path / "cells" / "reviews-seed3-ppo.json").write_text(json.dumps(cell))
    (tmp_path / "cells" / "reviews-seed4-ppo.json.abc.tmp").write_text("{trunc")  # another process mid-write
    merged = load_results(str(tmp_path))
    # floats kept to 6 significant digits, in the file and in what the report reads
    assert merged == {"reviews/seed0/ppo": {"x": 1},
                      "reviews/seed3/ppo": {"x": 2, "curve": [{"gold": 1.55, "kl": 1234570.0}]}}
    text = (tmp_path / "results.json").read_text()
    assert json.loads(text) == merged and "\n" not in text


def test_metarm_round_curves_continue_the_previous_round():
    from minirlhf.study.report import policies
    point = lambda it, kl: {"iter": it, "eval/kl": kl}
    cell = {"rounds": [{"round": 1, "curve": [point(0, 0.0), point(20, 3.0)]},
                       {"round": 2, "curve": [point(0, 3.1), point(20, 6.0)]}]}
    (n1, r1), (n2, r2) = policies(cell, "metarm")
    assert (n1, n2) == ("metarm r1", "metarm r2")
    assert [p["iter"] for p in r1["curve"]] == [0, 20]
    assert [(p["iter"], p["eval/kl"]) for p in r2["curve"]] == [(0, 0.0), (20, 3.0), (20, 3.1), (40, 6.0)]
    assert cell["rounds"][1]["curve"][0]["iter"] == 0  # results are not modified


def test_primary_endpoints_and_the_paired_analysis():
    from minirlhf.study.contrasts import endpoints, kl_grid_mean, split_half_peak
    from minirlhf.study.stats import holm, sign_flip_p
    curve = [{"eval/kl": 0.0, "eval/gold": 1.0, "gold_per_prompt": [1.0, 1.0, 1.0, 1.0]},
             {"eval/kl": 2.0, "eval/gold": 3.0, "gold_per_prompt": [5.0, 1.0, 5.0, 1.0]},
             {"eval/kl": 4.0, "eval/gold": 2.0, "gold_per_prompt": [1.0, 3.0, 1.0, 3.0]}]
    assert kl_grid_mean(curve, 4) == pytest.approx((2.0 + 3.0 + 2.5 + 2.0) / 4)
    assert kl_grid_mean(curve, 5) is None  # the run never reaches KL 5
    # chosen on one half of the prompt keys, measured on the other: the same-prompt peak (3.0)
    # would be biased upward
    assert split_half_peak({"curve": curve, "prompt_keys": ["x", "y", "x", "y"]}) == 1.0
    assert split_half_peak({"curve": curve, "prompt_keys": ["x"] * 4}) is None  # one key: no halves
    short = curve[:2]
    assert endpoints({"curve": curve}, {"curve": short})["KL-grid mean"] == (
        kl_grid_mean(curve, 2), kl_grid_mean(short, 2))
    assert sign_flip_p([1.0, 2.0, 3.0]) == 2 / 8  # only all-plus and all-minus are as extreme
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_the_split_half_peak_holds_out_prompt_keys_not_only_samples():
    from minirlhf.study.contrasts import key_halves, split_half_peak
    keys = ["a", "a", "b", "b", "c", "c", "d", "d"]  # each prompt asked twice, side by side
    halves = key_halves(keys)
    assert all(halves[i] == halves[i + 1] for i in range(0, 8, 2)) and sorted(halves) == [0] * 4 + [1] * 4
    # evaluation 1 is lucky on the first copy of every prompt, evaluation 2 better on every prompt
    # of half 1: the peak chosen on half 0 is evaluation 1, measured on half 1's other prompts
    lucky = [{"eval/kl": 1.0, "eval/gold": 0.0, "gold_per_prompt": [1.0, 0.0] * 4},
             {"eval/kl": 2.0, "eval/gold": 0.0, "gold_per_prompt": [0.5 * h for h in halves]}]
    assert split_half_peak({"curve": lucky, "prompt_keys": keys}) == 0.5
    # (split by index, half 0 would hold one copy of each prompt and half 1 the other)


def test_the_kl_grid_ends_where_both_runs_end_not_at_a_spike():
    from minirlhf.study.contrasts import endpoints, kl_grid_mean
    point = lambda kl: {"eval/kl": kl, "eval/gold": kl}
    spiky, steady = [point(0.0), point(1.0), point(9.0), point(2.5)], [point(0.0), point(5.0)]
    # v2's K = int(min(9.0, 5.0)) = 5, which the spiky run only passed in its spike
    assert endpoints({"curve": spiky}, {"curve": steady})["KL-grid mean"] == (
        kl_grid_mean(spiky, 2), kl_grid_mean(steady, 2))


def test_sign_flip_is_exact_up_to_40_seeds_and_sampled_beyond():
    import itertools
    import random

    from minirlhf.study.stats import DRAWS, holm, sign_flip_p, signed_sums
    rng = random.Random(1)
    d = [rng.gauss(0.3, 1.0) for _ in range(17)]
    exact = sum(abs(sum(s * x for s, x in zip(signs, d))) >= abs(sum(d)) - 1e-12
                for signs in itertools.product((1, -1), repeat=17)) / 2 ** 17
    assert sign_flip_p(d) == exact  # v2 sampled 20,000 patterns beyond 16 seeds
    d = [rng.gauss(0.1, 1.0) for _ in range(20)]
    assert sign_flip_p(d) == (abs(signed_sums(d)) >= abs(sum(d)) - 1e-9).mean()
    # 41 seeds, 24 ahead by 1 and 17 behind by 1: a flipped sum is 41 - 2K, K ~ Binomial(41, 1/2)
    exact = sum(math.comb(41, k) for k in range(42) if abs(41 - 2 * k) >= 7) / 2 ** 41
    assert abs(sign_flip_p([1.0] * 24 + [-1.0] * 17) - exact) < 4 * 0.5 / DRAWS ** 0.5
    assert sign_flip_p([0.0] * 5) == 1.0
    assert holm([0.5, 0.6]) == [1.0, 1.0]


def test_seeds_better_counts_ties_apart():
    from minirlhf.study.report import better
    assert better([0.5, 0.0, -0.1, 0.0]) == "1/4 (2 tied)" and better([0.5, -0.1]) == "1/2"


def test_a_run_of_rounds_cut_short_is_an_error_not_a_dropped_seed(tmp_path):
    from minirlhf.study.config import ReportConfig
    from minirlhf.study.report import write_report
    point = {"iter": 0, "eval/kl": 0.0, "eval/proxy": 0.0, "eval/gold": 0.0, "eval/win_rate": 0.5}
    summary = {"sft": point, "final": point, "peak_gold": point, "curve": [point]}
    results = {f"reviews/seed{s}/metarm": {"rounds": [{"round": r, **summary} for r in range(1, n + 1)]}
               for s, n in ((0, 3), (1, 2))}
    cfg = ReportConfig(out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="reviews/seed1/metarm: 2 rounds where other seeds have 3"):
        write_report(cfg, results, ["metarm"])


def test_a_cell_from_before_v3_is_refused_by_the_v3_report(tmp_path):
    from minirlhf.study.config import ReportConfig
    from minirlhf.study.report import write_report
    with open(os.path.join(ROOT, "results", "results.json")) as f:  # the committed v2 report's cells
        results = json.load(f)
    with pytest.raises(ValueError, match="reviews/seed0/big-rm: no prompt_keys .* commit f1b2926"):
        write_report(ReportConfig(out_dir=str(tmp_path)), results, ["big-rm", "ppo"])


def test_policy_minus_best_of_n_at_its_kl():
    from minirlhf.study.report import bon_lines
    bon = {s: {"curve": [{"n": n, "kl": kl, "gold": g} for n, kl, g in
                         ((2, 0.19, 0.0), (4, 0.64, 1.0), (8, 1.2, 2.0))]} for s in ("seed0", "seed1")}
    up = [{"eval/kl": 0.0, "eval/gold": 0.0}, {"eval/kl": 1.0, "eval/gold": 2.0}]  # gold 2·KL, stops at KL 1
    per_seed = {"ppo": {"seed0": {"curve": up}, "seed1": {"curve": up}}}
    row = bon_lines(per_seed, ["ppo"], bon)[-1]
    # n=4: 2·0.64 - 1.0 = +0.28 on both seeds; n=8 (KL 1.2) is beyond the run; n=2 is not shown
    assert row == "| PPO | +0.280 ± 0.000 (2/2) | n/a |"


def test_report_names_methods_as_readers_know_them():
    from minirlhf.study.cells import KNOWN_METHODS
    from minirlhf.study.report import LABELS, label
    assert set(LABELS) == set(KNOWN_METHODS)  # a new method needs its name
    assert label("uml+spg-iter r3") == "RLP-UML+SPG iterated r3" and label("SFT") == "SFT"
    assert label("vanilla-rounds r1") == "MetaRM eta=0 (its control) r1"
