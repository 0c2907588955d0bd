"""Stage 3 of RLHF: PPO against the proxy RM, judged by the gold reward (ALGORITHMS.md §1.3).

One iteration, as the algorithm numbers it:
    1. sample a response per prompt from the policy          (rollout)
    2. log-probs of the policy and the reference, values      (rollout)
    3. score the responses with the RM                        (rollout)
    4. shaped per-token rewards: -beta * KL, + score at the last token (rollout)
    5. GAE advantages and returns                             (rollout)
    6. whiten the advantages over valid tokens                (rollout)
    7. epochs of clipped policy and value updates             (ppo_update)
Each `(§1.3)` marks a detail ALGORITHMS.md lists as deciding correctness. `train_ppo` runs these
iterations, judging the policy on held-out prompts now and then (`GoldJudge`); MetaRM and the
iterated refinements run PPO in rounds that share one budget (`ppo_round`, ALGORITHMS.md §2.3).
"""
import copy
import math
import os
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import ppo
from .data.batches import Batcher
from .evaluate import best_of_n, drawn, evaluate, summarize
from .generate import generate, in_length_order, sequence_logprobs
from .model import trimmed
from .plumbing import dist, seeds
from .plumbing.checkpoint import atomic_save, load
from .plumbing.config import UsageError, made_with
from .plumbing.runtime import (Metrics, adamw, autocast, check_finite, clip_and_check, print_table,
                               write_summary)


def critic_values(critic, prompt, prompt_mask, response, resp_mask):
    """V(s_t) for each response token t: the critic read at the position that
    predicts token t. (B, N)"""
    N = response.shape[1]
    prompt, prompt_mask, response, resp_mask = trimmed(prompt, prompt_mask, response, resp_mask)
    ids = torch.cat([prompt, response], 1)
    values = critic(ids, torch.cat([prompt_mask, resp_mask], 1))
    # (B, N): the trimmed columns are padding, whose value reads 0
    return F.pad(values[:, prompt.shape[1] - 1:-1] * resp_mask, (0, N - resp_mask.shape[1]))


@torch.no_grad()
def rollout(policy, ref, critic, rm, prompt, prompt_mask, eos_id, pad_id, cfg, generator,
            kl_coef):
    """Steps 1-6 for a batch of encoded prompts (B, P): sample, score, and turn the batch into
    advantages and returns (all PPO's epochs need). With torchrun, each rank samples and scores its
    slice of the prompts; `dist.gather_rows` then gives every rank the whole batch, so GAE,
    whitening and the update read as single-process code."""
    B = prompt.shape[0]
    first = dist.shard_bounds(B)[0]
    prompt, prompt_mask = dist.shard(prompt), dist.shard(prompt_mask)  # this rank's rows (B', P)
    # 1. sample: pure sampling at T (§1.3)
    response, _, mask = generate(policy, prompt, prompt_mask, cfg.max_new_tokens, eos_id, pad_id,
                                 temperature=cfg.temperature, generator=generator, rows=(first, B))
    N = dist.all_max(response.shape[1])  # every rank pads its responses to the widest rank's
    response = F.pad(response, (0, N - response.shape[1]), value=pad_id)  # (B', N)
    mask = F.pad(mask, (0, N - mask.shape[1]))  # (B', N): 1 up to and including EOS
    # 2. old log-probs by the same forward the update uses, so the ratio is exactly 1 before
    # the first step (§1.3)
    seqs = prompt, prompt_mask, response, mask
    logp = in_length_order(lambda *b: sequence_logprobs(policy, *b, cfg.temperature), *seqs)
    # the same temperature everywhere (§1.3)
    ref_logp = in_length_order(lambda *b: sequence_logprobs(ref, *b, cfg.temperature), *seqs)
    values = in_length_order(lambda *b: critic_values(critic, *b), *seqs)  # (B', N)
    # 3. score; a response cut off before EOS gets the no-EOS penalty instead (§1.3)
    finished = (response == eos_id).any(-1)  # (B',)
    score = ppo.sequence_reward(in_length_order(rm.score, *seqs).float(), finished,
                                cfg.no_eos_penalty)  # (B',)
    prompt, prompt_mask, response, mask, logp, ref_logp, values, score, finished = (
        dist.gather_rows(prompt, prompt_mask, response, mask, logp, ref_logp, values, score,
                         finished))  # every rank now holds the whole batch (B, ...)
    rewards, kl = ppo.shaped_rewards(score, logp, ref_logp, mask, kl_coef)  # 4.
    advantages, returns = ppo.compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)  # 5.
    # 6. over valid tokens, after the returns (§1.3)
    advantages = ppo.masked_whiten(advantages, mask)
    batch = dict(prompt=prompt, prompt_mask=prompt_mask, response=response, response_mask=mask,
                 logp=logp, values=values, advantages=advantages, returns=returns)
    stats = {"objective/kl": kl.sum(-1).mean().item(), "objective/scores": score.mean().item(),
             "objective/kl_coef": kl_coef, "env/eos_rate": finished.float().mean().item(),
             "env/length": mask.sum(-1).float().mean().item(),
             "ppo/returns/mean": ppo.masked_mean(returns, mask).item()}
    return batch, stats


