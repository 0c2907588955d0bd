"""MetaRM (Dou et al. 2024): keep the RM able to tell the current policy's samples
apart. ALGORITHMS.md §3.

One meta step (first-order, as the authors implemented it):
    theta' = theta + eta * grad J(X_s)          (plain ascent on the difference objective;
                                                 optimizer untouched)
    g      = grad_theta' L_R(X_t; theta')        (Bradley-Terry loss on labelled pairs, at the
                                                 shifted weights)
    theta  <- optimizer step from theta with g
"""
import math

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import score_with
from .reward import bt_loss
from .runtime import clip_and_check


def difference_objective(rewards):
    """J = mean over prompts of (2 / k^2) * sum_{i<j} sigmoid(|r_i - r_j|), rewards
    (m prompts, k samples). Maximised: it grows as the RM spreads a prompt's samples apart. Range
    [(k-1)/(2k), (k-1)/k)."""
    k = rewards.shape[1]
    i, j = torch.triu_indices(k, k, offset=1, device=rewards.device)
    return (2 / k ** 2 * torch.sigmoid((rewards[:, i] - rewards[:, j]).abs()).sum(-1)).mean()


def _pref_loss(forward, pref_batch):
    """BT loss of an encoded pair batch (prompt, prompt_mask, resp, resp_mask): chosen rows
    first, then rejected."""
    rc, rr = score_with(forward, *pref_batch).chunk(2)
    return bt_loss(rc, rr)


def meta_step(rm, optimizer, pref_batch, meta_batch, eta, k, grad_clip=None):
    """One first-order MetaRM step. meta_batch: encoded (m * k) policy samples, prompt-major
    (k per prompt). Returns J at theta and at theta', the BT loss at theta', and
    ||theta' - theta||."""
    params = [p for p in rm.parameters() if p.requires_grad]
    backup = [p.detach().clone() for p in params]
    J = difference_objective(rm.score(*meta_batch).view(-1, k))
    grads = torch.autograd.grad(J, params, allow_unused=True)
    # theta' = theta + eta * grad J: a plain step, the optimizer state is not involved
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.add_(g, alpha=eta)
        shift = math.sqrt(sum(float((eta * g).pow(2).sum()) for g in grads if g is not None))
        J_shifted = (difference_objective(rm.score(*meta_batch).view(-1, k)).item() if eta
                     else J.item())
    loss = _pref_loss(rm, pref_batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # p.grad = grad of L_R at theta'
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)  # back to theta; the gradient stays in p.grad
    if grad_clip:
        clip_and_check(params, grad_clip, "MetaRM")
    optimizer.step()
    return {"J": J.item(), "J_shifted": J_shifted, "loss": loss.item(), "shift_norm": shift}


def meta_step_second_order(rm, optimizer, pref_batch, meta_batch, eta, k, grad_clip=None):
    """NOT what the paper ran: differentiates L_R(theta + eta * grad J(theta)) through the inner
    step (a Hessian-vector product). Needs the math attention path: wrap calls in
    `torch.nn.attention.sdpa_kernel([SDPBackend.MATH])`."""
    names = [n for n, p in rm.named_parameters() if p.requires_grad]
    params = [p for p in rm.parameters() if p.requires_grad]
    J = difference_objective(rm.score(*meta_batch).view(-1, k))
    grads = torch.autograd.grad(J, params, create_graph=True, allow_unused=True)
    shifted = {n: p + eta * g if g is not None else p for n, p, g in zip(names, params, grads)}

    def at_shifted(*args, **kwargs):  # the RM's forward at theta'
        return functional_call(rm, shifted, args, kwargs)
    loss = _pref_loss(at_shifted, pref_batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        J_shifted = difference_objective(score_with(at_shifted, *meta_batch).view(-1, k)).item()
    if grad_clip:
        clip_and_check(params, grad_clip, "MetaRM")
    optimizer.step()
    shift = math.sqrt(sum(float((eta * g.detach()).pow(2).sum()) for g in grads if g is not None))
    return {"J": J.item(), "J_shifted": J_shifted, "loss": loss.item(), "shift_norm": shift}


def metarm_step(codec, prompts, samples, eta, k, meta_prompts, second_order, grad_clip, rng, log):
    """MetaRM's RM step: a meta step with X_t = the batch of D and X_s = meta_prompts prompts x
    their k policy samples; each step's statistics are appended to `log`."""
    def step(rm, opt, batch):
        pref = codec.batch([p for p, _, _ in batch] * 2,
                           [c for _, c, _ in batch] + [r for _, _, r in batch])
        chosen = rng.sample(range(len(prompts)), min(meta_prompts, len(prompts)))
        meta = codec.batch([prompts[i] for i in chosen for _ in range(k)],
                           [y for i in chosen for y in samples[i]])
        if second_order:
            with sdpa_kernel([SDPBackend.MATH]):  # double backward needs the math attention path
                stats = meta_step_second_order(rm, opt, pref, meta, eta, k, grad_clip)
        else:
            stats = meta_step(rm, opt, pref, meta, eta, k, grad_clip)
        log.append(stats)
        return stats
    return step
