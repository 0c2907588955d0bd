"""RLP: Reward Learning on Policy (Lang, Huang, Li, NAACL 2024). ALGORITHMS.md §2.

The policy drifts away from the samples its RM was trained on; RLP retrains the RM on samples of the
policy itself, then runs PPO again. One round (RLP Algorithm 1, `rlp_round`):
    1. the policy to learn from: vanilla PPO's                       (train_ppo.py's, or trained)
    2. sample it: n responses per unlabelled prompt (P)              (policy_samples)
    3. what the method adds to D from P                              (added_pairs)
         RLP-SPG: synthetic pairs from self-consistent samples       (synthetic_preferences)
    4. retrain the RM from SFT on D + those pairs, normalised        (retrain_rm)
         RLP-UML: + lambda * L_M, a multi-view information
         bottleneck on view pairs of P                               (uml_rm, mib_loss)
    5. PPO again from SFT against the refined RM                     (train_ppo)
The oracle (gold-labelled pairs of P) and the control (D alone) run the same round. The iterated
mode, which repeats steps 2-5 every round on the current policy, is study code
(minirlhf/study/iterated.py).
"""
import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.batches import Batcher
from .evaluate import summarize
from .generate import policy_samples
from .plumbing import seeds
from .plumbing.memo import fingerprint, reused
from .plumbing.runtime import (Metrics, autocast, clip_and_check, print_table, read_summary,
                               write_summary)
from .ppo_trainer import ensure_ppo, train_ppo
from .reward import bt_loss
from .rm import (RMLoop, clean_labelled, fit_rm, gold_labelled, held_out_policy_pairs, new_rm,
                 normalize_on, pair_rewards, per_prompt_outputs, ready_to_score, rm_accuracy,
                 rm_scores)


# ---- RLP-UML's loss: a multi-view information bottleneck (ALGORITHMS.md §2.1)
def symmetric_kl(mu1, sigma1, mu2, sigma2):
    """SKL = 1/2 [KL(p1 || p2) + KL(p2 || p1)] for diagonal Gaussians, closed form, per row.
    Inputs (B, Z) -> (B,)
    KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2,
    summed over dims."""
    def kl(m1, s1, m2, s2):
        return (torch.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5).sum(-1)
    return 0.5 * (kl(mu1, sigma1, mu2, sigma2) + kl(mu2, sigma2, mu1, sigma1))


def jsd_mi(t_pos, t_neg):
    """Jensen-Shannon MI lower bound (Hjelm et al. 2018) from critic scores:
    I_hat = mean_pos(-softplus(-T(z1, z2))) - mean_neg(softplus(T(z1', z2)))."""
    return (-F.softplus(-t_pos)).mean() - F.softplus(t_neg).mean()


