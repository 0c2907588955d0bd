"""Stage 4: refine the RM on policy samples, then PPO again: RLP and MetaRM (ALGORITHMS.md §2-3).

RLP (one round, RLP Alg. 1): the vanilla PPO policy (out_dir/ppo.pt, trained if missing) -> n
samples per unlabelled prompt -> an RM retrained from SFT on D plus what the method
adds -> normalised -> PPO again from SFT. MetaRM: round r samples the latest policy, trains a fresh
RM for one epoch on D with meta steps, and continues PPO from the previous round's policy for that
round's length (`round_lengths`), so the rounds together get vanilla PPO's budget.
"""
import copy
import itertools
import os
import random
import statistics
from dataclasses import dataclass, replace

import torch

from . import seeds
from .checkpoint import load
from .config import made_with
from .data import Codec
from .evaluate import summarize
from .metarm import difference_objective, metarm_step
from .ppo_trainer import train_ppo
from .rlp import MIBHead, cluster_by_similarity, synthetic_preferences, uml_step
from .rm import (bt_step, clean_labelled, gold_labelled, normalize_on, rm_accuracy, score_texts,
                 train_reward_model)
from .runtime import print_table, read_summary, write_summary
from .sft import sample


@dataclass(frozen=True)
class RLPMethod:
    """What an RM refinement adds to the RM's retraining on D (nothing at all: the control)."""
    uml: bool = False
    """+ lambda * L_M, the multi-view information bottleneck on view pairs of P (RLP-UML)."""
    spg: bool = False
    """+ synthetic pairs from self-consistent policy samples (RLP-SPG)."""
    oracle: str = ""
    """+ gold-labelled policy pairs: 'first' (each prompt's first two samples, the noisy labeller:
    what a perfect SPG would give) or 'all' (every distinct pair of a prompt's samples, labelled
    by the sign of the gold difference, ties dropped: the bound of any refinement on policy
    samples)."""


RLP_METHODS = {"uml": RLPMethod(uml=True), "spg": RLPMethod(spg=True),
               "uml+spg": RLPMethod(uml=True, spg=True), "oracle": RLPMethod(oracle="first"),
               "control": RLPMethod()}
# the on-policy, iterated mode of each (minirlhf/iterated.py); the one-shot rounds above are the
# RLP paper's protocol (Algorithm 1)
ITERATED_METHODS = {"uml-iter": RLP_METHODS["uml"], "spg-iter": RLP_METHODS["spg"],
                    "uml+spg-iter": RLP_METHODS["uml+spg"], "oracle-iter": RLPMethod(oracle="all"),
                    "control-iter": RLP_METHODS["control"]}
META_METHODS = {"metarm", "vanilla-rounds"}  # MetaRM's rounds, and the same rounds with eta = 0


def policy_samples(policy, codec, prompts, n, temperature, generator):
    """n samples per prompt: a list (per prompt) of n response texts."""
    flat = sample(policy, codec, [p for p in prompts for _ in range(n)], temperature, generator)
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def per_prompt_outputs(rm, codec, prompts, samples, hidden=False):
    """score_texts over every prompt's n samples in one batched pass, cut back into one chunk per
    prompt: scores (n,), or with `hidden` the final hidden states (n, C)."""
    out = score_texts(rm, codec, [p for p, ys in zip(prompts, samples) for _ in ys],
                      [y for ys in samples for y in ys], hidden=hidden)
    n = len(samples[0])
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def rm_scores(rm, codec, prompts, samples):
    """RM scores (per prompt, a list of n floats) of each prompt's samples."""
    return [s.tolist() for s in per_prompt_outputs(rm, codec, prompts, samples)]


def policy_pairs(task, prompts, samples):
    """Clean gold-labelled pairs (prompt, better, worse) of two distinct samples per prompt (gold
    ties dropped)."""
    firsts = ((p, ys[0], next((y for y in ys[1:] if y != ys[0]), None))
              for p, ys in zip(prompts, samples))
    return clean_labelled(task, [(p, a, b) for p, a, b in firsts if b is not None])


