import gzip
import json
import math
import os

import pytest
import torch

from minirlhf.data.hh import DataError, load_hh_pairs
from minirlhf.generate import left_pad
from minirlhf.model import GPT, GPTConfig, ScalarModel, last_token_index
from minirlhf.reward import Ensemble, bt_loss, normalize, pairwise_accuracy

HH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf", "helpful-base",
                  "test.jsonl.gz")


def test_bt_loss_and_accuracy_by_hand():
    rc, rr = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    expected = -(math.log(1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.exp(1))) + math.log(0.5)) / 3
    assert math.isclose(bt_loss(rc, rr).item(), expected, rel_tol=1e-6)
    assert pairwise_accuracy(rc, rr) == pytest.approx((1 + 0 + 0.5) / 3)


def tiny_rm():
    torch.manual_seed(0)
    return ScalarModel(GPT(GPTConfig(vocab_size=20, n_positions=32, n_embd=16, n_layer=1, n_head=2))).eval()


def test_score_reads_last_real_token_under_any_padding():
    rm = tiny_rm()
    prompts, pm = left_pad([[5, 6, 7], [8]], pad_id=0)
    resp = torch.tensor([[9, 10, 2, 0], [11, 2, 0, 0]])
    rmask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert last_token_index(torch.cat([pm, rmask], 1)).tolist() == [5, 4]
    s = rm.score(prompts, pm, resp, rmask)
    for i, (p, r) in enumerate([([5, 6, 7], [9, 10, 2]), ([8], [11, 2])]):
        alone = rm(torch.tensor([p + r]))[0, -1]  # no padding at all: the last position is the EOS
        assert torch.allclose(s[i], alone, atol=1e-5)


def test_normalize_gives_zero_mean_unit_std():
    rm = tiny_rm()
    ids = torch.randint(1, 20, (16, 6))
    r = rm.score(ids[:, :2], torch.ones(16, 2, dtype=torch.long), ids[:, 2:], torch.ones(16, 4, dtype=torch.long))
    normalize(rm, r)
    r2 = rm.score(ids[:, :2], torch.ones(16, 2, dtype=torch.long), ids[:, 2:], torch.ones(16, 4, dtype=torch.long))
    assert abs(r2.mean().item()) < 1e-5 and abs(r2.std().item() - 1) < 1e-4


def test_gold_label_is_a_noisy_bradley_terry_annotator():
    import random

    from minirlhf.rm import gold_label
    rng = random.Random(0)
    assert all(gold_label(0.1, 1e-3, 0.0, rng) for _ in range(200))  # tiny tau: the better one, always
    assert not any(gold_label(0.1, 1e-3, 1.0, rng) for _ in range(200))  # every label flipped
    n = 20000
    p = 1 / (1 + math.exp(-0.5 / 0.5))  # sigmoid(diff / tau) = 0.731
    assert abs(sum(gold_label(0.5, 0.5, 0.0, rng) for _ in range(n)) / n - p) < 0.015  # SE 0.003
    flipped = p * 0.8 + (1 - p) * 0.2  # then 20% of labels flipped
    assert abs(sum(gold_label(0.5, 0.5, 0.2, rng) for _ in range(n)) / n - flipped) < 0.015


def test_ensemble_mean_and_min():
    a, b = tiny_rm(), tiny_rm()
    torch.nn.init.constant_(b.head.bias, -5.0)  # the min is member b's, not the first member's
    batch = (torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[5, 2]]),
             torch.ones(1, 2, dtype=torch.long))
    ra, rb = a.score(*batch), b.score(*batch)
    assert torch.allclose(Ensemble([a, b], "mean").score(*batch), (ra + rb) / 2)
    assert torch.allclose(Ensemble([a, b], "min").score(*batch), torch.minimum(ra, rb))
    assert torch.equal(torch.minimum(ra, rb), rb)


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def pair(c="fine", r="go away", prefix="\n\nHuman: hi\n\nAssistant:"):
    return json.dumps({"chosen": prefix + " " + c, "rejected": prefix + " " + r})


