"""The algorithm's data side: what happens to a complete group before it is stored.

A rollout worker calls these once a group's samples are scored: reward shaping
(DAPO's overlong penalty), group filters (DAPO's dynamic sampling, registered
by name like the losses), then the advantages (token rewards with the KL
penalty if it is in the reward, then the registered estimator). `DataSide` is
the view of `AlgorithmConfig` they read; what each estimator needs is in
`registry.ADVANTAGE_NEEDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhub.algorithms.advantages import group_advantages, token_rewards
from rlhub.algorithms.config import AlgorithmConfig, SpoConfig
from rlhub.algorithms.corrections import kl_estimate
from rlhub.algorithms.registry import GROUP_FILTERS, advantage_needs, register_group_filter
from rlhub.lazy import torch  # imported on first use


@dataclass
class DataSide:
    """What the algorithm does on the data side, once a group is complete (a view of AlgorithmConfig)."""

    advantage: str = "grpo"
    filters: list[str] = field(default_factory=list)
    """Registered group filters, in order (`dynamic_sampling` when algorithm.dynamic_sampling)."""
    overlong_window: int = 0
    overlong_penalty: float = 1.0
    kl_coef: float = 0.0
    """KL reward penalty per token (algorithm.kl_penalty=reward); 0 when the KL is a loss term or off."""
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    spo: SpoConfig | None = None
    """Where to cut and how many branches, when the estimator reads segment values (SPO); None otherwise."""

    @staticmethod
    def of(algo: AlgorithmConfig) -> "DataSide":
        in_reward = algo.kl_penalty == "reward"
        segments = advantage_needs(algo.advantage).segment_values
        return DataSide(algo.advantage, ["dynamic_sampling"] if algo.dynamic_sampling else [], algo.overlong_window,
                        algo.overlong_penalty, algo.kl_coef if in_reward else 0.0, algo.kl_estimator, algo.gamma, algo.lam,
                        algo.spo if segments else None)


def overlong_penalty(length: int, budget: int, window: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to budget - window, then falling linearly to -penalty at the budget.

    >>> overlong_penalty(10, 16, 4), overlong_penalty(14, 16, 4), overlong_penalty(16, 16, 4)
    (0.0, -0.5, -1.0)
    """
    if window <= 0 or length <= budget - window:
        return 0.0
    return -penalty * min(1.0, (length - (budget - window)) / window)


@register_group_filter("dynamic_sampling")
def dynamic_sampling(rewards: torch.Tensor) -> str | None:
    """DAPO's dynamic sampling: a group whose rewards are all equal has no learning signal (every
    advantage is 0); it is dropped as `filtered`, and admission starts another prompt instead.

    >>> dynamic_sampling(torch.tensor([1.0, 1.0])), dynamic_sampling(torch.tensor([1.0, 0.0]))
    ('filtered', None)
    """
    return "filtered" if bool((rewards == rewards[0]).all()) else None


def drop_reason(ds: DataSide, rewards: torch.Tensor) -> str | None:
    """The first configured filter's reason to drop a group with these rewards `[G]`, or None to keep it."""
    for name in ds.filters:
        reason = GROUP_FILTERS[name](rewards)
        if reason is not None:
            return reason
    return None


def advantages(ds: DataSide, rewards: torch.Tensor, mask: torch.Tensor, old_logprobs: torch.Tensor,
               ref_logprobs: torch.Tensor | None, values: torch.Tensor | None,
               turn_rewards: torch.Tensor | None = None, cut_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages [G, T], returns [G, T] or None) of a complete group: token rewards from the samples'
    rewards [G], or their turn rewards (`GroupTensors.turn_rewards`), minus kl_coef * KL to the reference
    on every token if the KL is in the reward; then the estimator (an outcome one sums each row; a
    segment one also reads the branches' `cut_values`, `GroupTensors.cut_values`)."""
    kl = None
    if ds.kl_coef:
        if ref_logprobs is None:
            raise ValueError("algorithm.kl_penalty=reward needs the reference actor's log-probs (algorithm.reference=actor)")
        kl = torch.where(mask.bool(), kl_estimate(old_logprobs, ref_logprobs, ds.kl_estimator), 0.0)
    return group_advantages(ds.advantage, token_rewards(rewards, mask, kl, ds.kl_coef, turn_rewards), mask, values, ds.gamma, ds.lam,
                            cut_values)
