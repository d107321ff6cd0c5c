"""Find environments by name through the `rlhub.envs` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from rlhub.envs.base import Env

GROUP = "rlhub.envs"


def available_envs() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def make_env(name: str, **kwargs: Any) -> Env:
    """Build environment `name` with its factory's keyword arguments."""
    found = available_envs()
    if name not in found:
        raise ValueError(f"env.name={name!r}: no such environment; installed: {sorted(found)}")
    factory = found[name].load()
    env = factory(**kwargs)
    for method in ("dataset", "reset", "step"):
        if not callable(getattr(env, method, None)):
            raise TypeError(f"env.name={name!r}: its factory returned {type(env).__name__}, which has no {method}()")
    return env