def ppo_update(policy, critic, opt_pi, opt_v, batch, cfg, generator):
    """Step 7: cfg.ppo_epochs epochs over shuffled minibatches of one rollout batch. With torchrun
    each rank takes its slice of every minibatch; its token-mean losses are weighted by its share of
    the minibatch's tokens and gradients are summed, which is exactly the whole minibatch's token
    mean (`share` is 1 on one process)."""
    B = batch["response"].shape[0]
    n_steps = cfg.ppo_epochs * math.ceil(B / cfg.minibatch)
    stats = {}
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(B, generator=generator,
                                  device=generator.device).split(cfg.minibatch):
            mask = batch["response_mask"]
            share = mask[dist.shard(idx)].sum() / mask[idx].sum()
            mb = {k: v[dist.shard(idx)] for k, v in batch.items()}
            seqs = mb["prompt"], mb["prompt_mask"], mb["response"], mb["response_mask"]
            logp, entropy = sequence_logprobs(policy, *seqs, cfg.temperature, with_entropy=True)
            pg_loss, pg_stats = ppo.policy_loss(logp, mb["logp"], mb["advantages"],
                                                mb["response_mask"], cfg.clip)
            values = critic_values(critic, *seqs)
            vf_loss, vf_stats = ppo.value_loss(values, mb["values"], mb["returns"],
                                               mb["response_mask"], cfg.vf_clip)
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
                          "objective/entropy": ppo.masked_mean(entropy,
                                                               mb["response_mask"]).item()}
            # token-weighted like the losses, so that summed over ranks they are the minibatch's;
            # the variance-type statistics (explained variance, ratio variance) are per-rank
            # estimates combined the same way
            for k, v in step_stats.items():
                stats[k] = stats.get(k, 0.0) + share.item() * v / n_steps
    return {k: dist.all_sum(v) for k, v in stats.items()}


# ---- the PPO loop: iterations of the steps above, judged now and then
@dataclass(frozen=True)
class Segment:
    """Where one `train_ppo` call sits in its PPO budget: the whole of it (the default), or one
    round of a run of rounds (MetaRM, the iterated refinements), which goes on where the round
    before it stopped."""
    first_iter: int = 0
    """Iterations of the budget before this segment: the segment's iteration `it` draws the prompts
    and randomness of the budget's iteration first_iter + it, so no round replays another's."""
    prompt_split: str = "unlabelled"
    """The task split of the rollout prompts ('ood' for MetaRM's --ood)."""
    eval_split: str = "eval"
    """The task split of the evaluation prompts ('ood-eval' for MetaRM's --ood)."""
    carry_from: str = ""
    """The checkpoint of the round before, whose critic, optimiser states and KL coefficient this
    round goes on with: a run of rounds differs from one PPO run only in its RM (§2.3)."""

    def evaluates(self, it, cfg):
        """Is the policy judged before the segment's iteration `it`? Every --eval_every iterations
        of the budget, and every one below --eval_dense; a later round's start is not (it is the
        previous round's end, judged there)."""
        g = self.first_iter + it
        return (g % cfg.eval_every == 0 or g < cfg.eval_dense) and not (self.first_iter and it == 0)


