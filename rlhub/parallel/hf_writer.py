"""An HF model directory written from tensors that arrive one at a time (sharded learner ranks).

Every rank iterates the tensors (each is gathered by a collective); the
writing rank buffers at most `shard_bytes` of them before it writes a
safetensors file, and an index (`model.safetensors.index.json`) names the
file of every tensor, as transformers and vLLM expect of a sharded
checkpoint. No process ever holds the whole model a second time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

SHARD_BYTES = 512 * 2**20


def write_hf(directory: Path, config: Any, items: Iterable[tuple[str, torch.Tensor]], write: bool, shard_bytes: int = SHARD_BYTES) -> None:
    """`config`: the model's transformers config; `write`: whether this rank writes (the others only
    take part in the gathers)."""
    from safetensors.torch import save_file

    if write:
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(directory))
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names: dict[str, int] = {}
    written = 0
    total = 0

    def flush() -> None:
        nonlocal written, size
        if files[-1]:
            save_file(files[-1], str(directory / f"part-{written:05d}.safetensors"), metadata={"format": "pt"})
            written += 1
        files[-1] = {}
        size = 0

    for name, tensor in items:
        if not write:
            continue
        if size and size + tensor.numel() * tensor.element_size() > shard_bytes:
            flush()
        files[-1][name] = tensor.contiguous().cpu()
        names[name] = written
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
    if not write:
        return
    flush()
    final = {i: f"model-{i + 1:05d}-of-{written:05d}.safetensors" for i in range(written)}
    for i, fname in final.items():
        (directory / f"part-{i:05d}.safetensors").rename(directory / fname)
    index = {"metadata": {"total_size": total}, "weight_map": {n: final[i] for n, i in names.items()}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
