"""The data-side scorers on Ray: the critic actor and the reference actor.

Rollout actors call `score` on every generation batch (through `RemoteScorer`);
the controller hands the critic the same batches the learner trains on. On a
CPU machine both run on the cores beside the learner's: the learner's step is
the slower phase of the pipeline, so they take time from generation instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray

from rlhub.scorers import Critic, ReferencePolicy
from rlhub.types import GroupTensors, collate


def _pin(run: Any, cores: set[int] | None) -> None:
    import torch

    if cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(run.cluster.torch_threads)


@ray.remote(max_concurrency=2)  # scoring for the rollout actors goes on while the critic trains
class CriticActor:
    def __init__(self, run: Any, model_path: str, cores: set[int] | None) -> None:
        _pin(run, cores)
        self.critic = Critic(model_path, run.model, run.algorithm, seed=run.seed + 17)
        self.pad_id = self.critic.model.backbone.config.pad_token_id or 0

    def score(self, batch: GroupTensors) -> dict[str, Any]:
        return self.critic.score(batch)

    def train_step(self, picks: list[list[int]], *objects: list) -> dict[str, float]:
        """One critic step on the groups picks[k] of objects[k], the batch the learner trains on."""
        return self.critic.train_step(collate([obj[i] for obj, idx in zip(objects, picks) for i in idx], self.pad_id))

    def save(self, directory: str) -> None:
        self.critic.save(Path(directory))

    def load(self, directory: str) -> None:
        self.critic.load(Path(directory))


@ray.remote
class ReferenceActor:
    def __init__(self, run: Any, model_path: str, cores: set[int] | None) -> None:
        _pin(run, cores)
        self.reference = ReferencePolicy(model_path, run.model)

    def load_published(self, weight_sync: Any) -> int:
        """Freeze the policy's latest published weights as the reference; returns their version."""
        published = weight_sync.pull(-1)
        self.reference.load_state(published.state)
        return published.version

    def score(self, batch: GroupTensors) -> dict[str, Any]:
        return self.reference.score(batch)

    def save(self, directory: str) -> None:
        self.reference.save(Path(directory))

    def load(self, directory: str) -> None:
        self.reference.load(Path(directory))


class RemoteScorer:
    """A scorer actor as a rollout worker sees it: a blocking `score`."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def score(self, batch: GroupTensors) -> dict[str, Any]:
        return ray.get(self.handle.score.remote(batch))
