"""Stage 2 of RLHF: a proxy reward model from a limited budget of preference pairs
(ALGORITHMS.md §1.2).

The pairs are two SFT samples per 'pref' prompt, labelled by the simulated annotator (the gold
reward through a Bradley-Terry labeller); on a file the gold reward is the gold RM trained on the
file's own pairs (file_task.py). The RM starts from the SFT weights, learns with the Bradley-Terry
loss, and is normalised to mean 0 / std 1 on SFT samples. Writes out_dir/rm.pt (ensemble members
1.. as rm_1.pt, ...) and preferences.json.
"""
import copy
import json
import math
import os
import random
import statistics

import torch
from tqdm import tqdm

from . import dist, seeds
from .checkpoint import atomic_write_json
from .config import made_with
from .data import Codec, DataError, gold_label
from .model import load_model, save_model
from .reward import Ensemble, bt_loss, normalize, pairwise_accuracy, reward_model_from
from .runtime import (Metrics, adamw, autocast, check_finite, clip_and_check, cosine_lr,
                      write_summary)
from .sft import sample


def pair_rewards(rm, codec, prompts, chosen, rejected):
    """(r(x, y_w), r(x, y_l)), each (B,), from one forward over 2B sequences."""
    r = rm.score(*codec.batch(list(prompts) * 2, list(chosen) + list(rejected)))
    return r[:len(prompts)], r[len(prompts):]


@torch.no_grad()
def rm_accuracy(rm, codec, pairs, batch=256):
    """Pairwise accuracy of rm on [(prompt, chosen, rejected)]; nan for no pairs (a policy that
    collapsed to one response per prompt leaves none)."""
    if not pairs:
        return float("nan")
    rc, rr = zip(*(pair_rewards(rm, codec, *zip(*pairs[i:i + batch]))
                   for i in range(0, len(pairs), batch)))
    return pairwise_accuracy(torch.cat(rc), torch.cat(rr))


@torch.no_grad()
def score_texts(rm, codec, prompts, responses, batch=256, hidden=False):
    """RM scores (N,) of (prompt, response) texts, `batch` at a time; with `hidden`, the final
    hidden states (N, C) the RM's head reads instead (a single RM, not an ensemble)."""
    out = []
    for i in range(0, len(prompts), batch):
        rows = codec.batch(prompts[i:i + batch], responses[i:i + batch])
        out.append(rm.score(*rows, return_hidden=True)[1] if hidden else rm.score(*rows))
    return torch.cat(out)


def normalize_on(rm, codec, prompts, responses):
    """normalize() on the RM's scores of (prompt, response) SFT samples."""
    return normalize(rm, score_texts(rm, codec, prompts, responses))


def sample_pairs(policy, codec, prompts, temperature, generator, desc="pairs"):
    """Two samples of the policy for each prompt; pairs of identical responses are dropped."""
    a, b = [], []
    for i in tqdm(range(0, len(prompts), 256), desc=desc, mininterval=1.0,
                  disable=not dist.is_main()):
        for out in (a, b):
            out += sample(policy, codec, prompts[i:i + 256], temperature, generator)
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


