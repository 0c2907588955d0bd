"""MetaRM (Dou et al. 2024): keep the RM able to tell the current policy's samples apart.
ALGORITHMS.md §3.

As the policy drifts, the RM's scores of its samples bunch together and stop ranking them. Each
MetaRM step first moves the RM a little towards spreading a prompt's policy samples apart (the
difference objective J), then takes its ordinary preference step from there:
    theta' = theta + eta * grad J(X_s)          (plain ascent on the difference objective;
                                                 optimizer untouched)
    g      = grad_theta' L_R(X_t; theta')        (Bradley-Terry loss on labelled pairs, at the
                                                 shifted weights)
    theta  <- optimizer step from theta with g   (first-order, as the authors implemented it)
MetaRM's rounds (`meta_rounds`), for r = 1 ... R:
    1. sample the latest policy: k responses per prompt, a little above the PPO temperature (S_r)
    2. train a fresh RM for one epoch on D, every step a meta step on S_r   (meta_rm)
    3. continue PPO from the latest policy against it, for round r's part of the budget
"""
import math
import random
import statistics

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data.batches import Batcher
from .evaluate import summarize
from .generate import policy_samples
from .model import score_with
from .plumbing import seeds
from .plumbing.runtime import autocast, clip_and_check, print_table, write_summary
from .ppo_trainer import ppo_round
from .reward import bt_loss
from .rm import (RMLoop, held_out_policy_pairs, new_rm, normalize_on, ready_to_score, rm_accuracy,
                 rm_scores)

META_METHODS = {"metarm", "vanilla-rounds"}  # MetaRM's rounds, and the same rounds with eta = 0


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


def meta_rm(cfg, sft, batcher, prefs, prompts, samples, eta, rng, seed, desc):
    """Step 2 of a round: a fresh RM trained for one epoch on D, every step a meta step whose X_t
    is the step's batch of D and whose X_s is --meta_prompts prompts x their k policy samples;
    normalised on SFT samples. Returns it and the meta steps' statistics."""
    k, device, log = cfg.meta_k, batcher.device, []
    rm = new_rm(sft, cfg, device, seed)
    loop = RMLoop(rm.parameters(), prefs["train"], cfg, seed, epochs=1, desc=desc)
    for batch in loop:
        with autocast(cfg, device):
            pref = batcher.batch([p for p, _, _ in batch] * 2,
                                 [c for _, c, _ in batch] + [r for _, _, r in batch])
            chosen = rng.sample(range(len(prompts)), min(cfg.meta_prompts, len(prompts)))
            meta = batcher.batch([prompts[i] for i in chosen for _ in range(k)],
                                 [y for i in chosen for y in samples[i]])
            if cfg.meta_second_order:
                with sdpa_kernel([SDPBackend.MATH]):  # double backward needs the math path
                    stats = meta_step_second_order(rm, loop.opt, pref, meta, eta, k,
                                                   cfg.grad_clip)
            else:
                stats = meta_step(rm, loop.opt, pref, meta, eta, k, cfg.grad_clip)
        log.append(stats)
        loop.log(stats)
    rm = ready_to_score(rm)
    normalize_on(rm, batcher, prefs["norm_prompts"], prefs["sft_samples"])
    return rm, log


