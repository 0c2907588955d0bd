"""The on-policy, iterated mode of every RM refinement, and the ceilings that measure headroom
(ALGORITHMS.md §2.3).

Iterated mode (`refine.py --method=oracle-iter`, `control-iter`, `uml-iter`, `spg-iter`,
`uml+spg-iter`): R rounds, each sampling the *current* policy, refining the RM with the method
(round 1 from the SFT weights, later rounds continuing the previous round's RM), normalising it,
and continuing PPO; the rounds share vanilla PPO's budget, like MetaRM's. `oracle-iter` adds
every distinct pair of the current policy's samples with clean gold labels, accumulating over
rounds: the upper bound of any method that refines on policy samples. `control-iter` runs the same
rounds retraining on D only.

Ceilings: `gold-ppo`, PPO on the gold reward itself, normalised like an RM: what the optimiser can
reach when the RM is no bottleneck; `big-rm`, PPO on a proxy trained on 10x the preference pairs
(the same labeller): what more human data buys.
"""
import random
from dataclasses import replace

import torch

from . import seeds
from .data import Codec, decode_responses
from .evaluate import summarize
from .ppo_trainer import train_ppo
from .refinement import (ITERATED_METHODS, held_out_policy_pairs, policy_samples, ppo_round,
                         refine_rm)
from .rm import bt_step, normalize_on, preference_data, rm_accuracy, train_reward_model
from .runtime import print_table, write_summary


def iterated_rounds(cfg, name, source, sft, rm, prefs, device):
    """The rounds of ITERATED_METHODS[name]; returns and records one row per round."""
    method, task = ITERATED_METHODS[name], source.task
    codec = Codec(source.tokenizer, cfg.prompt_len, cfg.max_new_tokens, device)
    policy, rows, added = sft, [], []
    for r in range(1, cfg.rounds + 1):
        rng = random.Random(cfg.seed + seeds.ITER_SAMPLES + r)
        prompts = task.sample_prompts(cfg.refine_prompts, rng, "unlabelled")
        samples = policy_samples(policy, codec, prompts, cfg.n_samples, 1.0, torch.Generator(
            device).manual_seed(cfg.seed + seeds.ITER_SAMPLES + r))
        # SPG ranks by the RM in use so far; the oracle's pairs accumulate over the rounds; round
        # r > 1 continues round r - 1's RM, which keeps what it learnt (from SFT, the accumulated
        # pairs would dilute the newest ones within the same steps)
        rm, stats, new = refine_rm(cfg, f"{name} r{r}", method, task, codec, sft, rm, prefs,
                                   prompts, samples, rng, cfg.seed + seeds.ITER_RM + r, added,
                                   init=rm if r > 1 else None)
        added += new if method.oracle else []
        rm_row = {"held_out_acc_gold": rm_accuracy(rm, codec, prefs["held_clean"]),
                  "rm_acc_policy_pairs": rm_accuracy(rm, codec, held_out_policy_pairs(
                      policy, codec, task, cfg.refine_prompts, cfg.temperature,
                      cfg.seed + seeds.HELD_OUT_PAIRS + r)), **stats}
        policy, history = ppo_round(cfg, r, name, source, sft, rm, policy, device)
        rows.append({"round": r, **rm_row, **summarize(history)})
        print(f"round {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in rm_row.items())
              + f", final gold {history[-1]['eval/gold']:.3f}")
    write_summary(cfg, name, {"rounds": rows})
    print_table([{"round": x["round"], "acc_heldout": x["held_out_acc_gold"],
                  "acc_policy": x["rm_acc_policy_pairs"], "kl": x["final"]["eval/kl"],
                  "gold": x["final"]["eval/gold"], "win_rate": x["final"]["eval/win_rate"]}
                 for x in rows], ["round", "acc_heldout", "acc_policy", "kl", "gold", "win_rate"])
    return rows


class GoldReward:
    """The task's gold reward behind the RM's interface (`score` of encoded prompts and responses),
    normalised like an RM: mean 0 and std 1 on the same SFT samples. `members[0]` is the proxy RM,
    which the critic starts from, as in every other run."""

    def __init__(self, task, tok, proxy, prompts, responses):
        gold = torch.tensor(task.golds(prompts, responses))
        self.task, self.tok, self.members = task, tok, [proxy]
        self.mean, self.std = gold.mean().item(), gold.std().item()

    def score(self, prompt, prompt_mask, response, resp_mask):
        texts = decode_responses(self.tok, response, resp_mask)
        prompts = [self.tok.decode([i for i in row[m.bool()].tolist() if i != self.tok.bos_id])
                   for row, m in zip(prompt.cpu(), prompt_mask.cpu())]
        gold = torch.tensor(self.task.golds(prompts, texts))
        return ((gold - self.mean) / self.std).to(response.device)


def gold_ppo(cfg, source, sft, rm, prefs, device):
    """The `gold-ppo` ceiling: PPO against the normalised gold reward, same recipe and budget."""
    gold = GoldReward(source.task, source.tokenizer, rm, prefs["norm_prompts"],
                      prefs["sft_samples"])
    _, history = train_ppo(cfg, source, sft, gold, device, name="ppo_gold")
    result = summarize(history)
    write_summary(cfg, "gold-ppo", result)
    print(f"gold-ppo: gold {history[0]['eval/gold']:.3f} -> {history[-1]['eval/gold']:.3f} at KL "
          f"{history[-1]['eval/kl']:.2f}")
    return result


def big_rm_ppo(cfg, source, sft, device, scale=10):
    """The `big-rm` ceiling: a proxy RM trained, like the proxy, on `scale` x its preference pairs
    (pairs of SFT samples, the same labeller; its first pairs are the proxy's own), then PPO on it
    with the same recipe and budget."""
    big_cfg = replace(cfg, rm_pairs=scale * cfg.rm_pairs)
    codec = Codec(source.tokenizer, cfg.prompt_len, cfg.max_new_tokens, device)
    train, _, held_clean, sft_samples = preference_data(sft, source, codec, big_cfg)
    big = train_reward_model(sft, train, big_cfg, device, seed=cfg.seed + seeds.BIG_RM,
                             step=bt_step(codec, cfg.grad_clip), desc="big-rm")
    normalize_on(big, codec, [p for p, _, _ in train][:len(sft_samples)], sft_samples)
    _, history = train_ppo(cfg, source, sft, big, device, name="ppo_big_rm")
    result = {"rm_after": {"held_out_acc_gold": rm_accuracy(big, codec, held_clean)},
              "rm_pairs": len(train), **summarize(history)}
    write_summary(cfg, "big-rm", result)
    print(f"big-rm: {len(train)} pairs, held-out accuracy "
          f"{result['rm_after']['held_out_acc_gold']:.3f}, "
          f"final gold {history[-1]['eval/gold']:.3f}")
    return result
