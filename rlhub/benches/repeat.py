"""Figures that reproduce: a benchmark run several times on a quiet machine, each number the median of its runs with the range.

    rlhub bench NAME [--runs N] [--max-load L] [--settle-s S] [the benchmark's own arguments]

- **Quiet.** Before each run the 1-minute load average is read every `POLL_S` seconds until it is at
  most L, or S seconds have passed. L defaults to half the cores (1.0 on a 2-core machine: one other
  process holding a core keeps the load at 1 and above); S to 240 (the load a 2-core run leaves behind
  falls below 1.0 within about a minute and a half). A run whose load was still above L when it
  started is marked `busy`: it runs and is kept in `runs`, but its numbers are left out of the
  figures. The load after each run is recorded beside it (that one includes the run's own work).
- **Median and range.** Every number of the result is the median over the quiet runs, and
  `spread` maps its path (keys joined by "/") to [min, max] where the runs differ. Lists of equal
  length are taken element by element (a bench returns its rows in one order whatever order it ran
  them in), anything else (text, lists that differ in length) is the first quiet run's. A number
  that is null in some runs (a success level not reached) is the median of the others when most runs
  have it, else null. Ratios are computed inside each run, so the median ratio is the median of
  same-run ratios.
- **Alternated.** A benchmark whose `run` takes `run_index` is told which run this is and
  alternates its sides by it (peer: TRL first in even runs, rlhub first in odd ones; engine: its
  engines in the reverse order in odd runs; e2e: the staleness runs likewise).

`DEFAULT_RUNS` says which benchmarks take three runs unless told (those comparing sides run as
wholes, and a whole training run); the others measure their own repetitions inside one run
(learner: median of alternated steps) and default to one.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

POLL_S = 5.0
DEFAULT_SETTLE_S = 240.0
DEFAULT_RUNS = {"peer": 3, "e2e": 3, "engine": 3, "train": 3, "budget": 3}


def default_max_load() -> float:
    return (os.cpu_count() or 2) / 2


@dataclass
class RepeatOptions:
    runs: int
    max_load: float
    settle_s: float


def split_args(name: str, args: list[str]) -> tuple[RepeatOptions, list[str]]:
    """(the repeat options, the benchmark's own arguments); ValueError naming a bad value."""
    opts = RepeatOptions(DEFAULT_RUNS.get(name, 1), default_max_load(), DEFAULT_SETTLE_S)
    rest: list[str] = []
    flags = {"--runs": ("runs", int), "--max-load": ("max_load", float), "--settle-s": ("settle_s", float)}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag in flags:
            if not eq:
                if i + 1 >= len(args):
                    raise ValueError(f"{flag} needs a value")
                i, value = i + 1, args[i + 1]
            field, kind = flags[flag]
            try:
                setattr(opts, field, kind(value))
            except ValueError:
                raise ValueError(f"{flag}={value!r} is not a {kind.__name__}") from None
        else:
            rest.append(args[i])
        i += 1
    if opts.runs < 1:
        raise ValueError(f"--runs={opts.runs}: at least 1")
    if opts.max_load <= 0 or opts.settle_s < 0:
        raise ValueError(f"--max-load={opts.max_load} must be > 0 and --settle-s={opts.settle_s} >= 0")
    return opts, rest


def wait_quiet(max_load: float, settle_s: float, load: Callable[[], float] = lambda: os.getloadavg()[0],
               sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Wait until the 1-minute load is at most `max_load` or `settle_s` have passed: {load_before, waited_s, busy}."""
    waited = 0.0
    current = load()
    while current > max_load and waited < settle_s:
        step = min(POLL_S, settle_s - waited)
        sleep(step)
        waited += step
        current = load()
    return {"load_before": round(current, 2), "waited_s": round(waited, 1), "busy": current > max_load}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def combine(results: list[Any], path: str = "", spread: dict[str, list[float]] | None = None) -> tuple[Any, dict[str, list[float]]]:
    """(the median result of `results`, {path: [min, max]} of the numbers that differ): see the module docstring."""
    spread = {} if spread is None else spread
    first = results[0]
    if all(isinstance(r, dict) for r in results):
        out = {}
        for key, value in first.items():
            if all(key in r for r in results):
                out[key] = combine([r[key] for r in results], f"{path}/{key}" if path else str(key), spread)[0]
            else:
                out[key] = value
        return out, spread
    if all(isinstance(r, list) for r in results) and len({len(r) for r in results}) == 1:
        return [combine([r[i] for r in results], f"{path}/{i}", spread)[0] for i in range(len(first))], spread
    numbers = [r for r in results if _number(r)]
    if numbers and all(_number(r) or r is None for r in results):
        if 2 * len(numbers) <= len(results) and len(numbers) < len(results):
            return None, spread  # most runs did not get there
        lo, hi = min(numbers), max(numbers)
        if lo != hi:
            spread[path] = [lo, hi]
        median = statistics.median(numbers)
        return (int(median) if all(isinstance(r, int) for r in numbers) and median == int(median) else median), spread
    return first, spread


def repeated(run: Callable[..., dict[str, Any]], args: list[str], opts: RepeatOptions,
             quiet: Callable[[float, float], dict[str, Any]] = wait_quiet) -> dict[str, Any]:
    """`run(args)` `opts.runs` times, each after `quiet`; the median result with `spread` and `repeat` (every run's load)."""
    alternates = "run_index" in inspect.signature(run).parameters
    results, meta = [], []
    for index in range(opts.runs):
        state = quiet(opts.max_load, opts.settle_s)
        start = time.perf_counter()
        result = run(args, run_index=index) if alternates else run(args)
        state.update(index=index, seconds=round(time.perf_counter() - start, 1), load_after=round(os.getloadavg()[0], 2))
        meta.append(state)
        results.append((state["busy"], result))
    used = [r for busy, r in results if not busy]
    combined, spread = combine(used) if used else (results[0][1], {})
    return {**combined, "spread": spread,
            "repeat": {"runs": meta, "quiet_runs": len(used), "max_load": opts.max_load, "settle_s": opts.settle_s,
                       "alternated": alternates, "cores": os.cpu_count(),
                       "note": None if used else "every run started above the load limit: these numbers are the first run's, not a figure"}}
