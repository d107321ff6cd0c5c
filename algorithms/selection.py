"""Which generated tokens carry the policy loss (`algorithm.token_selection`).

- all: every generated token (the default).
- cutpoints: only the tokens the behaviour policy sampled with probability below
  `algorithm.spo.rho` (SPO's probability mask, Guo et al., 2025: a segment's
  advantage is credited to the low-probability tokens where the path was
  chosen, not to the near-certain ones between them). The probability is the
  behaviour log-prob that travels with the token: the sampling distribution's.
- entropy_top_p: only the `token_selection_p` fraction of the step's generated
  tokens whose policy entropy is highest (DART; "Beyond the 80/20 rule", Wang
  et al., 2025: the high-entropy "forking" tokens carry the reasoning
  choices, and training on them alone matches or beats training on all).

The threshold is taken over the whole step (every micro-batch, every learner
rank): the learner measures the entropies first and selects each micro-batch's
tokens against it. The entropy is the policy's under the rollouts' sampling
distribution (temperature, top-p) at the learner's current weights, the same
forward's quantity the entropy bonus uses. The selected tokens are the loss's
normaliser too: `token_mean` averages over them, not over every token.
"""

from __future__ import annotations

import math

from rlhub.lazy import torch  # imported on first use

TOKEN_SELECTIONS = ("all", "entropy_top_p", "cutpoints")


def entropy_threshold(entropies: torch.Tensor, fraction: float) -> float:
    """The entropy at or above which a token is among the top `fraction` of `entropies` (the real
    tokens' entropies, any shape): the k-th largest, k = ceil(fraction * n). -inf when there is none.

    >>> entropy_threshold(torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7]), 0.4)
    0.699999988079071
    """
    values = entropies.detach().flatten().float()
    if values.numel() == 0:
        return -math.inf
    k = max(1, min(values.numel(), math.ceil(fraction * values.numel())))
    return float(torch.topk(values, k).values[-1])


def select(entropy: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """The float mask `[B, T]` of real tokens whose entropy is at least `threshold` (ties all kept);
    padding is never selected, whatever its entropy holds."""
    real = mask.bool()
    return (real & torch.where(real, entropy.detach(), -math.inf).ge(threshold)).float()


def cutpoints(behaviour_logprobs: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """The float mask `[B, T]` of real tokens whose behaviour probability is below `rho`.

    >>> cutpoints(torch.log(torch.tensor([[0.95, 0.5, 0.89, 0.1]])), torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.9).tolist()
    [[0.0, 1.0, 1.0, 0.0]]
    """
    real = mask.bool()
    return (real & torch.where(real, behaviour_logprobs, 0.0).lt(math.log(rho))).float()
