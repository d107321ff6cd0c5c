"""The data-side scorers on Ray: the critic actor and the reference actor.

Rollout actors call `score` on every generation batch (through `RemoteScorer`);
the controller hands the critic the same batches the learner trains on. On a
CPU machine both run on the cores beside the learner's: the learner's step is
the slower phase of the pipeline, so they take time from generation instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from rlhub.actors.learner import resolve_batch

if TYPE_CHECKING:  # torch and the models are imported inside the actors, not by the controller
    from rlhub.types import GroupTensors


def _pin(run: Any, cores: set[int] | None) -> None:
    import torch

    if cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(run.cluster.torch_threads)


@ray.remote(max_concurrency=2)  # scoring for the rollout actors goes on while the critic trains
class CriticActor:
    def __init__(self, run: Any, model_path: str, cores: set[int] | None) -> None:
        from rlhub.scorers import Critic

        _pin(run, cores)
        self.critic = Critic(model_path, run.model, run.algorithm, seed=run.seed + 17, moe=run.moe)
        self.pad_id = self.critic.model.backbone.config.pad_token_id or 0

    def load_published(self, weight_sync: Any) -> int:
        """Start the critic's trunk from the policy's latest published weights; returns their version."""
        published = weight_sync.pull(-1)
        self.critic.load_policy(published.state)
        return published.version

    def score(self, batch: GroupTensors) -> dict[str, Any]:
        return self.critic.score(batch)

    def train_step(self, parts: list[tuple[Any, list[int], list[int]]], at_version: int) -> dict[str, float]:
        """One critic step on the batch the learner trains on, given as (ref, indices, group ids) parts,
        starting from critic version `at_version` (steps run in version order whatever thread takes them);
        groups whose tensors were lost are left out, as the learner leaves them out."""
        from rlhub.types import collate

        tensors, _ = resolve_batch(parts)
        return self.critic.train_step(collate(tensors, self.pad_id) if tensors else None, at_version)

    def save(self, directory: str) -> None:
        self.critic.save(Path(directory))

    def load(self, directory: str) -> None:
        self.critic.load(Path(directory))


@ray.remote
class ReferenceActor:
    def __init__(self, run: Any, model_path: str, cores: set[int] | None) -> None:
        from rlhub.models.logprobs import SamplingPolicy
        from rlhub.scorers import ReferencePolicy

        _pin(run, cores)
        self.reference = ReferencePolicy(model_path, run.model, SamplingPolicy(run.rollout.temperature, run.rollout.top_p))

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
