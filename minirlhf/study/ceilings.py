"""The ceilings that measure headroom (ALGORITHMS.md §2.3): `gold-ppo`, PPO on the gold reward
itself, normalised like an RM: what the optimiser can reach when the RM is no bottleneck;
`big-rm`, PPO on a proxy trained on 10x the preference pairs (the same labeller): what more human
data buys.
"""
from dataclasses import replace

import torch

from ..data.batches import Batcher
from ..evaluate import summarize
from ..generate import sampled_responses
from ..plumbing import seeds
from ..plumbing.runtime import write_summary
from ..ppo_trainer import train_ppo
from ..rm import fit_rm, normalize_on, preference_data, rm_accuracy


class GoldReward:
    """The task's gold reward behind the RM's interface (`score` of encoded prompts and responses),
    normalised like an RM: mean 0 and std 1 on the same SFT samples. `members[0]` is the proxy RM,
    which the critic starts from, as in every other run."""

    def __init__(self, task, tok, proxy, prompts, responses):
        gold = torch.tensor(task.golds(prompts, responses))
        self.task, self.tok, self.members = task, tok, [proxy]
        self.mean, self.std = gold.mean().item(), gold.std().item()

    def score(self, prompt, prompt_mask, response, resp_mask):
        prompts = [self.tok.decode([i for i in row[m.bool()].tolist() if i != self.tok.bos_id])
                   for row, m in zip(prompt.cpu(), prompt_mask.cpu())]
        gold = torch.tensor(self.task.golds(prompts, sampled_responses(response, resp_mask)))
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
    (pairs of SFT samples, drawn and labelled the same way), then PPO on it with the same recipe
    and budget."""
    big_cfg = replace(cfg, rm_pairs=scale * cfg.rm_pairs)
    batcher = Batcher.of(cfg, source.tokenizer, device)
    train, _, held_clean, sft_samples = preference_data(sft, source, batcher, big_cfg)
    big = fit_rm(sft, train, big_cfg, batcher, seed=seeds.stream(cfg.seed, seeds.BIG_RM),
                 desc="big-rm")
    normalize_on(big, batcher, [p for p, _, _ in train], sft_samples)
    _, history = train_ppo(cfg, source, sft, big, device, name="ppo_big_rm")
    result = {"rm_after": {"held_out_acc_gold": rm_accuracy(big, batcher, held_clean)},
              "rm_pairs": len(train), **summarize(history)}
    write_summary(cfg, "big-rm", result)
    print(f"big-rm: {len(train)} pairs, held-out accuracy "
          f"{result['rm_after']['held_out_acc_gold']:.3f}, "
          f"final gold {history[-1]['eval/gold']:.3f}")
    return result
