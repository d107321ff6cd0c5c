"""FSDP2 over the learner ranks: shard a model per transformer block, gather it one tensor at a time.

`shard` applies `fully_shard` to each decoder layer and then to the whole
model, so parameters, gradients and the optimizer's state (built on the
sharded parameters) are split over the ranks, and a layer's full weights
exist only while that layer computes. Gradients are summed over the ranks,
not averaged: each rank's loss is already its share of the batch's loss (the
normalisers were reduced first, see `rlhub.parallel.ranks`), so the sum is
the one-rank gradient. Experts under expert parallelism are left out of
FSDP (each rank keeps whole experts of its own, `rlhub.parallel.experts`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch

from rlhub.parallel.ranks import Ranks


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers causal LM or bare trunk (`model.layers`)."""
    for owner in (getattr(model, "model", None), model, getattr(model, "backbone", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ValueError(f"{type(model).__name__}: no transformer blocks found (expected model.layers or layers)")


def shard(model: torch.nn.Module, ranks: Ranks, ignored: set[torch.nn.Parameter] | None = None) -> None:
    """FSDP2 per block, then the root (embeddings, final norm, head); `ignored`: parameters each rank
    keeps as they are (its experts under expert parallelism)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    ignored = ignored or set()
    for block in blocks(model):
        fully_shard(block, mesh=ranks.mesh, ignored_params={p for p in block.parameters() if p in ignored} or None)
    fully_shard(model, mesh=ranks.mesh, ignored_params=ignored or None)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum: each rank's loss is its share of the batch's
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter or gradient (a DTensor's local shard; a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_items(model: torch.nn.Module, gather_local: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for each state-dict entry, gathered one at a time (every rank must iterate:
    each gather is a collective). `gather_local(name, tensor)`: the full tensor of an entry FSDP does not
    shard but the ranks split themselves (an expert slice), None for an entry held whole."""
    for name, t in model.state_dict().items():
        if hasattr(t, "full_tensor"):
            yield name, t.full_tensor().detach()
        else:
            full = gather_local(name, t) if gather_local is not None else None
            yield name, (t if full is None else full).detach()


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float, ranks: Ranks, replicated: set[int]) -> torch.Tensor:
    """The total gradient norm over every rank's shards, and the gradients scaled to `max_norm` when above it
    (as `torch.nn.utils.clip_grad_norm_` does for one process). `replicated`: ids of parameters held
    whole by several ranks (the expert slices have world_size / expert_parallel copies)."""
    import torch.distributed as dist

    params = [p for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    copies = ranks.world_size // max(ranks.expert_parallel, 1)
    for p in params:
        g = local(p.grad).detach().double()
        squares += g.pow(2).sum() / (copies if id(p) in replicated else 1)
    dist.all_reduce(squares)
    total = squares.sqrt().float()
    if math.isfinite(float(total)):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            local(p.grad).mul_(coef.to(local(p.grad).dtype))
    return total


def load_full(model: torch.nn.Module, state: dict[str, torch.Tensor], load_local: Callable[[str, torch.Tensor], bool] | None = None) -> None:
    """Copy full tensors into a sharded model: each rank keeps its shard of each. `load_local(name, full)`
    takes an entry the ranks split themselves (True when it did)."""
    from torch.distributed.tensor import distribute_tensor

    own = model.state_dict()
    for name, full in state.items():
        target = own[name]
        if load_local is not None and load_local(name, full):
            continue
        with torch.no_grad():
            if hasattr(target, "device_mesh"):
                shard = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements)
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(full.to(target.dtype))


def idle_row(pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of a two-token row of padding: what a rank with nothing left to
    compute runs, so that its collectives pair with the busier ranks' (its loss is multiplied by 0)."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    return ids, torch.ones_like(ids)
