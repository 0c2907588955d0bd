"""Tiny end-to-end runs of each script on the embedded task (smoke preset: seconds)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_ppo
import train_rm
from minirlhf import ppo
from minirlhf.checkpoint import load_model
from minirlhf.config import Config, parse_args
from minirlhf.generate import sequence_logprobs
from minirlhf.sources import get_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """SFT + proxy RM trained once for the module (smoke preset, a few hundred pairs)."""
    out = str(tmp_path_factory.mktemp("smoke"))
    cfg = parse_args(["--preset=smoke", f"--out_dir={out}", "--rm_pairs=256", "--sft_steps=60"])
    train_rm.run(cfg)
    return out


def smoke_cfg(out, *extra):
    return parse_args(["--preset=smoke", f"--out_dir={out}", "--rm_pairs=256", "--sft_steps=60", *extra])


def read_metrics(out, stage):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["stage"] == stage]


def test_sft_lowers_loss(smoke_dir):
    losses = [r["loss"] for r in read_metrics(smoke_dir, "sft")]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_rm_beats_chance_on_clean_gold_labels(smoke_dir):
    with open(os.path.join(smoke_dir, "summary.json")) as f:
        rm = json.load(f)["rm"]
    assert rm["held_out_acc_gold"] > 0.55
    assert os.path.exists(os.path.join(smoke_dir, "rm.pt"))


def test_ppo_ratio_is_one_before_first_update(smoke_dir):
    cfg = smoke_cfg(smoke_dir)
    source = get_source(cfg)
    sft = load_model(os.path.join(smoke_dir, "sft.pt"))[0].eval()
    rm = load_model(os.path.join(smoke_dir, "rm.pt"), scalar=True)[0].eval()
    policy = load_model(os.path.join(smoke_dir, "sft.pt"))[0].train()  # train(): dropout is off, so no change
    policy.set_dropout(0.0)
    prompts = source.task.sample_prompts(cfg.rollout_batch, __import__("random").Random(0), "unlabelled")
    batch, _ = train_ppo.rollout(policy, sft, rm, rm, source.tokenizer, prompts, cfg, torch.device("cpu"),
                                 torch.Generator().manual_seed(0), cfg.kl_coef)
    idx = torch.arange(cfg.minibatch)  # a minibatch, as the update sees it
    logp = sequence_logprobs(policy, batch["p"][idx], batch["pm"][idx], batch["r"][idx], batch["rmask"][idx],
                             cfg.temperature)
    ratio = torch.exp(logp - batch["logp"][idx])[batch["rmask"][idx].bool()]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0)
    _, stats = ppo.policy_loss(logp, batch["logp"][idx], batch["advantages"][idx], batch["rmask"][idx], cfg.clip)
    assert stats["ppo/policy/clipfrac"] == 0.0


def test_ppo_smoke_raises_proxy(smoke_dir):
    cfg = smoke_cfg(smoke_dir, "--iters=12", "--eval_every=12", "--ppo_lr=1e-3", "--rollout_batch=32",
                    "--minibatch=16", "--eval_prompts=64", "--kl_coef=0.0")
    summary = train_ppo.run(cfg)
    assert summary["final"]["eval/proxy"] > summary["sft"]["eval/proxy"] + 0.1
    rows = read_metrics(smoke_dir, "ppo")
    assert {"objective/kl", "ppo/policy/clipfrac", "ppo/val/explained_variance", "eval/win_rate"} <= \
        {k for r in rows for k in r}


def test_best_of_n_smoke(smoke_dir):
    rows = train_ppo.run(smoke_cfg(smoke_dir, "--method=bon", "--bon_max=4"))
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert rows[-1]["proxy"] >= rows[0]["proxy"]  # picking by the proxy must raise the proxy


def test_cli_runs_and_rejects_bad_override(tmp_path):
    ok = subprocess.run([sys.executable, "train_sft.py", "--preset=smoke", "--sft_steps=3", f"--out_dir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert os.path.exists(tmp_path / "sft.pt") and os.path.exists(tmp_path / "tokenizer.json")
    bad = subprocess.run([sys.executable, "train_sft.py", "--sft_steps=many"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "--sft_steps='many': expected int" in bad.stderr


def test_config_parsing():
    cfg = parse_args(["--preset=smoke", "--kl_coef=0", "--task=arith", "--resume=True"])
    assert cfg.n_embd == 32 and cfg.kl_coef == 0.0 and isinstance(cfg.kl_coef, float)
    assert cfg.task == "arith" and cfg.resume is True
    for bad, msg in [("--nope=1", "unknown option --nope"), ("--iters=1.5", "expected int"),
                     ("--resume=1", "expected bool"), ("iters=3", "not of the form"),
                     ("--preset=huge", "expected one of")]:
        with pytest.raises(SystemExit, match=msg):
            parse_args([bad])
    docs = Config.field_docs()
    assert all(docs.get(f) for f in Config.__dataclass_fields__)  # every field documented


@pytest.mark.parametrize("method", ["uml", "spg", "uml+spg", "oracle", "control"])
def test_refine_rlp_smoke(smoke_dir, method):
    import refine
    result = refine.run(smoke_cfg(smoke_dir, f"--method={method}"))
    assert 0 <= result["rm_after"]["rm_acc_policy_pairs"] <= 1
    assert result["final"]["iter"] == 3
    if "spg" in method:
        assert "spg/acceptance" in result
    assert read_metrics(smoke_dir, f"ppo_{method}")


@pytest.mark.parametrize("method", ["metarm", "vanilla-rounds"])
def test_refine_metarm_smoke(smoke_dir, method):
    import refine
    rows = refine.run(smoke_cfg(smoke_dir, f"--method={method}", "--rounds=2", "--ood=True"))
    assert [r["round"] for r in rows] == [1, 2]
    assert (rows[0]["shift_norm"] > 0) == (method == "metarm")


def test_rm_ensemble_smoke(smoke_dir, tmp_path):
    import shutil
    shutil.copy(os.path.join(smoke_dir, "sft.pt"), tmp_path / "sft.pt")
    summary = train_rm.run(smoke_cfg(str(tmp_path), "--ensemble=2", "--ensemble_agg=min", "--rm_pairs=64"))
    assert len(summary["members"]) == 2 and os.path.exists(tmp_path / "rm_1.pt")
    assert summary["members"][0]["held_out_acc_noisy"] != summary["members"][1]["held_out_acc_noisy"] or \
        summary["members"][0]["norm_mean"] != summary["members"][1]["norm_mean"]  # different seeds, different RMs


HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "helpful-base", "test.jsonl.gz")


@pytest.mark.skipif(not os.path.exists(HH), reason="../shared/data/hh-rlhf not present")
def test_rm_on_real_hh_rlhf_file(tmp_path):
    summary = train_rm.run(parse_args(["--preset=smoke", f"--out_dir={tmp_path}", f"--data={HH}", "--rm_pairs=64",
                                       "--sft_steps=5", "--block_size=96", "--max_new_tokens=48", "--bpe_vocab=512"]))
    assert summary["train_pairs"] == 64 and summary["held_out_pairs"] > 200
    assert 0 <= summary["held_out_acc_noisy"] <= 1
