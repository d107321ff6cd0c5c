"""Advantage estimators, computed on the data side when a group is complete.

Outcome estimators take the group's scalar rewards `[G]` and return one
advantage per sample `[G]`, put on each of the sample's tokens. `gae` is the
token-level estimator for PPO with a learned value. `group_advantages` is
what the data side calls: token rewards in, token advantages (and, for GAE,
the critic's returns) out.
"""

from __future__ import annotations

import torch

from rlhub.algorithms.registry import get_advantage, register_advantage


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al., 2024): A_i = (r_i - mean(r)) / (std(r) + eps), population std over the group.

    >>> grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    tensor([ 1.0000, -1.0000, -1.0000,  1.0000])
    """
    centered = rewards - rewards.mean()
    return centered / (rewards.std(unbiased=False) + eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Liu et al., 2025): A_i = r_i - mean(r); no division by the std.

    >>> dr_grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    tensor([ 0.7500, -0.2500, -0.2500, -0.2500])
    """
    return rewards - rewards.mean()


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al., 2024): A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r)).

    >>> rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    tensor([ 1.0000, -0.3333, -0.3333, -0.3333])
    """
    g = rewards.numel()
    return (rewards - rewards.mean()) * g / (g - 1)


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE++ (Hu, 2025): the return itself; the learner normalises it over the global batch.

    The batch step is `normalize_over_batch` (the preset sets algorithm.batch_normalize).
    """
    return rewards.clone()


def normalize_over_batch(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(A - mean) / std over every real token of the batch (REINFORCE++'s global normalisation)."""
    real = advantages[mask.bool()]
    if real.numel() < 2:
        return advantages
    return (advantages - real.mean()) / (real.std(unbiased=False) + eps) * mask


@register_advantage("gae")
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens.

    rewards, values, mask: `[B, T]`; the reward of a sequence sits on its last
    token, values are the critic's V(s_t) before each token. Returns
    (advantages, returns), both `[B, T]` and zero on padding:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t.
    """
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


TOKEN_LEVEL = ("gae",)


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """`[G, T]` per-token rewards: each sequence's reward on its last generated token, minus
    kl_coef * KL on every generated token (the KL-as-reward penalty)."""
    last = mask.cumsum(-1).eq(mask.sum(-1, keepdim=True)) & mask.bool()  # the final generated token
    out = last.float() * rewards.unsqueeze(-1)
    if kl is not None and kl_coef:
        out = out - kl_coef * kl * mask
    return out


def group_advantages(
    name: str, rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages `[G, T]`, returns `[G, T]` or None) for one complete group.

    rewards: `[G, T]` token rewards (see `token_rewards`). Outcome estimators see
    each sequence's summed reward and put the sample's advantage on its tokens;
    `gae` needs the critic's `values` and also returns the critic's targets.
    """
    fn = get_advantage(name)
    if name in TOKEN_LEVEL:
        if values is None:
            raise ValueError(f"advantage {name!r} needs the critic's values")
        return fn(rewards, values, mask, gamma, lam)
    return fn(rewards.sum(-1)).unsqueeze(-1) * mask, None
