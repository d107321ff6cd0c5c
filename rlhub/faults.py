"""Fault injection: kill (or freeze) one process of a running training run, by its process id, at a
chosen or random moment, then measure from the run's own records how long it took to train again.

A run lists its processes by role in `run_dir/processes.json` ("driver", "learner rank 0",
"rollout actor 1", "store shard 0", "store coordinator", "critic", "reference", "judge",
"weight registry"), written at start and again whenever it replaces one. `inject` waits until the
run has recorded a given step, picks the target (a role, or a kind such as "rollout actor" for a
random one of them), and sends it SIGKILL (`how="kill"`) or SIGSTOP (`how="stop"`: a process that
hangs without dying), or hangs one of a rollout actor's engine calls or environment steps while the
rest of it lives on (`hang-engine`, `hang-env`). Every metrics row carries `time/unix`, so `recovery` can say, from
metrics.jsonl alone, when the first step after the fault was recorded (`resumed_s`) and when the run
got past the step it had reached when the fault came (`caught_up_s`; a recovery from a checkpoint
redoes the steps after it first).

`rlhub fault RUN_DIR TARGET --at-step N [--delay S] [--signal kill|stop] [--wait]` is the command;
tests/integration/test_faults.py drives it against real runs, one fault kind at a time, and the
README's table of faults comes from their records (`table`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KINDS = ("driver", "learner rank", "rollout actor", "store shard", "store coordinator", "weight registry", "critic", "reference", "judge")


@dataclass
class Fault:
    target: str
    """The role hit, as processes.json names it."""
    pid: int
    how: str
    """One of `HOW`."""
    at_step: int
    """The last step the run had recorded when the fault came."""
    time: float
    """When the signal was sent (time.time())."""


def processes(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The run's processes by role (run_dir/processes.json); {} before the run has written it."""
    path = Path(run_dir) / "processes.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def pick(found: dict[str, dict[str, Any]], target: str, rng: random.Random) -> tuple[str, int]:
    """(role, pid) for `target`: a role exactly, or a kind ("rollout actor", "store shard") for a
    random one of that kind. A target the run does not have is named with what it does have."""
    if target in found:
        return target, int(found[target]["pid"])
    matches = sorted(role for role in found if f" {target} " in f" {role} ")
    if not matches:
        raise ValueError(f"no process {target!r} in this run; it has: {', '.join(sorted(found)) or 'none yet'}")
    role = rng.choice(matches)
    return role, int(found[role]["pid"])


def last_step(run_dir: Path) -> int:
    """The highest step metrics.jsonl holds (0 before the first)."""
    path = Path(run_dir) / "metrics.jsonl"
    best = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                best = max(best, int(json.loads(line).get("step", 0)))
            except (json.JSONDecodeError, TypeError, ValueError):  # a torn line of a killed run
                continue
    return best


def wait_for_step(run_dir: Path, step: int, timeout_s: float, alive: Any = None) -> int:
    """Wait until the run has recorded `step`; returns the step reached. Raises TimeoutError after
    `timeout_s`, or RuntimeError when `alive()` (the run's process, say) turns false first."""
    deadline = time.monotonic() + timeout_s
    while (reached := last_step(run_dir)) < step:
        if alive is not None and not alive():
            raise RuntimeError(f"the run ended before recording step {step} (it reached {reached})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run did not record step {step} within {timeout_s:.0f} s (it reached {reached})")
        time.sleep(0.1)
    return reached


HOW = ("kill", "stop", "hang-engine", "hang-env")
"""kill: SIGKILL; stop: SIGSTOP (the whole process hangs); hang-engine, hang-env (a rollout actor only):
its next engine call, or its next `count` environment steps, never return while the process lives on."""


def inject(run_dir: Path, target: str, at_step: int, how: str = "kill", delay_s: float = 0.0, seed: int | None = None,
           timeout_s: float = 600.0, alive: Any = None, count: int = 1) -> Fault:
    """Once the run has recorded `at_step` (and `delay_s` more seconds passed), send the target's process
    SIGKILL or SIGSTOP, or leave the trigger that hangs a rollout actor's engine or environment calls
    (run_dir/faults/hang-engine-<actor>, hang-env-<actor>: the actor reads them). The role is looked up
    just before, so a process the run replaced meanwhile is the one hit."""
    if how not in HOW:
        raise ValueError(f"how={how!r}: one of {', '.join(HOW)}")
    wait_for_step(run_dir, at_step, timeout_s, alive)
    time.sleep(delay_s)
    role, pid = pick(processes(run_dir), target, random.Random(seed))
    reached = last_step(run_dir)
    sent = time.time()
    if how.startswith("hang-"):
        if not role.startswith("rollout actor "):
            raise ValueError(f"{how} hangs a rollout actor's calls, not {role}'s")
        trigger = Path(run_dir) / "faults" / f"{how}-{role.split()[-1]}"
        trigger.parent.mkdir(exist_ok=True)
        trigger.write_text(str(count))
    else:
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    return Fault(role, pid, how, reached, sent)


def recovery(run_dir: Path, fault: Fault, recoveries: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """How the run went on after `fault`, from metrics.jsonl: seconds until it recorded a step again
    (`resumed_s`), and until it recorded a step past `fault.at_step` (`caught_up_s`); None where it
    never did. With the run's `recoveries` (summary.json), steps that were still on their way when the
    fault came and were recorded before the recovery ended are not counted as training again, and
    `detected_s` says when the run found the loss."""
    role = fault.target.removeprefix("the node of ").split()[0]  # "learner", "store", "critic", ...
    mine = [r for r in recoveries if r.get("at", 0) >= fault.time and role in r.get("lost", "")][:1]  # the recovery it caused, if any
    since = max([fault.time, *(r["done"] for r in mine if "done" in r)])
    rows = [r for r in _rows(Path(run_dir) / "metrics.jsonl") if (r.get("time/unix") or 0) > since]
    resumed = min((r["time/unix"] for r in rows), default=None)
    caught_up = min((r["time/unix"] for r in rows if r.get("step", 0) > fault.at_step), default=None)
    found = min((r["at"] for r in mine), default=None)
    return {**asdict(fault), "resumed_s": None if resumed is None else resumed - fault.time,
            "caught_up_s": None if caught_up is None else caught_up - fault.time,
            "detected_s": None if found is None else found - fault.time}


def _rows(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


RECORDS = Path(__file__).resolve().parents[1] / "bench" / "faults.jsonl"
"""The fault tests' records the README's table is made from (RLHUB_FAULT_RECORDS=FILE pytest tests/integration/test_faults.py)."""


def read_records(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The records of `path` (default `RECORDS`), the last one of each fault kind, in the order first seen."""
    out: dict[str, dict[str, Any]] = {}
    for r in _rows(Path(path) if path else RECORDS):
        out[r["fault"]] = r
    return list(out.values())


def table(records: list[dict[str, Any]]) -> list[str]:
    """The README's table of faults from the fault tests' records: each kind's fault, what rlhub
    does, and the seconds measured until training went on and caught up."""
    lines = ["| fault | what rlhub does | loss found after | training again after | past the step it hit after | recoveries in its run | ledger of its run |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['fault']} | {r['response']} | {_s(r.get('detected_s'))} | {_s(r.get('resumed_s'))} | "
                     f"{_s(r.get('caught_up_s'))} | {r.get('recoveries', 0)} | {r.get('ledger', '')} |")
    return lines


def _s(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.1f} s"
