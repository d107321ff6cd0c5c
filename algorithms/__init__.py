"""Policy-optimisation algorithms as pure functions of tensors, registered by name.

Advantage estimators run on the data side, when a group is complete; policy
losses run in the learner, which looks them up by the name in its config and
knows nothing else about the algorithm.
"""

from rlhub.algorithms.registry import ADVANTAGE_NEEDS, ADVANTAGES, POLICY_LOSSES, AdvantageNeeds, advantage_needs, get_advantage, get_policy_loss
from rlhub.algorithms import advantages as _advantages  # noqa: F401  (registers)
from rlhub.algorithms import losses as _losses  # noqa: F401  (registers)

__all__ = ["ADVANTAGES", "ADVANTAGE_NEEDS", "POLICY_LOSSES", "AdvantageNeeds", "advantage_needs", "get_advantage", "get_policy_loss"]
