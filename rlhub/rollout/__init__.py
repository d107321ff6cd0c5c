"""Rollout: the worker behind each rollout actor, in the stages a group goes through.

- `worker`: the loop (admission, rounds, evaluation hold-outs);
- `weights`: verified weight loading (probe check, rebuild, in-flight loads);
- `turns`: turns and episodes (generation, batched or continuous, and environment steps);
- `groups`: group assembly (judge, samples, filters, scorers, advantages, the store);
- `branches`: SPO's rollouts branched at each sample's segment cuts, whose returns value the cuts;
- `records`: the counters, failure reports and the store seam a worker uses.
"""

from rlhub.algorithms.data_side import DataSide
from rlhub.datastore import prompt_index
from rlhub.rollout.groups import Groups
from rlhub.rollout.records import DataStoreClient, FailureLog, WorkerStats
from rlhub.rollout.turns import OpenGroup, TurnBatch, Turns
from rlhub.rollout.weights import SyncError, VerifiedWeights
from rlhub.rollout.worker import RolloutWorker
from rlhub.rollout_config import RolloutConfig

__all__ = ["DataSide", "DataStoreClient", "FailureLog", "Groups", "OpenGroup", "RolloutConfig", "RolloutWorker", "SyncError",
           "TurnBatch", "Turns", "VerifiedWeights", "WorkerStats", "prompt_index"]
