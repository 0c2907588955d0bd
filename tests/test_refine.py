import copy
import math
import random

import pytest
import torch

from minirlhf.metarm import difference_objective, meta_step, meta_step_second_order
from minirlhf.model import GPT, GPTConfig, ScalarModel
from minirlhf.reward import bt_loss
from minirlhf.rlp import (MIBHead, cluster_by_similarity, jsd_mi, mib_loss, symmetric_kl,
                          synthetic_preferences)


# ---- RLP-UML ----------------------------------------------------------------------------------------------------
def test_symmetric_kl_zero_for_equal_and_matches_monte_carlo():
    torch.manual_seed(0)
    mu, sigma = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    assert torch.allclose(symmetric_kl(mu, sigma, mu, sigma), torch.zeros(3), atol=1e-6)
    mu2, sigma2 = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    p, q = torch.distributions.Normal(mu, sigma), torch.distributions.Normal(mu2, sigma2)
    x, y = p.sample((200_000,)), q.sample((200_000,))
    mc = 0.5 * ((p.log_prob(x) - q.log_prob(x)).sum(-1).mean(0) + (q.log_prob(y) - p.log_prob(y)).sum(-1).mean(0))
    torch.testing.assert_close(symmetric_kl(mu, sigma, mu2, sigma2), mc, rtol=0.03, atol=0.03)


def test_jsd_mi_higher_for_dependent_pairs():
    torch.manual_seed(0)
    z1 = torch.randn(512, 8)
    critic = lambda a, b: (a * b).sum(-1)  # a fixed critic that scores agreement
    dependent = z1 + 0.1 * torch.randn_like(z1)
    independent = torch.randn(512, 8)
    mi_dep = jsd_mi(critic(z1, dependent), critic(z1.roll(1, 0), dependent))
    mi_ind = jsd_mi(critic(z1, independent), critic(z1.roll(1, 0), independent))
    assert mi_dep > mi_ind + 0.5


def test_mib_loss_trains_the_encoder_and_needs_two_prompts():
    torch.manual_seed(0)
    head = MIBHead(16, z_dim=4)
    h1 = torch.randn(8, 16, requires_grad=True)
    loss, stats = mib_loss(head, h1, h1 + 0.01 * torch.randn(8, 16), beta=1.0)
    assert math.isclose(loss.item(), -stats["mi"] + 1.0 * stats["skl"], rel_tol=1e-5)
    loss.backward()
    assert h1.grad.abs().sum() > 0 and all(p.grad is not None for p in head.critic.parameters())
    assert set(stats) == {"mi", "skl"}
    with pytest.raises(AssertionError, match="2 prompts"):
        mib_loss(head, torch.randn(1, 16), torch.randn(1, 16))


def test_mib_loss_of_identical_views_has_no_kl_term():
    torch.manual_seed(0)
    head, h = MIBHead(16, z_dim=4), torch.randn(8, 16)
    loss, stats = mib_loss(head, h, h, beta=3.0)
    assert stats["skl"] == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(-stats["mi"], abs=1e-5)


# ---- RLP-SPG ----------------------------------------------------------------------------------------------------
def test_synthetic_preferences_on_hand_made_groups():
    prompts = ["p0", "p1", "p2", "p3"]
    samples = [["a1", "a2", "b1", "c1"],  # largest group a: confidence 0.5 = gamma, kept
               ["a", "b", "c", "d"],      # confidence 0.25 < gamma: dropped
               ["x1", "x2", "x3", "x4"],  # a single cluster: nothing to reject, dropped
               ["a1", "a2", "a3", "b1"]]  # confidence 0.75: kept
    keys = [["A", "A", "B", "C"], ["A", "B", "C", "D"], ["X"] * 4, ["A", "A", "A", "B"]]
    scores = [[0.1, 0.9, 5.0, 0.0], [0, 0, 0, 0], [0, 1, 2, 3], [3.0, 1.0, 2.0, 9.0]]
    gold = {"a2": 1, "a1": 1, "b1": 0, "c1": 0}
    pairs, stats = synthetic_preferences(prompts, samples, keys, scores, 0.5, random.Random(0),
                                         golds=lambda ps, ys: [gold[y] for y in ys])
    assert [p for p, _, _ in pairs] == ["p0", "p3"]
    assert pairs[0][1] == "a2" and pairs[0][2] in ("b1", "c1")  # RM-argmax within the largest group, not overall
    assert pairs[1][1:] == ("a1", "b1")
    assert stats["spg/acceptance"] == 0.5 and stats["spg/gold_agreement"] == 1.0
    strict, _ = synthetic_preferences(prompts, samples, keys, scores, 0.51, random.Random(0))
    assert [p for p, _, _ in strict] == ["p3"]  # the gamma boundary
    by_rm, _ = synthetic_preferences(prompts[:1], samples[:1], keys[:1], scores[:1], 0.5, random.Random(0),
                                     rank_by="rm")
    assert by_rm == [("p0", "b1", "c1")]


