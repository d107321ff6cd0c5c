"""Atomic checkpoints: written aside, listed in a manifest, then renamed into place.

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

`manifest.json`, written last before the rename, lists every file with its size
and sha256, and the model's identity (architecture, vocab_size, hidden_size,
layers, experts: from `policy/config.json`, or under LoRA from the base model's).
`verify_checkpoint` checks a checkpoint against it (hashing costs about a
second per GB). A resume (`resume_checkpoint`) takes the newest checkpoint that
verifies: a damaged one (a file missing, shorter or with another hash, as a
disk or a copy can leave it) is moved aside to `damaged-step_<N>/` with one
warning naming the file and the checkpoint used instead, since going back a few
steps is what a resume does anyway; a checkpoint of another model (another
`model.path`) is refused, because no older one would fit either. Checkpoints
written before manifests existed are used without verification.

A write that fails (a full disk: `OSError` ENOSPC, raised by whichever process
wrote) removes its temporary directory and raises `CheckpointNotWritten` in one line;
the checkpoints before it are untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

PREFIX = "step_"
MANIFEST = "manifest.json"
DAMAGED = "damaged-"
IDENTITY = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_experts")

log = logging.getLogger("rlhub")


class CheckpointError(Exception):
    """A checkpoint could not be written, or does not verify; the message names it, the file and the cause."""

    def __init__(self, message: str, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged
        """True for damage (missing, truncated or corrupt files); False for a checkpoint of another model."""


class CheckpointNotWritten(CheckpointError):
    """Writing a checkpoint failed (a full disk); its temporary directory is gone, the earlier ones stay."""


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def write_checkpoint(run_dir: Path, version: int, write_tensors: Callable[[Path], None], state: dict[str, Any], keep_last: int) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{version:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_tensors(tmp)
        (tmp / "state.json").write_text(json.dumps({"version": version, **state}, indent=1))
        write_manifest(tmp)  # last: it lists what was written
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        if isinstance(e, OSError) or "No space left on device" in str(e):  # also a Ray actor's OSError
            before = latest_checkpoint(run_dir)
            kept = f"the last checkpoint, {before.name}, is intact" if before else "there is no earlier checkpoint"
            raise CheckpointNotWritten(f"checkpoint {final} not written: {_cause(e)}; {kept}") from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)  # atomic on one filesystem: a checkpoint is whole or absent
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _cause(e: BaseException) -> str:
    e = getattr(e, "cause", None) or e  # a Ray actor's error: what the actor raised
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
        return f"no space left on device ({e.filename})" if getattr(e, "filename", None) else "no space left on device"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


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


# ---- the manifest ------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What tells one model from another in its config.json (IDENTITY; experts under either name)."""
    if "num_experts" not in config and "num_local_experts" in config:
        config = {**config, "num_experts": config["num_local_experts"]}
    return {k: config[k] for k in IDENTITY if k in config}


def _checkpoint_model(directory: Path) -> dict[str, Any] | None:
    """The identity of the model a checkpoint holds: its policy's config.json, or the LoRA base model's."""
    for config in (directory / "policy" / "config.json", _lora_base(directory)):
        if config is not None and config.is_file():
            return model_identity(json.loads(config.read_text()))
    return None


def _lora_base(directory: Path) -> Path | None:
    meta = directory / "adapters" / "lora.json"
    return Path(json.loads(meta.read_text())["base_model"]) / "config.json" if meta.is_file() else None


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    listed = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": listed, "model": _checkpoint_model(directory)}, indent=1))


def verify_checkpoint(checkpoint: Path, model_config: dict[str, Any] | None = None) -> None:
    """CheckpointError (damaged=True) naming the first file that is missing, of another size or hash
    than the manifest says; CheckpointError (damaged=False) when `model_config` (the run's config.json)
    is another model than the checkpoint's. A checkpoint without a manifest (older) passes."""
    where = f"checkpoint {checkpoint}"
    if not (checkpoint / MANIFEST).is_file():
        return
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{where}: {MANIFEST} is not readable (corrupt)", damaged=True) from None
    for name, want in files.items():
        f = checkpoint / name
        if not f.is_file():
            raise CheckpointError(f"{where}: {name}: missing", damaged=True)
        size = f.stat().st_size
        if size != want["size"]:
            how = "truncated" if size < want["size"] else "changed"
            raise CheckpointError(f"{where}: {name}: {size} bytes, written as {want['size']} ({how})", damaged=True)
        if sha256(f) != want["sha256"]:
            raise CheckpointError(f"{where}: {name}: sha256 mismatch (corrupt)", damaged=True)
    saved, run = manifest.get("model") or {}, model_identity(model_config or {})
    differ = [k for k in IDENTITY if k in saved and k in run and saved[k] != run[k]]
    if differ:
        said = ", ".join(f"{k}={saved[k]}" for k in differ)
        ours = ", ".join(f"{k}={run[k]}" for k in differ)
        raise CheckpointError(f"{where} is of another model: {said}; this run's model has {ours} (model.path, or a "
                              "new run_dir)")


def _newest_that_verifies(run_dir: Path, model: dict[str, Any] | None, move_aside: bool) -> tuple[Path | None, list[CheckpointError], list[str]]:
    """(the newest checkpoint of `run_dir` that verifies, or None; the errors of the damaged ones newer
    than it; their names once moved aside, when `move_aside`). A checkpoint of another model raises."""
    damaged: list[CheckpointError] = []
    moved: list[str] = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(checkpoint, model)
        except CheckpointError as e:
            if not e.damaged:
                raise
            damaged.append(e)
            if move_aside:
                moved.append(DAMAGED + checkpoint.name)
                checkpoint.rename(checkpoint.with_name(moved[-1]))  # kept for a look; never listed again
            continue
        return checkpoint, damaged, moved
    return None, damaged, moved


def resume_checkpoint(run_dir: Path, model_path: Path | None = None) -> Path | None:
    """The checkpoint a resume starts from: the newest that verifies against the model at `model_path`
    (damaged ones moved aside, with one warning); None when the run has none. CheckpointError for a
    checkpoint of another model, or when none verifies."""
    model = json.loads((Path(model_path) / "config.json").read_text()) if model_path else None
    checkpoint, damaged, moved = _newest_that_verifies(run_dir, model, move_aside=True)
    if checkpoint is None and damaged:
        raise CheckpointError(f"{damaged[0]}; no checkpoint of {run_dir} verifies (moved aside: {', '.join(moved)}): start a new run")
    if damaged:
        log.warning("%s; resuming from %s, the newest checkpoint that verifies (moved aside: %s)", damaged[0], checkpoint.name,
                    ", ".join(moved))
    return checkpoint


def readable_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of `run_dir` that a command which only reads one (`rlhub eval`, `rlhub export`)
    takes: the newest that verifies against its manifest, a damaged newer one named in one warning and
    left where it is (a resume moves it aside); None when the run has none; CheckpointError when none
    verifies. (A checkpoint directory given by name is checked with `verify_checkpoint`.)"""
    checkpoint, damaged, _ = _newest_that_verifies(run_dir, None, move_aside=False)
    if checkpoint is None and damaged:
        raise CheckpointError(f"{damaged[0]}; no checkpoint of {run_dir} verifies")
    if damaged:
        log.warning("%s; reading %s, the newest checkpoint that verifies", damaged[0], checkpoint.name)
    return checkpoint