def test_hh_loader_splits_prompt_and_responses(tmp_path):
    p = tmp_path / "ok.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(pair() + "\n" + pair("sure", "no", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") + "\n")
    pairs = load_hh_pairs(p)
    assert pairs[0] == ("\n\nHuman: hi\n\nAssistant:", " fine", " go away")
    assert pairs[1][0].endswith("c\n\nAssistant:") and pairs[1][1:] == (" sure", " no")


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"bad\.jsonl:2: malformed JSON"),
    (json.dumps({"chosen": "\n\nHuman: x\n\nAssistant: y"}), r"bad\.jsonl:2: missing field 'rejected'"),
    (json.dumps({"chosen": 3, "rejected": "x"}), r"bad\.jsonl:2: field 'chosen' must be a string"),
    (json.dumps({"chosen": "no turns", "rejected": "x"}), r"bad\.jsonl:2: field 'chosen'"),
    (json.dumps([1, 2]), r"bad\.jsonl:2: expected a JSON object"),
])
def test_hh_loader_names_file_line_and_field(tmp_path, bad, message):
    p = tmp_path / "bad.jsonl"
    write_jsonl(p, [pair(), bad])
    with pytest.raises(DataError, match=message):
        load_hh_pairs(p)


def test_hh_loader_invalid_utf8_and_empty(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(pair().encode() + b"\n" + b'{"chosen": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid UTF-8"):
        load_hh_pairs(p)
    e = tmp_path / "empty.jsonl"
    e.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable preference pairs \(empty file\)"):
        load_hh_pairs(e)


def test_hh_loader_drops_identical_pairs_and_refuses_a_file_of_nothing_else(tmp_path, capsys):
    p = tmp_path / "same.jsonl"
    write_jsonl(p, [pair("yes", "yes"), pair()])
    assert load_hh_pairs(p) == [("\n\nHuman: hi\n\nAssistant:", " fine", " go away")]
    assert "dropped 1 pairs whose chosen and rejected responses are identical" in capsys.readouterr().err
    write_jsonl(p, [pair("yes", "yes"), pair("no", "no")])
    with pytest.raises(DataError, match=r"same\.jsonl: no usable preference pairs \(all 2 have chosen == rejected\)"):
        load_hh_pairs(p)


def test_hh_loader_names_a_truncated_corrupt_or_fake_gzip(tmp_path):
    good = gzip.compress(("\n".join(pair(str(i)) for i in range(200)) + "\n").encode())
    cases = {"cut.jsonl.gz": (good[:len(good) // 2], "truncated gzip file"),
             "text.jsonl.gz": (pair().encode() + b"\n", "not a valid gzip file"),
             "flipped.jsonl.gz": (good[:-8] + bytes(8), "not a valid gzip file")}  # checksum and size zeroed
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"{name}: {message}"):
            load_hh_pairs(tmp_path / name)


@pytest.mark.skipif(not os.path.exists(HH), reason="../shared/data/hh-rlhf not present")
def test_real_hh_rlhf_file_loads():
    pairs = load_hh_pairs(HH)
    assert len(pairs) > 2000
    assert all(p.endswith("Assistant:") for p, _, _ in pairs[:100])


def test_an_rm_with_no_pairs_is_an_error_not_a_hang():
    # sample_pairs drops pairs of identical responses: a near-deterministic SFT can leave none
    from minirlhf.plumbing.config import RMConfig
    from minirlhf.rm import RMLoop, rm_accuracy
    sft = GPT(GPTConfig(vocab_size=8, n_positions=8, n_embd=8, n_layer=1, n_head=1))
    with pytest.raises(DataError, match="no preference pairs to train on"):
        RMLoop(sft.parameters(), [], RMConfig(), seed=0)
    assert math.isnan(rm_accuracy(None, None, []))
