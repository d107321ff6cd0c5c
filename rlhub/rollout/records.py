"""What a rollout worker counts and reports, and what it needs from the data store.

`WorkerStats` are the counters a rollout actor hands the controller every
step; `FailureLog` keeps the first failures of each kind in full for the run's
log; `DataStoreClient` is the store seam as a worker sees it (the in-memory
store in unit tests, the Ray store's client in runs).
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from rlhub.types import GroupMeta, GroupTensors


class DataStoreClient(Protocol):
    """What a worker needs from the store."""

    def admit(self, actor_id: int, n: int, wait_s: float = 0.0) -> list[int] | None:
        """Up to `n` new group ids this actor may start (waiting up to `wait_s` for room); None once the run stops."""
        ...

    def put_many(self, groups: list[tuple[GroupMeta, GroupTensors]]) -> None: ...

    def drop(self, group_id: int, reason: str, samples: int, row: int | None = None) -> None:
        """A started group that will not be trained, and why (counted, and a ledger event)."""
        ...

    # with data.curation=difficulty (the in-memory and Ray stores have them)
    def plans(self, group_ids: list[int]) -> dict[int, dict[str, Any]]: ...

    def observe(self, outcomes: list[Any]) -> None: ...


@dataclass
class WorkerStats:
    groups: int = 0
    samples: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    idle_seconds: float = 0.0
    syncs: int = 0
    sync_seconds: float = 0.0
    last_sync_seconds: float = 0.0
    last_probe_error: float = 0.0
    last_sync_bytes: int = 0
    """Bytes of the last version loaded as published: the whole model, or under LoRA the adapters."""
    sync_rebuilds: int = 0
    sync_failures: int = 0
    score_seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    env_errors: dict[str, int] = field(default_factory=dict)
    """Environment exceptions by type (reset or step)."""
    outcomes: dict[str, int] = field(default_factory=dict)
    """Steps by the `info["outcome"]` the environment reported, where it reports one (the code tasks'
    sandbox outcomes: ok, syntax, error, timeout, memory, output, refused, ...)."""
    judged: int = 0
    """Samples scored by the model judge."""
    truncated: dict[str, int] = field(default_factory=dict)
    """Episodes ended at a limit (max_turns, max_tokens), kept with the rewards of the turns they took."""
    failure_reports: list[dict[str, Any]] = field(default_factory=list)
    """The first occurrences of each (environment, exception type): row and traceback, for the run's log."""
    replayed: int = 0
    """data.curation=difficulty: groups that got a kept successful trajectory of their row mixed in."""
    spo_cuts: int = 0
    """SPO: segment cuts branched from, and the branch episodes run from them (dropped ones among them)."""
    spo_branches: int = 0
    spo_branches_dropped: int = 0
    spo_branch_tokens: int = 0
    """Tokens the branches generated (also in `generated_tokens`)."""
    spo_unbranchable: int = 0
    """Cuts left out: the episode kept no copy of its state for that turn."""
    agent_generate_seconds: dict[str, float] = field(default_factory=dict)
    """A multi-agent environment's engine time by agent: each call's (or poll's) time shared by the
    episodes it generated for (the rollout load per agent, beside `agents/<name>/tokens`)."""
    peak_rss_mb: float = 0.0
    """The rollout process's peak resident memory so far (`peak_rss_mb`), set when stats are read."""


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (`ru_maxrss`: KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class FailureLog:
    """Keeps the first `first` failures per key in full, and counts all of them."""

    def __init__(self, counts: dict[str, int], reports: list[dict[str, Any]], first: int = 3) -> None:
        self.counts, self.reports, self.first = counts, reports, first

    def record(self, env: str, where: str, row: Any, error: BaseException) -> None:
        kind = type(error).__name__
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= self.first:
            self.reports.append({
                "env": env, "where": where, "error": kind, "occurrence": self.counts[kind],
                "row": repr(row)[:500], "traceback": "".join(traceback.format_exception(error))[-3000:],
            })

    @contextmanager
    def aside(self) -> Iterator[None]:
        """Failures recorded meanwhile go to counters of their own, dropped afterwards (an evaluation's
        environment failures are its own result, not the run's counters)."""
        kept = self.counts, self.reports
        self.counts, self.reports = {}, []
        try:
            yield
        finally:
            self.counts, self.reports = kept
