"""Stage 3 of RLHF: PPO against the proxy RM, judged by the gold reward. The project's main job.

    python train_ppo.py                         # SFT -> proxy RM -> PPO on `reviews`, then the final table
    python train_ppo.py --iters=300             # long enough to watch gold peak and fall while the proxy rises
    python train_ppo.py --method=bon            # best-of-n against the proxy, n = 1 ... 256
    python train_ppo.py --resume=True           # continue a killed run from out_dir/ppo.pt

Reuses out_dir/sft.pt and rm.pt when present (trains them otherwise). ALGORITHMS.md §1 lists the details that
decide correctness; each one is marked `# §1` where it is implemented.
"""
import copy
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlhf import dist, ppo
from minirlhf.checkpoint import atomic_save, load
from minirlhf.data import encode_prompts
from minirlhf.evaluate import best_of_n_curve, evaluate, rollout_texts
from minirlhf.generate import generate, sequence_logprobs
from minirlhf.reward import score_any
from minirlhf.runtime import Metrics, autocast, check_finite, clip_and_check, main, print_table, setup, write_summary
from minirlhf.sources import get_source
from train_rm import ensure_rm
from train_sft import ensure_sft


def iteration_rng(cfg, it, device, salt=0):
    """All randomness of iteration `it` derives from (seed, it): a resumed run replays exactly."""
    seed = (cfg.seed * 1_000_003 + it * 7919 + salt) % 2**62
    return random.Random(seed), torch.Generator(device).manual_seed(seed)


def critic_values(critic, prompt, prompt_mask, response, resp_mask):
    """V(s_t) for each response token t: the critic read at the position that predicts token t. (B, N)"""
    ids = torch.cat([prompt, response], 1)
    values = critic(ids, torch.cat([prompt_mask, resp_mask], 1))
    return values[:, prompt.shape[1] - 1:-1] * resp_mask


@torch.no_grad()
def rollout(policy, ref, critic, rm, tok, prompts, cfg, device, generator, kl_coef):
    """Sample, score, and turn the batch into advantages and returns (everything PPO's epochs need).
    With torchrun, each rank samples and scores its slice of the prompts; the slices are then gathered, so GAE,
    whitening and the update see the whole batch on every rank."""
    p, pm = (dist.shard(t) for t in encode_prompts(tok, prompts, device, max_len=cfg.block_size - cfg.max_new_tokens))
    first = dist.shard_bounds(len(prompts))[0]
    r, _, rmask = generate(policy, p, pm, cfg.max_new_tokens, tok.eos_id, tok.pad_id, temperature=cfg.temperature,
                           generator=generator, rows=(first, len(prompts)))  # §1 pure sampling at T
    N = dist.all_max(r.shape[1])  # every rank pads its responses to the widest rank's
    r, rmask = F.pad(r, (0, N - r.shape[1]), value=tok.pad_id), F.pad(rmask, (0, N - rmask.shape[1]))
    # old log-probs by the same forward the update uses, so the ratio is exactly 1 before the first step (§1)
    logp = sequence_logprobs(policy, p, pm, r, rmask, cfg.temperature)
    ref_logp = sequence_logprobs(ref, p, pm, r, rmask, cfg.temperature)  # §1 same temperature everywhere
    values = critic_values(critic, p, pm, r, rmask)
    finished = (r == tok.eos_id).any(-1)  # §1 truncated at the first EOS; a response without one is penalised
    score = ppo.sequence_reward(score_any(rm, p, pm, r, rmask).float(), finished, cfg.no_eos_penalty)
    p, pm, r, rmask, logp, ref_logp, values, score, finished = dist.gather_rows(
        p, pm, r, rmask, logp, ref_logp, values, score, finished)
    rewards, kl = ppo.shaped_rewards(score, logp, ref_logp, rmask, kl_coef)
    advantages, returns = ppo.compute_gae(rewards, values, rmask, cfg.gamma, cfg.lam)
    advantages = ppo.masked_whiten(advantages, rmask)  # §1 whiten over valid tokens, after computing returns
    batch = dict(p=p, pm=pm, r=r, rmask=rmask, logp=logp, values=values, advantages=advantages, returns=returns)
    stats = {"objective/kl": kl.sum(-1).mean().item(), "objective/scores": score.mean().item(),
             "objective/kl_coef": kl_coef, "env/eos_rate": finished.float().mean().item(),
             "env/length": rmask.sum(-1).float().mean().item(),
             "ppo/returns/mean": ppo.masked_mean(returns, rmask).item()}
    return batch, stats


