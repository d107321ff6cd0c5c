"""Atomic checkpoints: written aside, then renamed into place.

Layout: `<run_dir>/checkpoints/step_<N>/` with `learner/` (the policy's,
optimizer's and KL reference's shards, `torch.distributed.checkpoint`: any
world size resumes it, see `rlhub.parallel.checkpoint`), `policy/` (a whole HF
directory, safetensors), `critic/` and `reference/` (the same format) where the
algorithm has them, and `state.json` (version, data cursor, store counters,
the groups to start again). A LoRA learner (`model.lora`) writes `adapters/`
instead of `learner/` and `policy/`: the adapters, their optimizer state and the
base model they adapt (`rlhub.lora`). Checkpoints of earlier versions hold
`optimizer.safetensors` + `optimizer.json` instead of `learner/`.
A directory without its final name is never read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

PREFIX = "step_"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def write_checkpoint(run_dir: Path, version: int, write_tensors: Callable[[Path], None], state: dict[str, Any], keep_last: int) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{version:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_tensors(tmp)
    (tmp / "state.json").write_text(json.dumps({"version": version, **state}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)  # atomic on one filesystem: a checkpoint is whole or absent
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "state.json").read_text())
