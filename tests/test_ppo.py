import math
from types import SimpleNamespace

import numpy as np
import torch

from minirlhf import ppo
from minirlhf.evaluate import best_of_n_curve, win_tie_lose


def test_gae_hand_computed_three_tokens():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    mask = torch.ones(1, 3)
    gamma, lam = 1.0, 0.5
    d2 = 1.0 + 0 - 0.3  # last token: V(after) = 0
    d1 = 0.0 + 0.3 - 0.4
    d0 = 0.0 + 0.4 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, adv + values)


def test_gae_matches_naive_double_loop_with_padding():
    torch.manual_seed(0)
    B, N, gamma, lam = 4, 7, 0.9, 0.8
    rewards, values = torch.randn(B, N), torch.randn(B, N)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (N - n) for n in lengths])
    rewards = rewards * mask
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        v = values[b, :n].tolist() + [0.0]  # value after the last real token is 0
        for t in range(n):
            expected = sum((gamma * lam) ** (k - t) * (rewards[b, k].item() + gamma * v[k + 1] - v[k])
                           for k in range(t, n))
            assert math.isclose(adv[b, t].item(), expected, rel_tol=1e-5, abs_tol=1e-5)
            assert math.isclose(ret[b, t].item(), expected + v[t], rel_tol=1e-5, abs_tol=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    w = ppo.masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert abs(valid.mean().item()) < 1e-6
    assert abs(valid.var(unbiased=False).item() - 1) < 1e-4
    assert (w[~mask.bool()] == 0).all()


def test_shaped_rewards_put_score_on_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, -9.0], [-0.5, -1.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    rewards, kl = ppo.shaped_rewards(torch.tensor([10.0, 20.0]), logp, ref, mask, kl_coef=0.1)
    expected = -0.1 * (logp - ref) * mask
    expected[0, 2] += 10.0
    expected[1, 1] += 20.0
    torch.testing.assert_close(rewards, expected)
    assert (rewards[mask == 0] == 0).all() and (kl[mask == 0] == 0).all()


def test_unfinished_response_gets_penalty():
    r = ppo.sequence_reward(torch.tensor([3.0, 3.0]), torch.tensor([True, False]), -1.0)
    assert r.tolist() == [3.0, -1.0]


def test_adaptive_kl_controller():
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2
    assert math.isclose(ctl.value, 0.1 * (1 + 0.2 * 100 / 10000))
    ctl.update(current_kl=5.0, n_steps=100)  # error -1/6
    assert math.isclose(ctl.value, 0.1 * (1 + 0.2 * 0.01) * (1 - (1 / 6) * 0.01))
    fixed = ppo.FixedKLController(0.05)
    fixed.update(100.0, 100)
    assert fixed.value == 0.05


def test_policy_loss_clips():
    adv = torch.tensor([[1.0, -1.0]])
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratio 1.5 (clipped to 1.2 for A>0), 0.5 (clipped to 0.8, A<0)
    loss, stats = ppo.policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    assert math.isclose(loss.item(), (-1.2 + 0.8) / 2, rel_tol=1e-6)
    assert stats["ppo/policy/clipfrac"] == 1.0


def test_policy_loss_keeps_the_unclipped_term_when_it_is_the_larger_and_ignores_padding():
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    ratio = torch.tensor([[0.5, 1.5, 100.0]])  # the third token is padding: its ratio must not count
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo.policy_loss(torch.log(ratio), torch.zeros(1, 3), adv, mask, clip=0.2)
    # A > 0 with ratio 0.5 and A < 0 with ratio 1.5: the pessimistic (max) term is the unclipped one
    assert math.isclose(loss.item(), (-0.5 + 1.5) / 2, rel_tol=1e-6)
    assert stats["ppo/policy/clipfrac"] == 0.0
    k3 = ((0.5 - 1 - math.log(0.5)) + (1.5 - 1 - math.log(1.5))) / 2
    assert math.isclose(stats["ppo/policy/approx_kl"], k3, rel_tol=1e-6)


def test_value_loss_clipped():
    v, old, ret = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])
    loss, _ = ppo.value_loss(v, old, ret, torch.ones(1, 1), clip=0.2)
    assert math.isclose(loss.item(), 0.5 * (0.2 - 1.0) ** 2, rel_tol=1e-6)  # the clipped error is the larger
    # the unclipped error the larger (the new value overshoots a return below the old one): it counts
    loss, stats = ppo.value_loss(v, old, torch.tensor([[-1.0]]), torch.ones(1, 1), clip=0.2)
    assert math.isclose(loss.item(), 0.5 * (1.0 + 1.0) ** 2, rel_tol=1e-6)
    assert stats["ppo/val/clipfrac"] == 0.0


