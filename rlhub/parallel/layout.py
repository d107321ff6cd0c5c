"""How one rank holds a model: its FSDP2 shards and, under expert parallelism, its own experts.

The learner asks a `Layout` for everything that depends on how the weights
are split: shard a model (`apply`), gather its full tensors one at a time
(`full_items`, for publication and HF export), load full tensors into the
shards (`load_full`), finish its gradients (`finish_grads`: the expert
slices' sum over their replicas) and clip them by the norm over every rank.
For one rank each of these is the plain single-process operation.
"""

from __future__ import annotations

from typing import Iterator

import torch

from rlhub.parallel import fsdp
from rlhub.parallel.ranks import Ranks

EP_BALANCES = ("standard", "llep")


class Layout:
    def __init__(self, ranks: Ranks, ep_balance: str = "standard", ep_capacity: float = 1.25) -> None:
        if ep_balance not in EP_BALANCES:
            raise ValueError(f"learner.ep_balance={ep_balance!r}: use one of {list(EP_BALANCES)}")
        self.ranks = ranks
        self.ep_balance = ep_balance
        self.ep_capacity = ep_capacity
        self.experts: dict[int, dict[str, tuple[torch.nn.Module, str]]] = {}
        """id(model) -> {state-dict name: (its experts' `ExpertParallel` handle, parameter name)} of the expert slices it holds."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Split `model` over the ranks (in place; returned for convenience)."""
        ranks = self.ranks
        if not ranks.distributed:
            return model
        names: dict[str, tuple[torch.nn.Module, str]] = {}
        if ranks.expert_parallel > 1:
            from rlhub.parallel.experts import shard_experts

            handles = shard_experts(model, ranks.ep_group, balance=self.ep_balance, capacity=self.ep_capacity,
                                    replicas=ranks.replica_group)
            by_module = {id(h.module): h for h in handles}
            for name, module in model.named_modules():
                if id(module) in by_module:
                    for param in ("gate_up_proj", "down_proj"):
                        names[f"{name}.{param}"] = (by_module[id(module)], param)
        self.experts[id(model)] = names
        ignored = {getattr(h.module, p) for h, p in names.values()}
        fsdp.shard(model, ranks, ignored)
        return model

    def expert_names(self, model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
        return self.experts.get(id(model), {})

    # ---- full tensors -----------------------------------------------------------------
    def full_items(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of every state-dict entry, one at a time; every rank must iterate."""
        if not self.ranks.distributed:
            yield from ((k, v.detach()) for k, v in model.state_dict().items())
            return
        names = self.expert_names(model)

        def gather(name: str, _: torch.Tensor) -> torch.Tensor | None:
            if name not in names:
                return None
            from rlhub.parallel.experts import gather_expert

            module, param = names[name]
            return gather_expert(module, param)

        yield from fsdp.full_items(model, gather)

    def load_full(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not self.ranks.distributed:
            model.load_state_dict(state)
            return
        names = self.expert_names(model)

        def take(name: str, full: torch.Tensor) -> bool:
            if name not in names:
                return False
            from rlhub.parallel.experts import load_expert

            module, param = names[name]
            load_expert(module, param, full)
            return True

        fsdp.load_full(model, state, take)

    # ---- gradients --------------------------------------------------------------------
    def clip_grads(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Finish the gradients (expert slices summed over their replicas) and clip them by the norm over
        every rank's shards; returns that norm."""
        if not self.ranks.distributed:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        names = self.expert_names(model)
        if names and self.ranks.replica_group is not None:
            from rlhub.parallel.experts import reduce_expert_grads

            reduce_expert_grads(list({id(m): m for m, _ in names.values()}.values()), self.ranks.replica_group)
        replicated = {id(getattr(h.module, p)) for h, p in names.values()}
        return fsdp.clip_grad_norm(model.parameters(), max_norm, self.ranks, replicated)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` (the KL reference), made before the model is sharded."""
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)
