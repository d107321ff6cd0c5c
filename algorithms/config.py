"""The algorithm's configuration: which estimator and loss, and their knobs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AlgorithmConfig:
    """Policy optimisation (selected by `algorithm=<preset>`)."""

    name: str = "grpo"
    advantage: str = "grpo"
    """Advantage estimator, by registered name (computed on the data side)."""
    policy_loss: str = "ppo_clip"
    """Policy loss, by registered name (applied by the learner)."""
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    """Upper clip of the ratio; defaults to clip_eps."""
    entropy_coef: float = 0.0
    lr: float = 2e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    """Samples per forward/backward; gradients accumulate to one optimizer step per batch."""
