"""Stage 3 of RLHF: PPO against the proxy RM, judged by the gold reward (ALGORITHMS.md §1.3).

One iteration, as the algorithm numbers it:
    1. sample a response per prompt from the policy          (rollout)
    2. log-probs of the policy and the reference, values      (rollout)
    3. score the responses with the RM                        (rollout)
    4. shaped per-token rewards: -beta * KL, + score at the last token (rollout)
    5. GAE advantages and returns                             (rollout)
    6. whiten the advantages over valid tokens                (rollout)
    7. epochs of clipped policy and value updates             (ppo_update)
Each `# §1.3` marks a detail ALGORITHMS.md lists as deciding correctness.
"""
import copy
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import dist, ppo, seeds
from .checkpoint import atomic_save, load
from .config import made_with
from .data import Codec
from .evaluate import best_of_n, evaluate, rollout_texts
from .generate import generate, sequence_logprobs
from .runtime import Metrics, adamw, autocast, check_finite, clip_and_check, print_table


def iteration_rng(seed, it, device, salt=0):
    """All randomness of iteration `it` derives from (seed, it): a resumed run replays exactly."""
    s = seeds.iteration_seed(seed, it, salt)
    return random.Random(s), torch.Generator(device).manual_seed(s)


def critic_values(critic, prompt, prompt_mask, response, resp_mask):
    """V(s_t) for each response token t: the critic read at the position that
    predicts token t. (B, N)"""
    ids = torch.cat([prompt, response], 1)
    values = critic(ids, torch.cat([prompt_mask, resp_mask], 1))
    return values[:, prompt.shape[1] - 1:-1] * resp_mask


@torch.no_grad()
def rollout(policy, ref, critic, rm, prompt, prompt_mask, eos_id, pad_id, cfg, generator,
            kl_coef):
    """Steps 1-6 for a batch of encoded prompts (B, P): sample, score, and turn the batch into
    advantages and returns (all PPO's epochs need). With torchrun, each rank samples and scores its
    slice of the prompts; `dist.gather_rows` then gives every rank the whole batch, so GAE,
    whitening and the update read as single-process code."""
    p, pm = dist.shard(prompt), dist.shard(prompt_mask)
    first = dist.shard_bounds(prompt.shape[0])[0]
    # 1. sample: pure sampling at T (§1.3)
    r, _, rmask = generate(policy, p, pm, cfg.max_new_tokens, eos_id, pad_id,
                           temperature=cfg.temperature, generator=generator,
                           rows=(first, prompt.shape[0]))
    N = dist.all_max(r.shape[1])  # every rank pads its responses to the widest rank's
    r, rmask = F.pad(r, (0, N - r.shape[1]), value=pad_id), F.pad(rmask, (0, N - rmask.shape[1]))
    # 2. old log-probs by the same forward the update uses, so the ratio is exactly 1 before
    # the first step (§1.3)
    logp = sequence_logprobs(policy, p, pm, r, rmask, cfg.temperature)
    # the same temperature everywhere (§1.3)
    ref_logp = sequence_logprobs(ref, p, pm, r, rmask, cfg.temperature)
    values = critic_values(critic, p, pm, r, rmask)
    # 3. score; a response cut off before EOS gets the no-EOS penalty instead (§1.3)
    finished = (r == eos_id).any(-1)  # (B,)
    score = ppo.sequence_reward(rm.score(p, pm, r, rmask).float(), finished,
                                cfg.no_eos_penalty)  # (B,)
    p, pm, r, rmask, logp, ref_logp, values, score, finished = dist.gather_rows(
        p, pm, r, rmask, logp, ref_logp, values, score, finished)
    rewards, kl = ppo.shaped_rewards(score, logp, ref_logp, rmask, kl_coef)  # 4.
    advantages, returns = ppo.compute_gae(rewards, values, rmask, cfg.gamma, cfg.lam)  # 5.
    # 6. over valid tokens, after the returns (§1.3)
    advantages = ppo.masked_whiten(advantages, rmask)
    batch = dict(p=p, pm=pm, r=r, rmask=rmask, logp=logp, values=values, advantages=advantages,
                 returns=returns)
    stats = {"objective/kl": kl.sum(-1).mean().item(), "objective/scores": score.mean().item(),
             "objective/kl_coef": kl_coef, "env/eos_rate": finished.float().mean().item(),
             "env/length": rmask.sum(-1).float().mean().item(),
             "ppo/returns/mean": ppo.masked_mean(returns, rmask).item()}
    return batch, stats