def _mlp(d_in, d_hidden, d_out):
    """The 3-layer MLP of ALGORITHMS.md §2.1 (in -> d -> d -> out)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_hidden),
                         nn.ReLU(), nn.Linear(d_hidden, d_out))


class MIBHead(nn.Module):
    """Gaussian encoder p(z | v) = N(mu(h), sigma(h)^2) of a view's RM feature h, and the MI
    critic T(z1, z2). Trained jointly with the RM and thrown away afterwards: the reward
    head never reads z."""

    def __init__(self, d, z_dim=64):
        super().__init__()
        self.mu, self.sigma = _mlp(d, d, z_dim), _mlp(d, d, z_dim)
        self.critic = _mlp(2 * z_dim, d, 1)

    def encode(self, h):
        mu = self.mu(h)
        sigma = F.softplus(self.sigma(h)) + 1e-7
        # reparameterised (z = mu + sigma * eps), so that gradients flow through the sample
        return mu, sigma, mu + sigma * torch.randn_like(mu)


def mib_loss(head, h1, h2, beta=1.0):
    """L_M = -I_hat(z1; z2) + beta * SKL(p(z | v1), p(z | v2)) for two views (B, d) of the same
    B prompts. Negatives: z1 rolled by one position, i.e. paired with another prompt's z2.
    beta = 0 is the MVI ablation. (beta is our knob, --mib_beta: the paper has none.)"""
    assert h1.shape[0] >= 2, "the JS estimator needs >= 2 prompts per batch for its negatives"
    mu1, s1, z1 = head.encode(h1)
    mu2, s2, z2 = head.encode(h2)
    t_pos = head.critic(torch.cat([z1, z2], -1))
    t_neg = head.critic(torch.cat([z1.roll(1, dims=0), z2], -1))
    mi = jsd_mi(t_pos, t_neg)
    skl = symmetric_kl(mu1, s1, mu2, s2).mean()
    return -mi + beta * skl, {"mi": mi.item(), "skl": skl.item()}


# ---- RLP-SPG: synthetic preferences from self-consistency (ALGORITHMS.md §2.2)
def synthetic_preferences(prompts, samples, keys, scores, gamma, rng, golds=None,
                          rank_by="cluster"):
    """RLP-SPG (ALGORITHMS.md §2.2). For prompt i with samples[i] (n responses), their semantic
    keys[i] and current-RM scores scores[i]:
      1. group samples with equal keys; confidence = |largest group| / n
         (ties: the group met first);
      2. keep the prompt iff confidence >= gamma and some sample lies outside the largest group;
      3. chosen = the highest-RM sample of the largest group, rejected = uniform among
         the samples outside it.
    rank_by="rm" is the ablation that skips clustering: chosen = RM-best, rejected = RM-worst
    sample. golds(prompts, responses), when given, measures how often the synthetic label agrees
    with the gold judge. Returns ([(prompt, chosen, rejected)], stats)."""
    pairs = []
    for prompt, ys, ks, rs in zip(prompts, samples, keys, scores):
        if rank_by == "rm":
            best, worst = (max(range(len(ys)), key=rs.__getitem__),
                           min(range(len(ys)), key=rs.__getitem__))
            if ys[best] != ys[worst]:
                pairs.append((prompt, ys[best], ys[worst]))
            continue
        groups = {}
        for i, k in enumerate(ks):
            groups.setdefault(k, []).append(i)
        largest = max(groups.values(), key=len)
        outside = [i for i in range(len(ys)) if i not in largest]
        if len(largest) / len(ys) >= gamma and outside:
            chosen = max(largest, key=rs.__getitem__)
            pairs.append((prompt, ys[chosen], ys[rng.choice(outside)]))
    stats = {"spg/acceptance": len(pairs) / max(1, len(prompts)), "spg/pairs": len(pairs)}
    if golds is not None and pairs:
        p, c, r = zip(*pairs)
        agree = [(gc > gr) + 0.5 * (gc == gr) for gc, gr in zip(golds(p, c), golds(p, r))]
        stats["spg/gold_agreement"] = sum(agree) / len(agree)
    return pairs, stats


def cluster_by_similarity(hidden, threshold=0.9):
    """Semantic keys for free text (no task key; the paper used NLI entailment, which we do not
    ship): greedy clustering of one prompt's samples by cosine similarity of the RM's final hidden
    states (n, C). A sample joins the first cluster whose founding sample is at least `threshold`
    similar. Returns n cluster ids."""
    h = F.normalize(hidden.float(), dim=-1)
    founders, ids = [], []
    for i in range(h.shape[0]):
        sims = [float(h[i] @ h[f]) for f in founders]
        j = next((c for c, s in enumerate(sims) if s >= threshold), None)
        if j is None:
            founders.append(i)
            j = len(founders) - 1
        ids.append(j)
    return ids


@torch.no_grad()
def semantic_keys(task, rm, batcher, prompts, samples):
    """What each sample means, for RLP-SPG's clusters: the task's semantic key, or on free text
    (a file: no key) a cluster id from the RM's final hidden states (rlp.cluster_by_similarity)."""
    if task.semantic_key is not None:
        return [[task.semantic_key(p, y) for y in ys] for p, ys in zip(prompts, samples)]
    return [cluster_by_similarity(h)  # h (n, C)
            for h in per_prompt_outputs(rm.members[0], batcher, prompts, samples, hidden=True)]


# ---- the methods of a round, and what each adds to D
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


def all_clean_pairs(task, prompts, samples, rng):
    """Every distinct pair of each prompt's samples, labelled by the sign of the gold difference
    (ties dropped), dealt round-robin over the prompts in a random order within each prompt, so
    that a cut (--oracle_pairs) still covers every prompt instead of the first few."""
    per_prompt = []
    for p, ys in zip(prompts, samples):
        # in a fixed order, by their texts, whatever form the responses take
        distinct = sorted(set(ys), key=task.text)
        pairs = [(p, a, b) for a, b in itertools.combinations(distinct, 2)]
        per_prompt.append(rng.sample(pairs, len(pairs)))
    dealt = [pair for layer in itertools.zip_longest(*per_prompt) for pair in layer if pair]
    return clean_labelled(task, dealt)


