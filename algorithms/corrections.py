"""Off-policy corrections for stale and mismatched samples (`algorithm.correction`).

The engine's behaviour log-probs travel with every token. Each correction
decides which policy the loss clips against and what importance weight
multiplies each token's loss:

- none: clip against the behaviour policy itself (plain PPO on the samples).
- tis: truncated importance sampling; clip against the proximal policy (the
  learner's current weights, detached) and weight by min(pi_prox / pi_behav, cap).
- icepop: as tis, but tokens whose ratio leaves [band_low, band_high] are masked.
  The IcePop paper's ratio is the training engine's over the inference engine's
  probability under the same (behaviour) weights; here the numerator is the
  proximal policy, so for stale samples the ratio also carries the policy's
  change since the sample was generated (the same at max_staleness=0).
- decoupled: decoupled PPO; clip against the proximal policy, weight by the
  untruncated pi_prox / pi_behav.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhub.lazy import torch  # imported on first use: registering and checking names needs no torch

CORRECTIONS = ("none", "tis", "icepop", "decoupled")


@dataclass
class Corrected:
    old_logprobs: torch.Tensor  # [B, T] what the ratio clips against
    weights: torch.Tensor  # [B, T] importance weight per token (no grad)
    mask: torch.Tensor  # [B, T] tokens that still count
    metrics: dict[str, torch.Tensor]


def correct(
    logprobs: torch.Tensor,
    behaviour: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    cap: float = 2.0,
    band: tuple[float, float] = (0.5, 2.0),
) -> Corrected:
    """The correction `mode` for tokens with current log-probs `logprobs` (grad ignored)."""
    if mode not in CORRECTIONS:
        raise ValueError(f"algorithm.correction={mode!r}: use one of {CORRECTIONS}")
    real = mask.bool()
    prox = logprobs.detach()
    # pi_prox / pi_behav on real tokens, 0 on padding: selected, so padding's inf or NaN stays out
    ratio = torch.where(real, torch.exp(torch.where(real, prox - behaviour, 0.0)), 0.0)  # [B, T]
    metrics = {
        "is_ratio_mean": ratio[real].mean() if real.any() else torch.tensor(1.0),
        "is_ratio_max": ratio.max(),
    }
    if mode == "none":
        return Corrected(behaviour, torch.ones_like(mask), mask, metrics)
    if mode == "tis":
        weights = torch.clamp(ratio, max=cap)
        metrics["is_truncated_frac"] = ((ratio > cap) & real).float().sum() / mask.sum().clamp(min=1.0)
        return Corrected(prox, weights, mask, metrics)
    if mode == "icepop":
        keep = (ratio >= band[0]) & (ratio <= band[1]) & real
        metrics["is_masked_frac"] = (real & ~keep).float().sum() / mask.sum().clamp(min=1.0)
        return Corrected(prox, ratio * keep, mask * keep, metrics)
    return Corrected(prox, ratio, mask, metrics)  # decoupled


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's k1, k2, k3).

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r, with log r = log pi_theta - log pi_ref.
    """
    log_r = logprobs - ref_logprobs
    if kind == "k1":
        return log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.exp(-log_r) - 1.0 + log_r
    raise ValueError(f"algorithm.kl_estimator={kind!r}: use k1, k2 or k3")