def test_cluster_by_similarity():
    h = torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [0.02, 1.0]])
    assert cluster_by_similarity(h, threshold=0.9) == [0, 0, 1, 1]


def test_similarity_keys_batched_equal_one_prompt_at_a_time():
    from types import SimpleNamespace

    from minirlhf.data.batches import Batcher
    from minirlhf.data.tasks import get_task
    from minirlhf.rlp import semantic_keys
    from minirlhf.rm import score_responses
    tok = get_task("reviews").tokenizer
    torch.manual_seed(0)
    rm = ScalarModel(GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=48, n_embd=16, n_layer=1, n_head=2)))
    batcher, free_text = Batcher(tok, 16, 24), SimpleNamespace(semantic_key=None)
    prompts = ["review pizza staff positive :", "review soup negative :"]
    samples = [["the pizza was great .", "the staff were rude !", "the pizza was great . <eos>"],
               ["the soup was cold .", "bad .", "the soup was cold and the staff were rude ."]]
    with torch.no_grad():
        batched = score_responses(rm, batcher, [p for p in prompts for _ in range(3)], sum(samples, []), hidden=True)
        alone = torch.cat([rm.score(*batcher.batch([p] * 3, ys), return_hidden=True)[1]
                           for p, ys in zip(prompts, samples)])
        keys = semantic_keys(free_text, rm, batcher, prompts, samples)
    assert batched.shape == (6, 16) and torch.allclose(batched, alone, atol=1e-5)
    assert keys == [cluster_by_similarity(alone[i * 3:(i + 1) * 3]) for i in range(2)]


