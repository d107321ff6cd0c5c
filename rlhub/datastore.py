"""The data store: admission control on the way in, staleness-bounded batches on the way out.

Plain classes, so the logic is tested without Ray; `rlhub.actors.store` wraps
them in Ray actors (one coordinator for admission, `num_shards` shards for the
groups, tensors as object refs).

Admission: a prompt may be started only while the number started is below
`(learner_version + max_staleness + 1) * prompts_per_step`, so rollout actors
never run far enough ahead to produce samples that must be thrown away.
Batches: groups leave in arrival order, and a group whose oldest token is more
than `max_staleness` versions behind the learner is dropped and counted.

Both sides record what happens to each group id as ledger events (issued,
requeued, dropped; `rlhub.ledger`), which the controller drains into the run's
ledger: a record kept apart from the counters, so the two can be checked
against each other.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GroupMeta:
    """What a store shard keeps about one finished group (the tensors stay in the object store).

    Plain values only: store actors never import torch."""

    group_id: int  # admission index: the position of the prompt in the data stream
    prompt_index: int  # row of the training split
    actor_id: int
    min_version: int  # the oldest token's policy version
    max_version: int
    num_samples: int
    num_tokens: int  # completion tokens over the group
    reward_mean: float
    success_mean: float
    response_len_mean: float
    generate_seconds: float
    put_time: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)  # per sample: stop or length
    extra: dict[str, Any] = field(default_factory=dict)



def prompt_index(group_id: int, num_rows: int, seed: int) -> int:
    """Row of the training split for a position in the prompt stream: a fresh shuffle per epoch."""
    epoch, pos = divmod(group_id, num_rows)
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos]


def event(kind: str, group: int, **fields: Any) -> dict[str, Any]:
    """One ledger event, stamped with the time it happened (events from several actors merge by it)."""
    return {"event": kind, "group": group, **fields, "t": time.time()}


@dataclass
class DataStoreConfig:
    """The trajectory store."""

    num_shards: int = 1
    """Ray actors that hold group metadata; groups are spread by id."""
    batch_timeout_s: float = 300.0
    """The learner fails, naming the store's counters, if no batch is ready in this time."""


