"""Name registries for advantage estimators, policy losses and data-side group filters, and what each estimator needs.

`ADVANTAGE_NEEDS` is the one place that says what an estimator reads besides
the group's rewards; the config checks, the data side, the controller (which
starts a critic actor) and the benchmarks ask it, never a list of names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
GROUP_FILTERS: dict[str, Callable] = {}
"""Data-side filters: (group rewards [G]) -> the reason to drop the group, or None to keep it."""


@dataclass(frozen=True)
class AdvantageNeeds:
    """What an advantage estimator reads besides each sample's reward."""

    critic: bool = False
    """The critic's values V(s_t) before every generated token: a critic actor scores each group and trains beside the learner."""
    token_rewards: bool = False
    """Per-token rewards `[G, T]` and the completion mask (reward-to-go, GAE), instead of each sample's summed reward `[G]`."""
    segment_values: bool = False
    """The values of each sample's segment cuts, estimated by rollouts branched there (SPO): the rollout
    worker branches before the group's advantages are computed (`rlhub.rollout.branches`)."""


ADVANTAGE_NEEDS: dict[str, AdvantageNeeds] = {}


def _register(table: dict[str, Callable], name: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        if name in table:
            raise ValueError(f"{name!r} is registered twice")
        table[name] = fn
        return fn

    return deco


def register_advantage(name: str, critic: bool = False, token_rewards: bool = False, segment_values: bool = False) -> Callable[[F], F]:
    """Register an estimator. Outcome estimators (the default) map `[G]` rewards to `[G]` advantages;
    `token_rewards=True` ones map (rewards `[G, T]`, mask `[G, T]`, gamma) to `[G, T]`; `critic=True`
    ones also take the values and lambda and return (advantages, returns); `segment_values=True` ones
    map (rewards `[G]`, cut values `[G, T]`, mask `[G, T]`) to `[G, T]`."""
    if critic and not token_rewards:
        raise ValueError(f"advantage {name!r}: an estimator with a critic reads per-token rewards (token_rewards=True)")
    register = _register(ADVANTAGES, name)

    def deco(fn: F) -> F:
        register(fn)  # refuses a second registration before the needs are recorded
        ADVANTAGE_NEEDS[name] = AdvantageNeeds(critic=critic, token_rewards=token_rewards, segment_values=segment_values)
        return fn

    return deco


def register_policy_loss(name: str) -> Callable[[F], F]:
    return _register(POLICY_LOSSES, name)


def register_group_filter(name: str) -> Callable[[F], F]:
    return _register(GROUP_FILTERS, name)


def _get(table: dict, kind: str, name: str):
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; known: {sorted(table)}") from None


def get_advantage(name: str) -> Callable:
    return _get(ADVANTAGES, "advantage estimator", name)


def advantage_needs(name: str) -> AdvantageNeeds:
    """What the estimator `name` reads (see `AdvantageNeeds`); raises KeyError for an unknown name."""
    return _get(ADVANTAGE_NEEDS, "advantage estimator", name)


def get_policy_loss(name: str) -> Callable:
    return _get(POLICY_LOSSES, "policy loss", name)
