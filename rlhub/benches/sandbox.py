"""`rlhub bench sandbox`: what one code reward costs, per completion, in `rlhub.sandbox`.

Times `run_tests` the way `python_code` calls it: a correct three-test `add`
judged outside the candidate's process (calls mode, the default), the same in
asserts mode (the tests run in the child: the forgeable way, for comparison),
and code the sandbox refuses (a socket). Each round runs `calls` completions
of each case, the cases taking turns within the round; the figure of a case is
the median over `rounds` of its mean milliseconds per call, with the range.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

CASES = {
    "calls": ("def add(a, b):\n    return a + b\n", "calls"),
    "asserts": ("def add(a, b):\n    return a + b\n", "asserts"),
    "refused": ("import socket\ntry:\n    socket.socket()\nexcept OSError:\n    pass\ndef add(a, b):\n    return a + b\n", "calls"),
}
TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(5, 4) == 9"]


def parse_args(args: list[str]) -> dict[str, int]:
    """calls=50 rounds=5; a ConfigError (the command's one-line error) for anything else."""
    from rlhub.config import ConfigError

    opts = {"calls": 50, "rounds": 5}
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in opts or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"bench sandbox: {arg!r}: use calls=N and rounds=N (N >= 1)")
        opts[key] = int(value)
    return opts


def run(args: list[str]) -> dict[str, Any]:
    from rlhub.sandbox import Limits, check_isolation, run_tests

    opts = parse_args(args)
    layers = check_isolation("best_effort")
    per_round: dict[str, list[float]] = {name: [] for name in CASES}
    outcomes: dict[str, str] = {}
    for _ in range(opts["rounds"]):
        for name, (source, mode) in CASES.items():
            start = time.perf_counter()
            for _ in range(opts["calls"]):
                result = run_tests(source, TESTS, "add", Limits(timeout_s=5.0, cpu_s=2), isolation="best_effort", mode=mode)
            per_round[name].append(1000 * (time.perf_counter() - start) / opts["calls"])
            outcomes[name] = f"{result.outcome} {result.passed}/{result.total}"
    return {
        "layers": list(layers),
        "calls_per_round": opts["calls"],
        "rounds": opts["rounds"],
        **{f"{name}_ms": {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in per_round.items()},
        "outcomes": outcomes,
    }
