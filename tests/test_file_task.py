"""A preference file through the whole pipeline (Gao et al.'s protocol: a gold RM plays the human),
starting from a GPT-2 folder: SFT, gold RM, proxy RM, PPO, one RLP and one MetaRM round."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from minirlhf.data.file_task import FileTask, prompt_splits
from minirlhf.data.hh import DataError
from minirlhf.data.tokenizer import train_bpe
from minirlhf.generate import generate
from minirlhf.model import GPT, GPTConfig

ROOT = os.path.join(os.path.dirname(__file__), "..")
HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "helpful-base", "test.jsonl.gz")
TURN = "\n\nHuman: {}\n\nAssistant: {}"


def write_pairs(path, n=80):
    """n dialogues whose chosen answer is polite and whose rejected one is rude."""
    rng = random.Random(0)
    topics = ["the weather", "my cat", "a recipe", "the bus", "a poem", "the news", "music"]
    lines = []
    for i in range(n):
        question = f"tell me about {rng.choice(topics)} please, number {i}"
        lines.append(json.dumps({"chosen": TURN.format(question, "Sure, happy to help with that."),
                                 "rejected": TURN.format(question, "No. Go away.")}))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """pairs.jsonl, a byte-level BPE trained on it (vocab.json + merges.txt) and a tiny random
    GPT-2 of that vocabulary written by save_pretrained."""
    tmp = tmp_path_factory.mktemp("file")
    write_pairs(tmp / "pairs.jsonl")
    texts = [t for line in (tmp / "pairs.jsonl").read_text().splitlines()
             for t in json.loads(line).values()]
    tok = train_bpe(texts, vocab_size=300)
    tok.tok.model.save(str(tmp))  # vocab.json + merges.txt, GPT-2's files
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=128, n_embd=32, n_layer=2,
                  n_head=2)).save_pretrained(tmp / "gpt2")
    return tmp


def run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, (args[0], r.stderr[-3000:])
    return r


def test_file_runs_sft_gold_rm_proxy_ppo_rlp_and_metarm(folder):
    out = folder / "out"
    # CPU, fp32: on a GPU, bf16 autocast leaves the first KL a little above 0
    common = ["--preset=smoke", "--threads=1", "--device=cpu", f"--data={folder / 'pairs.jsonl'}",
              f"--tokenizer={folder}", f"--init_from={folder / 'gpt2'}", "--block_size=64",
              "--max_new_tokens=16", "--sft_steps=20", "--rm_pairs=48", "--eval_prompts=8",
              f"--out_dir={out}"]
    run("train_ppo.py", *common)
    run("refine.py", *common, "--method=spg")  # no semantic key on text: similarity clusters
    run("refine.py", *common, "--method=metarm", "--rounds=2", "--iters=2")
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert {"sft", "gold_rm", "rm", "ppo", "refine_spg", "metarm"} <= set(summary)
    assert summary["gold_rm"]["train_pairs"] == 72  # 90% of the file: the rest is held out
    assert summary["rm"]["train_pairs"] <= 48  # the proxy's budget: gold-labelled SFT pairs
    assert 0 <= summary["rm"]["held_out_acc_gold"] <= 1
    curve = summary["ppo"]["curve"]
    assert curve[0]["eval/kl"] < 1e-4 and all("eval/gold" in p for p in curve)
    assert summary["refine_spg"]["spg/pairs"] > 0  # similarity clusters made synthetic pairs
    with open(out / "metrics.jsonl") as f:
        stages = {json.loads(line)["stage"] for line in f}
    assert {"sft", "rm", "ppo"} <= stages


def test_a_gold_rm_from_another_run_is_reused(folder):
    """--gold_rm=PATH plays the human instead of training a new one."""
    args = ["train_rm.py", "--preset=smoke", "--threads=1", f"--data={folder / 'pairs.jsonl'}",
            f"--tokenizer={folder}", f"--init_from={folder / 'gpt2'}", "--block_size=64",
            "--max_new_tokens=16", "--sft_steps=2", "--rm_pairs=16"]
    first = folder / "out"  # the end-to-end test's, when it ran first; else a run of our own
    if not (first / "gold_rm.pt").exists():
        first = folder / "first"
        assert "gold RM:" in run(*args, f"--out_dir={first}").stdout
    r = run(*args, f"--gold_rm={first / 'gold_rm.pt'}", f"--out_dir={folder / 'second'}")
    assert "gold RM:" not in r.stdout and not (folder / "second" / "gold_rm.pt").exists()


def test_a_gold_rm_of_another_vocabulary_is_refused_before_sft(folder, tmp_path):
    from minirlhf.model import ScalarModel, save_model
    save_model(tmp_path / "gold.pt", ScalarModel(GPT(GPTConfig(vocab_size=50, n_positions=64,
                                                                n_embd=16, n_layer=1, n_head=2))))
    r = subprocess.run([sys.executable, "train_ppo.py", "--preset=smoke", "--threads=1",
                        f"--data={folder / 'pairs.jsonl'}", f"--tokenizer={folder}",
                        f"--gold_rm={tmp_path / 'gold.pt'}", f"--out_dir={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "its vocabulary (50 tokens) is not this run's tokenizer's" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before SFT trained or anything was written


def test_a_tokenizer_is_reused_only_beside_the_policy_trained_with_it(folder, tmp_path):
    """A failed run's tokenizer.json (say, the wrong --tokenizer for --init_from) must not
    outlive the options that made it; once SFT has trained, its tokenizer is the one to use."""
    from minirlhf.data.sources import FileSource
    from minirlhf.plumbing.config import SFTConfig, parse_args
    out = tmp_path / "out"
    out.mkdir()
    train_bpe(["a b c"] * 10, vocab_size=260).save(str(out / "tokenizer.json"))  # left behind
    cfg = parse_args([f"--data={folder / 'pairs.jsonl'}", f"--tokenizer={folder}", f"--out_dir={out}"],
                     SFTConfig)
    assert FileSource(cfg).tokenizer.vocab_size == 300  # the folder's, as asked
    (out / "sft.pt").write_bytes(b"")  # a policy trained with the saved one
    assert FileSource(cfg).tokenizer.vocab_size < 300
    assert FileSource(cfg, new_sft=True).tokenizer.vocab_size == 300  # train_sft.py trains anew


def test_a_corrupt_gpt2_weights_file_is_one_line(folder, tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text((folder / "gpt2" / "config.json").read_text())
    (gpt2 / "pytorch_model.bin").write_text("garbage")
    r = subprocess.run([sys.executable, "train_sft.py", "--preset=smoke", f"--data={folder / 'pairs.jsonl'}",
                        f"--init_from={gpt2}", f"--tokenizer={folder}", f"--out_dir={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0] == f"error: {gpt2 / 'pytorch_model.bin'}: corrupt or truncated checkpoint (not the zip archive " \
                       "torch.save writes, nor a legacy one of plain tensors)"


def test_a_file_with_a_prompt_field_reads_like_the_dialogues(tmp_path):
    from minirlhf.data.hh import load_hh_pairs
    write_pairs(tmp_path / "hh.jsonl", n=5)
    hh = load_hh_pairs(str(tmp_path / "hh.jsonl"))
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                                for p, c, r in hh))
    assert load_hh_pairs(str(tmp_path / "trl.jsonl")) == hh
    assert hh[0][0].endswith("\n\nAssistant:") and hh[0][1] == " Sure, happy to help with that."


def test_prompts_split_by_a_stable_hash_and_too_few_are_refused(tmp_path):
    write_pairs(tmp_path / "p.jsonl")
    from minirlhf.data.hh import load_hh_pairs
    pairs = load_hh_pairs(tmp_path / "p.jsonl")
    splits = prompt_splits("p", pairs)
    assert set(splits["pref"]) | set(splits["unlabelled"]) | set(splits["eval"]) == set(splits["sft"])
    assert not set(splits["pref"]) & set(splits["eval"])
    assert splits == prompt_splits("p", list(reversed(pairs)))  # order-free: a hash, not a position
    with pytest.raises(DataError, match="no prompt falls in"):
        prompt_splits("p", pairs[:1])


def test_file_task_judges_in_batches_like_one_at_a_time(folder):
    from minirlhf.data.batches import Batcher
    from minirlhf.data.hh import load_hh_pairs
    from minirlhf.data.tokenizer import gpt2_bpe
    from minirlhf.model import ScalarModel
    tok = gpt2_bpe(folder / "vocab.json", folder / "merges.txt")
    torch.manual_seed(0)
    judge = ScalarModel(GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=16,
                                      n_layer=1, n_head=2))).eval()
    pairs = load_hh_pairs(folder / "pairs.jsonl")
    task = FileTask("pairs", prompt_splits("pairs", pairs), judge, Batcher(tok, 48, 16))
    prompts = task.sample_prompts(6, random.Random(0), "eval")
    responses = [" Sure.", " No.", " Maybe later, friend.", " Yes", " ok", " Go away."]
    batch = task.golds(prompts, responses)
    assert batch == pytest.approx([task.gold(p, y) for p, y in zip(prompts, responses)], abs=1e-5)


@pytest.mark.skipif(not os.path.exists(HH), reason="../shared/data/hh-rlhf not present")
def test_real_hh_rlhf_file_through_ppo(tmp_path):
    run("train_ppo.py", "--preset=smoke", "--threads=1", f"--data={HH}", "--block_size=96",
        "--max_new_tokens=24", "--bpe_vocab=512", "--sft_steps=10", "--rm_pairs=32",
        "--eval_prompts=8", "--iters=2", f"--out_dir={tmp_path}")
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary["gold_rm"]["train_pairs"] > 2000 and "final" in summary["ppo"]


def test_from_pretrained_save_pretrained_from_pretrained_is_exact(folder, tmp_path):
    first = GPT.from_pretrained(folder / "gpt2")
    first.save_pretrained(tmp_path / "again")
    a, b = first.state_dict(), GPT.from_pretrained(tmp_path / "again").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_written_by_hugging_face_gives_its_logits_and_greedy_tokens():
    """tests/data/hf-gpt2-tiny: a random GPT-2 that transformers saved, with the logits and the greedy
    tokens (left-padded prompts) it computed (tests/data/make_hf_gpt2_tiny.py): checked here without
    transformers installed."""
    folder = os.path.join(os.path.dirname(__file__), "data", "hf-gpt2-tiny")
    ref = torch.load(os.path.join(folder, "reference.pt"), weights_only=True)
    ours = GPT.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = ours(ref["ids"], torch.ones_like(ref["ids"]))
    torch.testing.assert_close(logits, ref["logits"], atol=1e-5, rtol=0)
    greedy = generate(ours, ref["prompt"], ref["prompt_mask"], ref["greedy"].shape[1], eos_id=-1,
                      pad_id=0, greedy=True, stop_early=False)[0]
    assert torch.equal(greedy, ref["greedy"])
