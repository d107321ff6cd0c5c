"""The format warm start's result, kept on disk so the next run with the same inputs loads it.

The warm start is a pure function of the model's starting weights, the examples, the
step count, batch size, learning rate and seed, so its weights can be reused the way
the built model is: `RLHUB_CACHE/warm_start/<key>/` holds `model.safetensors` (the
policy's state dict, bit for bit) and `metrics.json` (what the computing run measured).
The key hashes those inputs and the learner's dtype; a model directory enters it by
its path, its config and its weight files' sizes and modification times, so rebuilding
or replacing it misses.
`warm_start.cache=false` computes it every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from rlhub.models.build import cache_dir


def warm_start_key(model_path: str, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, lr: float,
                   seed: int, dtype: str = "") -> str:
    root = Path(model_path)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.glob("*.safetensors"))
    h = hashlib.sha256()
    h.update(json.dumps([str(root.resolve()), (root / "config.json").read_text(), weights, steps, batch_size, lr, seed, dtype]).encode())
    h.update(json.dumps(examples).encode())
    return h.hexdigest()[:16]


def load_warm_start(key: str) -> tuple[dict[str, Any], dict[str, float]] | None:
    """(state dict, metrics) kept under `key`, or None."""
    where = cache_dir() / "warm_start" / key
    if not (where / "metrics.json").is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(where / "model.safetensors")), json.loads((where / "metrics.json").read_text())


def save_warm_start(key: str, state: dict[str, Any], metrics: dict[str, float]) -> None:
    """Written to a private directory and renamed into place: a concurrent run never reads half of it."""
    from safetensors.torch import save_file

    where = cache_dir() / "warm_start" / key
    tmp = where.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().clone() for k, v in state.items()}, str(tmp / "model.safetensors"))
    (tmp / "metrics.json").write_text(json.dumps(metrics))
    try:
        tmp.rename(where)
    except OSError:  # another run put it there first: same inputs, same weights
        shutil.rmtree(tmp, ignore_errors=True)


def cached_warm_start(learner: Any, model_path: str, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int,
                      lr: float, seed: int, cache: bool = True) -> dict[str, float]:
    """`learner.warm_start(...)`, or its kept result loaded into `learner.model`; the metrics say which
    ("warm_start/cached" 1 or 0)."""
    dtype = str(next(learner.model.parameters()).dtype)  # the learner's, which may differ from the directory's
    # the cache holds whole fp32 state dicts: a LoRA or bf16 learner computes its warm start each time
    cache = cache and learner.lora is None and learner.precision == "fp32"
    key = warm_start_key(model_path, examples, steps, batch_size, lr, seed, dtype) if cache else None
    kept = load_warm_start(key) if key else None
    if kept is not None:
        state, metrics = kept
        learner.model.load_state_dict(state)
        return {**metrics, "warm_start/cached": 1.0}
    metrics = learner.warm_start(examples, steps, batch_size, lr, seed)
    if key:
        save_warm_start(key, learner.state_dict(), metrics)
    return {**metrics, "warm_start/cached": 0.0}
