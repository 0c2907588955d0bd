"""Reward modelling: the Bradley-Terry loss, scoring at the last real token, normalisation, and ensembles."""
import copy

import torch
import torch.nn.functional as F

from .model import ScalarModel


def bt_loss(r_chosen, r_rejected):
    """L_R = -mean log sigmoid(r(x, y_w) - r(x, y_l))   (ALGORITHMS.md §1)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(r_chosen, r_rejected):
    """Fraction of pairs ranked right; a tie counts as half."""
    return ((r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()).mean().item()


def reward_model_from(sft):
    """SFT backbone (copied) + a fresh scalar head."""
    return ScalarModel(copy.deepcopy(sft))


def last_token_index(mask):
    """Index of the last 1 in each row of mask (B, T): works for left, right and both-sided padding."""
    T = mask.shape[1]
    return T - 1 - mask.long().flip(-1).argmax(-1)


def score(rm, prompt, prompt_mask, response, resp_mask, return_hidden=False):
    """r(x, y) (B,) read at the last real token of prompt + response (the EOS of a finished response).
    With return_hidden, also that token's final hidden state (B, C), the feature the head reads."""
    ids = torch.cat([prompt, response], 1)
    mask = torch.cat([prompt_mask, resp_mask], 1)
    values, hidden = rm(ids, mask, return_hidden=True)  # (B, T), (B, T, C)
    idx = last_token_index(mask)
    rows = torch.arange(ids.shape[0], device=ids.device)
    return (values[rows, idx], hidden[rows, idx]) if return_hidden else values[rows, idx]


@torch.no_grad()
def normalize(rm, rewards, scale=True):
    """Shift (and scale) the head so that `rewards` — the RM's scores of SFT samples — get mean 0 and std 1.
    Keeps the KL coefficient meaningful across RMs (TASK.md: a method must not win by inflating its scale)."""
    mean, std = rewards.mean(), (rewards.std() if scale else torch.tensor(1.0))
    rm.head.weight.div_(std)
    rm.head.bias.sub_(mean).div_(std)
    return mean.item(), std.item()


class Ensemble(torch.nn.Module):
    """Several RMs scored together (Coste et al.): 'mean' or 'min' (worst case) of their rewards."""

    def __init__(self, rms, agg="mean"):
        super().__init__()
        if agg not in ("mean", "min"):
            raise ValueError(f"--ensemble_agg={agg!r}: expected 'mean' or 'min'")
        self.rms, self.agg = torch.nn.ModuleList(rms), agg

    def score(self, *batch):
        r = torch.stack([score(rm, *batch) for rm in self.rms])  # (K, B)
        return r.mean(0) if self.agg == "mean" else r.min(0).values


def score_any(rm, *batch):
    """Score with a single RM or an Ensemble."""
    return rm.score(*batch) if isinstance(rm, Ensemble) else score(rm, *batch)
