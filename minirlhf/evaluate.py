"""Judging a policy with the task's gold reward: what really got better, and how far the
proxy drifted from it."""
import math

import numpy as np
import torch
from tqdm import tqdm

from .generate import generate, in_length_order, sampled_responses, sequence_logprobs
from .plumbing.memo import fingerprint, reused
from .rm import score_responses


@torch.no_grad()
def sample_with_kl(policy, ref, batcher, prompts, temperature, generator, batch=256):
    """Sample one response per prompt; returns the responses (token ids, as sampled), KL to ref
    (sum of k1 over tokens; 0 with ref=None, for callers that read no KL) and lengths, the last
    two as numpy arrays."""
    tok = batcher.tok
    responses, kl, length = [], [], []
    for i in range(0, len(prompts), batch):
        p, pm = batcher.prompts(prompts[i:i + batch])
        r, logp, rmask = generate(policy, p, pm, batcher.max_new_tokens, tok.eos_id, tok.pad_id,
                                  temperature=temperature, generator=generator)
        ref_logp = logp if ref is None else in_length_order(
            lambda *b: sequence_logprobs(ref, *b, temperature), p, pm, r, rmask)
        responses += sampled_responses(r, rmask)
        kl.append(((logp - ref_logp) * rmask).sum(-1).cpu())
        length.append(rmask.sum(-1).cpu())
    return responses, torch.cat(kl).numpy(), torch.cat(length).numpy()


def drawn(policy, ref, task, batcher, prompts, temperature, generator, n, reuse=False):
    """n draws of one response per prompt from `generator`: [(responses, KL to ref, lengths,
    gold)], the last three numpy arrays. With `reuse`, a policy with the reference's weights (the
    SFT, which every PPO run of a seed starts from) is drawn once per process (plumbing/memo.py)."""
    def draw():
        out = []
        for _ in range(n):
            responses, kl, length = sample_with_kl(policy, ref, batcher, prompts, temperature,
                                                   generator)
            out.append((responses, kl, length, np.array(task.golds(prompts, responses))))
        return out
    if not reuse:
        return draw()
    weights = fingerprint(policy)  # one pass over the weights: a GPT-2's are 0.5 GB
    if ref is not None and weights != fingerprint(ref):
        return draw()
    return reused((weights, ref is None, type(task).__name__, tuple(prompts), temperature,
                   batcher.prompt_len, batcher.max_new_tokens, n), draw, generator)


def win_tie_lose(gold, baseline_gold):
    """Per-prompt comparison of gold rewards; win-rate counts a tie as half."""
    gold, base = np.asarray(gold), np.asarray(baseline_gold)
    win, tie = float((gold > base).mean()), float((gold == base).mean())
    return {"win": win, "tie": tie, "lose": 1 - win - tie, "win_rate": win + tie / 2}


def evaluate(policy, ref, rm, task, batcher, prompts, sft_gold, temperature, generator,
             reuse=False):
    """Two samples per held-out prompt, judged by the gold reward and by the proxy RM (`reuse`:
    see `drawn`).

    sft_gold: gold of one SFT sample per prompt (the win-rate baseline). Gold, proxy, KL, length and
    the win-rate use both samples (each compared with the baseline); the pair of them measures
    how well the proxy ranks the policy's own samples. Returns a flat dict of metrics; the RM is
    normalised to unit std on SFT samples, so reward-difference spreads are in SFT-std units."""
    (a, kl_a, len_a, gold_a), (b, kl_b, len_b, gold_b) = drawn(
        policy, ref, task, batcher, prompts, temperature, generator, 2, reuse)
    proxy_a, proxy_b = (score_responses(rm, batcher, prompts, y).float().cpu().numpy()
                        for y in (a, b))
    decided = gold_a != gold_b  # RM accuracy on gold-labelled pairs of the policy's own samples
    rm_acc = (float(((proxy_a > proxy_b) == (gold_a > gold_b))[decided].mean()) if decided.any()
              else float("nan"))
    wtl = {k: (x + y) / 2 for (k, x), y in zip(win_tie_lose(gold_a, sft_gold).items(),
                                              win_tie_lose(gold_b, sft_gold).values())}
    return {"eval/gold": both(gold_a, gold_b), "eval/proxy": both(proxy_a, proxy_b),
            "eval/kl": both(kl_a, kl_b), "eval/length": both(len_a, len_b),
            "eval/eos_rate": float(np.mean([y[-1:] == (batcher.tok.eos_id,) for y in a + b])),
            "eval/win_rate": wtl["win_rate"], "eval/win": wtl["win"], "eval/tie": wtl["tie"],
            "eval/lose": wtl["lose"], "eval/rm_acc_policy_pairs": rm_acc,
            "eval/proxy_gold_corr": _corr(np.concatenate([proxy_a, proxy_b]),
                                          np.concatenate([gold_a, gold_b])),
            "eval/proxy_diff_std": float(np.std(proxy_a - proxy_b)),
            "eval/gold_diff_std": float(np.std(gold_a - gold_b)),
            "gold_per_prompt": ((gold_a + gold_b) / 2).tolist(),
            "samples": list(zip(prompts[:8], map(batcher.tok.text, a[:8]), proxy_a[:8].tolist(),
                                gold_a[:8].tolist()))}


