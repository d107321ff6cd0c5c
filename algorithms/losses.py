"""Policy losses: pure functions of per-token tensors, registered by name.

Each loss returns a per-token loss matrix `[B, T]` and metrics; `aggregate`
turns it into the scalar with the configured normaliser. All inputs are
`[B, T]` over target positions; `mask` is 1 where the target is a generated
token and 0 elsewhere, and masked positions never count: they are selected
away (`torch.where`), never multiplied by 0, so an inf or NaN there changes
neither a loss, a metric nor a gradient.

`old_logprobs` is the policy the ratio is clipped against: the engine's
behaviour log-probs without a correction, or the proximal (current, detached)
policy when an off-policy correction supplies the importance weights
(see `corrections.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhub.lazy import torch  # imported on first use: registering and checking names needs no torch

from rlhub.algorithms.registry import register_policy_loss


@dataclass
class PolicyLossInput:
    logprobs: torch.Tensor  # [B, T] log pi_theta(token), with grad
    old_logprobs: torch.Tensor  # [B, T] the policy the ratio is taken against
    advantages: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float, 1 on generated tokens


@dataclass
class LossConfig:
    """The knobs losses read (a view of AlgorithmConfig)."""

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    """Upper clip (DAPO's clip-higher); defaults to clip_eps."""
    dual_clip_c: float | None = None
    """Dual-clip lower bound c > 1 for negative advantages; None disables."""


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x on real positions, 0 on masked ones, whatever x holds there (inf * 0 would be NaN)."""
    return torch.where(mask.bool(), x, 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked(x, mask).sum() / mask.sum().clamp(min=1.0)


def _real_inputs(inp: PolicyLossInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, old_logprobs, advantages) with padded positions set to 0, so that nothing
    computed from them, forward or backward, can turn non-finite there."""
    return masked(inp.logprobs, inp.mask), masked(inp.old_logprobs, inp.mask), masked(inp.advantages, inp.mask)


def _ratio_metrics(ratio: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor, log_ratio: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "clip_frac": masked_mean(clipped.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": masked(ratio, mask).max(),
            # k3 estimate of KL(old || current): E[rho - 1 - log rho] >= 0
            "kl_old": masked_mean(ratio - 1.0 - log_ratio, mask),
        }


@register_policy_loss("ppo_clip")
def ppo_clip_loss(inp: PolicyLossInput, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO (Schulman et al., 2017): -min(rho A, clip(rho, 1-e, 1+e_high) A) per token.

    With `dual_clip_c` (Ye et al., 2020) a negative-advantage token's loss is
    also capped at -c A, so a huge ratio cannot blow the update up. With
    `clip_eps_high > clip_eps` this is DAPO's clip-higher.
    """
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    logprobs, old, adv = _real_inputs(inp)  # [B, T]
    log_ratio = logprobs - old
    ratio = torch.exp(log_ratio)
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + high) * adv
    loss = -torch.minimum(surr1, surr2)
    if cfg.dual_clip_c is not None:
        capped = torch.minimum(loss, -cfg.dual_clip_c * adv)
        loss = torch.where(adv < 0, capped, loss)
    return loss, _ratio_metrics(ratio, surr2 < surr1, inp.mask, log_ratio)


@register_policy_loss("gspo")
def gspo_loss(inp: PolicyLossInput, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al., 2025): a sequence-level, length-normalised ratio.

    s_i = exp(mean_t log(pi_theta / pi_old)) over sequence i's tokens; the
    sequence loss -min(s_i A_i, clip(s_i) A_i) is placed on each of its tokens,
    so `seq_mean_token_mean` aggregation gives the mean over sequences.
    """
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    logprobs, old, token_adv = _real_inputs(inp)  # [B, T], 0 on padding
    n_tok = inp.mask.sum(-1).clamp(min=1.0)  # [B]
    seq_log_ratio = (logprobs - old).sum(-1) / n_tok  # [B]
    ratio = torch.exp(seq_log_ratio)
    adv = token_adv.sum(-1) / n_tok  # [B] sequence advantage
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + high) * adv
    seq_loss = -torch.minimum(surr1, surr2)  # [B]
    loss = masked(seq_loss.unsqueeze(-1).expand_as(logprobs), inp.mask)  # [B, T]
    seq_mask = (inp.mask.sum(-1) > 0).float()
    return loss, _ratio_metrics(ratio, surr2 < surr1, seq_mask, seq_log_ratio)


@register_policy_loss("cispo")
def cispo_loss(inp: PolicyLossInput, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax, 2025): REINFORCE with a clipped, stopped importance weight.

    -sg(clip(rho, 1-e, 1+e_high)) A log pi_theta: every token keeps its gradient,
    only the weight is bounded (no token is dropped by clipping).
    """
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    logprobs, old, adv = _real_inputs(inp)  # [B, T]
    log_ratio = logprobs - old
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + high).detach()
    loss = -weight * adv * logprobs
    clipped = (ratio < 1.0 - cfg.clip_eps) | (ratio > 1.0 + high)
    return loss, _ratio_metrics(ratio, clipped, inp.mask, log_ratio)


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")


@dataclass
class BatchNorms:
    """Normalisers of the whole batch, so micro-batch contributions add up to the batch's loss."""

    num_tokens: float
    num_seqs: float
    constant: float = 1.0
    """Dr. GRPO's normaliser per sequence (e.g. the generation budget in tokens)."""


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, norms: BatchNorms) -> torch.Tensor:
    """This micro-batch's share of the batch loss under `mode`.

    token_mean: sum over all tokens / tokens in the batch.
    seq_mean_token_mean: mean over sequences of each sequence's token mean.
    seq_mean_token_sum: mean over sequences of each sequence's token sum.
    constant: sum over all tokens / (sequences x constant)  (Dr. GRPO: no length bias).
    """
    real = masked(loss, mask)  # [B, T]
    if mode == "token_mean":
        return real.sum() / max(norms.num_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        per_seq = real.sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
        return per_seq.sum() / max(norms.num_seqs, 1.0)
    if mode == "seq_mean_token_sum":
        return real.sum() / max(norms.num_seqs, 1.0)
    if mode == "constant":
        return real.sum() / (max(norms.num_seqs, 1.0) * norms.constant)
    raise ValueError(f"algorithm.loss_agg={mode!r}: use one of {AGGREGATIONS}")


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's critic loss per token: 0.5 (V - R)^2, or with value clipping
    0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), V_old being the
    critic's value when the sample was generated. All `[B, T]`; aggregate with `aggregate`.
    """
    values, old_values, returns = masked(values, mask), masked(old_values, mask), masked(returns, mask)
    err = (values - returns) ** 2
    if clip > 0:
        clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clipped = (clipped_values - returns) ** 2
        loss = 0.5 * torch.maximum(err, err_clipped)
        clip_frac = masked_mean((err_clipped > err).float(), mask)
    else:
        loss = 0.5 * err
        clip_frac = torch.zeros(())
    with torch.no_grad():
        real = mask.bool()
        var_r = returns[real].var(unbiased=False) if real.sum() > 1 else torch.zeros(())
        resid = (returns - values)[real].var(unbiased=False) if real.sum() > 1 else torch.zeros(())
        metrics = {
            "value_clip_frac": clip_frac.detach(),
            "values_mean": masked_mean(values, mask).detach(),
            "returns_mean": masked_mean(returns, mask),
            # the loss a critic that always says 0 (the zero-initialised head) would have on these returns
            "zero_value_loss": masked_mean(0.5 * returns**2, mask),
            # 1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant
            "explained_variance": 1.0 - resid / var_r.clamp(min=1e-8),
        }
    return loss, metrics