def test_explained_variance():
    returns, mask = torch.tensor([[1.0, 2.0, 4.0, 99.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert math.isclose(ppo.explained_variance(returns, returns, mask), 1.0)  # a perfect critic
    assert abs(ppo.explained_variance(torch.zeros(1, 4), returns, mask)) < 1e-6  # a constant one
    # wrong on the padding alone: still perfect, because padding is not a token
    off_pad = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    assert math.isclose(ppo.explained_variance(off_pad, returns, mask), 1.0)


def test_critic_value_of_token_t_sees_the_tokens_before_t_only():
    from minirlhf.generate import left_pad
    from minirlhf.model import GPT, GPTConfig, ScalarModel
    from minirlhf.ppo_trainer import critic_values
    torch.manual_seed(0)
    critic = ScalarModel(GPT(GPTConfig(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2))).eval()
    prompt, pm = left_pad([[5, 6, 7], [8]], pad_id=0)
    response = torch.tensor([[3, 4, 9, 10], [11, 12, 0, 0]])
    rmask = (response != 0).long()
    with torch.no_grad():
        v = critic_values(critic, prompt, pm, response, rmask)
        changed = response.clone()
        changed[:, 1] = 13  # a different token 1: V for token 1 is the state before it, unchanged
        w = critic_values(critic, prompt, pm, changed, rmask)
        alone = critic_values(critic, prompt[1:, -1:], pm[1:, -1:], response[1:, :2], rmask[1:, :2])
    assert torch.equal(v[:, :2], w[:, :2]) and not torch.allclose(v[:, 2], w[:, 2])
    assert (v[1, 2:] == 0).all()  # padding
    torch.testing.assert_close(v[1:, :2], alone)  # a left-padded row equals that row alone


def test_win_tie_lose():
    w = win_tie_lose([3, 1, 2, 0], [1, 1, 5, -1])
    assert (w["win"], w["tie"], w["lose"], w["win_rate"]) == (0.5, 0.25, 0.25, 0.625)


def test_best_of_n_estimator_matches_brute_force():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    from itertools import combinations
    for n, kl, est in best_of_n_curve(proxy, gold, [1, 2, 3, 6]):
        brute = np.mean([np.mean([gold[p, max(c, key=lambda i: proxy[p, i])] for c in combinations(range(6), n)])
                         for p in range(3)])
        assert math.isclose(est, brute, rel_tol=1e-9)
        assert math.isclose(kl, math.log(n) - (n - 1) / n)


def test_evaluation_uses_both_samples_of_each_prompt(monkeypatch):
    """Gold, proxy, KL and the win-rate average the two samples drawn per prompt (none is wasted)."""
    from minirlhf import evaluate as ev
    draws = iter([(["a1", "a22"], np.array([0.5, 1.5]), np.array([2, 3])),
                  (["b333", "b4444"], np.array([2.5, 3.5]), np.array([4, 5]))])
    monkeypatch.setattr(ev, "sample_with_kl", lambda *args: next(draws))
    proxy = {"a1": 1.0, "a22": 2.0, "b333": 3.0, "b4444": 4.0}
    monkeypatch.setattr(ev, "score_responses",
                        lambda rm, batcher, prompts, ys: torch.tensor([proxy[y] for y in ys]))

    class Task:  # gold = the response's length
        golds = staticmethod(lambda prompts, responses: [float(len(y)) for y in responses])
    batcher = SimpleNamespace(tok=SimpleNamespace(eos_id=0, text=str))
    out = ev.evaluate(None, None, None, Task(), batcher, ["p", "q"], np.array([2.5, 4.5]), 1.0, None)
    assert out["eval/gold"] == (2 + 3 + 4 + 5) / 4 and out["gold_per_prompt"] == [3.0, 4.0]
    assert out["eval/proxy"] == 2.5 and out["eval/kl"] == 2.0 and out["eval/length"] == 3.5
    assert out["eval/win_rate"] == 0.5  # a loses both prompts, b wins both


def test_the_sft_draws_reused_are_bit_for_bit_what_drawing_again_gives(monkeypatch):
    """The SFT's draws (a seed's win-rate baseline and first evaluation) are drawn once and reused,
    the generator left where drawing would leave it; a policy with other weights is drawn anew."""
    import copy

    from minirlhf import evaluate as ev
    from minirlhf.data.batches import Batcher
    from minirlhf.data.tasks import get_task
    from minirlhf.model import GPT, GPTConfig
    task = get_task("reviews")
    torch.manual_seed(0)
    sft = GPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, n_positions=48, n_embd=16, n_layer=1,
                        n_head=2)).eval()
    batcher, prompts = Batcher(task.tokenizer, 16, 24), ["review pizza staff positive :"] * 3
    policy = copy.deepcopy(sft)
    from minirlhf.plumbing import memo
    monkeypatch.setattr(memo, "MEMO", {})
    calls, real = [], ev.generate
    monkeypatch.setattr(ev, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))

    def draw(model, reuse):
        g = torch.Generator().manual_seed(5)
        out = ev.drawn(model, sft, task, batcher, prompts, 1.0, g, 2, reuse)
        return out, torch.rand(1, generator=g)  # and where the generator was left
    fresh = draw(policy, False)
    first, again = draw(policy, True), draw(policy, True)
    assert len(calls) == 2 * 2 and len(memo.MEMO) == 1  # the second reuse drew nothing
    for (x, u), (y, v) in ((fresh, first), (fresh, again)):
        assert torch.equal(u, v)
        for a, b in zip(x, y):
            assert a[0] == b[0] and all(np.array_equal(s, t) for s, t in zip(a[1:], b[1:]))
    with torch.no_grad():
        policy.lm_head.weight.mul_(1.5)  # another policy: drawn anew, not from the memo
    draw(policy, True)
    assert len(calls) == 3 * 2 and len(memo.MEMO) == 1
