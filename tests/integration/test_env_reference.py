"""The documentation's commands and examples run as written (README.md, docs/environments.md).

- Every documented `rlhub train` and `rlhub config` command composes into a valid run config.
- The reference's complete examples run: the shell blocks that write their own data train for two
  steps, and the multi-turn tool package is built from the reference's `# file:` blocks alone,
  installed, checked with `rlhub envs check` and trained with `env=unit_price` and no other task
  setting on the command line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", ROOT / "docs" / "environments.md")
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
SHORT = ["experiment.total_steps=2", "prompts_per_step=2", "group_size=2", "progress=false", "eval.final=false"]
"""What the tests add to a documented training command: its length, not its task."""


def blocks(path: Path) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(path.read_text())]


def commands(body: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, `$ ` prompts and comments dropped,
    `&&` chains split."""
    text = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in text.splitlines():
        line = line.strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:  # prose in a plain block (a file tree, an error message); a command must parse
                if re.search(r"rlhub (train|config)\b", part):
                    raise
                continue
            if words:
                out.append(words)
    return out


def rlhub_args(words: list[str]) -> tuple[str, list[str]] | None:
    """(subcommand, its arguments) of an `rlhub train|config ...` command, else None."""
    for i, w in enumerate(words):
        if (w == "rlhub" or w.endswith("/rlhub")) and i + 1 < len(words) and words[i + 1] in ("train", "config"):
            return words[i + 1], words[i + 2:]
    return None


def documented() -> list[tuple[str, list[str], str | None]]:
    """(where, arguments, the config error the documentation shows right after it or None) of every
    documented `rlhub train|config` command."""
    found = []
    for path in DOCS:
        for lang, body in blocks(path):
            if lang not in ("bash", "sh", ""):
                continue
            lines = re.sub(r"\\\n\s*", " ", body).splitlines()  # continuation lines joined
            for i, line in enumerate(lines):
                for words in commands(line):
                    if (parsed := rlhub_args(words)) is None:
                        continue
                    shown = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("rlhub: config error: ") else None
                    found.append((f"{path.name}: {' '.join(words)}", parsed[1], shown and shown.removeprefix("rlhub: config error: ")))
    return found


SHOWN_DATA = {"puzzles.jsonl": [{"numbers": [3, 5], "total": 8}, {"numbers": [2, 6], "total": 12}]}
"""The files the README's data error example reads, as it describes them (a `total` column, no `goal`)."""


@pytest.mark.parametrize("where, args, error", documented(), ids=[w for w, _, _ in documented()])
def test_every_documented_command_composes_a_valid_config(where, args, error, tmp_path, monkeypatch):
    from rlhub.config import ConfigError, load_config
    from rlhub.env_check import check_env

    if any(a.startswith(("env=unit_price", "env=reverse_word")) for a in args):
        pytest.skip("a package the other tests install")  # its entry point exists only while installed
    if error is None:
        load_config(args)  # a ConfigError names what is wrong
        return
    monkeypatch.chdir(tmp_path)
    for name, rows in SHOWN_DATA.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError) as raised:  # an example of an error: the message shown is the one given
        check_env(load_config(args))  # a config error, or one of its data, found before Ray starts
    assert str(raised.value) == error


def run_shell(words: list[str], cwd: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    """A documented command, `.venv/bin/X` taken from this interpreter's environment."""
    bin_dir = Path(sys.executable).parent
    words = [str(bin_dir / Path(w).name) if w.startswith(".venv/bin/") else w for w in words] + list(extra)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def reference_blocks() -> list[tuple[str, str]]:
    return blocks(ROOT / "docs" / "environments.md")


def test_the_references_data_examples_train_as_written(tmp_path):
    ran = 0
    for _, body in reference_blocks():
        if "/tmp/rlhub-doc" not in body:
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if rlhub_args(words) is None:  # the example writes its own data: as written, through a shell
                subprocess.run(["bash", "-c", line], check=True)
                continue
            done = run_shell(words, tmp_path, ["progress=false", f"run_dir={tmp_path / f'run{ran}'}"])
            assert done.returncode == 0, done.stderr[-3000:]
            summary = json.loads((tmp_path / f"run{ran}" / "summary.json").read_text())
            assert summary["status"] == "ok" and summary["steps"] == 2
            ran += 1
    assert ran == 2  # the dataset example and the reward-function example


def test_the_tool_package_from_the_reference_installs_checks_and_trains(tmp_path):
    package = tmp_path / "unit-price"
    written = []
    for _, body in reference_blocks():
        first, _, rest = body.partition("\n")
        if first.startswith("# file: "):
            target = package / first.removeprefix("# file: ").strip()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(rest)
            written.append(target.relative_to(package).as_posix())
    assert sorted(written) == ["pyproject.toml", "unit_price/__init__.py", "unit_price/data/orders.jsonl"]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(package)]
    subprocess.run(pip, check=True, capture_output=True)
    try:
        shown = run_shell([".venv/bin/rlhub", "config", "env=unit_price"], tmp_path)
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert "#   rollout.max_turns=3" in shown.stdout and "orders.jsonl" in shown.stdout
        checked = run_shell([".venv/bin/rlhub", "envs", "check", "unit_price", "rows=2"], tmp_path)
        assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-2000:]
        assert "environment unit_price: 8 train rows, 4 eval rows" in checked.stdout and '"name": "multiply"' in checked.stdout
        trained = run_shell([".venv/bin/rlhub", "train", "env=unit_price"], tmp_path, [*SHORT, f"run_dir={tmp_path / 'run'}"])
        assert trained.returncode == 0, trained.stderr[-3000:]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["steps"] == 2 and summary["failures"]["env_errors"] == 0
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "rlhub-env-unit-price"], capture_output=True)