class GoldJudge:
    """The gold judge's view of one PPO run (ALGORITHMS.md §4.2): two samples of the policy on each
    held-out prompt, scored by the gold reward and the proxy, against one SFT sample per prompt
    (the win-rate's baseline). `history` holds every evaluation, each with its per-prompt gold,
    which the report compares prompt by prompt."""

    def __init__(self, cfg, task, batcher, ref, rm, segment, device):
        self.cfg, self.task, self.batcher, self.ref, self.rm = cfg, task, batcher, ref, rm
        self.segment, self.device, self.history = segment, device, []
        self.prompts = task.sample_prompts(cfg.eval_prompts,
                                           random.Random(seeds.stream(cfg.seed, seeds.PPO_EVAL)),
                                           segment.eval_split)
        # the baseline's stream is fixed, so a resumed run gets the same
        gen = seeds.generators(device, cfg.seed, seeds.WIN_RATE_BASELINE)[1]
        self.sft_gold = (drawn(ref, None, task, batcher, self.prompts, cfg.temperature, gen, 1,
                               reuse=True)[0][3] if dist.is_main() else None)

    def judged(self, it):
        return bool(self.history) and self.history[-1]["iter"] == it

    def due(self, it):
        """Judge the policy before the segment's iteration `it`?"""
        return self.segment.evaluates(it, self.cfg) and not self.judged(it)

    def __call__(self, policy, it, metrics):
        """Judge the policy at the segment's iteration `it`; log it and show a few samples."""
        if not dist.is_main():  # with torchrun rank 0 judges; the policy is the same on every rank
            return
        cfg = self.cfg
        with autocast(cfg, self.device):
            ev = evaluate(policy, self.ref, self.rm, self.task, self.batcher, self.prompts,
                          self.sft_gold, cfg.temperature,
                          seeds.generators(self.device, cfg.seed, seeds.PPO_ITERATION,
                                           self.segment.first_iter + it, seeds.EVALUATION)[1],
                          reuse=self.segment.first_iter + it == 0)
        samples = ev.pop("samples")
        point = {"iter": it, **ev}
        if not self.history:  # once a run: the split-half peak holds out prompt keys (§4.3)
            point["prompt_keys"] = [self.task.prompt_key(p) for p in self.prompts]
        self.history.append(point)
        metrics.log(iter=it, **{k: v for k, v in ev.items() if k != "gold_per_prompt"})
        if it % cfg.sample_every == 0 or it == cfg.iters:
            print(f"\n--- iteration {it}: gold {ev['eval/gold']:.3f}  "
                  f"proxy {ev['eval/proxy']:.3f}  KL {ev['eval/kl']:.2f}  "
                  f"win-rate vs SFT {ev['eval/win_rate']:.3f}")
            print_table([dict(prompt=p, response=y, proxy=float(s), gold=float(g))
                         for p, y, s, g in samples[:4]],
                        ["prompt", "response", "proxy", "gold"])


STATE_FIELDS = ("critic", "opt_pi", "opt_v", "kl_coef")  # what a run carries besides its policy


def restore(ck, critic, opt_pi, opt_v, kl_ctl):
    """A PPO checkpoint's critic, optimiser states and KL coefficient, loaded into this run's."""
    critic.load_state_dict(ck["critic"])
    opt_pi.load_state_dict(ck["opt_pi"])
    opt_v.load_state_dict(ck["opt_v"])
    kl_ctl.value = ck["kl_coef"]


