"""The data store on Ray: a coordinator actor (admission) and `num_shards` shard actors.

Shards hold group metadata; each group's tensors are a Ray object ref (owned by
the rollout actor that made them). `RayDataStore` is the picklable client every
actor and the controller hold.

Waiting happens inside the actors (asyncio): a rollout actor asking for
admission, or the learner's side asking for a batch, is answered as soon as
there is room or data, instead of polling. On a 2-core machine polling RPCs
would take CPU from the learner and the engines.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable

import ray

from rlhub.datastore import Admission, GroupMeta, GroupQueue, merge_stats, select_batch

if TYPE_CHECKING:
    from rlhub.types import GroupTensors


class _Waiter:
    """An asyncio condition created inside the actor's event loop, with a bounded wait."""

    def __init__(self) -> None:
        self._cond: asyncio.Condition | None = None

    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def wait(self, ready: Callable[[], bool], timeout_s: float) -> None:
        if ready() or timeout_s <= 0:
            return
        async with self.cond():
            try:
                await asyncio.wait_for(self.cond().wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                pass

    async def notify(self) -> None:
        async with self.cond():
            self.cond().notify_all()


@ray.remote(num_cpus=0)
class CoordinatorActor:
    def __init__(self, prompts_per_step: int, max_staleness: int, num_rows: int, seed: int, curation: Any = None,
                 group_size: int = 0, policies: tuple[str, ...] = ()) -> None:
        self.admission = Admission(prompts_per_step, max_staleness, num_rows=num_rows, seed=seed, curation=curation,
                                   group_size=group_size, policies=policies)
        self.waiter = _Waiter()

    def _has_room(self) -> bool:
        a = self.admission
        return a.stopped or bool(a.requeued) or a.cursor < a.limit()

    async def admit(self, actor_id: int, n: int, wait_s: float = 0.0) -> list[int] | None:
        """Up to n group ids; waits up to wait_s for room when there is none."""
        await self.waiter.wait(self._has_room, wait_s)
        return self.admission.admit(actor_id, n)

    def plans(self, group_ids: list[int]) -> dict[int, dict[str, Any]]:
        return self.admission.plans(group_ids)

    def observe(self, outcomes: list[Any]) -> None:
        self.admission.observe(outcomes)

    def curation_stats(self) -> dict[str, float]:
        sampler = self.admission.sampler
        return {} if sampler is None else {**sampler.stats(), "curation/replays_offered": float(sampler.replayed)}

    async def finish(self, group_ids: list[int], dropped: bool = False, reason: str = "", row: int | None = None) -> None:
        for gid in group_ids:
            self.admission.finish(gid, dropped, reason, row)
        if dropped:
            await self.waiter.notify()

    async def count_dropped(self, n: int) -> None:
        self.admission.count_dropped(n)
        await self.waiter.notify()

    async def set_version(self, version: int, policy: str | None = None) -> None:
        self.admission.set_version(version, policy)
        await self.waiter.notify()

    async def stop(self) -> None:
        self.admission.stopped = True
        await self.waiter.notify()

    def in_flight(self) -> int:
        return len(self.admission.in_flight)

    async def requeue_actor(self, actor_id: int, also: list[int] = ()) -> list[int]:
        lost = sorted(set(self.admission.requeue_actor(actor_id)) | set(also))
        self.admission.requeue(lost, "actor_crash")
        await self.waiter.notify()
        return lost

    async def requeue(self, group_ids: list[int], reason: str) -> None:
        self.admission.requeue(group_ids, reason)
        await self.waiter.notify()

    def close_out(self, reason: str) -> int:
        return self.admission.close_out(reason)

    def take_events(self) -> list[dict[str, Any]]:
        return self.admission.take_events()

    def snapshot(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(events not yet taken, admission state), at one instant: a checkpoint's ledger and its state agree."""
        return self.admission.take_events(), self.admission.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.admission.load_state_dict(state)


@ray.remote(num_cpus=0)
class ShardActor:
    def __init__(self) -> None:
        self.groups = GroupQueue()
        self.waiter = _Waiter()

    async def put_many(self, metas: list[GroupMeta], boxes: list[tuple[Any, int]]) -> list[int]:
        """Queue finished groups; returns the ids that were accepted (a group queued or taken already is not)."""
        accepted = [meta.group_id for meta, box in zip(metas, boxes) if self.groups.put(meta, box)]  # box: (ref, index)
        await self.waiter.notify()
        return accepted

    def count_drop(self, reason: str, groups: int, samples: int) -> None:
        self.groups.count_drop(reason, groups, samples)

    async def peek(
        self, learner_version: int, max_staleness: int, min_count: int = 0, wait_s: float = 0.0
    ) -> tuple[list[tuple[float, int]], int]:
        """((arrival, id) of the fresh groups, stale evictions since the last peek);
        waits up to wait_s for at least min_count fresh groups."""
        await self.waiter.wait(lambda: len(self.groups.peek(learner_version, max_staleness)) >= min_count, wait_s)
        return self.groups.peek(learner_version, max_staleness), self.groups.take_newly_stale()

    def take(self, group_ids: list[int]) -> list[tuple[GroupMeta, tuple[Any, int]]]:
        return self.groups.take(group_ids)

    def remove_actor(self, actor_id: int) -> list[int]:
        """Forget the queued groups of a crashed actor (their tensors died with it)."""
        return self.groups.remove(lambda m: m.actor_id != actor_id)

    def release(self, group_ids: list[int]) -> None:
        self.groups.release(group_ids)

    def take_events(self) -> list[dict[str, Any]]:
        return self.groups.take_events()

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

    def __init__(self, coordinator: Any, shards: list[Any], max_staleness: int, call_timeout_s: float = 60.0) -> None:
        self.coordinator = coordinator
        self.shards = shards
        self.max_staleness = max_staleness
        self.call_timeout_s = call_timeout_s
        """Every call waits at most this long: a store actor that does not answer raises GetTimeoutError,
        and the controller's probe names it (`rlhub.actors.controller.Actors.probe`)."""

    def _get(self, refs: Any) -> Any:
        return ray.get(refs, timeout=self.call_timeout_s)

    @classmethod
    def create(cls, num_shards: int, prompts_per_step: int, max_staleness: int, num_rows: int = 0, seed: int = 0,
               curation: Any = None, group_size: int = 0, policies: tuple[str, ...] = (), options: dict | None = None,
               call_timeout_s: float = 60.0) -> "RayDataStore":
        """`policies`: separate policies' names (agents.policies=separate): admission waits for each one's publish.
        `options`: Ray actor options of every store actor (where the controller keeps them)."""
        options = options or {}
        coordinator = CoordinatorActor.options(**options).remote(prompts_per_step, max_staleness, num_rows, seed, curation, group_size,
                                                                 tuple(policies))
        return cls(coordinator, [ShardActor.options(**options).remote() for _ in range(num_shards)], max_staleness, call_timeout_s)

    def _shard(self, group_id: int) -> Any:
        return self.shards[group_id % len(self.shards)]

    # ---- rollout side ----
    def admit(self, actor_id: int, n: int, wait_s: float = 0.0) -> list[int] | None:
        return self._get(self.coordinator.admit.remote(actor_id, n, wait_s))

    def plans(self, group_ids: list[int]) -> dict[int, dict[str, Any]]:
        """How each admitted group runs, under data.curation=difficulty (`Admission.plans`)."""
        return self._get(self.coordinator.plans.remote(group_ids))

    def observe(self, outcomes: list[Any]) -> None:
        """Finished groups' outcomes, for the rows' solve rates (not waited for)."""
        self.coordinator.observe.remote(outcomes)

    def curation_stats(self) -> dict[str, float]:
        return self._get(self.coordinator.curation_stats.remote())

    def put_many(self, groups: list[tuple[GroupMeta, GroupTensors]]) -> None:
        """Finished groups: their tensors as one object in the object store (owned by this rollout
        actor, which lives until the run ends), and each group's metadata with (ref, index) to a shard."""
        ref = ray.put([tensors for _, tensors in groups])  # one object: the learner resolves it in one go
        by_shard: dict[int, tuple[list, list]] = {}
        for i, (meta, _) in enumerate(groups):
            metas, boxes = by_shard.setdefault(meta.group_id % len(self.shards), ([], []))
            metas.append(meta)
            boxes.append((ref, i))
        self._get([self.shards[i].put_many.remote(metas, boxes) for i, (metas, boxes) in by_shard.items()])
        # waited for: a group queued in a shard is never also in flight for an actor that may crash
        self._get(self.coordinator.finish.remote([meta.group_id for meta, _ in groups]))

    def drop(self, group_id: int, reason: str, samples: int, row: int | None = None) -> None:
        self._get(self._shard(group_id).count_drop.remote(reason, 1, samples))
        self._get(self.coordinator.finish.remote([group_id], True, reason, row))

    # ---- learner side ----
    def get_batch(
        self, n: int, learner_version: int, timeout_s: float, wait_s: float = 0.1, on_wait: Callable[[], None] | None = None
    ) -> list[tuple[GroupMeta, tuple[Any, int]]]:
        """The n oldest fresh groups as (meta, (ref, index)), waiting for them; raises TimeoutError naming the counters.

        Each round waits inside the shards (up to wait_s) for groups to arrive;
        `on_wait` runs between rounds (the controller checks its rollout actors there)."""
        deadline = time.monotonic() + timeout_s
        each = -(-n // len(self.shards))  # groups spread evenly over shards by id
        while True:
            answers = self._get([s.peek.remote(learner_version, self.max_staleness, each, wait_s) for s in self.shards])
            stale = sum(n for _, n in answers)
            if stale:  # never trained: admission makes room for as many
                self._get(self.coordinator.count_dropped.remote(stale))
            candidates = [(t, gid, i) for i, (p, _) in enumerate(answers) for t, gid in p]
            chosen = select_batch(candidates, n)
            if chosen is not None:
                by_shard: dict[int, list[int]] = {}
                for _, gid, i in chosen:
                    by_shard.setdefault(i, []).append(gid)
                taken = self._get([self.shards[i].take.remote(g) for i, g in by_shard.items()])
                groups = [(meta, box) for part in taken for meta, box in part]
                # a group queued by an actor killed before it told the coordinator is still "in flight" there:
                # taken, it is no longer, so neither that actor's requeue nor the run's end can start or drop it again
                self._get(self.coordinator.finish.remote([meta.group_id for meta, _ in groups]))
                return sorted(groups, key=lambda mg: mg[0].put_time)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no batch of {n} groups within {timeout_s:.0f} s; store: {self.stats()}")
            if on_wait is not None:
                on_wait()

    def set_version(self, version: int, policy: str | None = None) -> None:
        self._get(self.coordinator.set_version.remote(version, policy))

    def requeue_actor(self, actor_id: int) -> list[int]:
        """Start again everything of a crashed actor that was not trained: in flight or queued."""
        queued = [g for ids in self._get([s.remove_actor.remote(actor_id) for s in self.shards]) for g in ids]
        return self._get(self.coordinator.requeue_actor.remote(actor_id, queued))

    def requeue_taken(self, group_ids: list[int], reason: str) -> None:
        """Groups taken for a learner step that never happened (its data was lost): start them again."""
        by_shard: dict[int, list[int]] = {}
        for gid in group_ids:
            by_shard.setdefault(gid % len(self.shards), []).append(gid)
        self._get([self.shards[i].release.remote(ids) for i, ids in by_shard.items()])
        self._get(self.coordinator.requeue.remote(group_ids, reason))

    def take_events(self) -> list[dict[str, Any]]:
        """Ledger events recorded since the last call, in the order they happened."""
        parts = self._get([self.coordinator.take_events.remote(), *[s.take_events.remote() for s in self.shards]])
        return sorted((e for part in parts for e in part), key=lambda e: e["t"])

    def close_out(self, reason: str) -> int:
        return self._get(self.coordinator.close_out.remote(reason))

    def stop(self) -> None:
        self._get(self.coordinator.stop.remote())

    def stats(self) -> dict[str, Any]:
        merged = merge_stats(self._get([s.stats.remote() for s in self.shards]))
        merged["in_flight"] = self._get(self.coordinator.in_flight.remote())
        return merged

    def drain(self, reason: str) -> int:
        return sum(self._get([s.drain.remote(reason) for s in self.shards]))

    # ---- checkpoints ----
    def snapshot(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(ledger events up to now, the state to resume from), taken together: the events are exactly those
        of what the state has seen, so a checkpoint's ledger offset and its state agree. Untrained groups
        (queued or in flight) are started again after a resume, and their counts undone. Call with no
        learner step outstanding (shards change only when the controller asks)."""
        events, admission = self._get(self.coordinator.snapshot.remote())
        events += [e for part in self._get([s.take_events.remote() for s in self.shards]) for e in part]
        queued = [g for ids in self._get([s.queued_ids.remote() for s in self.shards]) for g in ids]
        # a group put after the coordinator's snapshot was issued after it too: the cursor restarts it
        admission["requeued"] = sorted(set(admission["requeued"]) | {g for g in queued if g < admission["cursor"]})
        stats = merge_stats(self._get([s.stats.remote() for s in self.shards]))
        state = {
            "admission": admission,
            "produced": stats["produced"] - stats["queued"],
            "consumed": stats["consumed"],
            "dropped": stats["dropped"],
            "dropped_samples": stats["dropped_samples"],
        }
        return sorted(events, key=lambda e: e["t"]), state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._get(self.coordinator.load_state_dict.remote(state["admission"]))
        self._get(self.shards[0].load_counters.remote(state["produced"], state["consumed"], state["dropped"], state["dropped_samples"]))