def both(x, y):
    """The mean over both samples of every prompt."""
    return float(np.concatenate([x, y]).mean())


def _corr(x, y):
    return float(np.corrcoef(x, y)[0, 1]) if np.std(x) > 0 and np.std(y) > 0 else float("nan")


def best_of_n_curve(proxy, gold, ns):
    """Expected gold of best-of-n (pick the highest-proxy of n samples) for each n, from N >= n
    samples per prompt without bias (Nakano et al. 2021): with samples sorted by proxy, the i-th
    smallest (1-based) is the best of a random n-subset with probability C(i-1, n-1) / C(N, n).
    proxy, gold: (prompts, N). Returns [(n, kl, gold)], with the analytic
    KL(best-of-n || pi) = log n - (n - 1) / n."""
    proxy, gold = np.asarray(proxy), np.asarray(gold)
    N = proxy.shape[1]
    order = np.argsort(proxy, axis=1, kind="stable")
    gold_sorted = np.take_along_axis(gold, order, axis=1)  # (P, N), ascending proxy
    i = np.arange(1, N + 1)
    out = []
    for n in ns:
        log_w = np.full(N, -np.inf)
        ok = i >= n
        log_w[ok] = _log_comb(i[ok] - 1, n - 1) - _log_comb(N, n)
        out.append((n, math.log(n) - (n - 1) / n, float((gold_sorted @ np.exp(log_w)).mean())))
    return out


def _log_comb(n, k):
    lg = np.vectorize(math.lgamma)
    return lg(np.asarray(n) + 1) - lg(np.asarray(k) + 1) - lg(np.asarray(n) - np.asarray(k) + 1)


def best_of_n(sft, rm, task, batcher, prompts, temperature, generator, n_max):
    """Gao et al.'s best-of-n curve against the proxy: gold of the highest-proxy of n SFT samples,
    for n = 1, 2, 4, ..., n_max, from n_max samples per prompt. Returns rows
    {n, kl, gold, proxy}."""
    proxy, gold = [], []
    for _ in tqdm(range(n_max), desc="best-of-n samples", mininterval=1.0):
        responses = sample_with_kl(sft, None, batcher, prompts, temperature, generator)[0]
        proxy.append(score_responses(rm, batcher, prompts, responses).float().cpu().numpy())
        gold.append(task.golds(prompts, responses))
    proxy, gold = np.array(proxy).T, np.array(gold).T  # (prompts, n_max)
    ns = [2 ** k for k in range(int(math.log2(n_max)) + 1)]
    return [{"n": n, "kl": kl, "gold": g, "proxy": pc[2]}
            for (n, kl, g), pc in zip(best_of_n_curve(proxy, gold, ns),
                                      best_of_n_curve(proxy, proxy, ns))]


def summarize(history):
    """The first (under "sft": the SFT policy's, except in a round that continues a policy,
    whose first evaluation is its own), final and peak-gold evaluations, the whole curve
    (iter, KL, proxy, gold) and the evaluation prompts' keys (GoldJudge records them with its
    first evaluation). The keys are results.json's cell format."""
    first = dict(history[0])
    keys = first.pop("prompt_keys", None)
    history = [first, *history[1:]]
    peak = max(history, key=lambda h: h["eval/gold"])
    fields = ("iter", "eval/kl", "eval/proxy", "eval/gold", "eval/win_rate", "gold_per_prompt")
    curve = [{k: h[k] for k in fields} for h in history]
    return {"sft": history[0], "final": history[-1], "peak_gold": peak, "curve": curve,
            "prompt_keys": keys}
