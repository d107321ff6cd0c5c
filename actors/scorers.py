"""The data-side scorers on Ray: the critic actor and the reference actor.

Rollout actors call `score` on every generation batch (through `RemoteScorer`);
the controller hands the critic the same batches the learner trains on. On a
CPU machine both run on the cores beside the learner's: the learner's step is
the slower phase of the pipeline, so they take time from generation instead.
"""

from __future__ import annotations

import os
import time
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


PROBE = {"probe": 1}
"""A concurrency group of its own for `alive`, so a scorer busy with a long call (a big batch to score,
a critic step) still answers the controller's probe at once; only a dead or frozen one is silent."""


class _Scorer:
    """A scorer actor (critic or reference), or one rank of a scorer sharded as the policy is
    (`learner.world_size` ranks, their own torch.distributed group). Rank 0 is then the front every
    caller talks to: it takes each call in turn (a score for a rollout actor, a training step, a save),
    sends the other ranks their share of it and computes its own, so every rank runs the same
    collectives in the same order. A call that reaches a rank other than 0 is that rank's share."""

    def __init__(self, run: Any, model_path: str, cores: set[int] | None, rank: int = 0) -> None:
        import threading

        _pin(run, cores)
        self.run, self.model_path, self.rank = run, model_path, rank
        self.others: list[Any] = []  # rank 0 of a sharded scorer: the handles of ranks 1..N-1
        self._sequence = threading.Lock()  # rank 0: one sharded call at a time, in the order the ranks see them
        if run.learner.world_size == 1:
            self._build(None)

    def _build(self, ranks: Any) -> None:
        raise NotImplementedError

    @ray.method(concurrency_group="probe")
    def alive(self) -> bool:
        """The controller's probe (`Actors.probe`), answered beside whatever call is running."""
        return True

    def where(self) -> dict[str, Any]:
        from rlhub.parallel.ranks import free_address, listen, node_host

        if self.rank == 0:  # held open until `start`: the group's store serves on it, at this node's address only
            self._listener = listen(node_host())
            host, port = self._listener.getsockname()[:2]
        else:
            host, port = free_address()
        return {"rank": self.rank, "node": host, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "port": port}

    def start(self, host: str, port: int, others: list[Any]) -> None:
        """Join the scorer ranks' group and build this rank's share; rank 0 is given the others' handles."""
        from rlhub.parallel.ranks import join

        self.others = others
        listener, self._listener = getattr(self, "_listener", None), None
        self._build(join(host, port, self.rank, self.run.learner.world_size, 1, self.run.learner.collective_timeout_s, listener=listener))

    def _fan(self, method: str, mine, shares: list[Any] | None = None) -> Any:
        """Run `mine()` here and `method` on the other ranks (with their `shares`, else no argument
        beyond what `mine` closes over), sent and run inside the sequence; returns (mine, theirs)."""
        with self._sequence:
            refs = [getattr(o, method).remote(*([] if shares is None else [share])) for o, share in
                    zip(self.others, shares[1:] if shares is not None else [None] * len(self.others))]
            out = mine()
            return out, ray.get(refs)

    def score(self, batch: GroupTensors | None) -> dict[str, Any]:
        """The scores of `batch`; at rank 0 of a sharded scorer each rank scores a slice of its rows."""
        if not self.others:
            return self.model.score(batch)
        import torch

        n = batch.input_ids.shape[0]
        world = len(self.others) + 1
        bounds = [n * r // world for r in range(world + 1)]
        slices = [batch.rows(torch.arange(bounds[r], bounds[r + 1]), batch.input_ids.shape[1]) if bounds[r + 1] > bounds[r] else None
                  for r in range(world)]
        mine, theirs = self._fan("score", lambda: self.model.score(slices[0]), slices)
        out = dict(mine)
        for key, value in mine.items():
            if torch.is_tensor(value) or value is None:
                out[key] = torch.cat([v[key] for v in [mine, *theirs] if v[key] is not None])
        return out

    def load_published(self, weight_sync: Any) -> int:
        """Load the policy's latest published weights (each rank its shards); returns their version."""
        from rlhub import lora

        published = weight_sync.pull(-1)
        state = published.state
        if lora.is_adapter_state(state):  # a LoRA policy publishes adapters: merged into the base it adapts
            state = lora.merged_model_state(self.model_path, state)
        if self.others:
            self._fan("load_published", lambda: self._take(state), [weight_sync] * (len(self.others) + 1))
        else:
            self._take(state)
        return published.version

    def _take(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        self._fan("save", lambda: self.model.save(Path(directory)), [directory] * (len(self.others) + 1))

    def load(self, directory: str) -> None:
        self._fan("load", lambda: self.model.load(Path(directory)), [directory] * (len(self.others) + 1))


@ray.remote(max_concurrency=2, concurrency_groups=PROBE)  # scoring for the rollout actors goes on while the critic trains
class CriticActor(_Scorer):
    def _build(self, ranks: Any) -> None:
        from rlhub.parallel.layout import Layout
        from rlhub.scorers import Critic

        run = self.run
        self.model = self.critic = Critic(self.model_path, run.model, run.algorithm, seed=run.seed + 17, moe=run.moe, ranks=ranks,
                                          layout=None if ranks is None else Layout(ranks))
        self.pad_id = self.critic.model.backbone.config.pad_token_id or 0

    def _take(self, state: dict[str, Any]) -> None:
        self.critic.load_policy(state)  # the trunk starts from the policy; the head stays at zero

    def train_step(self, shares: list[list[tuple[Any, list[int], list[int]]]], at_version: int) -> dict[str, float]:
        """One critic step on the batch the learner trains on, given as each learner rank's (ref, indices,
        group ids) parts, starting from critic version `at_version` (steps run in version order whatever
        thread takes them); groups whose tensors were lost are left out, as the learner leaves them out."""
        if not self.others:
            return self.train_share([p for share in shares for p in share], at_version)
        while self.critic.version < at_version:  # the turn first: a later step must not hold the sequence
            time.sleep(0.005)
        with self._sequence:
            refs = [o.train_share.remote(share, at_version) for o, share in zip(self.others, shares[1:])]
            out = self.train_share(shares[0], at_version)
            ray.get(refs)
        return out

    def train_share(self, parts: list[tuple[Any, list[int], list[int]]], at_version: int) -> dict[str, float]:
        from rlhub.types import collate

        tensors, _ = resolve_batch(parts)
        return self.critic.train_step(collate(tensors, self.pad_id) if tensors else None, at_version)


@ray.remote(concurrency_groups=PROBE)
class ReferenceActor(_Scorer):
    def _build(self, ranks: Any) -> None:
        from rlhub.models.logprobs import SamplingPolicy
        from rlhub.parallel.layout import Layout
        from rlhub.scorers import ReferencePolicy

        run = self.run
        self.model = self.reference = ReferencePolicy(self.model_path, run.model, SamplingPolicy(run.rollout.temperature, run.rollout.top_p),
                                                      layout=None if ranks is None else Layout(ranks))

    def _take(self, state: dict[str, Any]) -> None:
        """Freeze the policy's weights as they are now as the reference."""
        self.reference.load_state(state)


class RemoteScorer:
    """A scorer actor as a rollout worker sees it: a blocking `score`, waiting at most `timeout_s` (a hung
    scorer fails the rollout actor, and the controller's probe then names the scorer)."""

    def __init__(self, handle: Any, timeout_s: float = 600.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def score(self, batch: GroupTensors) -> dict[str, Any]:
        return ray.get(self.handle.score.remote(batch), timeout=self.timeout_s)
