"""The data store on Ray: a coordinator actor (admission) and `num_shards` shard actors.

Shards hold group metadata; each group's tensors are a Ray object ref owned by
its shard, so they outlive the rollout actor that made them. `RayDataStore` is
the picklable client every actor and the controller hold.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from rlhub.datastore import Admission, GroupQueue, merge_stats, select_batch
from rlhub.types import GroupMeta, GroupTensors


@ray.remote(num_cpus=0)
class CoordinatorActor:
    def __init__(self, prompts_per_step: int, max_staleness: int) -> None:
        self.admission = Admission(prompts_per_step, max_staleness)

    def admit(self, actor_id: int, n: int) -> list[int] | None:
        return self.admission.admit(actor_id, n)

    def finish(self, group_ids: list[int]) -> None:
        for gid in group_ids:
            self.admission.finish(gid)

    def set_version(self, version: int) -> None:
        self.admission.set_version(version)

    def stop(self) -> None:
        self.admission.stopped = True

    def in_flight(self) -> int:
        return len(self.admission.in_flight)

    def requeue_actor(self, actor_id: int, also: list[int] = ()) -> list[int]:
        lost = self.admission.requeue_actor(actor_id)
        self.admission.requeued = sorted(set(self.admission.requeued) | set(also))
        return sorted(set(lost) | set(also))

    def state_dict(self) -> dict[str, Any]:
        return self.admission.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.admission.load_state_dict(state)

    def started(self) -> int:
        return self.admission.started()


@ray.remote(num_cpus=0)
class ShardActor:
    def __init__(self) -> None:
        self.groups = GroupQueue()

    def put_many(self, metas: list[GroupMeta], refs: list) -> None:
        for meta, ref in zip(metas, refs):
            self.groups.put(meta, ref)

    def count_drop(self, reason: str, groups: int, samples: int) -> None:
        self.groups.count_drop(reason, groups, samples)

    def peek(self, learner_version: int, max_staleness: int) -> list[tuple[float, int]]:
        return self.groups.peek(learner_version, max_staleness)

    def take(self, group_ids: list[int]) -> list[tuple[GroupMeta, list]]:
        return [(meta, [ref]) for meta, ref in self.groups.take(group_ids)]

    def remove_actor(self, actor_id: int) -> list[int]:
        """Forget the queued groups of a crashed actor (their tensors died with it)."""
        lost = [m.group_id for m, _ in self.groups.queue if m.actor_id == actor_id]
        self.groups.queue = [(m, p) for m, p in self.groups.queue if m.actor_id != actor_id]
        self.groups.produced -= len(lost)
        return lost

    def queued_ids(self) -> list[int]:
        return [m.group_id for m, _ in self.groups.queue]

    def drain(self, reason: str) -> int:
        return self.groups.drain(reason)

    def stats(self) -> dict[str, Any]:
        return self.groups.stats()

    def load_counters(self, produced: int, consumed: int, dropped: dict[str, int], dropped_samples: dict[str, int]) -> None:
        self.groups.produced, self.groups.consumed = produced, consumed
        self.groups.dropped.update(dropped)
        self.groups.dropped_samples.update(dropped_samples)


class RayDataStore:
    """Client of the coordinator and shards (picklable: passed to every rollout actor)."""

    def __init__(self, coordinator: Any, shards: list[Any], max_staleness: int) -> None:
        self.coordinator = coordinator
        self.shards = shards
        self.max_staleness = max_staleness

    @classmethod
    def create(cls, num_shards: int, prompts_per_step: int, max_staleness: int) -> "RayDataStore":
        return cls(CoordinatorActor.remote(prompts_per_step, max_staleness), [ShardActor.remote() for _ in range(num_shards)], max_staleness)

    def _shard(self, group_id: int) -> Any:
        return self.shards[group_id % len(self.shards)]

    # ---- rollout side ----
    def admit(self, actor_id: int, n: int) -> list[int] | None:
        return ray.get(self.coordinator.admit.remote(actor_id, n))

    def put_many(self, groups: list[tuple[GroupMeta, GroupTensors]]) -> None:
        """Finished groups: tensors into the object store, metadata to the shards (one call each)."""
        by_shard: dict[int, tuple[list, list]] = {}
        for meta, tensors in groups:
            metas, refs = by_shard.setdefault(meta.group_id % len(self.shards), ([], []))
            metas.append(meta)
            refs.append(ray.put(tensors))  # owned by this rollout actor, which lives until the run ends
        ray.get([self.shards[i].put_many.remote(metas, refs) for i, (metas, refs) in by_shard.items()])
        self.coordinator.finish.remote([meta.group_id for meta, _ in groups])

    def drop(self, group_id: int, reason: str, samples: int) -> None:
        ray.get(self._shard(group_id).count_drop.remote(reason, 1, samples))
        self.coordinator.finish.remote([group_id])

    # ---- learner side ----
    def get_batch(
        self, n: int, learner_version: int, timeout_s: float, max_poll_s: float = 0.02, on_wait: Any = None
    ) -> list[tuple[GroupMeta, Any]]:
        """The n oldest fresh groups, waiting for them; raises TimeoutError naming the counters.

        Polls with a back-off from 1 ms to `max_poll_s`: on a 2-core machine a tight
        loop of RPCs would take CPU from the learner and the engines it waits for.
        `on_wait` is called while waiting (the controller checks its rollout actors there)."""
        deadline = time.monotonic() + timeout_s
        poll_s = 0.001
        while True:
            peeks = ray.get([s.peek.remote(learner_version, self.max_staleness) for s in self.shards])
            candidates = [(t, gid, i) for i, p in enumerate(peeks) for t, gid in p]
            chosen = select_batch(candidates, n)
            if chosen is not None:
                by_shard: dict[int, list[int]] = {}
                for _, gid, i in chosen:
                    by_shard.setdefault(i, []).append(gid)
                taken = ray.get([self.shards[i].take.remote(g) for i, g in by_shard.items()])
                groups = [(meta, box[0]) for part in taken for meta, box in part]
                return sorted(groups, key=lambda mg: mg[0].put_time)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no batch of {n} groups within {timeout_s:.0f} s; store: {self.stats()}")
            if on_wait is not None:
                on_wait()
            time.sleep(poll_s)
            poll_s = min(2 * poll_s, max_poll_s)

    def set_version(self, version: int) -> None:
        ray.get(self.coordinator.set_version.remote(version))

    def requeue_actor(self, actor_id: int) -> list[int]:
        """Start again everything of a crashed actor that was not trained: in flight or queued."""
        queued = [g for ids in ray.get([s.remove_actor.remote(actor_id) for s in self.shards]) for g in ids]
        return ray.get(self.coordinator.requeue_actor.remote(actor_id, queued))

    def stop(self) -> None:
        ray.get(self.coordinator.stop.remote())

    def stats(self) -> dict[str, Any]:
        merged = merge_stats(ray.get([s.stats.remote() for s in self.shards]))
        merged["in_flight"] = ray.get(self.coordinator.in_flight.remote())
        return merged

    def drain(self, reason: str) -> int:
        return sum(ray.get([s.drain.remote(reason) for s in self.shards]))

    # ---- checkpoints ----
    def state_dict(self, held: list[int] = ()) -> dict[str, Any]:
        """Cursor and counters. Untrained groups (queued, in flight, or `held`: taken for a
        batch not trained yet) are started again after a resume, and their counts undone."""
        admission = ray.get(self.coordinator.state_dict.remote())
        queued = [g for ids in ray.get([s.queued_ids.remote() for s in self.shards]) for g in ids]
        admission["requeued"] = sorted(set(admission["requeued"]) | set(queued) | set(held))
        stats = merge_stats(ray.get([s.stats.remote() for s in self.shards]))
        return {
            "admission": admission,
            "produced": stats["produced"] - stats["queued"] - len(held),
            "consumed": stats["consumed"] - len(held),
            "dropped": stats["dropped"],
            "dropped_samples": stats["dropped_samples"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ray.get(self.coordinator.load_state_dict.remote(state["admission"]))
        ray.get(self.shards[0].load_counters.remote(state["produced"], state["consumed"], state["dropped"], state["dropped_samples"]))
