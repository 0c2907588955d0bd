"""Stage 2 of RLHF: a proxy reward model from a limited budget of preference pairs
(ALGORITHMS.md §1.2).

The pairs are two SFT samples per 'pref' prompt, labelled by the simulated annotator (the gold
reward through a Bradley-Terry labeller); on a file the gold reward is the gold RM trained on the
file's own pairs (data/file_task.py). The RM starts from the SFT weights, learns with the
Bradley-Terry loss, and is normalised to mean 0 / std 1 on SFT samples. Writes out_dir/rm.pt
(ensemble members 1.. as rm_1.pt, ...) and preferences.json.

In order: scoring responses and measuring an RM's accuracy; the simulated annotator and the pairs it
labels; the RM's training loop (`RMLoop`, around a step its caller writes: the plain BT step here,
RLP-UML's in rlp.py, MetaRM's in metarm.py) and `fit_rm`, the loop with the BT step; the stage
itself (`train_rm`), which the refinements and the report reuse.
"""
import copy
import json
import math
import os
import random
import statistics

import torch
from tqdm import tqdm

from .data.batches import Batcher
from .data.hh import DataError
from .generate import in_length_order, policy_samples, sample_responses
from .model import load_model, save_model
from .plumbing import dist, seeds
from .plumbing.checkpoint import atomic_write_json
from .plumbing.config import made_with
from .plumbing.runtime import (Metrics, adamw, autocast, check_finite, clip_and_check, cosine_lr,
                               write_summary)
from .reward import Ensemble, bt_loss, normalize, pairwise_accuracy, reward_model_from


def pair_rewards(rm, batcher, prompts, chosen, rejected):
    """(r(x, y_w), r(x, y_l)), each (B,), from one forward over 2B sequences."""
    r = in_length_order(rm.score, *batcher.batch(list(prompts) * 2, list(chosen) + list(rejected)))
    return r[:len(prompts)], r[len(prompts):]


@torch.no_grad()
def rm_accuracy(rm, batcher, pairs, batch=256):
    """Pairwise accuracy of rm on [(prompt, chosen, rejected)]; nan for no pairs (a policy that
    collapsed to one response per prompt leaves none)."""
    if not pairs:
        return float("nan")
    rc, rr = zip(*(pair_rewards(rm, batcher, *zip(*pairs[i:i + batch]))
                   for i in range(0, len(pairs), batch)))
    return pairwise_accuracy(torch.cat(rc), torch.cat(rr))


@torch.no_grad()
def score_responses(rm, batcher, prompts, responses, batch=256, hidden=False):
    """RM scores (N,) of (prompt text, response) pairs, `batch` at a time, each response scored as
    the tokens it was sampled as (data.batches.encode_responses); with `hidden`, the final hidden
    states (N, C) the RM's head reads instead (a single RM, not an ensemble)."""
    score = (lambda *rows: rm.score(*rows, return_hidden=True)[1]) if hidden else rm.score
    return torch.cat([in_length_order(score, *batcher.batch(prompts[i:i + batch],
                                                            responses[i:i + batch]))
                      for i in range(0, len(prompts), batch)])


def normalize_on(rm, batcher, prompts, responses):
    """normalize() on the RM's scores of (prompt, response) SFT samples."""
    return normalize(rm, score_responses(rm, batcher, prompts, responses))


def per_prompt_outputs(rm, batcher, prompts, samples, hidden=False):
    """score_responses over every prompt's n samples in one batched pass, cut back into one chunk
    per prompt: scores (n,), or with `hidden` the final hidden states (n, C)."""
    out = score_responses(rm, batcher, [p for p, ys in zip(prompts, samples) for _ in ys],
                          [y for ys in samples for y in ys], hidden=hidden)
    n = len(samples[0])
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def rm_scores(rm, batcher, prompts, samples):
    """RM scores (per prompt, a list of n floats) of each prompt's samples."""
    return [s.tolist() for s in per_prompt_outputs(rm, batcher, prompts, samples)]


def gold_label(gold_diff, tau, flip, rng):
    """The simulated annotator of a pair (a, b) whose gold difference is g(a) - g(b): returns True
    if a is preferred. P(a > b) = sigmoid((g(a) - g(b)) / tau), then each label flips with
    probability `flip` (AlpacaFarm-style extra noise)."""
    diff = gold_diff / tau
    a_wins = rng.random() < 1 / (1 + math.exp(-max(-50.0, min(50.0, diff))))
    return a_wins != (rng.random() < flip)


