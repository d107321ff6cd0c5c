"""Advantage estimators over one complete group of samples of the same prompt.

Each takes the group's scalar rewards `[G]` and returns one advantage per
sample `[G]`; the learner broadcasts it over the sample's tokens.
"""

from __future__ import annotations

import torch

from rlhub.algorithms.registry import register_advantage


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(r)) / (std(r) + eps), std over the group (population).

    >>> grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    tensor([ 1.0000, -1.0000, -1.0000,  1.0000])
    """
    centered = rewards - rewards.mean()
    return centered / (rewards.std(unbiased=False) + eps)
