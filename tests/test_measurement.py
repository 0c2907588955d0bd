"""The measurements the report rests on: each test here failed before its fix (Science v2's bug list)."""
import pytest
import torch

from minirlhf import metarm, ppo_trainer, rlp, rm as rm_stage
from minirlhf.data.batches import Batcher, encode_responses
from minirlhf.data.tasks import get_task
from minirlhf.generate import response_mask, sampled_responses
from minirlhf.model import GPT, GPTConfig, ScalarModel
from minirlhf.pipeline import prepare_rl
from minirlhf.plumbing.config import RefineConfig, parse_args
from minirlhf.rm import load_preferences
from minirlhf.study.report import trajectories


def smoke(out, *extra):
    return parse_args(["--preset=smoke", f"--out_dir={out}", "--rm_pairs=128", "--sft_steps=30",
                       "--refine_prompts=64", *extra], RefineConfig)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("measure"))
    return out, prepare_rl(smoke(out))


def recording(monkeypatch, module, name, calls):
    """Wrap module.name so that every call's arguments are appended to `calls`."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)


def test_rlp_rm_accuracy_on_policy_pairs_uses_pairs_no_refinement_trained_on(trained, monkeypatch):
    out, (device, source, sft, rm) = trained
    prefs = load_preferences(out)
    accuracy, training = [], []
    recording(monkeypatch, rlp, "rm_accuracy", accuracy)
    recording(monkeypatch, rlp, "fit_rm", training)
    rlp.rlp_round(smoke(out), "oracle", source, sft, rm, prefs, device)
    trained_prompts = {p for p, _, _ in training[0][0][1]}
    measured = [pairs for (_, _, pairs), _ in accuracy if pairs is not prefs["held_clean"]]
    assert measured and all(pairs for pairs in measured)
    assert not trained_prompts & {p for pairs in measured for p, _, _ in pairs}


def test_every_rlp_method_and_the_control_take_the_same_number_of_rm_steps(trained, monkeypatch):
    out, (device, source, sft, rm) = trained
    cfg, prefs, steps = smoke(out), load_preferences(out), {}
    for method in ("control", "oracle"):
        calls = []
        recording(monkeypatch, rlp, "fit_rm", calls)
        rlp.rlp_round(cfg, method, source, sft, rm, prefs, device)
        (_, pairs, *_), kwargs = calls[0]
        steps[method] = kwargs.get("steps_per_epoch") or len(pairs) // cfg.rm_batch
        assert len(pairs) == len(prefs["train"])
        assert method == "control" or len(kwargs["newest"]) > cfg.rm_batch  # more pairs
    assert steps["control"] == steps["oracle"]


def test_a_short_rm_run_still_reaches_its_lr_decay(trained, monkeypatch):
    out, (device, source, sft, rm) = trained
    cfg = smoke(out, "--warmup=30", "--rm_batch=4")
    batcher = Batcher.of(cfg, source.tokenizer, device)
    pairs = load_preferences(out)["train"][:31 * 4]  # one epoch of 31 steps, as a MetaRM round's
    calls = []
    recording(monkeypatch, rm_stage, "cosine_lr", calls)
    rm_stage.fit_rm(sft, pairs, cfg, batcher, seed=0, epochs=1)
    (step, total, peak, warmup), _ = calls[-1]
    assert total == 31 and warmup <= total // 2 and rm_stage.cosine_lr(step, total, peak, warmup) < 0.2 * peak


def test_ood_rounds_are_judged_on_held_out_ood_prompts(trained, monkeypatch):
    out, (device, source, sft, _) = trained
    splits = []
    original = source.task.sample_prompts
    monkeypatch.setattr(source.task, "sample_prompts",
                        lambda n, rng, split: splits.append(split) or original(n, rng, split))
    metarm.meta_rounds(smoke(out, "--ood=True", "--rounds=1", "--iters=2"), "vanilla-rounds", source,
                       sft, load_preferences(out), device)
    assert "ood-eval" in splits and "eval" not in splits and "unlabelled" not in splits


@pytest.mark.parametrize("name", ["reviews", "arith"])
def test_ood_split_has_a_disjoint_held_out_part(name):
    task = get_task(name)
    assert task.keys["ood"] and task.keys["ood-eval"] and not set(task.keys["ood"]) & set(task.keys["ood-eval"])


def test_a_later_round_continues_the_prompt_batches_instead_of_replaying_them(trained, monkeypatch):
    out, (device, source, sft, rm) = trained
    cfg = smoke(out, "--rounds=2", "--iters=4")
    batches = {}
    for run in ("rounds", "vanilla"):
        calls = []
        recording(monkeypatch, ppo_trainer, "rollout", calls)
        if run == "rounds":
            metarm.meta_rounds(cfg, "vanilla-rounds", source, sft, load_preferences(out), device)
        else:
            ppo_trainer.train_ppo(cfg, source, sft, rm, device, name="ppo_batches")
        batches[run] = [args[4] for args, _ in calls]  # the encoded prompts of each iteration
        monkeypatch.undo()
    assert len(batches["rounds"]) == 4
    assert not torch.equal(batches["rounds"][0], batches["rounds"][2])
    assert all(torch.equal(a, b) for a, b in zip(batches["rounds"], batches["vanilla"]))  # paired with PPO


def test_matched_kl_shows_a_run_of_rounds_once():
    names = ["ppo", "uml", "metarm r1", "metarm r2", "vanilla-rounds r1", "vanilla-rounds r2"]
    assert trajectories(names) == ["ppo", "uml", "metarm r2", "vanilla-rounds r2"]


def test_a_pad_sampled_mid_response_stays_a_real_token_where_later_stages_score_it():
    tok = get_task("reviews").tokenizer
    the, pizza, was = (tok.encode(w)[0] for w in ("the", "pizza", "was"))
    response = torch.tensor([[the, pizza, tok.pad_id, was, tok.eos_id]])
    mask = response_mask(response, tok.eos_id)  # the tensor path (PPO's scoring)
    sampled = sampled_responses(response, mask)
    assert tok.text(sampled[0]) == "the pizza <pad> was <eos>"  # what the gold judge reads
    ids, text_mask = encode_responses(tok, sampled, 10)
    assert torch.equal(ids[:, :5], response) and torch.equal(text_mask[:, :5], mask)
    torch.manual_seed(0)
    rm = ScalarModel(GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2)))
    prompt, pm = Batcher(tok, 8, 10).prompts(["review pizza staff positive :"])
    assert torch.allclose(rm.score(prompt, pm, response, mask), rm.score(prompt, pm, ids, text_mask))


def test_rounds_start_short_and_share_vanilla_ppos_budget():
    from minirlhf.ppo_trainer import round_lengths
    assert round_lengths(40, 1) == [40] and round_lengths(40, 2) == [20, 20]
    assert round_lengths(40, 3) == [10, 10, 20] and round_lengths(40, 4) == [7, 6, 14, 13]
    assert round_lengths(40, 8) == [3, 3, 5, 6, 6, 6, 5, 6]
    assert all(sum(round_lengths(n, r)) == n and min(round_lengths(n, r)) >= 1
               for r in range(1, 10) for n in range(max(1, 2 * r - 2), 60))


def test_gold_reward_scores_encoded_texts_like_the_task_normalised(trained):
    from minirlhf.study.ceilings import GoldReward
    out, (device, source, sft, rm) = trained
    task, tok = source.task, source.tokenizer
    prompts = task.sample_prompts(6, __import__("random").Random(0), "eval")
    responses = [task.demonstrate(p, __import__("random").Random(i)) + " <eos>" for i, p in enumerate(prompts)]
    gold = GoldReward(task, tok, rm, prompts, responses)
    scores = gold.score(*Batcher(tok, 24, 40).batch(prompts, responses))
    expected = torch.tensor([task.gold(p, y) for p, y in zip(prompts, responses)])
    assert torch.allclose(scores, (expected - expected.mean()) / expected.std(), atol=1e-6)


@pytest.mark.parametrize("method", ["oracle-iter", "control-iter"])
def test_iterated_refinement_runs_rounds_that_continue_the_policy(trained, method):
    from minirlhf.study.iterated import iterated_rounds
    out, (device, source, sft, rm) = trained
    # a learning rate large enough that 2 iterations move the policy measurably (KL is estimated from samples)
    rows = iterated_rounds(smoke(out, "--rounds=2", "--iters=4", "--oracle_pairs=50", "--ppo_lr=3e-3"), method,
                           source, sft, rm, load_preferences(out), device)
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["sft"]["eval/kl"] > 0.2  # round 2 starts drifted
    assert (rows[1].get("oracle/pairs", 0) > 0) == (method == "oracle-iter")


def test_gold_ppo_ceiling_runs(trained):
    from minirlhf.study.ceilings import GoldReward, gold_ppo
    out, (device, source, sft, rm) = trained
    prefs = load_preferences(out)
    result = gold_ppo(smoke(out), source, sft, rm, prefs, device)
    assert result["final"]["iter"] == 3
    # the reward PPO saw, evaluated as its proxy, is the normalised gold itself
    gold = GoldReward(source.task, source.tokenizer, rm, prefs["norm_prompts"], prefs["sft_samples"])
    for p in result["curve"]:
        assert abs(p["eval/proxy"] - (p["eval/gold"] - gold.mean) / gold.std) < 1e-4


def test_big_rm_ceiling_trains_on_ten_times_the_pairs(trained):
    from minirlhf.study.ceilings import big_rm_ppo
    out, (device, source, sft, rm) = trained
    result = big_rm_ppo(smoke(out, "--rm_pairs=32"), source, sft, device)
    assert 10 * 32 * 0.8 <= result["rm_pairs"] <= 10 * 32  # identical sample pairs are dropped
    assert result["final"]["iter"] == 3 and 0 <= result["rm_after"]["held_out_acc_gold"] <= 1


def test_a_later_round_continues_its_rm_and_does_not_re_evaluate_its_start(trained, monkeypatch):
    from minirlhf.study.iterated import iterated_rounds
    out, (device, source, sft, rm) = trained
    calls = []
    recording(monkeypatch, rlp, "fit_rm", calls)
    rows = iterated_rounds(smoke(out, "--rounds=2", "--iters=4", "--eval_every=1", "--oracle_pairs=50"),
                           "oracle-iter", source, sft, rm, load_preferences(out), device)
    assert calls[0][1]["init"] is None and calls[1][1]["init"] is not None and calls[1][1]["epochs"] == 1
    assert [p["iter"] for p in rows[0]["curve"]] == [0, 1, 2]
    assert [p["iter"] for p in rows[1]["curve"]] == [1, 2]  # its start is round 1's end, judged there


def test_oracle_pairs_are_dealt_over_every_prompt_before_a_cut():
    class ByLength:
        def golds(self, prompts, responses):
            return [len(y) for y in responses]

        def text(self, response):
            return response
    samples = [["a", "bb", "ccc", "dddd"]] * 3
    pairs = rlp.all_clean_pairs(ByLength(), ["p0", "p1", "p2"], samples, __import__("random").Random(0))
    assert len(pairs) == 18 and [p for p, _, _ in pairs[:3]] == ["p0", "p1", "p2"]
    assert all(len(win) > len(lose) for _, win, lose in pairs)


def test_rlp_uml_records_its_terms_every_step(trained):
    from minirlhf.plumbing.runtime import read_jsonl
    out, (device, source, sft, rm) = trained
    cfg = smoke(out)
    rlp.rlp_round(cfg, "uml", source, sft, rm, load_preferences(out), device)
    rows = [r for r in read_jsonl(f"{out}/metrics.jsonl") if r["stage"] == "rm_uml"]
    steps = max(1, (len(load_preferences(out)["train"]) + cfg.oracle_pairs) // cfg.rm_batch) * cfg.rm_epochs
    assert [r["step"] for r in rows] == list(range(steps))
    for r in rows:  # L_M = -I + beta * SKL, and the step's loss is BT + lambda * L_M
        assert r["l_m"] == pytest.approx(-r["mi"] + cfg.mib_beta * r["skl"], abs=1e-5)
        assert r["loss"] == pytest.approx(r["bt"] + cfg.uml_lambda * r["l_m"], abs=1e-5)


def test_on_real_text_every_score_is_of_the_tokens_as_sampled():
    """A byte-level BPE does not survive decode-then-encode: a random policy's samples come back as
    other tokens. The RM's pairs, the gold RM and the evaluation must score the sequence PPO
    optimises (the tensors `generate` returned), EOS status included."""
    from minirlhf.data.file_task import FileTask
    from minirlhf.data.tokenizer import train_bpe
    from minirlhf.generate import generate
    from minirlhf.rm import sample_pairs, score_responses
    texts = ["Hello there, how are you doing today?", "I would like some coffee and a cake, please.",
             "Ça va très bien — merci!", "The weather is lovely; let's walk by the river."]
    tok = train_bpe(texts * 30, vocab_size=300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=2)
    policy, rm, gold_rm = GPT(cfg).eval(), ScalarModel(GPT(cfg)).eval(), ScalarModel(GPT(cfg)).eval()
    batcher, prompts = Batcher(tok, 16, 24), [f"\n\nHuman: {t}\n\nAssistant:" for t in texts] * 8
    prompt, pm = batcher.prompts(prompts)
    response, _, mask = generate(policy, prompt, pm, 24, tok.eos_id, tok.pad_id,
                                 generator=torch.Generator().manual_seed(1))
    sampled = sampled_responses(response, mask)
    assert sum(tok.encode(tok.text(y)) != list(y) for y in sampled) >= 8  # the test has teeth
    with torch.no_grad():  # the RM and the gold RM as PPO and the evaluation's proxy see them
        torch.testing.assert_close(score_responses(rm, batcher, prompts, sampled), rm.score(prompt, pm, response, mask))
        task = FileTask("file", {}, gold_rm, batcher)
        assert torch.allclose(torch.tensor(task.golds(prompts, sampled)), gold_rm.score(prompt, pm, response, mask),
                              atol=1e-5)
    # the RM's training pairs are the samples themselves, not their re-encoded texts
    pairs = sample_pairs(policy, batcher, prompts[:4], 1.0, torch.Generator().manual_seed(1))
    assert all(isinstance(y, tuple) for _, a, b in pairs for y in (a, b))
    again, _, again_mask = generate(policy, *batcher.prompts(prompts[:4]), 24, tok.eos_id, tok.pad_id,
                                    generator=torch.Generator().manual_seed(1))  # the pairs' first draws
    assert len(pairs) == 4 and [a for _, a, _ in pairs] == sampled_responses(again, again_mask)


def test_no_two_seeds_streams_or_rounds_share_a_draw():
    """The paired tests treat seeds as independent: no two of the first 64 seeds, no two streams and
    no two rounds (or steps, iterations, members) draw from one seed, nor the same prompt batch."""
    import random

    from minirlhf.plumbing import seeds
    task, found, batches = get_task("reviews"), set(), set()
    for seed in range(64):
        for name in seeds.NAMES:
            for index in ([(r, draw) for r in range(16) for draw in range(3)] if name == seeds.PPO_ITERATION
                          else [()] + [(r,) for r in range(16)]):
                s = seeds.stream(seed, name, *index)
                assert 0 <= s < 2 ** 62 and s not in found, (seed, name, index)
                found.add(s)
                batches.add(tuple(task.sample_prompts(8, random.Random(s), "unlabelled")))
    assert len(batches) == len(found)


def test_every_epoch_holds_each_newest_pair_however_many_pairs_came_before():
    # an iterated round's epoch: D + 8 earlier rounds' pairs, and this round's 40 (v2 drew the
    # epoch from all of them, so a new pair was in it with probability 60 / 380)
    cfg = smoke("unused", "--rm_batch=4")
    earlier = [("p", f"old {i}", "y") for i in range(380)]
    newest = [("p", f"new {i}", "y") for i in range(40)]
    loop = rm_stage.RMLoop([torch.nn.Parameter(torch.zeros(1))], earlier, cfg, seed=0, epochs=2,
                           steps_per_epoch=15, newest=newest)
    batches = list(loop)
    for epoch in (batches[:15], batches[15:]):
        seen = [pair for batch in epoch for pair in batch]
        assert len(seen) == 60 and all(seen.count(pair) == 1 for pair in newest)


def test_an_iterated_round_trains_on_its_new_pairs_as_newest(trained, monkeypatch):
    from minirlhf.study.iterated import iterated_rounds
    out, (device, source, sft, rm) = trained
    calls = []
    recording(monkeypatch, rlp, "fit_rm", calls)
    iterated_rounds(smoke(out, "--rounds=2", "--iters=4", "--oracle_pairs=50"), "oracle-iter",
                    source, sft, rm, load_preferences(out), device)
    (_, pairs1, *_), first = calls[0]
    (_, pairs2, *_), second = calls[1]
    d = len(load_preferences(out)["train"])
    assert len(pairs1) == d and len(first["newest"]) == 50
    # round 2: D and round 1's pairs fill the epoch; its own 50 are each in every epoch
    assert pairs2[d:] == first["newest"] and len(second["newest"]) == 50
    assert not set(second["newest"]) & set(pairs2)


def test_a_later_round_goes_on_with_the_ppo_state_of_the_round_before(trained, monkeypatch):
    out, (device, source, sft, rm) = trained
    cfg = smoke(out, "--rounds=2", "--iters=4")
    starts, original = [], ppo_trainer.rollout

    def rollout(policy, ref, critic, *args):
        starts.append(({k: v.clone() for k, v in critic.state_dict().items()}, args[-1]))
        return original(policy, ref, critic, *args)
    monkeypatch.setattr(ppo_trainer, "rollout", rollout)
    metarm.meta_rounds(cfg, "vanilla-rounds", source, sft, load_preferences(out), device)
    round1 = torch.load(f"{out}/vanilla-rounds_r1.pt", weights_only=True)
    first, second = ppo_trainer.round_lengths(4, 2)
    critic, kl_coef = starts[first]  # round 2's first iteration
    assert all(torch.equal(critic[k], v) for k, v in round1["critic"].items())
    assert kl_coef == round1["kl_coef"]
    round2 = torch.load(f"{out}/vanilla-rounds_r2.pt", weights_only=True)
    assert round2["opt_v"]["state"][0]["step"] == round1["opt_v"]["state"][0]["step"] * (1 + second / first)