def sample_pairs(policy, batcher, prompts, temperature, generator, desc="pairs"):
    """Two samples of the policy for each prompt; pairs of identical responses are dropped."""
    a, b = [], []
    for i in tqdm(range(0, len(prompts), 256), desc=desc, mininterval=1.0,
                  disable=not dist.is_main()):
        for out in (a, b):
            out += sample_responses(policy, batcher, prompts[i:i + 256], temperature, generator)
    return [(p, x, y) for p, x, y in zip(prompts, a, b) if x != y]


def gold_labelled(task, pairs, rng, tau, flip, noisy=True):
    """[(prompt, chosen, rejected)] by the gold labeller (noisy: Bradley-Terry at temperature tau,
    then flips) or by the sign of the gold difference (clean, ties dropped)."""
    if not pairs:
        return []
    prompts, a, b = zip(*pairs)
    out = []
    for (p, a, b), ga, gb in zip(pairs, task.golds(prompts, a), task.golds(prompts, b)):
        if noisy:
            a_wins = gold_label(ga - gb, tau, flip, rng)
        else:
            if ga == gb:
                continue
            a_wins = ga > gb
        out.append((p, a, b) if a_wins else (p, b, a))
    return out


def clean_labelled(task, pairs):
    """gold_labelled with clean labels: the sign of the gold difference, ties dropped."""
    return gold_labelled(task, pairs, None, None, None, noisy=False)


def policy_pairs(task, prompts, samples):
    """Clean gold-labelled pairs (prompt, better, worse) of two distinct samples per prompt (gold
    ties dropped)."""
    firsts = ((p, ys[0], next((y for y in ys[1:] if y != ys[0]), None))
              for p, ys in zip(prompts, samples))
    return clean_labelled(task, [(p, a, b) for p, a, b in firsts if b is not None])


def held_out_policy_pairs(policy, batcher, task, n_prompts, temperature, seed, split="eval"):
    """How well does an RM rank what the policy actually writes, where no refinement trained: clean
    gold-labelled pairs of two fresh samples on held-out prompts."""
    prompts = task.sample_prompts(n_prompts, random.Random(seed), split)
    samples = policy_samples(policy, batcher, prompts, 2, temperature,
                             torch.Generator(batcher.device).manual_seed(seed))
    return policy_pairs(task, prompts, samples)