def train_ppo(cfg, source, sft, rm, device, name="ppo", init_policy=None, segment=Segment()):
    """PPO from `init_policy` (default: the SFT weights) against `rm`, KL reference = SFT, for
    cfg.iters iterations of `segment`; judged by the gold reward every cfg.eval_every iterations;
    checkpoints to out_dir/<name>.pt. Returns (policy, history of evaluation dicts)."""
    task, batcher = source.task, Batcher.of(cfg, source.tokenizer, device)
    ref = sft.eval()
    policy = copy.deepcopy(init_policy if init_policy is not None else sft)
    critic = copy.deepcopy(rm.members[0])  # the critic starts from the RM (an ensemble's first)
    for m in (policy, critic.gpt):
        # dropout off in every RL-time model (§1.3), so train/eval mode makes no difference
        m.set_dropout(0.0)
    opt_pi = adamw(policy.parameters(), lr=cfg.ppo_lr, eps=1e-5, weight_decay=0.0)
    opt_v = adamw(critic.parameters(), lr=cfg.critic_lr, eps=1e-5, weight_decay=0.0)
    kl_ctl = (ppo.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.kl_target > 0 else ppo.FixedKLController(cfg.kl_coef))
    state = (critic, opt_pi, opt_v, kl_ctl)
    if segment.carry_from:  # a later round: no fresh critic, optimiser or KL coefficient
        restore(load(segment.carry_from, fields=STATE_FIELDS), *state)
    judge = GoldJudge(cfg, task, batcher, ref, rm, segment, device)
    ckpt_path, start = os.path.join(cfg.out_dir, f"{name}.pt"), 0
    if cfg.resume and os.path.exists(ckpt_path):
        ck = load(ckpt_path, expect=None if cfg.reuse else made_with(cfg, "ppo"),
                  fields=("policy", *STATE_FIELDS, "iter", "history"))
        policy.load_state_dict(ck["policy"])
        restore(ck, *state)
        start, judge.history = ck["iter"], ck["history"]
        print(f"resumed {ckpt_path} at iteration {start}")
    # rows after the checkpoint: replayed
    metrics = Metrics(cfg.out_dir, name, keep_steps=start, step_key="iter",
                      tensorboard=cfg.tensorboard)
    bar = tqdm(range(start, cfg.iters), desc=name, mininterval=1.0, initial=start, total=cfg.iters,
               disable=not dist.is_main())
    for it in bar:
        if judge.due(it):
            judge(policy, it, metrics)
        # all randomness of an iteration derives from (seed, iteration): a resumed run replays it
        rng, gen = seeds.generators(device, cfg.seed, seeds.PPO_ITERATION, segment.first_iter + it,
                                    seeds.ROLLOUT)
        prompts = task.sample_prompts(cfg.rollout_batch, rng, segment.prompt_split)
        prompt, prompt_mask = batcher.prompts(prompts)
        with autocast(cfg, device):
            batch, stats = rollout(policy, ref, critic, rm, prompt, prompt_mask,  # steps 1-6
                                   batcher.tok.eos_id, batcher.tok.pad_id, cfg, gen, kl_ctl.value)
            # the minibatch order has its own generator: how many steps a rank sampled
            # must not change it
            order = seeds.generators(device, cfg.seed, seeds.PPO_ITERATION,
                                     segment.first_iter + it, seeds.MINIBATCH_ORDER)[1]
            stats.update(ppo_update(policy, critic, opt_pi, opt_v, batch, cfg, order))  # step 7
        kl_ctl.update(stats["objective/kl"], cfg.rollout_batch)
        metrics.log(iter=it, **stats)
        bar.set_postfix(score=f"{stats['objective/scores']:.2f}", kl=f"{stats['objective/kl']:.2f}")
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters:
            atomic_save({"policy": policy.state_dict(), "critic": critic.state_dict(),
                         "opt_pi": opt_pi.state_dict(), "opt_v": opt_v.state_dict(),
                         "kl_coef": kl_ctl.value, "iter": it + 1,
                         "history": judge.history, "config": made_with(cfg, "ppo")}, ckpt_path)
    if not judge.judged(cfg.iters):
        judge(policy, cfg.iters, metrics)
    return policy, judge.history


