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
    {"event": "trained",  "group": int, "row": int, "actor": int, "version": int, "step": int, "tokens": int}
        trained at learner version `version` by the optimizer step that made `step` = version + 1;
        `tokens`: the generated tokens its rollout actor counted (optional in older ledgers).
    {"event": "dropped",  "group": int, "row": int | null, "reason": str}
        never trained (env_error, prompt_too_long, nonfinite_reward, too_few_samples,
        filtered, stale, run_end, nonfinite_step, critic_warmup, ...).
    {"event": "step",     "step": int, "version": int, "updated": bool, "groups": [[int, int], ...]}
        the learner's own account of optimizer step `step`: the (group id, tokens) pairs read off the
        tensors its loss was computed on, and whether the policy moved.

Separate policies (agents.policies=separate) train each group once, each on its own agents' tokens:
a "trained" event adds `"policies": {policy: tokens}`, the tokens of each policy that trained on
the group (its agents' generated tokens, as the rollout counted them), and every policy's learner
gives its own "step" report with `"policy": name`. Each policy's report is reconciled with the
tokens the trained events give that policy, so a policy that trained on another agent's rows
breaks the check.
    {"event": "run",      "version": int, "resumed": bool}
        a run (or a resume) started; only reported.
    {"event": "rollback", "offset": int, "step": int, "from_step": int, "reason": str}
        the run restored its last checkpoint (at version `step`) after losing an actor it cannot
        replace (a learner rank, the critic, the store): every event from byte `offset` (the
        checkpoint's `Ledger.offset()`) up to this line is undone, and steps step+1..from_step
        are redone after it. The undone lines stay in the file, so the ledger shows what was lost
        and redone; the check reads the run as if they had not happened.

The check is independent where it matters: "trained" says what the controller
handed over, "step" what the learner's tensors held. A step whose learner
report lacks a group, holds one the controller did not send, counts other
tokens for it, or did not move the policy while groups are recorded as
trained there, is a violation.

A checkpoint records `Ledger.offset()`; a resume `truncate()`s back to it, since
the resumed run redoes (and re-logs) everything after the checkpoint. A recovery
inside a run does not truncate: it appends a "rollback" event instead.
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
    "step": ("step", "version", "updated", "groups"),
    "run": ("version", "resumed"),
    "rollback": ("offset", "step", "from_step", "reason"),
}
TYPES: dict[str, type | tuple[type, ...]] = {
    "group": int, "row": (int, type(None)), "actor": int, "version": int, "step": int, "reason": str, "resumed": bool,
    "updated": bool, "groups": list, "tokens": int, "offset": int, "from_step": int,
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
    rollbacks: int = 0  # in-run recoveries from a checkpoint
    undone: int = 0  # events a rollback undid
    redone_steps: int = 0  # optimizer steps a rollback undid (redone after it)
    steps_checked: int = 0  # optimizer steps whose learner report was reconciled with the trained events
    violations: list[Violation] = field(default_factory=list)  # the first KEEP_VIOLATIONS
    violation_count: int = 0  # all of them

    @property
    def ok(self) -> bool:
        return self.violation_count == 0

    def add(self, group: int | None, message: str) -> None:
        self.violation_count += 1
        if len(self.violations) < KEEP_VIOLATIONS:
            self.violations.append(Violation(group, message))


def reconcile(events: Iterable[Any], allow_open: bool = False) -> Reconciliation:
    """Walk each group's events in order through the state machine (REFUSED), then check ids and the
    learner's reports. A rollback's offset counts the bytes `Ledger.write` would have written."""
    rec, numbered, offset = Reconciliation(), [], 0
    for line, event in enumerate(events, 1):
        numbered.append((line, offset, event))
        offset += len(json.dumps(event).encode()) + 1
    _walk(rec, _rolled_back(rec, numbered), allow_open)
    return rec


def _rolled_back(rec: Reconciliation, numbered: list[tuple[int, int, Any]]) -> list[tuple[int, Any]]:
    """(line, event) pairs with what each rollback undid left out: the events from its offset to it."""
    kept: list[tuple[int, int, Any]] = []
    starts = {offset for _, offset, _ in numbered}  # where lines begin: the offsets a checkpoint can record
    for line, offset, event in numbered:
        if isinstance(event, dict) and event.get("event") == "rollback":
            bad = [k for k in FIELDS["rollback"] if not isinstance(event.get(k), TYPES[k])]
            if bad or not 0 <= event["offset"] <= offset:
                rec.add(None, f"line {line}: rollback event with missing, mistyped or impossible {bad or ['offset']}")
                continue
            if event["offset"] not in starts:
                rec.add(None, f"line {line}: rollback to offset {event['offset']}, which is not a line boundary")
            undone = [e for e in kept if e[1] >= event["offset"]]
            kept = kept[: len(kept) - len(undone)]
            rec.rollbacks += 1
            rec.undone += len(undone)
            rec.redone_steps += max(0, event["from_step"] - event["step"])
            continue
        kept.append((line, offset, event))
    return [(line, event) for line, _, event in kept]


def _walk(rec: Reconciliation, numbered: Iterable[tuple[int, Any]], allow_open: bool) -> None:
    state: dict[int, str] = {}
    drop_reason: dict[int, str] = {}
    issued: set[int] = set()
    requeued: Counter[str] = Counter()
    # (step, policy or None) -> {group: tokens its rollout counted for it (None: not recorded)}
    per_step: dict[tuple[int, str | None], dict[int, int | None]] = {}
    reports: dict[tuple[int, str | None], dict[str, Any]] = {}  # (step, policy or None) -> the learner's "step" event
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
        if kind == "step":
            key = (ev["step"], ev.get("policy"))
            if key in reports:
                rec.add(None, f"line {line}: a second learner report for step {_name(key)}")
            reports[key] = ev
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
        elif isinstance(ev.get("policies"), dict):  # separate policies: each one's share of the group
            for policy, tokens in ev["policies"].items():
                per_step.setdefault((ev["step"], policy), {})[gid] = tokens if isinstance(tokens, int) else None
        else:
            per_step.setdefault((ev["step"], None), {})[gid] = ev["tokens"] if isinstance(ev.get("tokens"), int) else None
        if kind == "trained":
            if ev["step"] != ev["version"] + 1:
                rec.add(gid, f"trained at version {ev['version']} by step {ev['step']}, not version + 1 (line {line})")
    _check_ids(rec, issued)
    for gid in sorted(g for g, s in state.items() if s in ("issued", "requeued")):
        rec.open += 1
        if not allow_open:
            rec.add(gid, f"open: {state[gid]} but never trained or dropped")
    if reports:  # ledgers written before learners reported their steps have none
        _check_steps(rec, per_step, reports)
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


def _name(key: tuple[int, str | None]) -> str:
    step, policy = key
    return f"{step}" if policy is None else f"{step} (policy {policy})"


def _check_steps(rec: Reconciliation, per_step: dict[tuple[int, str | None], dict[int, int | None]],
                 reports: dict[tuple[int, str | None], dict[str, Any]]) -> None:
    """Each step's trained events (what the controller handed the learner) against the learner's report
    (what its tensors held), group by group and token count by token count; per policy where the
    policies are separate."""
    order = lambda k: (k[0], k[1] or "")  # noqa: E731
    for key in sorted(per_step.keys() - reports.keys(), key=order):
        rec.add(None, f"step {_name(key)}: {len(per_step[key])} groups recorded as trained, but no learner report for the step")
    rec.steps_checked += len({step for step, _ in reports})
    for key in sorted(reports, key=order):
        step = _name(key)
        report, sent = reports[key], per_step.get(key, {})
        if not report["updated"]:
            for gid in sorted(sent):
                rec.add(gid, f"recorded as trained at step {step}, where the learner did not move the policy")
            continue
        try:
            learned = {int(g): int(t) for g, t in report["groups"]}
        except (TypeError, ValueError):
            rec.add(None, f"step {step}: a learner report whose groups are not [group, tokens] pairs")
            continue
        for gid in sorted(sent.keys() - learned.keys()):
            rec.add(gid, f"recorded as trained at step {step}, but the learner's tensors at that step hold no row of it")
        for gid in sorted(learned.keys() - sent.keys()):
            rec.add(gid, f"the learner trained on it at step {step}, which the ledger does not record as trained there")
        for gid in sorted(sent.keys() & learned.keys()):
            if sent[gid] is not None and sent[gid] != learned[gid]:
                rec.add(gid, f"step {step}: its rollout counted {sent[gid]} tokens, the learner trained on {learned[gid]}")


def check_run(run_dir: Path, allow_open: bool = False) -> Reconciliation:
    """Reconcile RUN_DIR/ledger.jsonl."""
    path = Path(run_dir) / "ledger.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no ledger: {path}")
    rec, numbered = Reconciliation(), []
    for line, offset, text, event in _read_jsonl(path):
        if event is None:
            rec.add(None, f"line {line}: unparseable: {text[:80]!r}")
        else:
            numbered.append((line, offset, event))
    _walk(rec, _rolled_back(rec, numbered), allow_open)
    return rec


def _read_jsonl(path: Path) -> Iterator[tuple[int, int, str, Any]]:
    """(line number, byte offset of its start, text, parsed value or None where it does not parse)."""
    offset = 0
    for line, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        start, offset = offset, offset + len(raw) + 1
        if not raw:
            continue
        text = raw.decode(errors="replace")
        try:
            yield line, start, text, json.loads(text)
        except json.JSONDecodeError:
            yield line, start, text, None


def format_report(rec: Reconciliation) -> str:
    def counts(c: dict[str, int]) -> str:
        return " (" + ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) + ")" if c else ""

    head = (
        f"ledger: {rec.issued} groups issued, {rec.trained} trained, {sum(rec.dropped.values())} dropped{counts(rec.dropped)}, "
        f"{sum(rec.requeued.values())} re-issued{counts(rec.requeued)}, {rec.open} open"
    )
    lines = [head + (" — reconciled" if rec.ok else f" — NOT reconciled: {rec.violation_count} violations")]
    lines.append(f"  {rec.runs} run markers ({rec.resumes} resumes), {rec.steps_checked} learner steps reconciled with what they trained on")
    if rec.rollbacks:
        lines.append(f"  {rec.rollbacks} recoveries from a checkpoint: {rec.undone} events undone, {rec.redone_steps} steps redone")
    lines += [f"  {v}" for v in rec.violations[:10]]
    if rec.violation_count > 10:
        lines.append(f"  ... and {rec.violation_count - 10} more")
    return "\n".join(lines)