# ---- MetaRM -----------------------------------------------------------------------------------------------------
def test_difference_objective_by_hand_and_range():
    r = torch.tensor([[0.0, 1.0, 3.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert math.isclose(difference_objective(r).item(), 2 / 9 * (sig(1) + sig(3) + sig(2)), rel_tol=1e-6)
    k = 5
    assert math.isclose(difference_objective(torch.zeros(2, k)).item(), (k - 1) / (2 * k), rel_tol=1e-6)
    spread = difference_objective(torch.arange(k).float()[None] * 100).item()
    assert (k - 1) / (2 * k) < spread <= (k - 1) / k


def tiny_rm():
    torch.manual_seed(0)
    return ScalarModel(GPT(GPTConfig(vocab_size=12, n_positions=16, n_embd=16, n_layer=1, n_head=2)))


def batches():
    g = torch.Generator().manual_seed(1)
    ones = lambda n, t: torch.ones(n, t, dtype=torch.long)
    pref = (torch.randint(3, 12, (4, 3), generator=g), ones(4, 3), torch.randint(3, 12, (4, 4), generator=g),
            ones(4, 4))  # 2 chosen rows, then 2 rejected rows
    meta = (torch.randint(3, 12, (6, 3), generator=g), ones(6, 3), torch.randint(3, 12, (6, 4), generator=g),
            ones(6, 4))  # 2 prompts x k = 3 samples
    return pref, meta


def bt(rm, pref):
    rc, rr = rm.score(*pref).chunk(2)
    return bt_loss(rc, rr)


def test_meta_step_with_zero_eta_is_a_plain_bt_step():
    pref, meta = batches()
    a, b = tiny_rm(), tiny_rm()
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    stats = meta_step(a, opt_a, pref, meta, eta=0.0, k=3)
    opt_b.zero_grad()
    bt(b, pref).backward()
    opt_b.step()
    assert stats["shift_norm"] == 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_meta_step_equals_sgd_at_shifted_weights_and_leaves_optimizer_alone():
    pref, meta = batches()
    eta, alpha = 0.5, 0.1
    rm = tiny_rm()
    theta = [p.detach().clone() for p in rm.parameters()]
    # by hand: theta' = theta + eta * grad J(theta); g = grad L(theta'); expected = theta - alpha * g
    shifted = copy.deepcopy(rm)
    J = difference_objective(shifted.score(*meta).view(-1, 3))
    with torch.no_grad():
        for p, g in zip(shifted.parameters(), torch.autograd.grad(J, list(shifted.parameters()), allow_unused=True)):
            if g is not None:
                p.add_(eta * g)
    g_shifted = torch.autograd.grad(bt(shifted, pref), list(shifted.parameters()), allow_unused=True)
    opt = torch.optim.SGD(rm.parameters(), lr=alpha, momentum=0.9)
    stats = meta_step(rm, opt, pref, meta, eta=eta, k=3)
    assert stats["shift_norm"] > 0
    for p, t, g in zip(rm.parameters(), theta, g_shifted):
        torch.testing.assert_close(p, t - alpha * (g if g is not None else 0), atol=1e-6, rtol=1e-5)
        # the ascent never went through the optimizer: its momentum holds the BT gradient at theta' only
        if g is not None:
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], g, atol=1e-6, rtol=1e-5)


def test_small_ascent_step_raises_J():
    pref, meta = batches()
    rm = tiny_rm()
    stats = meta_step(rm, torch.optim.SGD(rm.parameters(), lr=0.1), pref, meta, eta=1e-2, k=3)
    assert stats["J_shifted"] > stats["J"]


def test_second_order_step_is_the_gradient_through_the_inner_step():
    """Against finite differences (float64): the step's gradient is that of F(theta) = L_R(theta + eta grad J)."""
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minirlhf.metarm import _pref_loss
    from minirlhf.model import score_with
    pref, meta = batches()
    rm, eta = tiny_rm().double(), 0.5
    theta = {n: p.detach().clone() for n, p in rm.named_parameters()}

    def F(params):
        params = {n: t.clone().requires_grad_() for n, t in params.items()}
        forward = lambda *a, **kw: functional_call(rm, params, a, kw)  # noqa: E731
        J = difference_objective(score_with(forward, *meta).view(-1, 3))
        grads = torch.autograd.grad(J, list(params.values()), allow_unused=True)
        shifted = {n: t.detach() + (eta * g if g is not None else 0) for (n, t), g in zip(params.items(), grads)}
        with torch.no_grad():
            return _pref_loss(lambda *a, **kw: functional_call(rm, shifted, a, kw), pref).item()

    with sdpa_kernel([SDPBackend.MATH]):
        meta_step_second_order(rm, torch.optim.SGD(rm.parameters(), lr=1.0), pref, meta, eta=eta, k=3)
        g = {n: theta[n] - p.detach() for n, p in rm.named_parameters()}  # SGD, lr 1: the step is the gradient
        u = {n: torch.randn_like(t, generator=torch.Generator().manual_seed(i)) for i, (n, t) in enumerate(theta.items())}
        eps = 1e-5
        fd = (F({n: theta[n] + eps * u[n] for n in theta}) - F({n: theta[n] - eps * u[n] for n in theta})) / (2 * eps)
    assert sum((g[n] * u[n]).sum().item() for n in theta) == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_uml_without_two_prompts_of_distinct_samples_is_one_error():
    from minirlhf.rlp import uml_views
    with pytest.raises(ValueError, match="RLP-UML: 1 of 2 prompts have two distinct policy samples"):
        uml_views(["a", "b"], [["x", "y"], ["z", "z"]])


def test_second_order_variant_runs_on_math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    pref, meta = batches()
    first, second = tiny_rm(), tiny_rm()
    with sdpa_kernel([SDPBackend.MATH]):
        meta_step(first, torch.optim.SGD(first.parameters(), lr=0.1), pref, meta, eta=0.0, k=3)
        meta_step_second_order(second, torch.optim.SGD(second.parameters(), lr=0.1), pref, meta, eta=0.0, k=3)
    for a, b in zip(first.parameters(), second.parameters()):  # eta = 0: both are a plain BT step
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    changed, again = tiny_rm(), tiny_rm()
    with sdpa_kernel([SDPBackend.MATH]):
        s2 = meta_step_second_order(changed, torch.optim.SGD(changed.parameters(), lr=0.1), pref, meta, eta=1.0, k=3)
        s1 = meta_step(again, torch.optim.SGD(again.parameters(), lr=0.1), pref, meta, eta=1.0, k=3)
    assert any(not torch.allclose(a, b) for a, b in zip(changed.parameters(), again.parameters()))
    # the same theta' either way, so the same J there (the eta sweep reads it from both)
    assert s2["J_shifted"] == pytest.approx(s1["J_shifted"], abs=1e-6) and s2["J_shifted"] != s1["J"]
