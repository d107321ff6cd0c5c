"""What the sandbox probes share: a wrong `add` that attacks from inside, run through the sandbox's own runner.

`add` never returns a sum, so any test it passed would be a forgery: every probe checks the reward is 0, and
that the attack was blocked (the outcome, what `add` returned, or the host side: no file, no connection).
"""

from __future__ import annotations

import textwrap

import pytest

from rlhub import sandbox
from rlhub.sandbox import Limits, SandboxResult, plan_test

SECRET = "7f3a9c1e5b"
"""What the host's secret file holds: no process id, path or number of the run can contain it by chance."""

TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(5, 4) == 9"]
FAST = Limits(timeout_s=3.0, cpu_s=2, memory_mb=256, output_kb=64, disk_mb=2, files=64)
LAYERS = frozenset(sandbox.check_isolation("best_effort"))
"""The kernel layers this machine applies (CI runs on the same kind of machine: all of them)."""


def needs(*layers: str) -> pytest.MarkDecorator:
    """Skip where a layer the probe relies on does not apply here."""
    missing = [name for name in layers if not any(layer.startswith(name) for layer in LAYERS)]
    return pytest.mark.skipif(bool(missing), reason=f"the kernel layers {missing} do not apply on this machine")


def attempt(action: str, prelude: str = "") -> str:
    """Source whose `add` runs `action` and returns what happened ('done', or 'blocked: <exception> <errno> <message>')."""
    return (f"{prelude}\ndef add(a, b):\n    try:\n{textwrap.indent(textwrap.dedent(action), ' ' * 8)}\n"
            f"        return 'done'\n    except BaseException as e:\n"
            f"        return 'blocked: ' + type(e).__name__ + ' ' + str(getattr(e, 'errno', '')) + ' ' + str(e)[-60:]\n")


def score(source: str, *, audit: bool = True, skip: tuple[str, ...] = (), limits: Limits = FAST,
          isolation: str = "best_effort", roots: tuple[str, ...] = (), tests: list[str] = TESTS) -> SandboxResult:
    """The sandbox's result for `source`; `audit=False` leaves the audit hook out, `skip` kernel layers."""
    plans = [plan_test(t, "add") for t in tests]
    return sandbox._run(source, tests, plans, "add", limits, isolation, _audit=audit, _pretend_missing=skip,
                        _read_roots=roots)


def zero(result: SandboxResult) -> SandboxResult:
    assert (result.passed, result.fraction) == (0, 0.0), result
    return result


def refused(result: SandboxResult, event: str = "") -> SandboxResult:
    assert result.outcome == "refused" and event in result.detail, result
    return zero(result)


def blocked(result: SandboxResult, *reasons: str) -> SandboxResult:
    """No refusal (the hook was left out, or the kernel answered first): `add` saw the attack fail."""
    assert result.outcome == "ok" and "blocked:" in result.detail and "done" not in result.detail, result
    assert not reasons or any(r in result.detail for r in reasons), result
    return zero(result)
