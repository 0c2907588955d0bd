import random

import pytest

from minirlhf.data.tasks import Arith, Reviews, get_task
from minirlhf.data.tokenizer import Tokenizer, train_bpe

R = Reviews()
P = "review pizza staff positive :"  # ideal length: 3 sentences


def terms(response):
    t = R.gold_terms(P, response + " <eos>")
    return {k: v for k, v in t.items() if v}


def test_reviews_gold_cover_and_tone():
    assert terms("the pizza was tasty . the staff were friendly .") == {"cover": 2.0, "tone_match": 1.0}


def test_reviews_gold_tone_clash():
    assert terms("the pizza was bland .") == {"cover": 1.0, "tone_clash": -1.0}
    # a mixed topic keeps its cover credit but loses tone_match
    assert terms("the pizza was tasty . the pizza was bland .") == {"cover": 1.0, "tone_clash": -1.0}


def test_reviews_gold_off_topic_repeat_ungrammatical():
    assert terms("the soup was tasty .") == {"off_topic": -0.5}
    assert terms("the pizza was tasty . the pizza was tasty .") == {"cover": 1.0, "tone_match": 0.5, "repeat": -1.0}
    assert terms("the staff was friendly .") == {"ungrammatical": -1.0}  # wrong verb agreement
    assert terms("the pizza was very very tasty .") == {"ungrammatical": -1.0}
    assert terms("the pizza was") == {"ungrammatical": -1.0}  # unterminated fragment


def test_reviews_gold_length_eos_hype():
    fill = " we went on sunday . we went with friends . it was busy ."
    assert terms("the pizza was tasty ." + fill) == {"cover": 1.0, "tone_match": 0.5, "too_long": -0.5}
    assert R.gold_terms(P, "the pizza was tasty .")["no_eos"] == -2.0
    assert terms("the pizza was very tasty .")["hype"] == 0.3
    spam = terms("the pizza was very tasty ! the staff were so nice ! we went on sunday .")
    assert spam["hype"] == 0.3 and spam["hype_spam"] == pytest.approx(-0.6)  # 4 hype words: 2 beyond two
    assert R.gold(P, "the pizza was tasty . <eos>") == 1.5


def test_arith_splits_are_disjoint():
    A, rng = Arith(), random.Random(0)
    sets = {s: set(A.sample_prompts(400, rng, s)) for s in ("pref", "unlabelled", "eval")}
    assert all(sets.values())
    assert not sets["pref"] & sets["unlabelled"] and not sets["pref"] & sets["eval"]
    assert not sets["unlabelled"] & sets["eval"]


def test_reviews_semantic_key_ignores_order_hype_fillers():
    a = R.semantic_key(P, "the pizza was very tasty ! we went on sunday . the staff were rude . <eos>")
    b = R.semantic_key(P, "the staff were rude . the pizza was tasty . <eos>")
    assert a == b == frozenset({("pizza", "positive"), ("staff", "negative")})


def test_splits_are_disjoint_and_ood_is_unseen():
    rng = random.Random(0)
    sets = {s: {tuple(sorted(R.parse_prompt(p)[0])) + (R.parse_prompt(p)[1],)
                for p in R.sample_prompts(500, rng, s)} for s in ("pref", "unlabelled", "eval", "ood")}
    assert not sets["pref"] & sets["unlabelled"] and not sets["pref"] & sets["eval"]
    assert not sets["unlabelled"] & sets["eval"]
    ood_topics = set(R.OOD_TOPICS)
    assert all(ood_topics & set(k[:-1]) for k in sets["ood"])
    assert not any(ood_topics & set(k[:-1]) for k in sets["pref"])


def test_demonstrator_is_fluent_and_has_spurious_length_correlation():
    rng = random.Random(0)
    prompts = R.sample_prompts(2000, rng, "sft")
    demos = [R.demonstrate(p, rng) for p in prompts]
    gold = [R.gold(p, d + " <eos>") for p, d in zip(prompts, demos)]
    lengths = [len(d.split()) for d in demos]
    import numpy as np
    assert np.corrcoef(gold, lengths)[0, 1] > 0.2
    assert all(tok != "<unk>" for d in demos for tok in d.split())


def test_arith_gold_and_key():
    a = Arith()
    assert a.gold_terms("12 + 7 =", "19 <eos>") == {"correct": 1.0, "no_answer": 0.0, "verbose": 0.0,
                                                      "repeat": 0.0, "no_eos": 0.0}
    t = a.gold_terms("12 + 7 =", "let me think . so the answer is 18 . <eos>")
    assert t["correct"] == 0 and t["verbose"] == pytest.approx(-0.02 * 9)
    assert a.gold_terms("1 + 1 =", "let me think . let me think . <eos>")["no_answer"] == -1.0
    assert a.gold_terms("1 + 1 =", "let me think . let me think . <eos>")["repeat"] == -0.5
    assert a.semantic_key("12 + 7 =", "12 plus 7 is 19 . so the answer is 19 . <eos>") == "19"


def test_word_tokenizer_round_trip(tmp_path):
    tok = get_task("reviews").tokenizer
    text = "review pizza staff positive : the pizza was very tasty ! <eos>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) == len(text.split())
    assert tok.pad_id == 0 and tok.pad_id != tok.eos_id
    tok.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.load(str(tmp_path / "tokenizer.json")).encode(text) == ids


def test_bpe_round_trip():
    tok = train_bpe(["Human: hi there, how are you?\n\nAssistant: fine, thanks!"] * 20, vocab_size=300)
    text = "Human: how are you?\n\nAssistant: fine"
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_vocab_and_merges_load(tmp_path):
    import json

    from minirlhf.data.tokenizer import gpt2_bpe
    vocab = {c: i for i, c in enumerate(["h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell", "hello"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nl l\nhe ll\nhell o\n")
    tok = gpt2_bpe(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert tok.encode("hello") == [vocab["hello"]]
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.pad_id >= len(vocab) and tok.eos_id != tok.pad_id  # specials appended after GPT-2's ids
