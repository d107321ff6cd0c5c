"""The child's report, read as untrusted bytes, and the judgement of one call.

The grammar is `rlhub.sandbox.child`'s; anything that breaks it (a record out of order, a wrong type, a
value nested too deep, bytes after the end) makes the report malformed, which scores 0. Nothing here
raises on what the child wrote.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhub.sandbox.layers import missing as missing_layers
from rlhub.sandbox.layers import warn_missing
from rlhub.sandbox.plans import Failed, Iterated, Plan, passes

if TYPE_CHECKING:
    from rlhub.sandbox import Limits

LOAD_STATUSES = ("ok", "syntax", "error", "memory", "output", "isolation")
TEST_STATUSES = ("pass", "fail", "error", "memory", "output")
VALUE_CHARS = 1 << 16
"""The longest encoded output the child sends (longer: unencodable)."""


@dataclass
class _Report:
    """What the child reported, validated (see rlhub.sandbox.child for the grammar)."""

    layers: tuple[str, ...] | None = None
    load: tuple[str, str] | None = None
    outputs: list = None  # type: ignore[assignment] - decoded values, or Failed
    kinds: set = None  # type: ignore[assignment] - failure kinds of the calls: memory, output
    tests: list = None  # type: ignore[assignment] - (status, detail), asserts mode
    refused: str = ""
    ended: bool = False
    malformed: str = ""

    def __post_init__(self) -> None:
        self.outputs, self.kinds, self.tests = [], set(), []


class _Malformed(ValueError):
    pass


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _Malformed(what)


def parse(data: bytes, n_calls: int, n_tests: int) -> _Report:
    """The report, read as untrusted bytes: any break of the grammar sets `malformed` (scored 0), nothing raises."""
    report = _Report()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" after the last newline; else a record the child did not finish (it was killed)
    try:
        for line in lines:
            _take(report, json.loads(line), n_calls, n_tests)
        _require(not (tail and report.ended), "bytes after the end")
    except (ValueError, TypeError, RecursionError, OverflowError) as e:  # json's errors are ValueErrors
        report.malformed = f"the report is malformed: {type(e).__name__}: {str(e)[:100]}"
    return report


def _take(r: _Report, record: Any, n_calls: int, n_tests: int) -> None:
    _require(type(record) is list and len(record) > 0 and type(record[0]) is str, "a record is not a list")
    kind, args = record[0], record[1:]
    _require(not r.ended, "a record after the end")
    if kind == "refused":
        _require(len(args) == 2 and all(type(a) is str for a in args), "refused")
        r.refused = r.refused or " ".join(args)[:300]
    elif r.layers is None:
        _require(kind == "layers" and len(args) == 1 and type(args[0]) is list and len(args[0]) <= 16 and
                 all(type(x) is str and len(x) <= 32 for x in args[0]), "the layers come first")
        r.layers = tuple(args[0])
    elif kind == "load":
        _require(r.load is None and len(args) == 2 and args[0] in LOAD_STATUSES and type(args[1]) is str, "load")
        r.load = (args[0], args[1])
    elif kind == "call":
        _require(r.load is not None and r.load[0] == "ok" and len(args) >= 3 and type(args[0]) is int and
                 args[0] == len(r.outputs) < n_calls and args[1] in ("value", "raised", "unencodable"), "call")
        if args[1] == "value":
            _require(len(args) == 3, "call value")
            r.outputs.append(_decode(args[2], 0))
        elif args[1] == "raised":
            _require(len(args) == 4 and args[2] in ("error", "memory", "output") and type(args[3]) is str, "call raised")
            r.kinds.add(args[2])
            r.outputs.append(Failed(args[3][:300]))
        else:
            _require(len(args) == 3 and type(args[2]) is str, "call unencodable")
            r.outputs.append(Failed(f"the output is unencodable: {args[2][:100]}"))
    elif kind == "test":
        _require(r.load is not None and r.load[0] == "ok" and len(args) == 3 and type(args[0]) is int and
                 args[0] == len(r.tests) < n_tests and args[1] in TEST_STATUSES and type(args[2]) is str, "test")
        r.tests.append((args[1], args[2][:300]))
    elif kind == "end":
        _require(len(args) == 0 and r.load is not None, "end")
        _require(r.load[0] != "ok" or (len(r.outputs), len(r.tests)) == (n_calls, n_tests), "the report ends early")
        r.ended = True
    else:
        raise _Malformed(f"unknown record {kind[:20]!r}")


_SCALARS = {"none": type(None), "bool": bool, "int": int, "float": float, "str": str}
_CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "iter": lambda items: Iterated(tuple(items))}


def _decode(node: Any, depth: int) -> Any:
    """A tagged value (see rlhub.sandbox.child) as plain data, or _Malformed."""
    _require(type(node) is list and len(node) == 2 and type(node[0]) is str and depth <= 40, "a value is not [tag, payload]")
    tag, payload = node
    if tag in _SCALARS:
        _require(type(payload) is _SCALARS[tag], f"a {tag} value")
        return payload
    if tag == "bytes":
        _require(type(payload) is str, "a bytes value")
        return bytes.fromhex(payload)
    if tag in ("complex", "range"):
        _require(type(payload) is list and len(payload) == (2 if tag == "complex" else 3) and
                 all(type(x) is (float if tag == "complex" else int) for x in payload), f"a {tag} value")
        return complex(*payload) if tag == "complex" else range(*payload)
    _require(type(payload) is list, f"a {tag} value")
    if tag == "dict":
        _require(all(type(p) is list and len(p) == 2 for p in payload), "a dict value")
        return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in payload}
    _require(tag in _CONTAINERS, f"an unknown tag {tag[:20]!r}")
    return _CONTAINERS[tag](_decode(item, depth + 1) for item in payload)


def judge(r: _Report, plans: list[Plan] | None, total: int, isolation: str, returncode: int, timed_out: bool,
           overflow: bool, limits: Limits, output: str) -> tuple[int, str, str]:
    """(passed, outcome, detail). Tests pass only in a complete report; refusals, missing required layers and
    malformed reports score 0 whatever else was reported."""
    missing = missing_layers(r.layers or ())
    if missing and r.layers is not None and isolation == "best_effort":
        warn_missing(tuple(missing))
    load, detail = r.load or ("", "")
    if r.refused:
        return 0, "refused", r.refused
    if load == "isolation" or (r.layers is not None and missing and isolation == "required"):
        ran = "the child did not run the code" if load == "isolation" else "the code ran"
        return 0, "isolation", f"required layers did not apply ({ran}): {', '.join(missing)}"
    if r.malformed or overflow:
        return 0, "malformed", r.malformed or "the report is larger than its limit"
    if timed_out or returncode == -signal.SIGXCPU:
        return 0, "timeout", f"wall-clock limit {limits.timeout_s} s" if timed_out else f"CPU limit {limits.cpu_s} s"
    complete = r.ended and load == "ok"
    kinds = r.kinds | {status for status, _ in r.tests} | {load}
    passed, failure = 0, ""
    if complete and plans is not None:
        for plan, start in zip(plans, _offsets(plans)):
            ok, why = passes(plan, r.outputs[start:start + len(plan.calls)])
            passed += ok
            failure = failure or why
    elif complete:
        passed = sum(status == "pass" for status, _ in r.tests)
        failure = next((f"test {i}: {d or s}" for i, (s, d) in enumerate(r.tests) if s != "pass"), "")
    if "output" in kinds or returncode == -signal.SIGXFSZ:
        return passed, "output", f"output limit {limits.output_kb} KiB: {detail or failure}"
    if "memory" in kinds or (not r.ended and "MemoryError" in output):
        return passed, "memory", detail or failure or output
    if load == "syntax":
        return 0, "syntax", detail
    if not complete:
        return 0, "error", detail or f"the child exited with {returncode} before its report ended: {output}"
    return passed, "ok", failure


def _offsets(plans: list[Plan]) -> list[int]:
    starts, n = [], 0
    for plan in plans:
        starts.append(n)
        n += len(plan.calls)
    return starts