def preference_data(sft, source, codec, cfg):
    """Training pairs D, held-out pairs (noisy and clean labels) and the SFT samples used
    for normalisation."""
    task, rng = source.task, random.Random(cfg.seed + seeds.PREFERENCES)
    gen = torch.Generator(codec.device).manual_seed(cfg.seed + seeds.PREFERENCES)
    train = sample_pairs(sft, codec, task.sample_prompts(cfg.rm_pairs, rng, "pref"),
                         cfg.temperature, gen, desc="sampling preference pairs")
    held = sample_pairs(sft, codec, task.sample_prompts(max(64, cfg.rm_pairs // 4), rng, "eval"),
                        cfg.temperature, gen, desc="sampling held-out pairs")

    def label(pairs):
        return gold_labelled(task, pairs, rng, cfg.label_tau, cfg.label_flip)
    return label(train), label(held), clean_labelled(task, held), [a for _, a, _ in train]


def bt_step(codec, grad_clip):
    """The plain RM step: Bradley-Terry loss on a batch of labelled pairs (with torchrun: this
    rank's slice of it, weighted so that the summed gradient is the global batch's)."""
    def step(rm, opt, batch):
        local = dist.shard(batch)
        rc, rr = pair_rewards(rm, codec, *zip(*local))
        loss = bt_loss(rc, rr) * len(local) / len(batch)
        check_finite(loss, "RM")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.sync_grads(rm.parameters())
        clip_and_check(rm.parameters(), grad_clip, "RM")
        opt.step()
        return {"loss": dist.all_sum(loss.item()), "acc": pairwise_accuracy(rc, rr)}
    return step


def train_reward_model(sft, pairs, cfg, device, seed, step, epochs=None, aux=None, desc="rm",
                       steps_per_epoch=None, init=None):
    """A fresh RM from the SFT weights (or a copy of the RM `init`, to continue it), trained on
    `pairs` for `epochs`.
    `step(rm, opt, batch) -> dict` does one update: bt_step, or RLP-UML's and MetaRM's steps. `aux`,
    a module trained jointly with the RM (RLP-UML's encoder and critic, which its step holds),
    shares the optimizer and is thrown away afterwards. `steps_per_epoch` (default: one pass over
    `pairs`) lets methods that add pairs to D train for as many steps as the ones that do not."""
    if not pairs:  # an epoch of no pairs never fills, and the loop below would never end
        raise DataError(f"{desc}: no preference pairs to train on (each sampled pair had two "
                        "identical responses: raise --rm_pairs or --temperature)")
    torch.manual_seed(seed)
    rm = (reward_model_from(sft) if init is None else copy.deepcopy(init)).to(device)
    rm.gpt.set_dropout(cfg.dropout)
    rm.train()
    params = list(rm.parameters()) + (list(aux.to(device).train().parameters())
                                      if aux is not None else [])
    opt = adamw(params, lr=cfg.rm_lr, weight_decay=cfg.weight_decay)
    rng = random.Random(seed)
    epochs = epochs or cfg.rm_epochs
    steps_per_epoch = steps_per_epoch or max(1, len(pairs) // cfg.rm_batch)
    total = epochs * steps_per_epoch
    # a short run (a MetaRM round: one epoch) must still reach its decay: warmup is at most half
    warmup = min(cfg.warmup, total // 2)
    bar = tqdm(range(total), desc=desc, mininterval=1.0, disable=not dist.is_main())
    order = []
    for i in bar:
        if i % steps_per_epoch == 0:  # an epoch longer than the pairs goes round them again
            order = []
            while len(order) < steps_per_epoch * cfg.rm_batch:
                order += rng.sample(pairs, len(pairs))
        for g in opt.param_groups:
            g["lr"] = cosine_lr(i, total, cfg.rm_lr, warmup)
        first = (i % steps_per_epoch) * cfg.rm_batch
        with autocast(cfg, device):
            stats = step(rm, opt, order[first:first + cfg.rm_batch])
        check_finite(stats["loss"], desc, i)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    rm.gpt.set_dropout(0.0)
    return rm.eval()


def rm_paths(out_dir, members):
    return [os.path.join(out_dir, "rm.pt" if k == 0 else f"rm_{k}.pt") for k in range(members)]


def train_rm(cfg, source, sft, device):
    """The proxy RM(s): preference data, Bradley-Terry training, held-out accuracy, normalisation;
    saved to out_dir. Returns the summary."""
    codec = Codec.of(cfg, source.tokenizer, device)
    train, held_noisy, held_clean, sft_samples = preference_data(sft, source, codec, cfg)
    norm_prompts = [p for p, _, _ in train]
    atomic_write_json(dict(train=train, held_noisy=held_noisy, held_clean=held_clean,
                           norm_prompts=norm_prompts, sft_samples=sft_samples),
                      os.path.join(cfg.out_dir, "preferences.json"))
    print(f"RM: {len(train)} training pairs, {len(held_noisy)} held-out pairs")
    metrics, results, rms = Metrics(cfg.out_dir, "rm"), [], []
    for k, path in enumerate(rm_paths(cfg.out_dir, cfg.ensemble)):
        rm = train_reward_model(sft, train, cfg, device, seed=cfg.seed + seeds.RM_MEMBER * k,
                                step=bt_step(codec, cfg.grad_clip), desc=f"rm{k}")
        res = {"held_out_acc_noisy": rm_accuracy(rm, codec, held_noisy)}
        if held_clean:
            res["held_out_acc_gold"] = rm_accuracy(rm, codec, held_clean)
        res["norm_mean"], res["norm_std"] = normalize_on(rm, codec, norm_prompts, sft_samples)
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
        gen = torch.Generator(device).manual_seed(cfg.seed + seeds.SHIFTED)
        prompts = source.task.sample_prompts(max(64, cfg.rm_pairs // 4),
                                             random.Random(cfg.seed + seeds.SHIFTED), "eval")
        hot = clean_labelled(source.task, sample_pairs(sft, codec, prompts, 1.5, gen,
                                                       desc="sampling shifted pairs"))
        summary["shifted_acc_gold_T1.5"] = rm_accuracy(combine(rms, cfg.ensemble_agg), codec, hot)
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
    return {k: [tuple(x) for x in v] if k in ("train", "held_noisy", "held_clean") else v
            for k, v in prefs.items()}


def ensure_rm(cfg, source, sft, device):
    """The proxy RM(s) of out_dir (an Ensemble when cfg.ensemble > 1), trained first if missing."""
    paths = rm_paths(cfg.out_dir, cfg.ensemble)
    if not os.path.exists(paths[-1]):
        train_rm(cfg, source, sft, device)
    expect = None if cfg.reuse else made_with(cfg, "rm")
    return combine([load_model(p, scalar=True, expect=expect)[0].to(device).eval() for p in paths],
                   cfg.ensemble_agg)