def ppo_update(policy, critic, opt_pi, opt_v, batch, cfg, generator):
    """K epochs over shuffled minibatches of one rollout batch. With torchrun each rank takes its slice of every
    minibatch; its token-mean losses are weighted by its share of the minibatch's tokens and gradients are summed,
    which is exactly the whole minibatch's token mean."""
    B = batch["r"].shape[0]
    stats = {}
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(B, generator=generator, device=generator.device).split(cfg.minibatch):
            share = batch["rmask"][dist.shard(idx)].sum() / batch["rmask"][idx].sum()
            mb = {k: v[dist.shard(idx)] for k, v in batch.items()}
            logp, entropy = sequence_logprobs(policy, mb["p"], mb["pm"], mb["r"], mb["rmask"], cfg.temperature,
                                              with_entropy=True)
            pg_loss, pg_stats = ppo.policy_loss(logp, mb["logp"], mb["advantages"], mb["rmask"], cfg.clip)
            values = critic_values(critic, mb["p"], mb["pm"], mb["r"], mb["rmask"])
            vf_loss, vf_stats = ppo.value_loss(values, mb["values"], mb["returns"], mb["rmask"], cfg.vf_clip)
            check_finite(pg_loss + vf_loss, "PPO", 0)
            opt_pi.zero_grad(set_to_none=True)
            (share * pg_loss).backward()
            dist.sync_grads(policy.parameters())
            clip_and_check(policy.parameters(), cfg.grad_clip, "PPO policy", 0)
            opt_pi.step()
            opt_v.zero_grad(set_to_none=True)
            (share * cfg.vf_coef * vf_loss).backward()  # a separate critic and optimizer: vf_coef only scales its step
            dist.sync_grads(critic.parameters())
            clip_and_check(critic.parameters(), cfg.grad_clip, "PPO critic", 0)
            opt_v.step()
            step_stats = {**pg_stats, **vf_stats, "ppo/loss/policy": pg_loss.item(), "ppo/loss/value": vf_loss.item(),
                          "objective/entropy": ppo.masked_mean(entropy, mb["rmask"]).item()}
            # token-weighted like the losses, so that summed over ranks they are the minibatch's; the variance-type
            # statistics (explained variance, ratio variance) are per-rank estimates combined the same way
            for k, v in step_stats.items():
                stats[k] = stats.get(k, 0.0) + share.item() * v / (cfg.ppo_epochs * math.ceil(B / cfg.minibatch))
    return {k: dist.all_sum(v) for k, v in stats.items()}
    return stats


def sft_baseline(ref, rm, source, prompts, cfg, device):
    """Gold of one SFT sample per eval prompt: the win-rate baseline (fixed seed, so a resumed run gets the same)."""
    texts = rollout_texts(ref, ref, rm, source.tokenizer, prompts, cfg, device, iteration_rng(cfg, -1, device, 1)[1])[0]
    return np.array([source.task.gold(p, t) for p, t in zip(prompts, texts)])


