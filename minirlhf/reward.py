"""Reward modelling: the Bradley-Terry loss, pairwise accuracy, normalisation, and ensembles (an RM
scores a sequence at its last real token: model.ScalarModel)."""
import copy

import torch
import torch.nn.functional as F

from .model import ScalarModel


def bt_loss(r_chosen, r_rejected):
    """L_R = -mean log sigmoid(r(x, y_w) - r(x, y_l))   (ALGORITHMS.md §1.2)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(r_chosen, r_rejected):
    """Fraction of pairs ranked right; a tie counts as half."""
    return ((r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()).mean().item()


def reward_model_from(sft):
    """SFT backbone (copied) + a fresh scalar head."""
    return ScalarModel(copy.deepcopy(sft))


@torch.no_grad()
def normalize(rm, rewards):
    """Shift and scale the head so that `rewards` — the RM's scores of SFT samples — get
    mean 0 and std 1. Keeps the KL coefficient meaningful across RMs (a method must not win by
    inflating its scale: ALGORITHMS.md §1.2)."""
    mean, std = rewards.mean(), rewards.std()
    rm.head.weight.div_(std)
    rm.head.bias.sub_(mean).div_(std)
    return mean.item(), std.item()


class Ensemble(torch.nn.Module):
    """Several RMs scored together (Coste et al.): 'mean' or 'min' (worst case) of their rewards.
    Scores like a single RM (`score`), so every caller treats the two alike."""

    def __init__(self, rms, agg="mean"):
        super().__init__()
        if agg not in ("mean", "min"):
            raise ValueError(f"--ensemble_agg={agg!r}: expected 'mean' or 'min'")
        self.members, self.agg = torch.nn.ModuleList(rms), agg

    def score(self, *batch):
        r = torch.stack([rm.score(*batch) for rm in self.members])  # (K, B)
        return r.mean(0) if self.agg == "mean" else r.min(0).values
