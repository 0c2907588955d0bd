"""The reproduction report's runs: every method on every seed, one cell at a time, resumable and
splittable across processes (the protocol: docs/protocol.md; its analysis: ALGORITHMS.md §4.3).

Per seed, one SFT policy and one proxy RM (out_dir/<task>/seed<k>/) serve every method, each with
the same PPO budget (--iters). A finished cell lands at once as its own file in out_dir/cells/ and
is merged into out_dir/results.json; finished cells are never rerun.
"""
import json
import os
from dataclasses import fields, replace

from tqdm import tqdm

from ..evaluate import summarize
from ..metarm import meta_rounds
from ..pipeline import prepare_rl
from ..plumbing.checkpoint import atomic_write_json, check_made_with
from ..plumbing.runtime import lock_out_dir, read_summary
from ..ppo_trainer import best_of_n_baseline, ensure_ppo, train_ppo
from ..rlp import RLP_METHODS, rlp_round
from ..rm import ensure_rm, load_preferences
from .ceilings import big_rm_ppo, gold_ppo
from .iterated import ITERATED_METHODS, iterated_rounds
from .report import write_report

# every method of the report: the one-shot RLP rounds as in the RLP paper, and UML+SPG also in the
# iterated mode beside the oracle and the control
METHODS = ("bon", "ppo", "gold-ppo", "big-rm", *RLP_METHODS, "oracle-iter", "control-iter",
           "uml+spg-iter", "ensemble-mean", "ensemble-min", "metarm", "vanilla-rounds")
# run only when named (--methods=uml-iter,spg-iter); reported when present
EXTRA_METHODS = ("uml-iter", "spg-iter")
KNOWN_METHODS = METHODS + EXTRA_METHODS


def run_cell(cfg, method):
    """One method on one seed; returns what the report needs (JSON-able)."""
    device, source, sft, rm = prepare_rl(cfg)
    if method == "bon":
        return {"curve": best_of_n_baseline(cfg, source, sft, rm, device)}
    if method == "ppo":
        ensure_ppo(cfg, source, sft, rm, device)
        summary = read_summary(cfg)
        return {**summary["ppo"],
                "rm_after": {"held_out_acc_gold": summary["rm"].get("held_out_acc_gold")}}
    prefs = load_preferences(cfg.out_dir)
    if method in RLP_METHODS:
        return rlp_round(cfg, method, source, sft, rm, prefs, device)
    if method in ITERATED_METHODS:
        return {"rounds": iterated_rounds(cfg, method, source, sft, rm, prefs, device)}
    if method == "gold-ppo":
        return gold_ppo(cfg, source, sft, rm, prefs, device)
    if method == "big-rm":
        return big_rm_ppo(cfg, source, sft, device)
    # Coste et al.: 3 RMs from different seeds (member 0 is the proxy itself)
    if method.startswith("ensemble"):
        ens_cfg = replace(cfg, ensemble=3, ensemble_agg=method.split("-")[1])
        _, history = train_ppo(ens_cfg, source, sft, ensure_rm(ens_cfg, source, sft, device),
                               device, name=f"ppo_{method}")
        return summarize(history)
    return {"rounds": meta_rounds(cfg, method, source, sft, prefs, device)}


def load_results(out_dir):
    """Every finished cell: results.json merged with out_dir/cells/, where each cell lands as its
    own file the moment it finishes (so processes that split the seeds with --first_seed can
    share one out_dir). results.json is written on one line with floats to 6 significant digits,
    and that is what is returned: a report reads the same numbers whether it was just run or
    rebuilt from the file."""
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
    results = six_digits(results)
    # every evaluation's per-prompt gold of every cell: tens of MB at 16 seeds, most of it float
    # noise such as 1.5499999999999998 and indentation
    atomic_write_json(results, path, indent=None)
    return results


def six_digits(x):
    """x with every float rounded to 6 significant digits (dicts and lists followed)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: six_digits(v) for k, v in x.items()}
    if isinstance(x, list):
        return [six_digits(v) for v in x]
    return x


# options that say which cells run, where and how fast, or what is printed: not what a cell computes
NOT_SETTINGS = {"out_dir", "device", "threads", "resume", "reuse", "ckpt_every", "preset", "seeds",
                "first_seed", "methods", "sample_every", "tensorboard"}


def settings(cfg):
    """{option: value} of what shapes a cell: the same for every cell of one report."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_SETTINGS}


def run_report(cfg):
    """Every method on seeds first_seed .. first_seed + seeds - 1 of cfg.task, then
    report.md and the curves. Finished cells are reused by key alone (task/seed/method), so new
    cells are refused under other settings than out_dir/<task>/settings.json records (written when
    the first cell finished)."""
    results = load_results(cfg.out_dir)
    methods = cfg.methods.split(",") if cfg.methods else METHODS
    cells = [(k, m) for k in range(cfg.first_seed, cfg.first_seed + cfg.seeds) for m in methods]
    todo = [(k, m) for k, m in cells if f"{cfg.task}/seed{k}/{m}" not in results]
    path = os.path.join(cfg.out_dir, cfg.task, "settings.json")
    if todo and os.path.exists(path) and not cfg.reuse:
        with open(path) as f:
            check_made_with(path, json.load(f), settings(cfg))
    for k, method in tqdm(todo, desc=f"report {cfg.task}", initial=len(cells) - len(todo),
                          total=len(cells)):
        key = f"{cfg.task}/seed{k}/{method}"
        seed_cfg = replace(cfg, seed=k, out_dir=os.path.join(cfg.out_dir, cfg.task, f"seed{k}"))
        # one writer per seed folder; processes may split the seeds
        with lock_out_dir(seed_cfg.out_dir):
            cell = {key: run_cell(seed_cfg, method)}
        atomic_write_json(cell, os.path.join(cfg.out_dir, "cells", key.replace("/", "-") + ".json"))
        if not os.path.exists(path):
            atomic_write_json(settings(cfg), path)
        results.update(cell)
    results = load_results(cfg.out_dir)
    write_report(cfg, results, KNOWN_METHODS)
    print(f"wrote {cfg.out_dir}/results.json and {cfg.out_dir}/{cfg.task}/report.md, curves.csv")
    return results