def train_ppo(cfg, source, sft, rm, device, name="ppo", init_policy=None, prompt_split="unlabelled"):
    """PPO from `init_policy` (default: the SFT weights) against `rm`, KL reference = SFT, critic initialised
    from the RM. Evaluates with the gold judge every cfg.eval_every iterations; checkpoints to out_dir/<name>.pt.
    Returns (policy, history of evaluation dicts)."""
    tok, task = source.tokenizer, source.task
    ref = sft.eval()
    policy = copy.deepcopy(init_policy if init_policy is not None else sft)
    critic = copy.deepcopy(rm.rms[0] if hasattr(rm, "rms") else rm)  # an ensemble's critic starts from member 0
    for m in (policy, critic.gpt):
        m.set_dropout(0.0)  # §1 dropout off in every RL-time model (so train/eval mode makes no difference)
    opt_pi = torch.optim.AdamW(policy.parameters(), lr=cfg.ppo_lr, eps=1e-5, weight_decay=0.0)
    opt_v = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, eps=1e-5, weight_decay=0.0)
    kl_ctl = (ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else ppo.FixedKLController(cfg.kl_coef))
    eval_prompts = task.sample_prompts(cfg.eval_prompts, random.Random(cfg.seed + 2), "eval")
    sft_gold = sft_baseline(ref, rm, source, eval_prompts, cfg, device) if dist.is_main() else None
    ckpt_path = os.path.join(cfg.out_dir, f"{name}.pt")
    start, history = 0, []
    if cfg.resume and os.path.exists(ckpt_path):
        ck = load(ckpt_path)
        policy.load_state_dict(ck["policy"])
        critic.load_state_dict(ck["critic"])
        opt_pi.load_state_dict(ck["opt_pi"])
        opt_v.load_state_dict(ck["opt_v"])
        kl_ctl.value, start, history = ck["kl_coef"], ck["iter"], ck["history"]
        print(f"resumed {ckpt_path} at iteration {start}")
    metrics = Metrics(cfg.out_dir, name, keep_steps=start, step_key="iter")  # rows after the checkpoint: replayed

    def do_eval(it):
        if not dist.is_main():  # with torchrun rank 0 judges; the policy is the same on every rank
            return
        with autocast(cfg, device):
            ev = evaluate(policy, ref, rm, task, tok, eval_prompts, sft_gold, cfg, device,
                          iteration_rng(cfg, it, device, 2)[1])
        samples = ev.pop("samples")
        history.append({"iter": it, **ev})  # with per-prompt gold: the report compares policies prompt by prompt
        metrics.log(iter=it, **{k: v for k, v in ev.items() if k != "gold_per_prompt"})
        if it % cfg.sample_every == 0 or it == cfg.iters:
            print(f"\n--- iteration {it}: gold {ev['eval/gold']:.3f}  proxy {ev['eval/proxy']:.3f}  "
                  f"KL {ev['eval/kl']:.2f}  win-rate vs SFT {ev['eval/win_rate']:.3f}")
            print_table([dict(prompt=p, response=y, proxy=float(s), gold=float(g)) for p, y, s, g in samples[:4]],
                        ["prompt", "response", "proxy", "gold"])

    bar = tqdm(range(start, cfg.iters), desc=name, mininterval=1.0, initial=start, total=cfg.iters,
               disable=not dist.is_main())
    for it in bar:
        if it % cfg.eval_every == 0 and not (history and history[-1]["iter"] == it):
            do_eval(it)
        rng, gen = iteration_rng(cfg, it, device)
        prompts = task.sample_prompts(cfg.rollout_batch, rng, prompt_split)
        with autocast(cfg, device):
            batch, stats = rollout(policy, ref, critic, rm, tok, prompts, cfg, device, gen, kl_ctl.value)
            # the minibatch order has its own generator: how many steps a rank sampled must not change it
            stats.update(ppo_update(policy, critic, opt_pi, opt_v, batch, cfg, iteration_rng(cfg, it, device, 3)[1]))
        kl_ctl.update(stats["objective/kl"], cfg.rollout_batch)
        metrics.log(iter=it, **stats)
        bar.set_postfix(score=f"{stats['objective/scores']:.2f}", kl=f"{stats['objective/kl']:.2f}")
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters:
            atomic_save({"policy": policy.state_dict(), "critic": critic.state_dict(), "opt_pi": opt_pi.state_dict(),
                         "opt_v": opt_v.state_dict(), "kl_coef": kl_ctl.value, "iter": it + 1,
                         "history": history}, ckpt_path)
    if not (history and history[-1]["iter"] == cfg.iters):
        do_eval(cfg.iters)
    return policy, history


