"""The learner's sharded checkpoint: `torch.distributed.checkpoint` (DCP) under `learner/`, in safetensors.

Every rank writes its own shards of the policy, the optimizer's state and the
frozen KL reference (when the learner holds one), named by parameter (FQN),
with the global shape of each tensor in the metadata. Loading reads whatever
part each rank needs, so a checkpoint written at one world size loads at
another (2 -> 1, 1 -> 2) and with or without expert parallelism: the expert
slices are saved as tensors sharded over the expert ranks. One process (a
one-rank learner) writes and reads the same format without a process group.

Nothing here unpickles. The tensors go through DCP's safetensors storage
(`learner/shards/shard-<n>-model-00001-of-00001.safetensors`, one per rank
that holds tensors, each file's header holding its shards' offsets in the
global tensor, as JSON); the few values that are not
tensors (the optimizer's hyperparameters per parameter group) go to
`learner/index.json`, written by rank 0. DCP's default format would pickle
both its `.metadata` file and every non-tensor value, and unpickle them on
load (`pickle.load`, `torch.load(weights_only=False)`): a checkpoint could run
code in the process that resumes it. A checkpoint of that earlier format (a
`.metadata` file) is still read, its metadata by an unpickler that builds only
DCP's record types and its other values with `torch.load(weights_only=True)`
(`rlhub.parallel.legacy_dcp`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhub.parallel.layout import Layout

DIRNAME = "learner"
INDEX = "index.json"
"""Under learner/: the format's name and the state's values that are not tensors (written by rank 0)."""
SHARDS = "shards"
"""Under learner/: DCP's safetensors files, and nothing else (its reader takes every .safetensors file there)."""
FORMAT = "rlhub-dcp-safetensors/1"
LEGACY_METADATA = ".metadata"
"""DCP's default format (pickled metadata): checkpoints of earlier rlhub versions, read safely."""


def has_sharded(directory: Path) -> bool:
    return (directory / DIRNAME / INDEX).is_file() or (directory / DIRNAME / LEGACY_METADATA).is_file()


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer, reference: torch.nn.Module | None,
            layout: Layout) -> tuple[dict[str, Any], list[tuple[dict, str, torch.Tensor]]]:
    """The state to save or load in place, and the (dict, key, local tensor) entries wrapped as sharded
    tensors over the expert ranks (put back after a load)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions()
    state: dict[str, Any] = {"model": get_model_state_dict(model, options=opts),
                             "optimizer": get_optimizer_state_dict(model, optimizer, options=opts)}
    if reference is not None:
        state["reference"] = get_model_state_dict(reference, options=opts)
    wrapped: list[tuple[dict, str, torch.Tensor]] = []
    ranks = layout.ranks
    if ranks.expert_parallel > 1:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        def wrap(d: dict, key: str) -> None:
            t = d[key]
            wrapped.append((d, key, t))
            d[key] = DTensor.from_local(t, ranks.ep_mesh, [Replicate(), Shard(0)], run_check=False)

        moments = state["optimizer"]["state"]
        for name in layout.expert_names(model):
            wrap(state["model"], name)
            if name in moments:
                moments[name] = dict(moments[name])  # the optimizer's own per-parameter dict must keep its plain tensors
                for key, value in list(moments[name].items()):
                    if torch.is_tensor(value) and value.dim() > 0:
                        wrap(moments[name], key)
        if reference is not None:
            for name in layout.expert_names(reference):
                wrap(state["reference"], name)
    return state, wrapped


def save(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, reference: torch.nn.Module | None,
         layout: Layout) -> None:
    """Every rank calls this with the same `directory`."""
    state, _ = _states(model, optimizer, reference, layout)
    _save(directory, state, layout)


def load(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, reference: torch.nn.Module | None,
         layout: Layout) -> None:
    """Every rank calls this; each reads its own part, whatever the world size that wrote it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state, wrapped = _states(model, optimizer, reference, layout)
    _load(directory, state, layout)
    for d, key, local in wrapped:  # the loaded slices, back as the plain tensors the model holds
        local.copy_(d[key].to_local())
        d[key] = local
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if "reference" in state:
        set_model_state_dict(reference, state["reference"])


def saved_keys(directory: Path) -> set[str]:
    """The tensors a sharded checkpoint holds ("model.<name>", "optimizer.state.<name>.exp_avg", ...)."""
    return set(_reader(directory).read_metadata().state_dict_metadata)