def ppo_update(policy, critic, opt_pi, opt_v, batch, cfg, generator):
    """Step 7: cfg.ppo_epochs epochs over shuffled minibatches of one rollout batch. With torchrun
    each rank takes its slice of every minibatch; its token-mean losses are weighted by its share of
    the minibatch's tokens and gradients are summed, which is exactly the whole minibatch's token
    mean (`share` is 1 on one process)."""
    B = batch["r"].shape[0]
    n_steps = cfg.ppo_epochs * math.ceil(B / cfg.minibatch)
    stats = {}
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(B, generator=generator,
                                  device=generator.device).split(cfg.minibatch):
            share = batch["rmask"][dist.shard(idx)].sum() / batch["rmask"][idx].sum()
            mb = {k: v[dist.shard(idx)] for k, v in batch.items()}
            logp, entropy = sequence_logprobs(policy, mb["p"], mb["pm"], mb["r"], mb["rmask"],
                                              cfg.temperature, with_entropy=True)
            pg_loss, pg_stats = ppo.policy_loss(logp, mb["logp"], mb["advantages"], mb["rmask"],
                                                cfg.clip)
            values = critic_values(critic, mb["p"], mb["pm"], mb["r"], mb["rmask"])
            vf_loss, vf_stats = ppo.value_loss(values, mb["values"], mb["returns"], mb["rmask"],
                                               cfg.vf_clip)
            check_finite(pg_loss + vf_loss, "PPO")
            for model, opt, loss, what in ((policy, opt_pi, pg_loss, "PPO policy"),
                                           (critic, opt_v, cfg.vf_coef * vf_loss, "PPO critic")):
                opt.zero_grad(set_to_none=True)
                (share * loss).backward()
                dist.sync_grads(model.parameters())
                clip_and_check(model.parameters(), cfg.grad_clip, what)
                opt.step()
            step_stats = {**pg_stats, **vf_stats, "ppo/loss/policy": pg_loss.item(),
                          "ppo/loss/value": vf_loss.item(),
                          "objective/entropy": ppo.masked_mean(entropy, mb["rmask"]).item()}
            # token-weighted like the losses, so that summed over ranks they are the minibatch's;
            # the variance-type statistics (explained variance, ratio variance) are per-rank
            # estimates combined the same way
            for k, v in step_stats.items():
                stats[k] = stats.get(k, 0.0) + share.item() * v / n_steps
    return {k: dist.all_sum(v) for k, v in stats.items()}


def sft_baseline(ref, rm, task, codec, prompts, cfg):
    """Gold of one SFT sample per eval prompt: the win-rate baseline (fixed seed, so a resumed
    run gets the same)."""
    gen = iteration_rng(cfg.seed, -1, codec.device, 1)[1]
    texts = rollout_texts(ref, None, rm, codec, prompts, cfg.temperature, gen)[0]
    return np.array(task.golds(prompts, texts))


