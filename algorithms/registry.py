"""Name registries for advantage estimators and policy losses."""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}


def _register(table: dict[str, Callable], name: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        if name in table:
            raise ValueError(f"{name!r} is registered twice")
        table[name] = fn
        return fn

    return deco


def register_advantage(name: str) -> Callable[[F], F]:
    return _register(ADVANTAGES, name)


def register_policy_loss(name: str) -> Callable[[F], F]:
    return _register(POLICY_LOSSES, name)


def _get(table: dict[str, Callable], kind: str, name: str) -> Callable:
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; known: {sorted(table)}") from None


def get_advantage(name: str) -> Callable:
    return _get(ADVANTAGES, "advantage estimator", name)


def get_policy_loss(name: str) -> Callable:
    return _get(POLICY_LOSSES, "policy loss", name)