def read_full(directory: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """The full tensors under `prefix` of a sharded checkpoint, read in this one process (for export)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = _reader(directory).read_metadata().state_dict_metadata
    out: dict[str, torch.Tensor] = {}
    for key, m in meta.items():
        if key.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata):
            out[key[len(prefix) + 1:]] = torch.empty(m.size, dtype=m.properties.dtype)
    dcp.load({prefix: out}, storage_reader=_reader(directory), planner=_planner(directory), no_dist=True)
    return out


def save_model(directory: Path, model: torch.nn.Module, layout: Layout) -> None:
    """A model alone (a frozen reference) in the same format, under `learner/`'s name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    _save(directory, {"model": get_model_state_dict(model)}, layout)


def load_model(directory: Path, model: torch.nn.Module, layout: Layout) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    _load(directory, state, layout)
    set_model_state_dict(model, state["model"])


# ---- the format: tensors in safetensors, every other value in JSON -------------------------------

def _save(directory: Path, state: dict[str, Any], layout: Layout) -> None:
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    tensors, values = split_values(state)
    target = directory / DIRNAME
    writer = HuggingFaceStorageWriter(str(target / SHARDS), save_distributed=True)
    dcp.save(tensors, storage_writer=writer, no_dist=not layout.ranks.distributed)
    if layout.ranks.is_main:  # the values are the same on every rank (hyperparameters, parameter names)
        (target / INDEX).write_text(json.dumps({"format": FORMAT, "values": values}, indent=1) + "\n")


def _load(directory: Path, state: dict[str, Any], layout: Layout) -> None:
    """Load `state` in place: its tensors (each rank its own part) and its other values, which keep the
    types the live state has (a tuple stays a tuple)."""
    import json

    import torch.distributed.checkpoint as dcp

    if not (directory / DIRNAME / INDEX).is_file():
        dcp.load(state, storage_reader=_reader(directory), planner=_planner(directory), no_dist=not layout.ranks.distributed)
        return
    tensors, _ = split_values(state)
    dcp.load(tensors, storage_reader=_reader(directory), no_dist=not layout.ranks.distributed)
    index = json.loads((directory / DIRNAME / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{directory / DIRNAME / INDEX}: format {index.get('format')!r}, this rlhub reads {FORMAT!r}")
    merge_values(state, index["values"])


def _reader(directory: Path) -> Any:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if (directory / DIRNAME / INDEX).is_file():
        return HuggingFaceStorageReader(str(directory / DIRNAME / SHARDS))
    from rlhub.parallel.legacy_dcp import SafeLegacyReader

    return SafeLegacyReader(str(directory / DIRNAME))


def _planner(directory: Path) -> Any:
    """DCP's default planner, except for a checkpoint of the earlier format, whose non-tensor values it
    would unpickle freely."""
    if (directory / DIRNAME / INDEX).is_file():
        return None
    from rlhub.parallel.legacy_dcp import SafeLoadPlanner

    return SafeLoadPlanner()


def split_values(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tensors of a nested state dict, its other values), both nested as `tree` is; tensors are
    the same objects (DCP loads into them in place).

    >>> split_values({"a": torch.zeros(1), "g": [{"lr": 0.1}], "s": {"0": {"step": 3}}})[1]
    {'g': [{'lr': 0.1}], 's': {'0': {'step': 3}}}
    """
    tensors: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            t, v = split_values(value)
            if t:
                tensors[key] = t
            if v:
                values[key] = v
        elif torch.is_tensor(value):
            tensors[key] = value
        else:
            values[key] = value
    return tensors, values


def merge_values(tree: dict[str, Any], values: dict[str, Any]) -> None:
    """Put values read back from JSON into `tree`, in the types `tree` already holds."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            merge_values(tree[key], value)
        else:
            tree[key] = _like(tree.get(key), value)


def _like(template: Any, value: Any) -> Any:
    """`value` (from JSON) shaped as `template`: tuples come back as tuples (AdamW's betas), in lists and
    dicts too."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(_like(t, v) for t, v in zip(template, value)) if len(template) == len(value) else tuple(value)
    if isinstance(template, list) and isinstance(value, list) and len(template) == len(value):
        return [_like(t, v) for t, v in zip(template, value)]
    if isinstance(template, dict) and isinstance(value, dict):
        return {k: _like(template.get(k), v) for k, v in value.items()}
    return value