def added_pairs(cfg, method, task, batcher, rm, prompts, samples, rng):
    """Step 3 of a round: the pairs `method` adds to D from the policy samples (`samples[i]`, n
    responses of prompts[i]), and its statistics. SPG ranks by `rm`, the RM in use so far."""
    if method.spg:
        keys = semantic_keys(task, rm, batcher, prompts, samples)
        scores = rm_scores(rm, batcher, prompts, samples)
        return synthetic_preferences(prompts, samples, keys, scores, cfg.spg_gamma, rng,
                                     golds=task.golds, rank_by=cfg.spg_rank)
    if method.oracle == "first":
        firsts = [(p, ys[0], ys[1]) for p, ys in zip(prompts, samples) if ys[0] != ys[1]]
        pairs = gold_labelled(task, firsts, rng, cfg.label_tau, cfg.label_flip)
    elif method.oracle == "all":
        pairs = all_clean_pairs(task, prompts, samples, rng)[:cfg.oracle_pairs]
    else:
        return [], {}
    return pairs, {"oracle/pairs": len(pairs)}


# ---- retraining the RM: BT on D and the added pairs, + L_M for RLP-UML
def retrain_rm(cfg, method, sft, batcher, prefs, added, prompts, samples, rng, seed, init=None,
               desc="rm", earlier=()):
    """Step 4 of a round: an RM retrained from the SFT weights on D + `earlier` + `added` (with
    RLP-UML's L_M on the policy samples when `method.uml`), every epoch holding each pair of
    `added` once, normalised on SFT samples like the proxy; with `init` (an earlier round's RM),
    that RM continued for one epoch instead."""
    # the same number of RM steps for every method, the control included: an epoch is |D| plus
    # the most pairs a method may add (--oracle_pairs), so that an RM sees what it was given
    # (with fewer steps, 2,000 added pairs were each seen less than once and barely learnt)
    steps = max(1, (len(prefs["train"]) + cfg.oracle_pairs) // cfg.rm_batch)
    epochs = 1 if init is not None else None
    # D and the earlier rounds' pairs fill what the added ones leave of an epoch: the newest
    # pairs are never diluted by the accumulated ones (ALGORITHMS.md §2.3)
    pairs = list(prefs["train"]) + list(earlier)
    if method.uml:
        rm = uml_rm(cfg, sft, batcher, pairs, prompts, samples, rng, seed, epochs=epochs,
                    steps_per_epoch=steps, init=init, desc=desc, newest=added)
    else:
        rm = fit_rm(sft, pairs, cfg, batcher, seed, epochs=epochs, steps_per_epoch=steps,
                    init=init, desc=desc, newest=added)
    normalize_on(rm, batcher, prefs["norm_prompts"], prefs["sft_samples"])
    return rm


def uml_views(prompts, samples):
    """RLP-UML's views: the prompts with two distinct policy samples, (prompt, their samples)."""
    views = [(p, ys) for p, ys in zip(prompts, samples) if len(set(ys)) >= 2]
    if len(views) < 2:  # the JS estimator's negatives are other prompts' views
        raise ValueError(f"RLP-UML: {len(views)} of {len(prompts)} prompts have two distinct "
                         "policy samples; L_M needs at least 2 (more --n_samples?)")
    return views


def uml_rm(cfg, sft, batcher, pairs, prompts, samples, rng, seed, epochs, steps_per_epoch,
           init=None, desc="rm", newest=()):
    """RLP-UML's RM (RLP Eq. 1): each step, the BT loss on a batch of `pairs` plus uml_lambda * L_M
    on as many view pairs of the policy samples. The bottleneck head (MIBHead) trains beside the RM
    and is thrown away: the reward head never reads z. Every step's terms (the BT loss, the MI
    estimate, the symmetric KL, L_M) are rows of metrics.jsonl, stage rm_<desc>: whether L_M does
    anything shows there."""
    views = uml_views(prompts, samples)
    torch.manual_seed(seed)  # the head's init derives from the seed alone, like the RM's
    head = MIBHead(sft.cfg.n_embd, cfg.z_dim)
    rm = new_rm(sft, cfg, batcher.device, seed, init)
    params = list(rm.parameters()) + list(head.to(batcher.device).train().parameters())
    loop = RMLoop(params, pairs, cfg, seed, epochs, steps_per_epoch, desc, newest)
    metrics = Metrics(cfg.out_dir, "rm_" + desc.replace(" ", "_"), tensorboard=cfg.tensorboard)
    for batch in loop:
        with autocast(cfg, batcher.device):
            # the BT loss on the batch of labelled pairs
            rc, rr = pair_rewards(rm, batcher, *zip(*batch))
            loss_r = bt_loss(rc, rr)
            # as many prompts' two views: two different samples of one prompt
            chosen = rng.sample(views, min(len(views), len(batch)))
            v1, v2 = zip(*(rng.sample(sorted(set(ys), key=batcher.tok.text), 2)
                           for _, ys in chosen))
            _, h = rm.score(*batcher.batch([p for p, _ in chosen] * 2, list(v1) + list(v2)),
                            return_hidden=True)  # (2B, C): the RM's features of both views
            loss_m, terms = mib_loss(head, *h.chunk(2), beta=cfg.mib_beta)
            loss = loss_r + cfg.uml_lambda * loss_m
            loop.opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_and_check(params, cfg.grad_clip, "RM (UML)")
            loop.opt.step()
        loop.log({"loss": loss.item()})
        metrics.log(step=loop.step, loss=loss.item(), bt=loss_r.item(), **terms,
                    l_m=loss_m.item())
    return ready_to_score(rm)


# ---- one round of RLP (Algorithm 1)
def rlp_round(cfg, name, source, sft, rm, prefs, device):
    """One RLP round (RLP Alg. 1) for the method RLP_METHODS[name], from the proxy `rm` and its
    pairs D (`prefs`); returns and records its summary."""
    method, task = RLP_METHODS[name], source.task
    batcher = Batcher.of(cfg, source.tokenizer, device)
    # 1. the policy to learn from: vanilla PPO's
    policy = ensure_ppo(cfg, source, sft, rm, device)
    # 2. P: --n_samples per unlabelled prompt (the paper's 10) at T = 1 (every one-shot method of
    # a seed draws the same P from the same policy: drawn once in a process, plumbing/memo.py)
    rng, gen = seeds.generators(device, cfg.seed, seeds.RLP_SAMPLES)
    prompts = task.sample_prompts(cfg.refine_prompts, rng, "unlabelled")
    drawn_from = (fingerprint(policy), type(task).__name__, batcher.prompt_len,
                  batcher.max_new_tokens)
    samples = reused((drawn_from, tuple(prompts), cfg.n_samples),
                     lambda: policy_samples(policy, batcher, prompts, cfg.n_samples, 1.0, gen), gen)
    # (how well an RM ranks the policy's samples where nothing trained, before and after)
    held_out = seeds.stream(cfg.seed, seeds.HELD_OUT_PAIRS)
    pol_pairs = reused((drawn_from, "held-out pairs", cfg.refine_prompts, held_out),
                       lambda: held_out_policy_pairs(policy, batcher, task, cfg.refine_prompts, 1.0,
                                                     held_out))
    before = {"rm_acc_policy_pairs": rm_accuracy(rm, batcher, pol_pairs),
              "held_out_acc_gold": rm_accuracy(rm, batcher, prefs["held_clean"])}
    # 3. what the method adds to D
    added, stats = added_pairs(cfg, method, task, batcher, rm, prompts, samples, rng)
    # 4. the RM retrained from SFT on D + added (+ L_M on P), normalised
    refined = retrain_rm(cfg, method, sft, batcher, prefs, added, prompts, samples, rng,
                         seeds.stream(cfg.seed, seeds.RLP_RM), desc=name)
    after = {"rm_acc_policy_pairs": rm_accuracy(refined, batcher, pol_pairs),
             "held_out_acc_gold": rm_accuracy(refined, batcher, prefs["held_clean"])}
    print(f"{name}: RM accuracy on gold-labelled policy pairs "
          f"{before['rm_acc_policy_pairs']:.3f} -> {after['rm_acc_policy_pairs']:.3f}; "
          f"on held-out SFT pairs {before['held_out_acc_gold']:.3f} -> "
          f"{after['held_out_acc_gold']:.3f}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    # 5. PPO again from SFT, against the refined RM
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
