"""RLP: Reward Learning on Policy (Lang, Huang, Li, NAACL 2024). ALGORITHMS.md §2.

RLP-UML: a multi-view information bottleneck on policy samples shapes the RM's backbone
(`MIBHead`, `mib_loss`).
RLP-SPG: synthetic preference pairs from self-consistency of policy samples
(`synthetic_preferences`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .reward import bt_loss, pairwise_accuracy
from .rm import pair_rewards
from .runtime import clip_and_check


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


def synthetic_preferences(prompts, samples, keys, rm_scores, gamma, rng, golds=None,
                          rank_by="cluster"):
    """RLP-SPG (ALGORITHMS.md §2.2). For prompt i with samples[i] (n texts), their semantic keys[i]
    and current-RM scores rm_scores[i]:
      1. group samples with equal keys; confidence = |largest group| / n
         (ties: the group met first);
      2. keep the prompt iff confidence >= gamma and some sample lies outside the largest group;
      3. chosen = the highest-RM sample of the largest group, rejected = uniform among
         the samples outside it.
    rank_by="rm" is the ablation that skips clustering: chosen = RM-best, rejected = RM-worst
    sample. golds(prompts, responses), when given, measures how often the synthetic label agrees
    with the gold judge. Returns ([(prompt, chosen, rejected)], stats)."""
    pairs = []
    for prompt, ys, ks, rs in zip(prompts, samples, keys, rm_scores):
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


def uml_step(codec, prompts, samples, head, rng, uml_lambda, mib_beta, grad_clip):
    """RLP-UML's RM step (RLP Eq. 1): the BT loss on a batch of D plus uml_lambda * L_M on as many
    view pairs from P (two different samples of one prompt are its two views). `head` is the MIBHead
    trained beside the RM."""
    views = [(p, ys) for p, ys in zip(prompts, samples) if len(set(ys)) >= 2]
    if len(views) < 2:  # the JS estimator's negatives are other prompts' views
        raise ValueError(f"RLP-UML: {len(views)} of {len(prompts)} prompts have two distinct "
                         "policy samples; L_M needs at least 2 (more --n_samples?)")

    def step(rm, opt, batch):
        rc, rr = pair_rewards(rm, codec, *zip(*batch))
        loss_r = bt_loss(rc, rr)
        chosen = rng.sample(views, min(len(views), len(batch)))
        v1, v2 = zip(*(rng.sample(sorted(set(ys)), 2) for _, ys in chosen))
        _, h = rm.score(*codec.batch([p for p, _ in chosen] * 2, list(v1) + list(v2)),
                        return_hidden=True)
        loss_m, stats = mib_loss(head, *h.chunk(2), beta=mib_beta)
        loss = loss_r + uml_lambda * loss_m
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_check(list(rm.parameters()) + list(head.parameters()), grad_clip, "RM (UML)")
        opt.step()
        return {"loss": loss.item(), "bt": loss_r.item(), "acc": pairwise_accuracy(rc, rr), **stats}
    return step