def train_ppo(cfg, source, sft, rm, device, name="ppo", init_policy=None,
              prompt_split="unlabelled", eval_split="eval", first_iter=0):
    """PPO from `init_policy` (default: the SFT weights) against `rm`, KL reference = SFT, critic
    initialised from the RM (an ensemble's first member). Evaluates with the gold judge every
    cfg.eval_every iterations on `eval_split` prompts; checkpoints to out_dir/<name>.pt. A run that
    continues another (a round of MetaRM or of an iterated method) passes `first_iter`: its
    iteration `it` draws the prompts and randomness of iteration first_iter + it, so it never
    replays the earlier run's batches. Returns (policy, history of evaluation dicts)."""
    task, codec = source.task, Codec.of(cfg, source.tokenizer, device)
    ref = sft.eval()
    policy = copy.deepcopy(init_policy if init_policy is not None else sft)
    critic = copy.deepcopy(rm.members[0])
    for m in (policy, critic.gpt):
        # dropout off in every RL-time model (§1.3), so train/eval mode makes no difference
        m.set_dropout(0.0)
    opt_pi = adamw(policy.parameters(), lr=cfg.ppo_lr, eps=1e-5, weight_decay=0.0)
    opt_v = adamw(critic.parameters(), lr=cfg.critic_lr, eps=1e-5, weight_decay=0.0)
    kl_ctl = (ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.kl_target > 0 else ppo.FixedKLController(cfg.kl_coef))
    eval_prompts = task.sample_prompts(cfg.eval_prompts, random.Random(cfg.seed + seeds.PPO_EVAL),
                                       eval_split)
    sft_gold = sft_baseline(ref, rm, task, codec, eval_prompts, cfg) if dist.is_main() else None
    ckpt_path = os.path.join(cfg.out_dir, f"{name}.pt")
    start, history = 0, []
    if cfg.resume and os.path.exists(ckpt_path):
        ck = load(ckpt_path, expect=None if cfg.reuse else made_with(cfg, "ppo"),
                  fields=("policy", "critic", "opt_pi", "opt_v", "kl_coef", "iter", "history"))
        policy.load_state_dict(ck["policy"])
        critic.load_state_dict(ck["critic"])
        opt_pi.load_state_dict(ck["opt_pi"])
        opt_v.load_state_dict(ck["opt_v"])
        kl_ctl.value, start, history = ck["kl_coef"], ck["iter"], ck["history"]
        print(f"resumed {ckpt_path} at iteration {start}")
    # rows after the checkpoint: replayed
    metrics = Metrics(cfg.out_dir, name, keep_steps=start, step_key="iter")

    def do_eval(it):
        if not dist.is_main():  # with torchrun rank 0 judges; the policy is the same on every rank
            return
        with autocast(cfg, device):
            ev = evaluate(policy, ref, rm, task, codec, eval_prompts, sft_gold, cfg.temperature,
                          iteration_rng(cfg.seed, first_iter + it, device, 2)[1])
        samples = ev.pop("samples")
        # with per-prompt gold: the report compares policies prompt by prompt
        history.append({"iter": it, **ev})
        metrics.log(iter=it, **{k: v for k, v in ev.items() if k != "gold_per_prompt"})
        if it % cfg.sample_every == 0 or it == cfg.iters:
            print(f"\n--- iteration {it}: gold {ev['eval/gold']:.3f}  "
                  f"proxy {ev['eval/proxy']:.3f}  KL {ev['eval/kl']:.2f}  "
                  f"win-rate vs SFT {ev['eval/win_rate']:.3f}")
            print_table([dict(prompt=p, response=y, proxy=float(s), gold=float(g))
                         for p, y, s, g in samples[:4]],
                        ["prompt", "response", "proxy", "gold"])

    def evaluated(it):
        return history and history[-1]["iter"] == it

    bar = tqdm(range(start, cfg.iters), desc=name, mininterval=1.0, initial=start, total=cfg.iters,
               disable=not dist.is_main())
    for it in bar:
        # the schedule counts from SFT; a continued run's start was the end of the run before it
        g = first_iter + it
        if ((g % cfg.eval_every == 0 or g < cfg.eval_dense) and not evaluated(it)
                and not (first_iter and it == 0)):
            do_eval(it)
        rng, gen = iteration_rng(cfg.seed, first_iter + it, device)
        prompts = task.sample_prompts(cfg.rollout_batch, rng, prompt_split)
        prompt, prompt_mask = codec.prompts(prompts)
        with autocast(cfg, device):
            batch, stats = rollout(policy, ref, critic, rm, prompt, prompt_mask, codec.tok.eos_id,
                                   codec.tok.pad_id, cfg, gen, kl_ctl.value)
            # the minibatch order has its own generator: how many steps a rank sampled
            # must not change it
            order = iteration_rng(cfg.seed, first_iter + it, device, 3)[1]
            stats.update(ppo_update(policy, critic, opt_pi, opt_v, batch, cfg, order))
        kl_ctl.update(stats["objective/kl"], cfg.rollout_batch)
        metrics.log(iter=it, **stats)
        bar.set_postfix(score=f"{stats['objective/scores']:.2f}", kl=f"{stats['objective/kl']:.2f}")
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters:
            atomic_save({"policy": policy.state_dict(), "critic": critic.state_dict(),
                         "opt_pi": opt_pi.state_dict(), "opt_v": opt_v.state_dict(),
                         "kl_coef": kl_ctl.value, "iter": it + 1,
                         "history": history, "config": made_with(cfg, "ppo")}, ckpt_path)
    if not evaluated(cfg.iters):
        do_eval(cfg.iters)
    return policy, history


def best_of_n_baseline(cfg, source, sft, rm, device):
    """Best-of-n against the proxy on held-out prompts: the alternative to PPO that spends
    its KL by selection."""
    prompts = source.task.sample_prompts(max(8, cfg.eval_prompts // 4),
                                         random.Random(cfg.seed + seeds.BEST_OF_N), "eval")
    codec = Codec.of(cfg, source.tokenizer, device)
    return best_of_n(sft, rm, source.task, codec, prompts, cfg.temperature,
                     iteration_rng(cfg.seed, -2, device)[1], cfg.bon_max)
