"""The exactly-once ledger: every group's life, one JSON line per event, checked after the run.

The store's counters say how many groups went where; the ledger says which ones,
so `rlhub check RUN_DIR` can prove that every handed-out group was trained
exactly once or dropped with a reason, across actor crashes and resumes.
RUN_DIR/ledger.jsonl holds one object per line:

    {"event": "issued",   "group": int, "row": int, "actor": int, "version": int}
        handed to a rollout actor (row: dataset row; version: learner version then).
        A group is issued again only after a "requeued".
    {"event": "requeued", "group": int, "reason": str}
        a handed-out group that will be started again (actor_crash, lost_object, resume).
    {"event": "trained",  "group": int, "row": int, "actor": int, "version": int, "step": int}
        trained at learner version `version` by the optimizer step that made `step` = version + 1.
    {"event": "dropped",  "group": int, "row": int | null, "reason": str}
        never trained (env_error, prompt_too_long, nonfinite_reward, too_few_samples,
        filtered, stale, run_end, nonfinite_step, ...).
    {"event": "run",      "version": int, "resumed": bool}
        a run (or a resume) started; only reported.

A checkpoint records `Ledger.offset()`; a resume `truncate()`s back to it, since
the resumed run redoes (and re-logs) everything after the checkpoint.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Iterable, Iterator

KEEP_VIOLATIONS = 20
FIELDS: dict[str, tuple[str, ...]] = {
    "issued": ("group", "row", "actor", "version"),
    "requeued": ("group", "reason"),
    "trained": ("group", "row", "actor", "version", "step"),
    "dropped": ("group", "row", "reason"),
    "run": ("version", "resumed"),
}
TYPES: dict[str, type | tuple[type, ...]] = {
    "group": int, "row": (int, type(None)), "actor": int, "version": int, "step": int, "reason": str, "resumed": bool,
}
# The state machine, by its refusals: (event, state before) -> violation; any pair not here is allowed.
# States are None (never seen), "issued", "requeued", "trained", "dropped".
# A drop is an outcome: a requeue after it is refused like a requeue after training.
REFUSED: dict[tuple[str, str | None], str] = {
    ("issued", "issued"): "issued twice without a requeue",
    ("issued", "dropped"): "issued twice without a requeue",
    ("issued", "trained"): "trained, then re-issued: would train twice",
    ("requeued", None): "requeued but never issued",
    ("requeued", "dropped"): "dropped, then re-issued",
    ("requeued", "trained"): "trained, then re-issued: would train twice",
    ("trained", None): "trained without issued",
    ("trained", "requeued"): "trained while requeued, before being issued again",
    ("trained", "trained"): "trained twice",
    ("trained", "dropped"): "trained after dropped",
    ("dropped", None): "dropped without issued",
    ("dropped", "trained"): "dropped after trained",
    ("dropped", "dropped"): "dropped twice",
}


class Ledger:
    """Append-only writer of ledger.jsonl; each `write` is one flush and one fsync."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")

    def write(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        self._file.write(b"".join(json.dumps(e).encode() + b"\n" for e in events))
        self._file.flush()
        os.fsync(self._file.fileno())

    def offset(self) -> int:
        """Bytes written so far (the file's size): what a checkpoint records."""
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def truncate(path: Path | str, offset: int) -> None:
    """Cut the ledger back to `offset` bytes (a checkpoint's `Ledger.offset()`)."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    if offset < 0 or offset > size:
        raise ValueError(f"cannot truncate ledger {path} ({size} bytes) to offset {offset}")
    if not path.exists():
        return
    with open(path, "r+b") as f:
        if offset > 0:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                raise ValueError(f"offset {offset} is not at a line boundary of ledger {path} ({size} bytes)")
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Violation:
    group: int | None
    message: str

    def __str__(self) -> str:
        return self.message if self.group is None else f"group {self.group}: {self.message}"


@dataclass
class Reconciliation:
    """What the ledger says happened, and every way it breaks exactly-once."""

    issued: int = 0  # distinct group ids
    trained: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # groups whose outcome is a drop, by reason
    requeued: dict[str, int] = field(default_factory=dict)  # requeue events (re-issues), by reason
    open: int = 0  # groups still issued or requeued at the end
    runs: int = 0  # "run" markers, of which `resumes` resumed
    resumes: int = 0
    steps_checked: int = 0  # metrics steps whose "train/groups" was compared
    violations: list[Violation] = field(default_factory=list)  # the first KEEP_VIOLATIONS
    violation_count: int = 0  # all of them

    @property
    def ok(self) -> bool:
        return self.violation_count == 0

    def add(self, group: int | None, message: str) -> None:
        self.violation_count += 1
        if len(self.violations) < KEEP_VIOLATIONS:
            self.violations.append(Violation(group, message))


def reconcile(events: Iterable[Any], metrics_rows: list[dict[str, Any]] | None = None, allow_open: bool = False) -> Reconciliation:
    """Walk each group's events in order through the state machine (REFUSED), then check ids and metrics."""
    rec = Reconciliation()
    _walk(rec, enumerate(events, 1), metrics_rows, allow_open)
    return rec


def _walk(rec: Reconciliation, numbered: Iterable[tuple[int, Any]], metrics_rows: list[dict[str, Any]] | None, allow_open: bool) -> None:
    state: dict[int, str] = {}
    drop_reason: dict[int, str] = {}
    issued: set[int] = set()
    requeued: Counter[str] = Counter()
    per_step: Counter[int] = Counter()
    for line, ev in numbered:
        kind = ev.get("event") if isinstance(ev, dict) else None
        if kind not in FIELDS:
            rec.add(None, f"line {line}: not a ledger event: {str(ev)[:80]}")
            continue
        bad = [k for k in FIELDS[kind] if k not in ev or not isinstance(ev[k], TYPES[k])]
        if bad:
            rec.add(None, f"line {line}: {kind} event with missing or mistyped {bad}")
            continue
        if kind == "run":
            rec.runs += 1
            rec.resumes += bool(ev["resumed"])
            continue
        gid, before = ev["group"], state.get(ev["group"])
        if (kind, before) in REFUSED:
            rec.add(gid, f"{REFUSED[kind, before]} (line {line})")
        if before != "trained":  # trained is final: a later event cannot hide a second training
            state[gid] = kind
        if kind == "issued":
            issued.add(gid)
        elif kind == "requeued":
            requeued[ev["reason"]] += 1
        elif kind == "dropped":
            drop_reason[gid] = ev["reason"]
        else:
            per_step[ev["step"]] += 1
            if ev["step"] != ev["version"] + 1:
                rec.add(gid, f"trained at version {ev['version']} by step {ev['step']}, not version + 1 (line {line})")
    _check_ids(rec, issued)
    for gid in sorted(g for g, s in state.items() if s in ("issued", "requeued")):
        rec.open += 1
        if not allow_open:
            rec.add(gid, f"open: {state[gid]} but never trained or dropped")
    if metrics_rows is not None:
        _check_metrics(rec, per_step, metrics_rows)
    rec.issued = len(issued)
    rec.trained = sum(s == "trained" for s in state.values())
    rec.dropped = dict(Counter(drop_reason[g] for g, s in state.items() if s == "dropped"))
    rec.requeued = dict(requeued)


def _check_ids(rec: Reconciliation, issued: set[int]) -> None:
    """Ids are handed out from a cursor, so the issued ones must be exactly 0..max."""
    missing = sorted(set(range(max(issued, default=-1) + 1)) - issued)
    for _, run in groupby(enumerate(missing), key=lambda p: p[1] - p[0]):  # consecutive ids share i - gid
        ids = [gid for _, gid in run]
        rec.add(ids[0], f"id gap: groups {ids[0]}..{ids[-1]} never issued (a handed-out id was not recorded)")


def _check_metrics(rec: Reconciliation, per_step: Counter[int], metrics_rows: list[dict[str, Any]]) -> None:
    """An independent count: each step's "train/groups" in metrics.jsonl against the ledger's trained events."""
    # a resumed run logs a step again (last wins); rows without train/groups (the final evaluation) are not steps
    logged = {row["step"]: row for row in metrics_rows if "step" in row and "train/groups" in row}
    for step in sorted(logged.keys() & per_step.keys()):
        rec.steps_checked += 1
        if logged[step]["train/groups"] != per_step[step]:
            rec.add(None, f"metrics mismatch at step {step}: train/groups={logged[step]['train/groups']}, ledger trained {per_step[step]}")


def check_run(run_dir: Path, allow_open: bool = False) -> Reconciliation:
    """Reconcile RUN_DIR/ledger.jsonl, cross-checked with RUN_DIR/metrics.jsonl when there is one."""
    path, metrics = Path(run_dir) / "ledger.jsonl", Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no ledger: {path}")
    rec, numbered = Reconciliation(), []
    for line, text, event in _read_jsonl(path):
        if event is None:
            rec.add(None, f"line {line}: unparseable: {text[:80]!r}")
        else:
            numbered.append((line, event))
    # metrics lines that do not parse are skipped: a run killed mid-write leaves a torn last line
    rows = [row for _, _, row in _read_jsonl(metrics) if isinstance(row, dict)] if metrics.is_file() else None
    _walk(rec, numbered, rows, allow_open)
    return rec


def _read_jsonl(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, text, parsed value or None where it does not parse)."""
    for line, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            yield line, text, json.loads(text)
        except json.JSONDecodeError:
            yield line, text, None


def format_report(rec: Reconciliation) -> str:
    def counts(c: dict[str, int]) -> str:
        return " (" + ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) + ")" if c else ""

    head = (
        f"ledger: {rec.issued} groups issued, {rec.trained} trained, {sum(rec.dropped.values())} dropped{counts(rec.dropped)}, "
        f"{sum(rec.requeued.values())} re-issued{counts(rec.requeued)}, {rec.open} open"
    )
    lines = [head + (" — reconciled" if rec.ok else f" — NOT reconciled: {rec.violation_count} violations")]
    lines.append(f"  {rec.runs} run markers ({rec.resumes} resumes), {rec.steps_checked} metrics steps cross-checked")
    lines += [f"  {v}" for v in rec.violations[:10]]
    if rec.violation_count > 10:
        lines.append(f"  ... and {rec.violation_count - 10} more")
    return "\n".join(lines)
