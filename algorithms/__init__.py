"""Policy-optimisation algorithms as pure functions of tensors, registered by name.

Advantage estimators run on the data side, when a group is complete; policy
losses run in the learner, which looks them up by the name in its config and
knows nothing else about the algorithm.

The registries fill when the modules that define the functions are imported,
which needs torch; this package imports them on first use of a registry name,
so that `rlhub.algorithms.config` (a plain dataclass) stays light to import.
"""

from __future__ import annotations

from typing import Any

_REGISTRY_NAMES = ("ADVANTAGES", "ADVANTAGE_NEEDS", "POLICY_LOSSES", "AdvantageNeeds", "advantage_needs", "get_advantage", "get_policy_loss")

__all__ = list(_REGISTRY_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _REGISTRY_NAMES:
        raise AttributeError(f"module 'rlhub.algorithms' has no attribute {name!r}")
    from rlhub.algorithms import advantages, losses, registry  # noqa: F401  (importing them registers)

    return getattr(registry, name)