# ---- runs of rounds (MetaRM, the iterated refinements) and best-of-n
def ensure_ppo(cfg, source, sft, rm, device):
    """The vanilla PPO policy of out_dir (ppo.pt): trained first (and its summary recorded) when
    missing or shorter than cfg.iters; one longer than cfg.iters is refused (check_vanilla_ppo)."""
    path = os.path.join(cfg.out_dir, "ppo.pt")
    ck = (load(path, expect=None if cfg.reuse else made_with(cfg, "ppo"), fields=("policy", "iter"))
          if os.path.exists(path) else None)
    check_vanilla_ppo(cfg, ck)
    if ck is None or ck["iter"] < cfg.iters:
        policy, history = train_ppo(cfg, source, sft, rm, device)
        write_summary(cfg, "ppo", summarize(history))
        return policy
    policy = copy.deepcopy(sft)
    policy.load_state_dict(ck["policy"])
    return policy.eval()


def check_vanilla_ppo(cfg, ck=None):
    """A refinement's PPO is compared with vanilla PPO at equal budget: a vanilla policy of out_dir
    that ran more iterations than cfg.iters is refused (a shorter one is trained on)."""
    path = os.path.join(cfg.out_dir, "ppo.pt")
    if ck is None and os.path.exists(path):
        ck = load(path, fields=("iter",))
    if ck is not None and ck["iter"] > cfg.iters:
        raise UsageError(f"--iters={cfg.iters}: {path} is a vanilla PPO policy of {ck['iter']} "
                         f"iterations, which the refined RM's {cfg.iters} would be compared with: "
                         f"pass --iters={ck['iter']}, or another --out_dir")


def round_weights(rounds):
    """Each round's share of the PPO budget: 1, 1, 2, 2, 2, ... parts. The first refinements come
    early, at low KL, where an on-policy method can first help; later rounds stay short, because a
    long round lets the policy drift far from the samples its RM was refined on."""
    return [1] * min(rounds, 2) + [2] * (rounds - 2)


def round_lengths(iters, rounds):
    """PPO iterations of each round, summing to `iters` (round_weights, rounded cumulatively)."""
    weights = round_weights(rounds)
    ends = [round(iters * sum(weights[:r + 1]) / sum(weights)) for r in range(rounds)]
    return [b - a for a, b in zip([0] + ends, ends)]


def ppo_round(cfg, r, name, source, sft, rm, policy, device, splits=("unlabelled", "eval")):
    """Round r of a run of rounds: PPO continued from `policy` against `rm` for the round's length.
    The rounds share vanilla PPO's budget (cfg.iters in all), so the last round is compared at
    equal PPO compute; round r goes on with the iteration count (and prompt batches) where round
    r - 1 stopped, as one vanilla PPO run would, with round r - 1's critic, optimiser states and
    KL coefficient (from its checkpoint). `splits`: the rollout and evaluation prompts'.
    Returns (policy, history)."""
    lengths = round_lengths(cfg.iters, cfg.rounds)
    before = os.path.join(cfg.out_dir, f"{name}_r{r - 1}.pt") if r > 1 else ""
    return train_ppo(replace(cfg, iters=lengths[r - 1]), source, sft, rm, device,
                     name=f"{name}_r{r}", init_policy=policy,
                     segment=Segment(sum(lengths[:r - 1]), *splits, carry_from=before))


def best_of_n_baseline(cfg, source, sft, rm, device):
    """Best-of-n against the proxy on held-out prompts: the alternative to PPO that spends
    its KL by selection."""
    rng, gen = seeds.generators(device, cfg.seed, seeds.BEST_OF_N)
    prompts = source.task.sample_prompts(max(8, cfg.eval_prompts // 4), rng, "eval")
    batcher = Batcher.of(cfg, source.tokenizer, device)
    return best_of_n(sft, rm, source.task, batcher, prompts, cfg.temperature, gen, cfg.bon_max)
