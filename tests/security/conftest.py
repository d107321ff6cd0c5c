"""Fixtures of the sandbox probes (their helpers are in sandbox_probe.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from sandbox_probe import SECRET


@pytest.fixture(autouse=True)
def calls_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each call's directory is made here, so that the probe can see it is gone afterwards."""
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(calls))
    yield calls
    assert list(calls.iterdir()) == []


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A directory of the host, outside every read root, holding a secret."""
    directory = tmp_path / "host"
    directory.mkdir()
    (directory / "secret.txt").write_text(f"the answer key: {SECRET}")
    return directory
