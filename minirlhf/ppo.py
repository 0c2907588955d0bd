"""PPO's pure functions: masked statistics, KL-shaped rewards, GAE, the clipped
losses, KL controllers.

Every tensor is (B, N) over response tokens with `mask` 1 on real tokens (a prefix of each row).
"""
import torch

from .model import last_token_index


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def masked_whiten(x, mask):
    """(x - mean) / std over the real tokens only (the advantages), 0 on padding."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def shaped_rewards(score, logprobs, ref_logprobs, mask, kl_coef):
    """r_t = -beta * (log pi(y_t) - log pi_ref(y_t))  (k1 estimator), plus the sequence reward
    `score` (B,) on the last real token, never on padding. Returns (rewards, kl), each (B, N)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += score
    return rewards, kl


def sequence_reward(score, finished, no_eos_penalty):
    """The RM score for a finished response, the fixed penalty for one that never emitted EOS."""
    return torch.where(finished, score, torch.full_like(score, no_eos_penalty))


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016), right to left:
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma * lam * A_{t+1}
    with V = 0 after the last real token. Returns (advantages, returns), returns = A + V
    (before whitening)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    N = rewards.shape[1]
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    """Clipped surrogate: mean over real tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        # Schulman's k3
        stats = {"ppo/policy/approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
                 "ppo/policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "ppo/ratio/mean": masked_mean(ratio, mask).item(),
                 "ppo/ratio/var": masked_var(ratio, mask).item()}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip):
    """Clipped value loss: 0.5 * mean max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2),
                             mask)
    with torch.no_grad():
        stats = {"ppo/val/clipfrac": masked_mean(((values - returns) ** 2
                                                  < (clipped_values - returns) ** 2).float(),
                                                 mask).item(),
                 "ppo/val/explained_variance": explained_variance(values, returns, mask)}
    return loss, stats


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over real tokens: 1 is a perfect critic, <= 0 a useless one."""
    return (1 - masked_var(returns - values, mask)
            / masked_var(returns, mask).clamp(min=1e-8)).item()


class FixedKLController:
    def __init__(self, value):
        self.value = value

    def update(self, current_kl, n_steps):
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2,
    0.2) * n_steps / horizon)."""

    def __init__(self, value, target, horizon):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl, n_steps):
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
