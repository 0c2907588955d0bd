"""Tiny end-to-end runs of each stage on the embedded task (smoke preset: seconds), through the library; and
every script from the command line."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from minirlhf import ppo
from minirlhf.data.batches import Batcher
from minirlhf.data.sources import get_source
from minirlhf.evaluate import summarize
from minirlhf.generate import sequence_logprobs
from minirlhf.metarm import meta_rounds
from minirlhf.model import load_model
from minirlhf.pipeline import prepare_rl
from minirlhf.plumbing import config
from minirlhf.plumbing.config import PPOConfig, RefineConfig, RMConfig, UsageError, parse_args
from minirlhf.ppo_trainer import best_of_n_baseline, rollout, train_ppo
from minirlhf.rlp import rlp_round
from minirlhf.rm import load_preferences, train_rm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_cfg(out, *extra, cls=PPOConfig):
    return parse_args(["--preset=smoke", f"--out_dir={out}", "--rm_pairs=256", "--sft_steps=60", *extra], cls)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """SFT + proxy RM trained once for the module (smoke preset, a few hundred pairs)."""
    out = str(tmp_path_factory.mktemp("smoke"))
    prepare_rl(smoke_cfg(out))
    return out


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
    prompts = source.task.sample_prompts(cfg.rollout_batch, random.Random(0), "unlabelled")
    batcher = Batcher.of(cfg, source.tokenizer)
    batch, _ = rollout(policy, sft, rm, rm, *batcher.prompts(prompts), batcher.tok.eos_id, batcher.tok.pad_id, cfg,
                       torch.Generator().manual_seed(0), cfg.kl_coef)
    idx = torch.arange(cfg.minibatch)  # a minibatch, as the update sees it
    mb = {k: v[idx] for k, v in batch.items()}
    logp = sequence_logprobs(policy, mb["prompt"], mb["prompt_mask"], mb["response"], mb["response_mask"],
                             cfg.temperature)
    ratio = torch.exp(logp - mb["logp"])[mb["response_mask"].bool()]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6, rtol=0)
    _, stats = ppo.policy_loss(logp, mb["logp"], mb["advantages"], mb["response_mask"], cfg.clip)
    assert stats["ppo/policy/clipfrac"] == 0.0


def test_ppo_smoke_raises_proxy(smoke_dir):
    cfg = smoke_cfg(smoke_dir, "--iters=12", "--eval_every=12", "--ppo_lr=1e-3", "--rollout_batch=32",
                    "--minibatch=16", "--eval_prompts=64", "--kl_coef=0.0")
    device, source, sft, rm = prepare_rl(cfg)
    # its own name: ppo.pt stays the vanilla policy (default settings) that the refinement tests reuse
    summary = summarize(train_ppo(cfg, source, sft, rm, device, name="ppo_fast")[1])
    assert summary["final"]["eval/proxy"] > summary["sft"]["eval/proxy"] + 0.1
    rows = read_metrics(smoke_dir, "ppo_fast")
    assert {"objective/kl", "ppo/policy/clipfrac", "ppo/val/explained_variance", "eval/win_rate"} <= \
        {k for r in rows for k in r}


def test_best_of_n_smoke(smoke_dir):
    cfg = smoke_cfg(smoke_dir, "--bon_max=4")
    device, source, sft, rm = prepare_rl(cfg)
    rows = best_of_n_baseline(cfg, source, sft, rm, device)
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert rows[-1]["proxy"] >= rows[0]["proxy"]  # picking by the proxy must raise the proxy
    assert all(math.isclose(r["kl"], math.log(r["n"]) - (r["n"] - 1) / r["n"]) for r in rows)


def test_config_parsing():
    cfg = parse_args(["--preset=smoke", "--kl_coef=0", "--task=arith", "--resume=True"])
    assert cfg.n_embd == 32 and cfg.kl_coef == 0.0 and isinstance(cfg.kl_coef, float)
    assert cfg.task == "arith" and cfg.resume is True
    for bad, msg in [("--nope=1", "unknown option --nope"), ("--iters=1.5", "expected int"),
                     ("--resume=1", "expected bool"), ("iters=3", "not of the form"),
                     ("--preset=huge", "expected one of")]:
        with pytest.raises(UsageError, match=msg):
            parse_args([bad])
    with pytest.raises(UsageError, match="unknown option --rounds for this script"):
        parse_args(["--rounds=2"], config.SFTConfig)  # a refinement option is not train_sft.py's


def test_every_field_is_documented_and_help_lists_the_scripts_own_stage_first():
    from minirlhf.bench.config import BenchConfig
    from minirlhf.study.config import ReportConfig
    for cls in (config.SFTConfig, RMConfig, PPOConfig, RefineConfig, ReportConfig, BenchConfig):
        docs = config.field_docs(cls)
        assert all(docs.get(f) for f in cls.__dataclass_fields__), cls
    out = subprocess.run([sys.executable, "train_rm.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    sections = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert sections[:2] == ["reward model:", "SFT:"] and "PPO:" not in sections
    out = subprocess.run([sys.executable, "experiments.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True).stdout
    assert "--out_dir='out_report'" in out and "--preset='report'" in out and "--iters=40" in out  # true defaults
    assert "\nreport:" in out and "\nbenchmark:" not in out  # the study's group, titled, beside its config


@pytest.mark.parametrize("method", ["uml", "spg", "uml+spg", "oracle", "control"])
def test_refine_rlp_smoke(smoke_dir, method):
    cfg = smoke_cfg(smoke_dir, cls=RefineConfig)
    device, source, sft, rm = prepare_rl(cfg)
    result = rlp_round(cfg, method, source, sft, rm, load_preferences(smoke_dir), device)
    assert result["final"]["iter"] == 3
    if "spg" in method:
        assert "spg/acceptance" in result
    assert read_metrics(smoke_dir, f"ppo_{method}")
    # PPO re-run from SFT on the refined RM, not on the proxy: the same seed's prompts and samples,
    # so only the RM can make its curve differ from vanilla PPO's
    with open(os.path.join(smoke_dir, "summary.json")) as f:
        vanilla = json.load(f)["ppo"]["curve"]
    assert [p["eval/proxy"] for p in result["curve"]] != [p["eval/proxy"] for p in vanilla]


@pytest.mark.parametrize("method", ["metarm", "vanilla-rounds"])
def test_refine_metarm_smoke(smoke_dir, method):
    cfg = smoke_cfg(smoke_dir, "--rounds=2", "--ood=True", cls=RefineConfig)
    device, source, sft, _ = prepare_rl(cfg)
    rows = meta_rounds(cfg, method, source, sft, load_preferences(smoke_dir), device)
    assert [r["round"] for r in rows] == [1, 2]
    assert (rows[0]["shift_norm"] > 0) == (method == "metarm")


def test_rm_ensemble_smoke(smoke_dir, tmp_path):
    import shutil
    shutil.copy(os.path.join(smoke_dir, "sft.pt"), tmp_path / "sft.pt")
    cfg = smoke_cfg(str(tmp_path), "--ensemble=2", "--ensemble_agg=min", "--rm_pairs=64", cls=RMConfig)
    summary = train_rm(cfg, get_source(cfg), load_model(str(tmp_path / "sft.pt"))[0], torch.device("cpu"))
    assert len(summary["members"]) == 2 and os.path.exists(tmp_path / "rm_1.pt")
    assert summary["members"][0]["held_out_acc_noisy"] != summary["members"][1]["held_out_acc_noisy"] or \
        summary["members"][0]["norm_mean"] != summary["members"][1]["norm_mean"]  # different seeds, different RMs


HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "helpful-base", "test.jsonl.gz")


@pytest.mark.skipif(not os.path.exists(HH), reason="../shared/data/hh-rlhf not present")
def test_rm_on_real_hh_rlhf_file(tmp_path):
    r = subprocess.run([sys.executable, "train_rm.py", "--preset=smoke", f"--out_dir={tmp_path}", f"--data={HH}",
                        "--rm_pairs=64", "--sft_steps=5", "--block_size=96", "--max_new_tokens=48", "--bpe_vocab=512"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    # the gold RM learns the file's pairs; the proxy learns 64 of its labels on pairs of SFT samples
    assert summary["gold_rm"]["train_pairs"] > 2000 and 0 <= summary["gold_rm"]["held_out_acc"] <= 1
    assert summary["rm"]["train_pairs"] <= 64 and 0 <= summary["rm"]["held_out_acc_gold"] <= 1


def test_every_entry_point_runs_from_the_command_line(tmp_path):
    base = ["--preset=smoke", "--threads=1", "--sft_steps=5", f"--out_dir={tmp_path / 'out'}"]
    rl = [*base, "--rm_pairs=64"]
    for args in (["train_sft.py", *base], ["train_rm.py", *rl], ["train_ppo.py", *rl],
                 ["train_ppo.py", *rl, "--method=bon", "--bon_max=2"], ["refine.py", *rl, "--method=control"],
                 ["bench.py", "--preset=smoke", "--threads=1", "--sizes=default"]):
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, (args[0], r.stderr[-2000:])
    assert "one PPO iteration" in r.stdout
    with open(tmp_path / "out" / "summary.json") as f:
        summary = json.load(f)
    assert {"sft", "rm", "ppo", "bon", "refine_control"} <= set(summary)
    assert summary["ppo"]["final"]["iter"] == summary["refine_control"]["final"]["iter"] == 3
    assert [r["n"] for r in summary["bon"]["curve"]] == [1, 2]
    assert all(math.isfinite(p["eval/gold"]) for p in summary["ppo"]["curve"])


def test_sft_starts_from_a_gpt2_checkpoint_with_rows_for_our_special_tokens(tmp_path):
    """--init_from: a tiny random GPT-2 folder (our save_pretrained, HF's layout) and a byte-level
    vocab.json/merges.txt; with a zero learning rate SFT must save exactly the checkpoint's weights."""
    from tokenizers import pre_tokenizers

    from minirlhf.model import GPT, GPTConfig
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # every byte has a token: any text encodes
    (tmp_path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(alphabet)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=len(alphabet), n_positions=128, n_embd=16, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    turn = "\n\nHuman: {}\n\nAssistant: {}"
    lines = [json.dumps({"chosen": turn.format(f"hi {i}", "hello there"), "rejected": turn.format(f"hi {i}", "go")})
             for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    args = ["train_sft.py", "--preset=smoke", f"--data={tmp_path / 'pairs.jsonl'}", f"--tokenizer={tmp_path}",
            f"--init_from={tmp_path / 'gpt2'}", "--block_size=96", "--max_new_tokens=32", "--sft_steps=2",
            "--sft_lr=0.0", f"--out_dir={tmp_path / 'out'}"]
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sft, ck = load_model(str(tmp_path / "out" / "sft.pt"))
    pretrained = GPT.from_pretrained(str(tmp_path / "gpt2"))
    assert sft.cfg.vocab_size == len(alphabet) + 4 and sft.cfg.n_embd == 16  # + PAD, BOS, EOS, UNK
    assert torch.equal(sft.transformer.wte.weight[:len(alphabet)], pretrained.transformer.wte.weight)
    assert torch.equal(sft.transformer.h[1].mlp.c_fc.weight, pretrained.transformer.h[1].mlp.c_fc.weight)
    assert ck["config"]["init_from"] == str(tmp_path / "gpt2")  # recorded: reusing it elsewhere is refused
    bad = subprocess.run([sys.executable, "train_ppo.py", "--preset=smoke", f"--init_from={tmp_path / 'gpt2'}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--init_from=" in bad.stderr and "needs --data=FILE" in bad.stderr


def test_the_report_seed_benchmark_times_every_method_and_charges_every_second():
    from minirlhf.study.cells import METHODS
    r = subprocess.run([sys.executable, "bench.py", "--only=report-seed", "--preset=smoke", "--seed=100",
                        "--threads=1", "--json=True"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    [line] = r.stdout.splitlines()  # --json: the JSON line alone
    result = json.loads(line)
    assert list(result["steps"]) == ["SFT and proxy RM", *METHODS]
    assert all(s["core_min"] > 0 for s in result["steps"].values())
    assert result["core_min"] == pytest.approx(sum(s["core_min"] for s in result["steps"].values()))
    # every second of the run is charged to one part: the parts add up to the wall time
    assert sum(result["profile_s"].values()) == pytest.approx(60 * result["wall_min"], rel=0.02)
    assert all(result["profile_s"][part] > 0 for part in ("generation", "PPO update", "RM training"))


def test_the_cost_profile_charges_a_call_to_its_outermost_sticky_part(monkeypatch):
    from minirlhf.study import cost
    clock = [0.0]
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])
    profile = cost.Profile()

    def spend(seconds, inner=None):
        def run():
            clock[0] += seconds
            if inner:
                inner()
            clock[0] += seconds
        return run
    forward = profile.charged(spend(1.0), "log-prob and score passes", False)
    generation = profile.charged(spend(2.0, forward), "generation", True)  # its passes are its own
    gold = profile.charged(spend(0.5, forward), "gold judging", False)  # a pass inside is a pass
    for call in (generation, gold, forward):
        call()
    clock[0] += 3.0  # between the calls: the rest
    profile.switch()
    assert profile.seconds == {"generation": 6.0, "PPO update": 0.0, "RM training": 0.0,
                               "log-prob and score passes": 4.0, "gold judging": 1.0,
                               "Python and the rest": 3.0}