def meta_rounds(cfg, name, source, sft, prefs, device):
    """MetaRM's rounds (name 'metarm'), or the same loop without the meta ascent (name
    'vanilla-rounds', eta = 0: its control). Returns and records one row per round."""
    eta = cfg.meta_eta if name == "metarm" else 0.0
    task, batcher = source.task, Batcher.of(cfg, source.tokenizer, device)
    # --ood: train on OOD topics and judge on held-out OOD prompts (D stays in-distribution)
    split, eval_split = ("ood", "ood-eval") if cfg.ood else ("unlabelled", "eval")
    policy, rows = sft, []
    for r in range(1, cfg.rounds + 1):
        # 1. S_r: k samples of the latest policy per prompt, a little above the PPO temperature
        rng, gen = seeds.generators(device, cfg.seed, seeds.META_SAMPLES, r)
        prompts = task.sample_prompts(cfg.refine_prompts, rng, split)
        samples = policy_samples(policy, batcher, prompts, cfg.meta_k,
                                 cfg.temperature + cfg.meta_temp_delta, gen)
        # 2. a fresh RM, one epoch of meta steps on D and S_r
        rm, log = meta_rm(cfg, sft, batcher, prefs, prompts, samples, eta, rng,
                          seeds.stream(cfg.seed, seeds.META_RM, r), f"{name} r{r}")
        rm_row = {"J_policy_samples": difference_objective(
                      torch.tensor(rm_scores(rm, batcher, prompts, samples))).item(),
                  "shift_norm": statistics.mean(s["shift_norm"] for s in log),
                  "held_out_acc_gold": rm_accuracy(rm, batcher, prefs["held_clean"]),
                  "rm_acc_policy_pairs": rm_accuracy(rm, batcher, held_out_policy_pairs(
                      policy, batcher, task, cfg.refine_prompts, cfg.temperature,
                      seeds.stream(cfg.seed, seeds.HELD_OUT_PAIRS, r), eval_split))}
        # 3. PPO continued from the latest policy, for this round's part of the budget
        policy, history = ppo_round(cfg, r, name, source, sft, rm, policy, device,
                                    (split, eval_split))
        rows.append({"round": r, **rm_row, **summarize(history)})
        print(f"round {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in rm_row.items())
              + f", final gold {history[-1]['eval/gold']:.3f}, "
              f"win-rate {history[-1]['eval/win_rate']:.3f}")
    write_summary(cfg, name + ("_ood" if cfg.ood else ""), {"eta": eta, "rounds": rows})
    print_table([{"round": x["round"], "J": x["J_policy_samples"], "shift": x["shift_norm"],
                  "acc_heldout": x["held_out_acc_gold"], "acc_policy": x["rm_acc_policy_pairs"],
                  "diff_std": x["final"]["eval/proxy_diff_std"], "gold": x["final"]["eval/gold"],
                  "win_rate": x["final"]["eval/win_rate"]} for x in rows],
                ["round", "J", "shift", "acc_heldout", "acc_policy", "diff_std", "gold",
                 "win_rate"])
    return rows


def eta_sweep(cfg, source, sft, prefs, device, etas=(0.0, 0.01, 0.1, 1.0, 10.0)):
    """MetaRM's eta at our scale (the paper's 5e-6 barely moves a small model): one
    round-1 RM per eta, each on the same samples of the SFT policy."""
    task, batcher = source.task, Batcher.of(cfg, source.tokenizer, device)
    rng, gen = seeds.generators(device, cfg.seed, seeds.META_SAMPLES, 1)
    prompts = task.sample_prompts(cfg.refine_prompts, rng, "unlabelled")
    samples = policy_samples(sft, batcher, prompts, cfg.meta_k,
                             cfg.temperature + cfg.meta_temp_delta, gen)
    held_pairs = held_out_policy_pairs(sft, batcher, task, cfg.refine_prompts, cfg.temperature,
                                       seeds.stream(cfg.seed, seeds.HELD_OUT_PAIRS, 1))
    rows = []
    for eta in etas:
        batches = random.Random(seeds.stream(cfg.seed, seeds.META_BATCHES))
        rm, log = meta_rm(cfg, sft, batcher, prefs, prompts, samples, eta, batches,
                          seeds.stream(cfg.seed, seeds.META_RM, 1), f"eta={eta}")
        rows.append({"eta": eta, "shift_norm": statistics.mean(s["shift_norm"] for s in log),
                     "J_gain": statistics.mean(s["J_shifted"] - s["J"] for s in log),
                     "J_policy_samples": difference_objective(
                         torch.tensor(rm_scores(rm, batcher, prompts, samples))).item(),
                     "held_out_acc_gold": rm_accuracy(rm, batcher, prefs["held_clean"]),
                     "rm_acc_policy_pairs": rm_accuracy(rm, batcher, held_pairs)})
    print_table(rows, list(rows[0]))
    write_summary(cfg, "eta_sweep", {"rows": rows})
    return rows