def held_out_policy_pairs(policy, codec, task, n_prompts, temperature, seed, split="eval"):
    """How well does an RM rank what the policy actually writes, where no refinement trained: clean
    gold-labelled pairs of two fresh samples on held-out prompts."""
    prompts = task.sample_prompts(n_prompts, random.Random(seed), split)
    samples = policy_samples(policy, codec, prompts, 2, temperature,
                             torch.Generator(codec.device).manual_seed(seed))
    return policy_pairs(task, prompts, samples)


def refine_rm(cfg, name, method, task, codec, sft, rm, prefs, prompts, samples, rng, seed,
              earlier=(), init=None):
    """An RM retrained from the SFT weights on D, plus what `method` adds from the policy samples
    (and the pairs `earlier` rounds added), normalised on SFT samples; with `init` (an earlier
    round's refined RM), that RM continued for one epoch instead. Returns (the RM, the method's
    statistics, the pairs it added)."""
    step, aux, stats, added = bt_step(codec, cfg.grad_clip), None, {}, []
    if method.spg:
        keys = semantic_keys(task, rm, codec, prompts, samples)
        scores = rm_scores(rm, codec, prompts, samples)
        synthetic, stats = synthetic_preferences(prompts, samples, keys, scores, cfg.spg_gamma, rng,
                                                 golds=task.golds, rank_by=cfg.spg_rank)
        added += synthetic  # D union D_hat, no reweighting
    if method.uml:
        torch.manual_seed(seed)  # the head's init derives from the seed alone, like the RM's
        aux = MIBHead(sft.cfg.n_embd, cfg.z_dim)
        step = uml_step(codec, prompts, samples, aux, rng, cfg.uml_lambda, cfg.mib_beta,
                        cfg.grad_clip)
    if method.oracle == "first":
        firsts = [(p, ys[0], ys[1]) for p, ys in zip(prompts, samples) if ys[0] != ys[1]]
        added += gold_labelled(task, firsts, rng, cfg.label_tau, cfg.label_flip)
        stats = {"oracle/pairs": len(added)}
    if method.oracle == "all":
        added += all_clean_pairs(task, prompts, samples, rng)[:cfg.oracle_pairs]
        stats = {"oracle/pairs": len(added)}
    # the same number of RM steps for every method, the control included: an epoch is |D| plus
    # the most pairs a method may add (--oracle_pairs), so that an RM sees what it was given
    # (with fewer steps, 2,000 added pairs were each seen less than once and barely learnt)
    refined = train_reward_model(
        sft, list(prefs["train"]) + list(earlier) + added, cfg, codec.device, seed=seed, step=step,
        aux=aux, desc=name, init=init, epochs=1 if init is not None else None,
        steps_per_epoch=max(1, (len(prefs["train"]) + cfg.oracle_pairs) // cfg.rm_batch))
    normalize_on(refined, codec, prefs["norm_prompts"], prefs["sft_samples"])
    return refined, stats, added


@torch.no_grad()
def semantic_keys(task, rm, codec, prompts, samples):
    """What each sample means, for RLP-SPG's clusters: the task's semantic key, or on free text
    (a file: no key) a cluster id from the RM's final hidden states (rlp.cluster_by_similarity)."""
    if task.semantic_key is not None:
        return [[task.semantic_key(p, y) for y in ys] for p, ys in zip(prompts, samples)]
    return [cluster_by_similarity(h)  # h (n, C)
            for h in per_prompt_outputs(rm.members[0], codec, prompts, samples, hidden=True)]


def all_clean_pairs(task, prompts, samples, rng):
    """Every distinct pair of each prompt's samples, labelled by the sign of the gold difference
    (ties dropped), dealt round-robin over the prompts in a random order within each prompt, so
    that a cut (--oracle_pairs) still covers every prompt instead of the first few."""
    per_prompt = []
    for p, ys in zip(prompts, samples):
        pairs = [(p, a, b) for a, b in itertools.combinations(sorted(set(ys)), 2)]
        per_prompt.append(rng.sample(pairs, len(pairs)))
    dealt = [pair for layer in itertools.zip_longest(*per_prompt) for pair in layer if pair]
    return clean_labelled(task, dealt)


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


def ppo_round(cfg, r, name, source, sft, rm, policy, device, split="unlabelled", eval_split="eval"):
    """Round r of a run of rounds: PPO continued from `policy` against `rm` for the round's length.
    The rounds share vanilla PPO's budget (cfg.iters in all), so the last round is compared at
    equal PPO compute; round r continues the iteration count (and prompt batches) where round r - 1
    stopped, as one vanilla PPO run would. Returns (policy, history)."""
    lengths = round_lengths(cfg.iters, cfg.rounds)
    return train_ppo(replace(cfg, iters=lengths[r - 1]), source, sft, rm, device,
                     name=f"{name}_r{r}", init_policy=policy, prompt_split=split,
                     eval_split=eval_split, first_iter=sum(lengths[:r - 1]))


def vanilla_policy(cfg, source, sft, rm, device):
    """The vanilla PPO policy pi_theta of out_dir (ppo.pt), trained first if missing or
    shorter than cfg.iters."""
    path = os.path.join(cfg.out_dir, "ppo.pt")
    ck = (load(path, expect=None if cfg.reuse else made_with(cfg, "ppo"), fields=("policy", "iter"))
          if os.path.exists(path) else None)
    if ck is None or ck["iter"] < cfg.iters:
        policy, history = train_ppo(cfg, source, sft, rm, device)
        write_summary(cfg, "ppo", summarize(history))
        return policy
    policy = copy.deepcopy(sft)
    policy.load_state_dict(ck["policy"])
    return policy.eval()


def rlp_round(cfg, name, source, sft, rm, prefs, device):
    """One RLP round (RLP Alg. 1) for the method RLP_METHODS[name]; returns and
    records its summary."""
    method, task = RLP_METHODS[name], source.task
    codec = Codec.of(cfg, source.tokenizer, device)
    policy = vanilla_policy(cfg, source, sft, rm, device)
    rng = random.Random(cfg.seed + seeds.RLP_SAMPLES)
    prompts = task.sample_prompts(cfg.refine_prompts, rng, "unlabelled")
    # RLP's P: --n_samples per prompt (the paper's 10) at T = 1
    samples = policy_samples(policy, codec, prompts, cfg.n_samples, 1.0,
                             torch.Generator(device).manual_seed(cfg.seed + seeds.RLP_SAMPLES))
    pol_pairs = held_out_policy_pairs(policy, codec, task, cfg.refine_prompts, 1.0,
                                      cfg.seed + seeds.HELD_OUT_PAIRS)
    before = {"rm_acc_policy_pairs": rm_accuracy(rm, codec, pol_pairs),
              "held_out_acc_gold": rm_accuracy(rm, codec, prefs["held_clean"])}
    refined, stats, _ = refine_rm(cfg, name, method, task, codec, sft, rm, prefs, prompts, samples,
                                  rng, cfg.seed + seeds.RLP_RM)
    after = {"rm_acc_policy_pairs": rm_accuracy(refined, codec, pol_pairs),
             "held_out_acc_gold": rm_accuracy(refined, codec, prefs["held_clean"])}
    print(f"{name}: RM accuracy on gold-labelled policy pairs "
          f"{before['rm_acc_policy_pairs']:.3f} -> {after['rm_acc_policy_pairs']:.3f}; "
          f"on held-out SFT pairs {before['held_out_acc_gold']:.3f} -> "
          f"{after['held_out_acc_gold']:.3f}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    _, history = train_ppo(cfg, source, sft, refined, device, name=f"ppo_{name}")
    result = {"rm_before": before, "rm_after": after, **stats, **summarize(history)}
    write_summary(cfg, f"refine_{name}", result)
    vanilla = read_summary(cfg)["ppo"]
    print(f"\n=== vanilla PPO vs PPO with the {name}-refined RM (gold judge, held-out prompts) ===")
    print_table([dict(policy=f"{who} {when}", iter=h["iter"], gold=h["eval/gold"], kl=h["eval/kl"],
                      win_rate=h["eval/win_rate"], rm_acc=h["eval/rm_acc_policy_pairs"])
                 for who, res in (("vanilla", vanilla), (name, result))
                 for when, h in (("final", res["final"]), ("peak", res["peak_gold"]))],
                ["policy", "iter", "gold", "kl", "win_rate", "rm_acc"])
    return result


def meta_rounds(cfg, name, source, sft, prefs, device):
    """MetaRM's rounds (name 'metarm'), or the same loop without the meta ascent (name
    'vanilla-rounds', eta = 0: its control)."""
    eta = cfg.meta_eta if name == "metarm" else 0.0
    task, codec = source.task, Codec.of(cfg, source.tokenizer, device)
    # --ood: train on OOD topics and judge on held-out OOD prompts (D stays in-distribution)
    split, eval_split = ("ood", "ood-eval") if cfg.ood else ("unlabelled", "eval")
    policy, rows = sft, []
    for r in range(1, cfg.rounds + 1):
        rng = random.Random(cfg.seed + seeds.META_SAMPLES + r)
        prompts = task.sample_prompts(cfg.refine_prompts, rng, split)
        S = policy_samples(policy, codec, prompts, cfg.meta_k,
                           cfg.temperature + cfg.meta_temp_delta,
                           torch.Generator(device).manual_seed(cfg.seed + seeds.META_SAMPLES + r))
        rm, log = meta_trained_rm(cfg, sft, codec, prefs, prompts, S, eta, rng,
                                  cfg.seed + seeds.META_RM + r, f"{name} r{r}")
        rm_row = {"J_policy_samples": difference_objective(
                      torch.tensor(rm_scores(rm, codec, prompts, S))).item(),
                  "shift_norm": statistics.mean(s["shift_norm"] for s in log),
                  "held_out_acc_gold": rm_accuracy(rm, codec, prefs["held_clean"]),
                  "rm_acc_policy_pairs": rm_accuracy(rm, codec, held_out_policy_pairs(
                      policy, codec, task, cfg.refine_prompts, cfg.temperature,
                      cfg.seed + seeds.HELD_OUT_PAIRS + r, eval_split))}
        policy, history = ppo_round(cfg, r, name, source, sft, rm, policy, device, split,
                                    eval_split)
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


def meta_trained_rm(cfg, sft, codec, prefs, prompts, S, eta, rng, seed, desc):
    """A fresh RM trained for one epoch on D with MetaRM steps on the policy samples S, normalised
    on SFT samples; returns it and the meta steps' statistics."""
    log = []
    step = metarm_step(codec, prompts, S, eta, cfg.meta_k, cfg.meta_prompts, cfg.meta_second_order,
                       cfg.grad_clip, rng, log)
    rm = train_reward_model(sft, prefs["train"], cfg, codec.device, seed=seed, step=step, epochs=1,
                            desc=desc)
    normalize_on(rm, codec, prefs["norm_prompts"], prefs["sft_samples"])
    return rm, log


def eta_sweep(cfg, source, sft, prefs, device, etas=(0.0, 0.01, 0.1, 1.0, 10.0)):
    """MetaRM's eta at our scale (the paper's 5e-6 barely moves a small model): one
    round-1 RM per eta."""
    task, codec = source.task, Codec.of(cfg, source.tokenizer, device)
    rng = random.Random(cfg.seed + seeds.META_SAMPLES + 1)
    prompts = task.sample_prompts(cfg.refine_prompts, rng, "unlabelled")
    S = policy_samples(sft, codec, prompts, cfg.meta_k, cfg.temperature + cfg.meta_temp_delta,
                       torch.Generator(device).manual_seed(cfg.seed + seeds.META_SAMPLES + 1))
    held_pairs = held_out_policy_pairs(sft, codec, task, cfg.refine_prompts, cfg.temperature,
                                       cfg.seed + seeds.HELD_OUT_PAIRS + 1)
    rows = []
    for eta in etas:
        rm, log = meta_trained_rm(cfg, sft, codec, prefs, prompts, S, eta, random.Random(cfg.seed),
                                  cfg.seed + seeds.META_RM + 1, f"eta={eta}")
        rows.append({"eta": eta, "shift_norm": statistics.mean(s["shift_norm"] for s in log),
                     "J_gain": statistics.mean(s["J_shifted"] - s["J"] for s in log),
                     "J_policy_samples": difference_objective(
                         torch.tensor(rm_scores(rm, codec, prompts, S))).item(),
                     "held_out_acc_gold": rm_accuracy(rm, codec, prefs["held_clean"]),
                     "rm_acc_policy_pairs": rm_accuracy(rm, codec, held_pairs)})
    print_table(rows, list(rows[0]))
    write_summary(cfg, "eta_sweep", {"rows": rows})
    return rows