class Admission:
    """Hands out prompt positions under the staleness bound and tracks what is in flight."""

    def __init__(
        self, prompts_per_step: int, max_staleness: int, total_prompts: int | None = None, num_rows: int = 0, seed: int = 0,
        curation: Any = None, group_size: int = 0, policies: tuple[str, ...] = (),
    ) -> None:
        """`curation`: a `rlhub.curation.DataConfig` whose curation is `difficulty`: rows are then
        picked as groups are admitted (`plans` says each group's), not read off the shuffled stream.
        `policies`: the names of separate policies (agents.policies=separate), each of which reports its
        version; admission opens for the version all of them have published."""
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.prompts_per_step = prompts_per_step
        self.max_staleness = max_staleness
        self.total_prompts = total_prompts
        self.num_rows, self.seed = num_rows, seed  # the prompt stream, to name each group's dataset row
        self.group_size = group_size
        self.sampler = None
        if curation is not None and curation.curation == "difficulty":
            from rlhub.curation import DifficultySampler

            if not num_rows:
                raise ValueError("data.curation=difficulty needs the number of training rows")
            self.sampler = DifficultySampler(curation, num_rows, seed)
        self.rows_of: dict[int, int] = {}  # group id -> its row, where the sampler picked it
        self.events: list[dict[str, Any]] = []
        self.learner_version = 0
        self.policy_versions: dict[str, int | None] = {p: None for p in policies}  # each separate policy's latest publish
        self.cursor = 0  # the next position in the prompt stream
        self.in_flight: dict[int, int] = {}  # group id -> actor id
        self.requeued: list[int] = []  # positions to start again (after a crash or a resume)
        self.dropped = 0  # started groups that will never be trained
        self.stopped = False

    def limit(self) -> int:
        # a dropped group never reaches a batch, so it makes room for one more: the learner
        # must still find prompts_per_step groups for every version
        return (self.learner_version + self.max_staleness + 1) * self.prompts_per_step + self.dropped

    def admit(self, actor_id: int, n: int) -> list[int] | None:
        """Up to n group ids to start now (possibly none); None once the run is stopping."""
        if self.stopped:
            return None
        granted: list[int] = []
        while len(granted) < n and self.requeued:
            granted.append(self.requeued.pop(0))
        room = self.limit() - self.cursor
        if self.total_prompts is not None:
            room = min(room, self.total_prompts - self.cursor)
        fresh = max(0, min(n - len(granted), room))
        if self.sampler is not None:  # a requeued group keeps its row
            self.rows_of.update(zip(range(self.cursor, self.cursor + fresh), self.sampler.pick(fresh)))
        granted.extend(range(self.cursor, self.cursor + fresh))
        self.cursor += fresh
        for gid in granted:
            self.in_flight[gid] = actor_id
            self.events.append(event("issued", gid, row=self.row(gid), actor=actor_id, version=self.learner_version))
        return granted

    def row(self, group_id: int) -> int | None:
        if self.sampler is not None:
            return self.rows_of.get(group_id)
        return prompt_index(group_id, self.num_rows, self.seed) if self.num_rows else None

    def plans(self, group_ids: list[int]) -> dict[int, dict[str, Any]]:
        """How each of these admitted groups runs (`DifficultySampler.plan`: its row, samples, a trajectory
        to replay); empty without curation (rows come from `prompt_index`, every group is group_size)."""
        if self.sampler is None:
            return {}
        out = {}
        for gid in group_ids:
            out[gid] = plan = self.sampler.plan(self.rows_of[gid], self.group_size, self.learner_version)
            self.sampler.replayed += plan["replay"] is not None
        return out

    def observe(self, outcomes: list[Any]) -> None:
        """Finished groups' outcomes (`rlhub.curation.Outcome`), for the rows' solve rates."""
        if self.sampler is not None:
            for o in outcomes:
                self.sampler.observe(o, self.learner_version)

    def finish(self, group_id: int, dropped: bool = False, reason: str = "", row: int | None = None) -> None:
        self.in_flight.pop(group_id, None)
        self.dropped += dropped
        if dropped:
            self.events.append(event("dropped", group_id, row=row, reason=reason))

    def count_dropped(self, n: int) -> None:
        """Groups that were finished but dropped later (stale in the store)."""
        self.dropped += n

    def requeue_actor(self, actor_id: int) -> list[int]:
        """The in-flight groups of a crashed actor (to be started again, with `requeue`)."""
        return sorted(g for g, a in self.in_flight.items() if a == actor_id)

    def requeue(self, group_ids: list[int], reason: str) -> None:
        """Start these groups again (they will never be trained as they are), first in line."""
        for gid in group_ids:
            self.in_flight.pop(gid, None)
            self.events.append(event("requeued", gid, reason=reason))
        self.requeued = sorted(set(self.requeued) | set(group_ids))

    def close_out(self, reason: str) -> int:
        """At the end of a run: groups waiting to start again, or still in flight, are dropped."""
        left = sorted(set(self.requeued) | set(self.in_flight))
        for gid in left:
            self.events.append(event("dropped", gid, row=self.row(gid), reason=reason))
        self.requeued, self.in_flight = [], {}
        return len(left)

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    def set_version(self, version: int, policy: str | None = None) -> None:
        """The learner published `version` (a separate policy names itself: admission follows the
        oldest version among the policies, once each has published one)."""
        if not self.policy_versions:
            self.learner_version = version
            return
        if policy not in self.policy_versions:
            raise ValueError(f"set_version: policy {policy!r} is not one of {sorted(self.policy_versions)}")
        self.policy_versions[policy] = version
        published = [v for v in self.policy_versions.values() if v is not None]
        if len(published) == len(self.policy_versions):
            self.learner_version = min(published)

    def state_dict(self) -> dict[str, Any]:
        # what is in flight has not been trained: it is started again after a resume
        state = {"cursor": self.cursor, "requeued": sorted(self.requeued + list(self.in_flight)), "dropped": self.dropped}
        if self.sampler is not None:  # every group's row (a queued one may be started again), and the rates
            state["rows_of"] = {str(g): r for g, r in self.rows_of.items()}
            state["curation"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self.dropped = int(state.get("dropped", 0))
        self.requeued = [int(g) for g in state["requeued"]]
        self.in_flight = {}
        if self.sampler is not None and "curation" in state:
            self.rows_of = {int(g): int(r) for g, r in state["rows_of"].items()}
            self.sampler.load_state_dict(state["curation"])


class GroupQueue:
    """Finished groups of one shard, oldest arrival first, with counters."""

    def __init__(self) -> None:
        self.queue: list[tuple[GroupMeta, Any]] = []
        self.produced = 0
        self.consumed = 0
        self.dropped: Counter[str] = Counter()
        self.dropped_samples: Counter[str] = Counter()
        self.newly_stale = 0
        self.taken: set[int] = set()  # handed to the learner: never queued again, unless released
        self.events: list[dict[str, Any]] = []

    def put(self, meta: GroupMeta, payload: Any) -> bool:
        """Queue a finished group; a group already queued or taken is ignored (finishing is idempotent)."""
        if meta.group_id in self.taken or any(m.group_id == meta.group_id for m, _ in self.queue):
            return False
        meta.put_time = meta.put_time or time.time()
        self.queue.append((meta, payload))
        self.produced += 1
        self.dropped_samples.update(meta.extra.get("dropped_samples", {}))
        return True

    def release(self, group_ids: list[int]) -> None:
        """Taken groups whose learner step never happened: they will be generated and queued again
        (and counted as produced again then)."""
        mine = self.taken & set(group_ids)
        self.taken -= mine
        self.consumed -= len(mine)
        self.produced -= len(mine)

    def count_drop(self, reason: str, groups: int = 1, samples: int = 0) -> None:
        """A group (or samples of one) that will never be trained, with the reason."""
        if groups:
            self.produced += groups
            self.dropped[reason] += groups
        if samples:
            self.dropped_samples[reason] += samples

    def evict_stale(self, learner_version: int, max_staleness: int) -> int:
        keep = [(m, p) for m, p in self.queue if learner_version - m.min_version <= max_staleness]
        evicted = len(self.queue) - len(keep)
        if evicted:
            self.dropped["stale"] += evicted
            self.events += [event("dropped", m.group_id, row=m.prompt_index, reason="stale") for m, _ in self.queue
                            if learner_version - m.min_version > max_staleness]
            self.queue = keep
        return evicted

    def peek(self, learner_version: int, max_staleness: int) -> list[tuple[float, int]]:
        """(arrival time, group id) of every group that is still fresh enough (stale ones are evicted)."""
        self.newly_stale += self.evict_stale(learner_version, max_staleness)
        return [(m.put_time, m.group_id) for m, _ in self.queue]

    def take_newly_stale(self) -> int:
        """Stale evictions since the last call (admission makes room for as many)."""
        n, self.newly_stale = self.newly_stale, 0
        return n

    def take(self, group_ids: list[int]) -> list[tuple[GroupMeta, Any]]:
        wanted = set(group_ids)
        taken = [(m, p) for m, p in self.queue if m.group_id in wanted]
        self.queue = [(m, p) for m, p in self.queue if m.group_id not in wanted]
        self.consumed += len(taken)
        self.taken.update(m.group_id for m, _ in taken)
        return taken

    def remove(self, keep: Any) -> list[int]:
        """Forget the queued groups for which keep(meta) is false; their ids (they will be started again)."""
        gone = [m.group_id for m, _ in self.queue if not keep(m)]
        self.queue = [(m, p) for m, p in self.queue if keep(m)]
        self.produced -= len(gone)
        return gone

    def drain(self, reason: str) -> int:
        """Count what is left as dropped (at the end of a run)."""
        n = len(self.queue)
        if n:
            self.dropped[reason] += n
            self.events += [event("dropped", m.group_id, row=m.prompt_index, reason=reason) for m, _ in self.queue]
            self.queue = []
        return n

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    def stats(self) -> dict[str, Any]:
        return {
            "produced": self.produced,
            "consumed": self.consumed,
            "queued": len(self.queue),
            "dropped": dict(self.dropped),
            "dropped_samples": dict(self.dropped_samples),
        }


def select_batch(candidates: list[tuple[float, int, int]], n: int) -> list[tuple[float, int, int]] | None:
    """The n oldest (arrival time, group id, shard) across shards, or None if fewer are ready."""
    if len(candidates) < n:
        return None
    return sorted(candidates)[:n]


def merge_stats(per_shard: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"produced": 0, "consumed": 0, "queued": 0, "dropped": Counter(), "dropped_samples": Counter()}
    for s in per_shard:
        for k in ("produced", "consumed", "queued"):
            total[k] += s[k]
        total["dropped"].update(s["dropped"])
        total["dropped_samples"].update(s["dropped_samples"])
    total["dropped"] = dict(total["dropped"])
    total["dropped_samples"] = dict(total["dropped_samples"])
    total["dropped_total"] = sum(total["dropped"].values())
    return total


class InMemoryDataStore:
    """The whole store in one process: the seam's reference implementation, used by tests."""

    def __init__(self, prompts_per_step: int, max_staleness: int, num_rows: int = 0, seed: int = 0, curation: Any = None,
                 group_size: int = 0) -> None:
        self.admission = Admission(prompts_per_step, max_staleness, num_rows=num_rows, seed=seed, curation=curation,
                                   group_size=group_size)
        self.groups = GroupQueue()
        self.max_staleness = max_staleness

    def admit(self, actor_id: int, n: int, wait_s: float = 0.0) -> list[int] | None:
        return self.admission.admit(actor_id, n)  # one process: nobody could make room while we wait

    def plans(self, group_ids: list[int]) -> dict[int, dict[str, Any]]:
        return self.admission.plans(group_ids)

    def observe(self, outcomes: list[Any]) -> None:
        self.admission.observe(outcomes)

    def put_many(self, groups: list[tuple[GroupMeta, Any]]) -> None:
        for meta, payload in groups:
            self.groups.put(meta, payload)
            self.admission.finish(meta.group_id)

    def drop(self, group_id: int, reason: str, samples: int, row: int | None = None) -> None:
        self.groups.count_drop(reason, 1, samples)
        self.admission.finish(group_id, dropped=True, reason=reason, row=row)

    def take_events(self) -> list[dict[str, Any]]:
        return sorted(self.admission.take_events() + self.groups.take_events(), key=lambda e: e["t"])

    def get_batch(self, n: int, learner_version: int) -> list[tuple[GroupMeta, Any]] | None:
        ready = self.groups.peek(learner_version, self.max_staleness)
        self.admission.count_dropped(self.groups.take_newly_stale())
        chosen = select_batch([(t, gid, 0) for t, gid in ready], n)
        return None if chosen is None else self.groups.take([gid for _, gid, _ in chosen])

    def set_version(self, version: int, policy: str | None = None) -> None:
        self.admission.set_version(version, policy)

    def stats(self) -> dict[str, Any]:
        return {**merge_stats([self.groups.stats()]), "in_flight": len(self.admission.in_flight)}
