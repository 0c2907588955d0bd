"""Taking the result out: a trained policy as a Hugging Face folder (export == original, with and
without transformers), the folder as a later run's --init_from, TensorBoard logs, the curves
command."""
import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from minirlhf.data.tasks import get_task
from minirlhf.data.tokenizer import Tokenizer, gpt2_bpe, train_bpe
from minirlhf.generate import generate, left_pad
from minirlhf.model import GPT, load_model
from minirlhf.plumbing.checkpoint import load
from minirlhf.plumbing.curves import runs
from minirlhf.plumbing.export import export_tokenizer
from minirlhf.plumbing.runtime import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset=smoke", "--threads=1", "--sft_steps=5", "--rm_pairs=64"]
TEXTS = ["review pizza staff positive :", "the soup was super terrible ! the prices were rude .",
         "Hello there,\n\nhow are you? Ça va — très bien. 12 + 7 = 19", "  two  spaces\tand a tab"]


def script(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A smoke PPO run on `reviews` that exported its final and its SFT policy, with TensorBoard on
    when the package is installed."""
    tmp = tmp_path_factory.mktemp("export")
    board = [f"--tensorboard={importlib.util.find_spec('tensorboard') is not None}"]
    script("train_ppo.py", *SMOKE, *board, f"--out_dir={tmp / 'out'}", f"--export={tmp / 'tuned'}",
           f"--export_sft={tmp / 'sft'}")
    return tmp


def test_the_export_holds_the_trained_weights_its_tokenizer_and_how_to_sample(exported):
    tuned, out = exported / "tuned", exported / "out"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json"} <= set(os.listdir(tuned))
    assert {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(tuned))
    policy = load(out / "ppo.pt", fields=("policy",))["policy"]
    again = GPT.from_pretrained(tuned).state_dict()
    assert set(again) == set(policy) and all(torch.equal(again[k], policy[k]) for k in policy)
    sft = load_model(out / "sft.pt")[0].state_dict()
    from_sft_folder = GPT.from_pretrained(exported / "sft").state_dict()
    assert all(torch.equal(from_sft_folder[k], sft[k]) for k in sft)
    assert not torch.equal(again["transformer.h.0.mlp.c_fc.weight"], sft["transformer.h.0.mlp.c_fc.weight"])
    tok = get_task("reviews").tokenizer
    gen_cfg = json.loads((tuned / "generation_config.json").read_text())
    assert (gen_cfg["eos_token_id"], gen_cfg["pad_token_id"], gen_cfg["bos_token_id"]) == (tok.eos_id, tok.pad_id,
                                                                                          tok.bos_id)
    assert gen_cfg["top_k"] == 0 and gen_cfg["do_sample"] and gen_cfg["temperature"] == 1.0  # minirlhf's sampling
    exported_tok = Tokenizer.load(str(tuned / "tokenizer.json"))
    for text in TEXTS[:2]:  # every text starts with BOS, as minirlhf's prompts do
        assert exported_tok.tok.encode(text).ids == [tok.bos_id] + tok.encode(text)


def test_an_exported_bpe_tokenizer_is_a_tokenizer_folder_that_reads_back_the_same(tmp_path):
    tok = train_bpe(TEXTS * 20, vocab_size=300)
    export_tokenizer(tok, tmp_path, model_max_length=64)
    again = gpt2_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")  # what --tokenizer=DIR reads
    assert again.vocab_size == tok.vocab_size and (again.pad_id, again.bos_id, again.eos_id) == (
        tok.pad_id, tok.bos_id, tok.eos_id)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text


def test_an_exported_file_run_is_a_later_runs_init_from_exactly(tmp_path):
    """A run on a preference file (its own byte-level BPE) exports its PPO policy; another run's
    --init_from=DIR --tokenizer=DIR starts from exactly that policy, with the same token ids."""
    from minirlhf.plumbing.config import PPOConfig, parse_args
    from minirlhf.sft import build_policy
    turn = "\n\nHuman: {}\n\nAssistant: {}"
    rng = random.Random(0)
    words = ["tea", "coffee", "cake", "rain", "sun", "books", "music", "cats"]
    pairs = [{"chosen": turn.format(f"tell me about {a} and {b} ({i})", f"I like {a} and {b}."),
              "rejected": turn.format(f"tell me about {a} and {b} ({i})", "No.")}
             for i, (a, b) in enumerate((rng.choice(words), rng.choice(words)) for _ in range(300))]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    file_run = [*SMOKE, f"--data={data}", "--bpe_vocab=400", "--block_size=96", "--max_new_tokens=24"]
    script("train_ppo.py", *file_run, f"--out_dir={tmp_path / 'out'}", f"--export={tmp_path / 'tuned'}")
    cfg = parse_args([*file_run, f"--init_from={tmp_path / 'tuned'}", f"--tokenizer={tmp_path / 'tuned'}"], PPOConfig)
    source_tok = Tokenizer.load(str(tmp_path / "out" / "tokenizer.json"))
    again_tok = gpt2_bpe(tmp_path / "tuned" / "vocab.json", tmp_path / "tuned" / "merges.txt")
    assert all(again_tok.encode(p["chosen"]) == source_tok.encode(p["chosen"]) for p in pairs[:20])
    start = build_policy(cfg, type("Source", (), {"tokenizer": again_tok})()).state_dict()
    policy = load(tmp_path / "out" / "ppo.pt", fields=("policy",))["policy"]
    assert all(torch.equal(start[k], policy[k]) for k in policy)


def test_transformers_loads_the_export_and_computes_what_minirlhf_does(exported):
    transformers = pytest.importorskip("transformers")
    tuned = exported / "tuned"
    ours = GPT.from_pretrained(tuned).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tuned).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tuned)
    tok = get_task("reviews").tokenizer
    prompts = [p for p in get_task("reviews").sample_prompts(4, random.Random(0), "eval")]
    # the tokenizer: the ids minirlhf's prompts have (BOS first), and back
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    assert hf_tok(prompts).input_ids == ids
    assert [hf_tok.decode(i[1:]) for i in ids] == [tok.decode(i[1:]) for i in ids] == prompts
    # the model: logits of left-padded prompts, then greedy continuations
    prompt, mask = left_pad(ids, tok.pad_id)
    batch = hf_tok(prompts, padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, prompt) and torch.equal(batch.attention_mask, mask)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hf_logits = theirs(input_ids=prompt, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(hf_logits[mask.bool()], ours(prompt, mask)[mask.bool()], atol=1e-5, rtol=0)
        hf_greedy = theirs.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                    eos_token_id=None)[:, prompt.shape[1]:]
    ours_greedy = generate(ours, prompt, mask, 8, eos_id=-1, pad_id=tok.pad_id, greedy=True, stop_early=False)[0]
    assert torch.equal(hf_greedy, ours_greedy)


@pytest.mark.parametrize("which", ["arith", "gpt2-style"])
def test_transformers_tokenizes_every_kind_of_exported_tokenizer_as_minirlhf_does(tmp_path, which):
    transformers = pytest.importorskip("transformers")
    if which == "arith":
        tok, texts = get_task("arith").tokenizer, ["12 + 7 =", "let me think . so the answer is 19 ."]
    else:  # a GPT-2 folder's vocab.json + merges.txt, minirlhf's PAD/BOS/EOS/UNK appended after its ids
        bpe = tmp_path / "bpe"
        bpe.mkdir()
        export_tokenizer(train_bpe(TEXTS * 20, vocab_size=300), bpe, model_max_length=64)
        raw = json.loads((bpe / "vocab.json").read_text())
        specials = {"<pad>", "<bos>", "<eos>", "<unk>"}
        (bpe / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(t for t in raw if t not in specials)}))
        tok, texts = gpt2_bpe(bpe / "vocab.json", bpe / "merges.txt"), TEXTS
        assert tok.pad_id == tok.vocab_size - 4  # appended
    export_tokenizer(tok, tmp_path / "out", model_max_length=64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok(text).input_ids == [tok.bos_id] + ids
        assert hf_tok(text, add_special_tokens=False).input_ids == ids
        assert hf_tok.decode(ids) == tok.decode(ids)
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id) == (tok.pad_id, tok.eos_id)


def test_tensorboard_holds_the_metrics_of_metrics_jsonl(exported):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(exported / "out" / "tensorboard" / "ppo"))
    board.Reload()
    rows = [r for r in read_jsonl(exported / "out" / "metrics.jsonl") if r["stage"] == "ppo"]
    for name in ("objective/kl", "env/eos_rate", "eval/gold"):
        logged = {(r["iter"], r[name]) for r in rows if name in r}
        shown = {(e.step, e.value) for e in board.Scalars(name)}
        assert logged and {s for s, _ in shown} == {s for s, _ in logged}
        assert all(abs(v - dict(logged)[s]) < 1e-5 for s, v in shown)


def test_the_curves_of_a_run_join_its_rounds():
    rows = [{"stage": "sft", "step": 0, "loss": 1.0}, {"stage": "ppo", "iter": 0, "eval/gold": 1.0, "eval/kl": 0.0},
            {"stage": "metarm_r1", "iter": 0, "eval/gold": 2.0, "eval/kl": 0.0},
            {"stage": "metarm_r2", "iter": 1, "eval/gold": 3.0, "eval/kl": 1.0}]
    assert {k: [r["eval/gold"] for r in v] for k, v in runs(rows).items()} == {"ppo": [1.0], "metarm": [2.0, 3.0]}


def test_the_curves_command_draws_a_run_or_says_what_it_lacks(exported, tmp_path):
    r = subprocess.run([sys.executable, "curves.py", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --out_dir='{tmp_path}': no metrics.jsonl there"
    if importlib.util.find_spec("matplotlib") is None:
        r = subprocess.run([sys.executable, "curves.py", f"--out_dir={exported / 'out'}"], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 2 and "needs the optional matplotlib" in r.stderr
        return
    script("curves.py", f"--out_dir={exported / 'out'}")
    with open(exported / "out" / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_without_its_package_is_one_line_before_any_work(tmp_path, monkeypatch):
    import importlib

    from minirlhf.plumbing.config import PPOConfig, UsageError, parse_args
    from minirlhf.plumbing.validate import validate
    real = importlib.import_module

    def without_tensorboard(name, *args):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real(name, *args)
    monkeypatch.setattr(importlib, "import_module", without_tensorboard)
    with pytest.raises(UsageError, match=r"--tensorboard=True: needs the optional tensorboard package"):
        validate(parse_args(["--tensorboard=True", f"--out_dir={tmp_path / 'out'}"], PPOConfig))
