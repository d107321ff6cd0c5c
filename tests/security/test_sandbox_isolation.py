"""Probes of the isolation policy: the required kernel layers, checked at start-up and in every call."""

from __future__ import annotations

import logging
import socket

import pytest
from sandbox_probe import LAYERS, needs, score, zero

from rlhub import sandbox
from rlhub.sandbox import REQUIRED_LAYERS, IsolationUnavailable, Limits, check_isolation, run_tests
from rlhub.sandbox import SandboxConfig

ALL_REQUIRED = needs(*REQUIRED_LAYERS)


@ALL_REQUIRED
def test_required_isolation_applies_here():
    layers = check_isolation("required")
    assert {"audit", "rlimits", "netns", "tmpfs", "nocaps", "seccomp"} <= set(layers)
    assert any(layer.startswith("landlock") for layer in layers)


@ALL_REQUIRED
@pytest.mark.parametrize("layer", REQUIRED_LAYERS)
def test_required_isolation_names_a_missing_layer(layer):
    with pytest.raises(IsolationUnavailable, match=f"{layer}: ") as raised:
        check_isolation("required", _pretend_missing=(layer,))
    assert "sandbox.isolation=best_effort" in str(raised.value)
    assert [name for name in REQUIRED_LAYERS if f"{name}: " in str(raised.value)] == [layer]


def test_best_effort_returns_what_applies_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="rlhub.sandbox"):
        layers = check_isolation("best_effort", _pretend_missing=("seccomp", "landlock"))
    assert "seccomp" not in layers and not any(layer.startswith("landlock") for layer in layers)
    assert "audit" in layers and "seccomp" in caplog.text and "landlock" in caplog.text
    with pytest.raises(ValueError, match="sandbox.isolation='strict'"):
        check_isolation("strict")


@ALL_REQUIRED
def test_a_call_without_a_required_layer_does_not_run_the_code(host):
    """Without seccomp (and with the hook left out), this code would connect to the host's socket; under
    isolation=required the child reports its layers and stops before loading it."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(host / "s"))
    server.listen(1)
    server.setblocking(False)
    code = f"import socket\nsocket.socket(socket.AF_UNIX).connect({str(host / 's')!r})\ndef add(a, b):\n    return a + b\n"
    result = zero(score(code, audit=False, skip=("seccomp",), isolation="required"))
    assert result.outcome == "isolation" and "did not run the code" in result.detail and "seccomp" in result.detail, result
    with pytest.raises(BlockingIOError):
        server.accept()
    ok = score("def add(a, b):\n    return a + b\n", isolation="required")
    assert (ok.outcome, ok.passed) == ("ok", 3), ok


def test_the_configured_policy_is_the_default(monkeypatch):
    monkeypatch.setattr(sandbox, "_policy", sandbox._policy)
    sandbox.configure(SandboxConfig(isolation="best_effort"))
    assert sandbox._policy.isolation == "best_effort"
    with pytest.raises(ValueError, match="sandbox.isolation"):
        sandbox.configure(SandboxConfig(isolation="none"))
    result = run_tests("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3"], "add", Limits())
    assert (result.outcome, result.passed) == ("ok", 1)
    assert set(result.layers) >= {"audit", "rlimits"} and LAYERS >= set(result.layers)