def best_of_n(cfg, source, sft, rm, device):
    """Gao et al.'s best-of-n curve against the proxy: gold of the highest-proxy of n SFT samples."""
    n_prompts = max(8, cfg.eval_prompts // 4)
    prompts = source.task.sample_prompts(n_prompts, random.Random(cfg.seed + 3), "eval")
    gen = iteration_rng(cfg, -2, device)[1]
    proxy, gold = [], []
    for _ in tqdm(range(cfg.bon_max), desc="bon samples"):
        texts, s, _, _ = rollout_texts(sft, sft, rm, source.tokenizer, prompts, cfg, device, gen)
        proxy.append(s)
        gold.append([source.task.gold(p, t) for p, t in zip(prompts, texts)])
    ns = [2 ** k for k in range(int(math.log2(cfg.bon_max)) + 1)]
    proxy_curve = best_of_n_curve(np.array(proxy).T, np.array(proxy).T, ns)
    rows = [{"n": n, "kl": kl, "gold": g, "proxy": pc[2]}
            for (n, kl, g), pc in zip(best_of_n_curve(np.array(proxy).T, np.array(gold).T, ns), proxy_curve)]
    print_table(rows, ["n", "kl", "proxy", "gold"])
    return rows


def summarize(history):
    """The iteration-0 (SFT), final and peak-gold evaluations, and the whole curve (iter, KL, proxy, gold)."""
    peak = max(history, key=lambda h: h["eval/gold"])
    curve = [{k: h[k] for k in ("iter", "eval/kl", "eval/proxy", "eval/gold", "eval/win_rate")} for h in history]
    return {"sft": history[0], "final": history[-1], "peak_gold": peak, "curve": curve}


def rl_setup(cfg):
    """Device, task, SFT policy and proxy RM for an RL-time script (SFT and RM are trained first if missing)."""
    device = setup(cfg)
    source = get_source(cfg)
    if not source.has_gold:
        raise SystemExit("error: RL stages need an embedded task with a gold judge (--data is for train_rm.py only)")
    return device, source, ensure_sft(cfg).to(device).eval(), ensure_rm(cfg, device)


def run(cfg):
    device, source, sft, rm = rl_setup(cfg)
    if cfg.method == "bon" and dist.world() > 1:
        raise SystemExit("error: --method=bon runs on one process")
    if cfg.method == "bon":
        rows = best_of_n(cfg, source, sft, rm, device)
        write_summary(cfg, "bon", {"curve": rows})
        return rows
    if cfg.method != "ppo":
        raise SystemExit(f"error: --method={cfg.method!r}: expected 'ppo' or 'bon'")
    _, history = train_ppo(cfg, source, sft, rm, device)
    if not dist.is_main():
        return None
    summary = summarize(history)
    write_summary(cfg, "ppo", summary)
    print("\n=== SFT vs PPO, judged by the gold reward on held-out prompts ===")
    print_table([dict(policy=name, iter=h["iter"], gold=h["eval/gold"], proxy=h["eval/proxy"], kl=h["eval/kl"],
                      win_rate=h["eval/win_rate"], length=h["eval/length"], rm_acc=h["eval/rm_acc_policy_pairs"],
                      proxy_diff_std=h["eval/proxy_diff_std"])
                 for name, h in (("SFT", summary["sft"]), ("PPO final", summary["final"]),
                                 ("PPO peak gold", summary["peak_gold"]))],
                ["policy", "iter", "gold", "proxy", "kl", "win_rate", "length", "rm_acc", "proxy_diff_std"])
    print("(win_rate: gold win-rate vs SFT samples, ties 1/2; rm_acc: proxy accuracy on gold-labelled pairs of the "
          "policy's own samples)")
    return summary


if __name__ == "__main__":
    main(run)