def preference_data(sft, source, batcher, cfg):
    """Training pairs D, held-out pairs (noisy and clean labels) and the SFT samples used
    for normalisation."""
    task = source.task
    rng, gen = seeds.generators(batcher.device, cfg.seed, seeds.PREFERENCES)
    train = sample_pairs(sft, batcher, task.sample_prompts(cfg.rm_pairs, rng, "pref"),
                         cfg.temperature, gen, desc="sampling preference pairs")
    held = sample_pairs(sft, batcher, task.sample_prompts(max(64, cfg.rm_pairs // 4), rng, "eval"),
                        cfg.temperature, gen, desc="sampling held-out pairs")

    def label(pairs):
        return gold_labelled(task, pairs, rng, cfg.label_tau, cfg.label_flip)
    return label(train), label(held), clean_labelled(task, held), [a for _, a, _ in train]


def new_rm(sft, cfg, device, seed, init=None):
    """A fresh RM (the SFT backbone and a new scalar head, initialised from `seed`), or a copy of
    the RM `init` to continue it, in training mode."""
    torch.manual_seed(seed)
    rm = (reward_model_from(sft) if init is None else copy.deepcopy(init)).to(device)
    rm.gpt.set_dropout(cfg.dropout)
    return rm.train()


class RMLoop:
    """The RM's training loop, around a step its caller writes (the plain BT step below, RLP-UML's,
    MetaRM's): AdamW over `params`, `epochs` passes of `steps_per_epoch` batches of `pairs` in a
    shuffled order, the learning rate warmed up and decayed. Iterating yields each step's batch.
    `steps_per_epoch` (default: one pass over `pairs`) lets methods that add pairs to D train for
    as many steps as the ones that do not. Every epoch holds each of `newest` once, however many
    `pairs` there are (ALGORITHMS.md §2.3): the rest of it is drawn from `pairs`."""

    def __init__(self, params, pairs, cfg, seed, epochs=None, steps_per_epoch=None, desc="rm",
                 newest=()):
        if not pairs:  # an epoch of no pairs never fills, and the loop would never end
            raise DataError(f"{desc}: no preference pairs to train on (each sampled pair had two "
                            "identical responses: raise --rm_pairs or --temperature)")
        self.opt = adamw(params, lr=cfg.rm_lr, weight_decay=cfg.weight_decay)
        self.pairs, self.cfg, self.desc, self.rng = pairs, cfg, desc, random.Random(seed)
        self.newest = list(newest)
        self.steps_per_epoch = steps_per_epoch or max(1, len(pairs) // cfg.rm_batch)
        if len(self.newest) > self.steps_per_epoch * cfg.rm_batch:
            raise ValueError(f"{desc}: {len(self.newest)} newest pairs do not fit an epoch of "
                             f"{self.steps_per_epoch} x {cfg.rm_batch}")
        self.total = (epochs or cfg.rm_epochs) * self.steps_per_epoch
        # a short run (a MetaRM round: one epoch) must still reach its decay: warmup is at most half
        self.warmup = min(cfg.warmup, self.total // 2)

    def __iter__(self):
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        self.bar = tqdm(range(self.total), desc=self.desc, mininterval=1.0,
                        disable=not dist.is_main())
        order = []
        for self.step in self.bar:
            if self.step % per_epoch == 0:
                order = self.epoch(per_epoch * cfg.rm_batch)
            for g in self.opt.param_groups:
                g["lr"] = cosine_lr(self.step, self.total, cfg.rm_lr, self.warmup)
            first = (self.step % per_epoch) * cfg.rm_batch
            yield order[first:first + cfg.rm_batch]

    def epoch(self, size):
        """One epoch's order: every newest pair and `size` - len(newest) of `pairs` (an epoch longer
        than the pairs goes round them again), shuffled together."""
        rest = []
        while len(rest) < size - len(self.newest):
            rest += self.rng.sample(self.pairs, len(self.pairs))
        if not self.newest:
            return rest
        order = self.newest + rest[:size - len(self.newest)]
        self.rng.shuffle(order)
        return order

    def log(self, stats):
        """After each step: stop on a non-finite loss, show the loss."""
        check_finite(stats["loss"], self.desc, self.step)
        self.bar.set_postfix(loss=f"{stats['loss']:.3f}")


def bt_step(rm, opt, batch, batcher, grad_clip):
    """The plain RM step: the Bradley-Terry loss on a batch of labelled pairs (with torchrun: this
    rank's slice of it, weighted so that the summed gradient is the global batch's)."""
    local = dist.shard(batch)
    rc, rr = pair_rewards(rm, batcher, *zip(*local))
    loss = bt_loss(rc, rr) * len(local) / len(batch)
    check_finite(loss, "RM")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    dist.sync_grads(rm.parameters())
    clip_and_check(rm.parameters(), grad_clip, "RM")
    opt.step()
    return {"loss": dist.all_sum(loss.item()), "acc": pairwise_accuracy(rc, rr)}


def fit_rm(sft, pairs, cfg, batcher, seed, epochs=None, steps_per_epoch=None, init=None,
           desc="rm", newest=()):
    """An RM trained with the Bradley-Terry loss on `pairs` (ALGORITHMS.md §1.2): from the SFT
    weights (or continuing `init`), `epochs` passes, each holding every pair of `newest`;
    returned in eval mode."""
    rm = new_rm(sft, cfg, batcher.device, seed, init)
    loop = RMLoop(rm.parameters(), pairs, cfg, seed, epochs, steps_per_epoch, desc, newest)
    for batch in loop:
        with autocast(cfg, batcher.device):
            loop.log(bt_step(rm, loop.opt, batch, batcher, cfg.grad_clip))
    return ready_to_score(rm)


def ready_to_score(rm):
    """A trained RM made ready to score: dropout off, eval mode."""
    rm.gpt.set_dropout(0.0)
    return rm.eval()


def rm_paths(out_dir, members):
    return [os.path.join(out_dir, "rm.pt" if k == 0 else f"rm_{k}.pt") for k in range(members)]


def train_rm(cfg, source, sft, device):
    """The proxy RM(s): preference data, Bradley-Terry training, held-out accuracy, normalisation;
    saved to out_dir. Returns the summary."""
    batcher = Batcher.of(cfg, source.tokenizer, device)
    train, held_noisy, held_clean, sft_samples = preference_data(sft, source, batcher, cfg)
    norm_prompts = [p for p, _, _ in train]
    atomic_write_json(dict(train=train, held_noisy=held_noisy, held_clean=held_clean,
                           norm_prompts=norm_prompts, sft_samples=sft_samples),
                      os.path.join(cfg.out_dir, "preferences.json"), indent=None)
    print(f"RM: {len(train)} training pairs, {len(held_noisy)} held-out pairs")
    metrics = Metrics(cfg.out_dir, "rm", step_key="member", tensorboard=cfg.tensorboard)
    results, rms = [], []
    for k, path in enumerate(rm_paths(cfg.out_dir, cfg.ensemble)):
        rm = fit_rm(sft, train, cfg, batcher, seed=seeds.stream(cfg.seed, seeds.RM_MEMBER, k),
                    desc=f"rm{k}")
        res = {"held_out_acc_noisy": rm_accuracy(rm, batcher, held_noisy)}
        if held_clean:
            res["held_out_acc_gold"] = rm_accuracy(rm, batcher, held_clean)
        res["norm_mean"], res["norm_std"] = normalize_on(rm, batcher, norm_prompts, sft_samples)
        save_model(path, rm, source=source.name, config=made_with(cfg, "rm"))
        metrics.log(member=k, **res)
        results.append(res)
        rms.append(rm)
        print(f"RM {k}: " + ", ".join(f"{key} {v:.3f}" for key, v in res.items()))
    dist.barrier()  # every rank reads rm.pt next
    summary = {key: statistics.mean(r[key] for r in results) for key in results[0]}
    summary.update(train_pairs=len(train), held_out_pairs=len(held_noisy), members=results)
    # the shift the project is about: accuracy on a deliberately shifted policy's pairs
    if source.has_gold:
        rng, gen = seeds.generators(device, cfg.seed, seeds.SHIFTED)
        prompts = source.task.sample_prompts(max(64, cfg.rm_pairs // 4), rng, "eval")
        hot = clean_labelled(source.task, sample_pairs(sft, batcher, prompts, 1.5, gen,
                                                       desc="sampling shifted pairs"))
        summary["shifted_acc_gold_T1.5"] = rm_accuracy(combine(rms, cfg.ensemble_agg), batcher, hot)
        print("gold-label accuracy on pairs of SFT samples "
              f"{summary.get('held_out_acc_gold', math.nan):.3f} vs on pairs from a shifted "
              f"(T=1.5) sampler {summary['shifted_acc_gold_T1.5']:.3f}")
    write_summary(cfg, "rm", summary)
    return summary


def combine(rms, agg):
    """One RM, or an Ensemble of several: both score alike."""
    return rms[0] if len(rms) == 1 else Ensemble(rms, agg)


def load_preferences(out_dir):
    """The preference data D that train_rm used (the refinements retrain on
    exactly the same pairs)."""
    with open(os.path.join(out_dir, "preferences.json")) as f:
        prefs = json.load(f)
    # a sampled response is its token ids (a JSON list); an out_dir from before stored its text
    def response(y):
        return tuple(y) if isinstance(y, list) else y
    return {k: [tuple(map(response, x)) if k in ("train", "held_noisy", "held_clean")
                else response(x) for x in v]
            for k, v in prefs.items()}


def ensure_rm(cfg, source, sft, device):
    """The proxy RM(s) of out_dir (an Ensemble when cfg.ensemble > 1), trained first if missing."""
    paths = rm_paths(cfg.out_dir, cfg.ensemble)
    if not os.path.exists(paths[-1]):
        train_rm(cfg, source, sft, device)
    expect = None if cfg.reuse else made_with(cfg, "rm")
    return combine([load_model(p, scalar=True, expect=expect)[0].to(device).eval() for p in paths],
                   cfg.ensemble_agg)
