"""The learner's sharded checkpoint: `torch.distributed.checkpoint` (DCP) under `learner/`.

Every rank writes its own shards of the policy, the optimizer's state and the
frozen KL reference (when the learner holds one), named by parameter (FQN),
with the global shape of each tensor in the metadata. Loading reads whatever
part each rank needs, so a checkpoint written at one world size loads at
another (2 -> 1, 1 -> 2) and with or without expert parallelism: the expert
slices are saved as tensors sharded over the expert ranks. One process (a
one-rank learner) writes and reads the same format without a process group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhub.parallel.layout import Layout

DIRNAME = "learner"


def has_sharded(directory: Path) -> bool:
    return (directory / DIRNAME / ".metadata").is_file()


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
    import torch.distributed.checkpoint as dcp

    state, _ = _states(model, optimizer, reference, layout)
    dcp.save(state, checkpoint_id=str(directory / DIRNAME), no_dist=not layout.ranks.distributed)


def load(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, reference: torch.nn.Module | None,
         layout: Layout) -> None:
    """Every rank calls this; each reads its own part, whatever the world size that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state, wrapped = _states(model, optimizer, reference, layout)
    dcp.load(state, checkpoint_id=str(directory / DIRNAME), no_dist=not layout.ranks.distributed)
    for d, key, local in wrapped:  # the loaded slices, back as the plain tensors the model holds
        local.copy_(d[key].to_local())
        d[key] = local
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if "reference" in state:
        set_model_state_dict(reference, state["reference"])


def saved_keys(directory: Path) -> set[str]:
    """The keys a sharded checkpoint holds ("model.<name>", "optimizer.state.<name>.exp_avg", ...)."""
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(directory / DIRNAME)).read_metadata().state_dict_metadata)


def read_full(directory: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """The full tensors under `prefix` of a sharded checkpoint, read in this one process (for export)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(directory / DIRNAME)).read_metadata().state_dict_metadata
    out: dict[str, torch.Tensor] = {}
    for key, m in meta.items():
        if key.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata):
            out[key[len(prefix) + 1:]] = torch.empty(m.size, dtype=m.properties.dtype)
    dcp.load({prefix: out}, checkpoint_id=str(directory / DIRNAME), no_dist=True)
    return out


def save_model(directory: Path, model: torch.nn.Module, layout: Layout) -> None:
    """A model alone (a frozen reference) in the same format, under `learner/`'s name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(directory / DIRNAME), no_dist=not layout.ranks.distributed)


def load_model(directory: Path, model: torch.nn.Module, layout: Layout) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(directory / DIRNAME), no_dist=not layout.ranks.distributed)
    set_model_state_dict(model, state["model"])
