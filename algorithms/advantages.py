"""Advantage estimators, computed on the data side when a group is complete.

Outcome estimators take the group's scalar rewards `[G]` and return one
advantage per sample `[G]`, put on each of the sample's tokens. Token-level
estimators read per-token rewards `[G, T]`: `reinforce_pp` (the reward-to-go)
and `gae` (with the critic's values). What each one needs is registered with
it (`registry.ADVANTAGE_NEEDS`). `group_advantages` is what the data side
calls: token rewards in, token advantages (and, for GAE, the critic's returns) out.

Padded positions are selected away (`torch.where`), never multiplied by the
mask, so whatever they hold (inf, NaN) cannot leak into a real token.
"""

from __future__ import annotations

from rlhub.lazy import torch  # imported on first use: registering and checking names needs no torch

from rlhub.algorithms.registry import advantage_needs, get_advantage, register_advantage


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


@register_advantage("reinforce_pp", token_rewards=True)
def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu, 2025): the reward-to-go G_t = sum_{s >= t} gamma^(s-t) r_s over each sequence's generated tokens.

    With the KL as a reward penalty, r_s = r * 1[s = last] - beta * KL_s, so
    G_t = r - beta * sum_{s >= t} KL_s. `[G, T]` in and out, zero on padding;
    the learner then normalises over the global batch (`normalize_over_batch`,
    the preset's algorithm.batch_normalize).

    >>> reinforce_pp_advantages(torch.tensor([[0.0, -0.1, -0.1, 0.9, 5.0]]), torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]]))
    tensor([[0.0000, 0.7000, 0.8000, 0.9000, 0.0000]])
    """
    real = mask.bool()  # [G, T]
    r = torch.where(real, rewards, 0.0)  # [G, T]
    out = torch.zeros_like(r)
    to_go = torch.zeros_like(r[:, 0])  # [G]
    for t in reversed(range(r.shape[1])):
        to_go = torch.where(real[:, t], r[:, t] + gamma * to_go, to_go)  # padding neither adds nor discounts
        out[:, t] = torch.where(real[:, t], to_go, 0.0)
    return out


@register_advantage("spo", segment_values=True)
def spo_advantages(rewards: torch.Tensor, cut_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Segment Policy Optimization (Guo et al., 2025), chain form: A = V(segment's end) - V(its start).

    rewards: `[G]` each sample's return. cut_values: `[G, T]` the Monte Carlo value V(s) of the state
    before the token at each cut (the mean return of rollouts branched there), NaN elsewhere. A
    sample's cuts split its generated tokens into segments; every token of a segment gets its
    segment's advantage. The value before the first segment is the prompt's, estimated by the group's
    other samples (their mean return: leave-one-out, so a sample's own return is not its baseline);
    after the last segment it is the sample's own return. The segment advantages telescope to
    r_i - mean_{j != i} r_j, RLOO's advantage up to a factor G / (G - 1), which is what a sample
    without cuts gets. Zero on padding.

    >>> nan = float("nan")
    >>> spo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([[nan, nan, 0.5, nan], [nan, nan, nan, nan]]),
    ...                torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]))
    tensor([[ 0.5000,  0.5000,  0.5000,  0.5000],
            [-1.0000, -1.0000,  0.0000,  0.0000]])
    """
    g = rewards.numel()
    real = mask.bool()
    baseline = (rewards.sum() - rewards) / max(g - 1, 1)  # [G] the prompt's value, without the sample itself
    cut = torch.isfinite(cut_values) & real  # [G, T]
    out = torch.zeros_like(mask, dtype=torch.float32)
    for i in range(g):
        before = float(baseline[i])
        start = 0
        for t in [int(t) for t in cut[i].nonzero().flatten()] + [mask.shape[1]]:
            after = float(rewards[i]) if t == mask.shape[1] else float(cut_values[i, t])
            out[i, start:t] = after - before  # the segment [start, t): the tokens before the cut
            before, start = after, t
    return torch.where(real, out, 0.0)


def normalize_over_batch(advantages: torch.Tensor, mask: torch.Tensor, mean: float | None = None, std: float | None = None,
                         eps: float = 1e-6) -> torch.Tensor:
    """(A - mean) / std over every real token of the batch (REINFORCE++'s global normalisation); zero on padding.
    `mean`, `std`: the whole batch's, when `advantages` is one learner rank's share of it."""
    real = mask.bool()
    values = advantages[real]
    if mean is None or std is None:
        if values.numel() < 2:
            return torch.where(real, advantages, 0.0)
        mean, std = values.mean(), values.std(unbiased=False)
    return torch.where(real, (advantages - mean) / (std + eps), 0.0)


@register_advantage("gae", critic=True, token_rewards=True)
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens.

    rewards, values, mask: `[B, T]`; the reward of a sequence sits on its last
    token, values are the critic's V(s_t) before each token. Returns
    (advantages, returns), both `[B, T]` and zero on padding:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t.
    Positions outside the mask inside a sequence (environment and tool tokens
    between a multi-turn episode's assistant turns) are skipped, not ends:
    V_{t+1} and A_{t+1} come from the next generated token.
    """
    real = mask.bool()
    values = torch.where(real, values, 0.0)  # [B, T]
    rewards = torch.where(real, rewards, 0.0)  # [B, T]
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)  # [B] A at the next generated token
    next_value = torch.zeros_like(last)  # [B] V at the next generated token
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = delta + gamma * lam * last
        last = torch.where(real[:, t], here, last)
        next_value = torch.where(real[:, t], values[:, t], next_value)
        adv[:, t] = torch.where(real[:, t], here, 0.0)
    return adv, torch.where(real, adv + values, 0.0)


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0,
                  placed: torch.Tensor | None = None) -> torch.Tensor:
    """`[G, T]` per-token rewards: each sequence's reward on its last generated token, or, `placed`,
    a multi-turn episode's rewards on the last token of each turn (rows summing to `rewards`); minus
    kl_coef * KL on every generated token (the KL-as-reward penalty)."""
    real = mask.bool()
    last = mask.cumsum(-1).eq(mask.sum(-1, keepdim=True)) & real  # the final generated token
    out = torch.where(last, rewards.unsqueeze(-1), 0.0) if placed is None else placed.float().clone()
    if kl is not None and kl_coef:
        out = out - kl_coef * torch.where(real, kl, 0.0)
    return out


def group_advantages(
    name: str, rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 0.95,
    cut_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages `[G, T]`, returns `[G, T]` or None) for one complete group.

    rewards: `[G, T]` token rewards (see `token_rewards`). Outcome estimators see
    each sequence's summed reward and put the sample's advantage on its tokens;
    token-level ones see the token rewards; one with a critic needs the critic's
    `values` and also returns the critic's targets; a segment estimator reads the `cut_values` the
    rollout worker's branches estimated (`[G, T]`, NaN off the cuts; None: no sample had a cut).
    """
    fn, needs = get_advantage(name), advantage_needs(name)
    real = mask.bool()
    if needs.segment_values:
        none = torch.full_like(rewards, float("nan"))
        return fn(torch.where(real, rewards, 0.0).sum(-1), none if cut_values is None else cut_values, mask), None
    if needs.critic:
        if values is None:
            raise ValueError(f"advantage {name!r} needs the critic's values")
        return fn(rewards, values, mask, gamma, lam)
    if needs.token_rewards:
        return fn(rewards, mask, gamma), None
    per_sample = fn(torch.where(real, rewards, 0.0).sum(-1))  # [G]
    return torch.where(real, per_sample.unsqueeze(-1), 0.0), None
