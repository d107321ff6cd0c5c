"""Expert parallelism (EP) for the learner's MoE layers, with least-loaded rebalancing (LLEP).

Where this sits: on the learner ranks only. When `learner.expert_parallel > 1`
the learner calls `shard_experts(model, ranks.ep_group, replicas=ranks.replica_group)`
before it builds the optimizer (and before FSDP, which is told to leave the
expert slices alone). Each of the P ranks of an EP group then keeps experts
[r*E/P, (r+1)*E/P) of every MoE layer, under the same parameter names
(`gate_up_proj` [E/P, 2I, H], `down_proj` [E/P, H, I]), so state-dict keys do
not change; `gather_expert` / `load_expert` convert between the slice and the
full [E, ...] tensor for weight publication, export and checkpoints. Rollout
engines never see any of this: they receive full tensors.

Standard EP (`balance="standard"`). The experts module's forward gets hidden
states [N, H] and each token's K expert ids and routing weights. Every
(token, choice) pair is sent to the rank owning its expert (pair counts first,
by a plain all-to-all, then the hidden rows by the autograd-aware one), the
owner runs its experts, the outputs come back by the reverse all-to-all, and
the source multiplies by the routing weights and sums into each token's row.

LLEP (`balance="llep"`, after "Least-Loaded Expert Parallelism"). Under skewed
routing standard EP gives a few ranks most of the pairs. LLEP all-gathers the
per-rank per-expert counts [P, E] and every rank computes the same plan
(`llep_plan`): with T pairs in all, the capacity is C = ceil(capacity * T / P);
each rank first keeps the pairs of its own experts, heaviest expert first, up
to C; what overflows (largest overflow first) is cut into pieces, each given
to the least-loaded rank that still has room (ties: lower rank), as much as
that room allows, so one expert may be split over several ranks. An
expert's pairs are ordered globally by (source rank, position), and the plan
assigns ranges of that order, so each rank knows where each of its own pairs
goes and how many it receives, with no further exchange. A rank that computes
pairs of an expert it does not own receives that expert's weights from the
owner in the same autograd-aware all-to-all as the tokens (one collective per
direction, so every rank's backward runs its collectives in the same order),
and the gradient the helper computes flows back into the owner's parameter
gradient. Borrowed weights travel in the hidden states' dtype.

Guaranteed: outputs and gradients (hidden states, routing weights, expert
weights) equal those of the unsharded module up to floating-point summation
order, in both modes; no pair is ever dropped; under LLEP no rank computes
more than C pairs in a layer (C >= T/P, so room always exists). Not guaranteed:
balanced time (a helper also pays for the weights it receives, and the plan
does not minimise weight moves), nor any bound under standard EP. Every rank
of the group must run every forward and backward of the layers in the same
order (a layer is three collectives forward: counts, dispatch, combine; two
backward); a rank with no pairs still takes part, and its experts get a zero
gradient rather than none. Expert gradients are sums over the EP group's
losses (like FSDP here, which sums); `reduce_expert_grads` adds the replicas'.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
import torch.nn.functional as F

# torch 2.13 marks the autograd-aware all_to_all_single deprecated in favour of a private module; it is
# the public one that differentiates, so it stays, without a warning from every rank at every step
warnings.filterwarnings("ignore", message=r".*all_to_all_single is deprecated.*", category=FutureWarning)

BALANCE_MODES = ("standard", "llep")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
"""The experts module's 3-D parameters, split along dim 0 (experts)."""


# ---- statistics ------------------------------------------------------------------------------


@dataclass
class LayerDispatch:
    """One EP forward of one layer, as seen by this rank."""

    layer: int
    pairs: int
    """(token, expert) pairs computed on this rank."""
    standard_pairs: int
    """Pairs this rank would have computed under standard EP (its experts' pairs from every rank)."""
    capacity: int | None
    """LLEP's bound C on any rank's pairs; None under standard EP."""
    weights_received: int
    """Experts whose weights this rank received to help with (LLEP)."""
    bytes_received: int
    seconds: float
    """Wall time of dispatch + compute + combine (forward only)."""


@dataclass
class DispatchStats:
    """What the EP forwards run inside one `ep_stats()` context recorded, one entry per layer call."""

    layers: list[LayerDispatch] = field(default_factory=list)

    @property
    def pairs(self) -> list[int]:
        return [d.pairs for d in self.layers]

    @property
    def standard_pairs(self) -> list[int]:
        return [d.standard_pairs for d in self.layers]

    @property
    def weights_received(self) -> int:
        return sum(d.weights_received for d in self.layers)

    @property
    def bytes_received(self) -> int:
        return sum(d.bytes_received for d in self.layers)

    @property
    def seconds(self) -> float:
        return sum(d.seconds for d in self.layers)


_STATS: ContextVar[DispatchStats | None] = ContextVar("rlhub_ep_stats", default=None)


@contextmanager
def ep_stats() -> Iterator[DispatchStats]:
    """Record the EP forwards this thread (or task) runs inside the block; others record nothing.
    Nested blocks: the innermost one records. A forward re-run by activation checkpointing records again."""
    stats = DispatchStats()
    token = _STATS.set(stats)
    try:
        yield stats
    finally:
        _STATS.reset(token)


# ---- the LLEP plan ---------------------------------------------------------------------------


class Piece(NamedTuple):
    """Pairs [start, stop) of `expert`'s global order (source rank, position), computed at `rank`."""

    expert: int
    rank: int
    start: int
    stop: int


@dataclass(frozen=True)
class LlepPlan:
    """Which rank computes which of every expert's pairs; the same at every rank of the group."""

    counts: torch.Tensor
    """[P, E] pairs per (source rank, expert), the plan's input."""
    capacity: int
    """C: no rank's load exceeds it."""
    pieces: tuple[Piece, ...]
    """Sorted by (expert, start); the pieces of an expert tile [0, its total)."""
    load: tuple[int, ...]
    """[P] pairs each rank computes."""

    def owner(self, expert: int) -> int:
        ranks, experts = self.counts.shape
        return expert // (experts // ranks)

    def moves(self) -> list[tuple[int, int]]:
        """(expert, helper rank) for every expert whose weights go to a rank that does not own it."""
        return sorted({(p.expert, p.rank) for p in self.pieces if p.rank != self.owner(p.expert)})

    def routes(self) -> torch.Tensor:
        """[P, P, E] pairs of expert e that source rank s sends to rank q: [s, q, e]."""
        ranks, experts = self.counts.shape
        out = torch.zeros(ranks, ranks * experts, dtype=torch.long)
        if not self.pieces:
            return out.view(ranks, ranks, experts)
        e, q, start, stop = (torch.tensor(c, dtype=torch.long) for c in zip(*self.pieces))  # [M] each
        src_lo = (self.counts.cumsum(0) - self.counts)[:, e]  # [P, M] where each source's pairs begin
        src_hi = src_lo + self.counts[:, e]
        overlap = (torch.minimum(src_hi, stop) - torch.maximum(src_lo, start)).clamp(min=0)  # [P, M]
        out.index_add_(1, q * experts + e, overlap)
        return out.view(ranks, ranks, experts)

    def destinations(self, rank: int, experts: torch.Tensor) -> torch.Tensor:
        """[M] the rank computing each of `rank`'s pairs, given their experts [M] sorted ascending."""
        counts = self.counts.to(experts.device)
        totals = counts.sum(0)  # [E]
        expert_base = totals.cumsum(0) - totals  # [E] an expert's first pair in the flat order of all pairs
        source_base = (counts.cumsum(0) - counts)[rank]  # [E] this rank's first pair within each expert
        mine = counts[rank]
        position = torch.arange(len(experts), device=experts.device) - (mine.cumsum(0) - mine)[experts]  # [M]
        flat = expert_base[experts] + source_base[experts] + position  # [M]
        e, q, start, _ = (torch.tensor(c, dtype=torch.long, device=experts.device) for c in zip(*self.pieces))
        piece = torch.searchsorted(expert_base[e] + start, flat, right=True) - 1  # [M]
        return q[piece]


def llep_plan(counts: torch.Tensor, capacity: float) -> LlepPlan:
    """The LLEP assignment of every (token, expert) pair, from the pair counts [P, E] of all ranks.

    >>> plan = llep_plan(torch.tensor([[6, 0, 1, 1], [5, 1, 1, 1]]), 1.0)
    >>> plan.capacity, plan.load
    (8, (8, 8))
    >>> [tuple(p) for p in plan.pieces]
    [(0, 0, 0, 8), (0, 1, 8, 11), (1, 1, 0, 1), (2, 1, 0, 2), (3, 1, 0, 2)]
    >>> plan.moves()  # (expert, helper): rank 1 receives experts 0 and 1
    [(0, 1), (1, 1)]
    """
    if capacity < 1.0:
        raise ValueError(f"capacity={capacity} must be >= 1.0 (below it the pairs do not fit on the ranks)")
    ranks, experts = counts.shape
    if experts % ranks:
        raise ValueError(f"num_experts={experts} must divide by expert_parallel={ranks}")
    per_rank = experts // ranks
    totals = counts.sum(0).tolist()  # [E]
    cap = math.ceil(capacity * sum(totals) / ranks)
    load = [0] * ranks
    pieces: list[Piece] = []
    overflow: list[Piece] = []  # the rank field is the owner; reassigned below
    for r in range(ranks):
        native = sorted(range(r * per_rank, (r + 1) * per_rank), key=lambda e: (-totals[e], e))
        for e in native:
            keep = min(totals[e], cap - load[r])
            if keep:
                pieces.append(Piece(e, r, 0, keep))
                load[r] += keep
            if keep < totals[e]:
                overflow.append(Piece(e, r, keep, totals[e]))
    for e, _, start, stop in sorted(overflow, key=lambda p: (p.start - p.stop, p.expert)):
        while start < stop:
            q = min((q for q in range(ranks) if load[q] < cap), key=lambda q: (load[q], q))
            take = min(stop - start, cap - load[q])
            pieces.append(Piece(e, q, start, start + take))
            load[q] += take
            start += take
    pieces.sort(key=lambda p: (p.expert, p.start))
    return LlepPlan(counts.detach().cpu().long(), cap, tuple(pieces), tuple(load))


# ---- sharding and the EP forward -------------------------------------------------------------


def find_experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The stacked-experts modules (`*.mlp.experts`, `*.block_sparse_moe.experts`), in layer order."""
    def is_experts(m: torch.nn.Module) -> bool:
        params = [getattr(m, n, None) for n in EXPERT_PARAMS]
        return hasattr(m, "act_fn") and all(isinstance(p, torch.nn.Parameter) and p.dim() == 3 for p in params)

    return [m for m in model.modules() if is_experts(m)]


@dataclass
class _Route:
    """Where this rank's pairs go and what it receives, for one forward of one layer."""

    dest: torch.Tensor
    """[N*K] destination rank of each pair, pairs in expert order."""
    send: torch.Tensor
    """[P, E] pairs this rank sends, per (destination, expert)."""
    recv: torch.Tensor
    """[P, E] pairs this rank computes, per (source, expert)."""
    moves: list[tuple[int, int]]
    """(expert, helper): the weights each owner sends (LLEP); empty under standard EP."""
    standard_pairs: int
    capacity: int | None


@dataclass(eq=False)
class ExpertParallel:
    """One sharded experts module: its slice of experts and the forward that replaced the module's."""

    module: torch.nn.Module
    group: Any
    """The EP process group (P ranks)."""
    layer: int
    num_experts: int
    balance: str = "standard"
    capacity: float = 1.25
    replicas: Any = None
    """Ranks holding the same slice (None: none)."""

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def local(self) -> range:
        """This rank's experts."""
        n = self.num_experts // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def __deepcopy__(self, memo: dict[int, Any]) -> ExpertParallel:
        # process groups are not copyable; a copied model (a reference policy) shares them
        clone = object.__new__(ExpertParallel)
        memo[id(self)] = clone
        for key, value in vars(self).items():
            setattr(clone, key, value if key in ("group", "replicas") else copy.deepcopy(value, memo))
        return clone

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        stats, began = _STATS.get(), time.perf_counter()
        k = top_k_index.shape[1]
        experts = top_k_index.reshape(-1)  # [N*K]
        by_expert = torch.argsort(experts, stable=True)  # [N*K] pairs grouped by expert, (token, choice) order within
        counts = torch.bincount(experts, minlength=self.num_experts)  # [E]
        route = self._route(counts, experts[by_expert])
        pairs = by_expert[torch.argsort(route.dest, stable=True)]  # [N*K] send order: (destination, expert, position)
        x_recv, w_recv = self._dispatch(hidden[pairs // k], route)  # [M, H], [V, D]
        y_back = self._combine(self._compute(x_recv, w_recv, route), route)  # [N*K, H]
        weights = top_k_weights.reshape(-1)[pairs]  # [N*K]
        out = torch.zeros_like(hidden).index_add_(0, pairs // k, (y_back * weights[:, None]).to(hidden.dtype))
        if stats is not None:
            self._record(stats, began, route, w_recv, hidden)
        return out

    def _route(self, counts: torch.Tensor, experts: torch.Tensor) -> _Route:
        if self.balance == "llep":
            return self._llep_route(counts, experts)
        n = len(self.local)
        mine = torch.empty(self.size, n, dtype=counts.dtype, device=counts.device)  # [P, E/P]
        dist.all_to_all_single(mine, counts.view(self.size, n), group=self.group)
        recv = torch.zeros(self.size, self.num_experts, dtype=torch.long)
        recv[:, self.local.start:self.local.stop] = mine.cpu()
        owner = torch.arange(self.num_experts) // n  # [E]
        send = torch.zeros(self.size, self.num_experts, dtype=torch.long)
        send[owner, torch.arange(self.num_experts)] = counts.cpu()
        return _Route(experts // n, send, recv, [], int(recv.sum()), None)

    def _llep_route(self, counts: torch.Tensor, experts: torch.Tensor) -> _Route:
        gathered = [torch.empty_like(counts) for _ in range(self.size)]
        dist.all_gather(gathered, counts, group=self.group)
        plan = llep_plan(torch.stack(gathered), self.capacity)  # the same plan at every rank
        routes = plan.routes()  # [P, P, E]
        standard = int(plan.counts[:, self.local.start:self.local.stop].sum())
        dest = plan.destinations(self.rank, experts) if len(experts) else experts
        return _Route(dest, routes[self.rank], routes[:, self.rank], plan.moves(), standard, plan.capacity)

    def _dispatch(self, x_send: torch.Tensor, route: _Route) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (and, under LLEP, expert weights) to the ranks computing them, in one autograd all-to-all:
        one collective per direction keeps every rank's backward in the same order."""
        hidden = x_send.shape[1]
        width = sum(p[0].numel() for p in self._params())  # D: one expert's weights, flattened
        chunks, sizes_in = [], []
        for q, rows in enumerate(x_send.split(route.send.sum(1).tolist())):
            sent = [self._flat_weights(e - self.local.start, x_send.dtype) for e, h in route.moves
                    if h == q and e in self.local]
            chunks += [rows.reshape(-1), *sent]
            sizes_in.append(rows.numel() + width * len(sent))
        rows_in = route.recv.sum(1).tolist()  # [P] rows from each source
        sizes_out = [rows * hidden + width * self._incoming(route, s) for s, rows in enumerate(rows_in)]
        buf_in = torch.cat(chunks)
        buf = dist_autograd.all_to_all_single(buf_in.new_empty(sum(sizes_out)), buf_in, sizes_out, sizes_in,
                                              group=self.group)
        tokens, weights = [], []
        for rows, part in zip(rows_in, buf.split(sizes_out)):
            tokens.append(part[:rows * hidden])
            weights.append(part[rows * hidden:])
        return torch.cat(tokens).view(-1, hidden), torch.cat(weights).view(-1, width)

    def _incoming(self, route: _Route, source: int) -> int:
        n = len(self.local)
        return sum(1 for e, h in route.moves if h == self.rank and e // n == source)

    def _compute(self, x_recv: torch.Tensor, w_recv: torch.Tensor, route: _Route) -> torch.Tensor:
        """[M, H] each received row through its expert, rows in received order (source, expert, position)."""
        experts = torch.arange(self.num_experts).repeat(self.size)  # [P*E]
        row_expert = torch.repeat_interleave(experts, route.recv.flatten()).to(x_recv.device)  # [M]
        order = torch.argsort(row_expert, stable=True)
        received = {e: w for (e, h), w in zip([m for m in route.moves if m[1] == self.rank], w_recv)}
        sizes = route.recv.sum(0).tolist()  # [E] rows per expert
        outs = [self._mlp(x, *self._weights(e, received)) for e, x in enumerate(x_recv[order].split(sizes)) if len(x)]
        # nothing to compute: still tie the output to the dispatch, whose backward every rank must join
        y = torch.cat(outs)[torch.argsort(order)] if outs else x_recv + w_recv.sum() * 0  # [M, H]
        if not any(sizes[e] for e in self.local):  # a zero gradient, as the unsharded module's slice would get
            y = y + sum(p.flatten()[0] for p in self._params()) * 0
        return y

    def _combine(self, y_recv: torch.Tensor, route: _Route) -> torch.Tensor:
        """[N*K, H] the outputs back to their sources, in send order."""
        sent = route.send.sum(1).tolist()
        out = y_recv.new_empty(sum(sent), y_recv.shape[1])
        return dist_autograd.all_to_all_single(out, y_recv, sent, route.recv.sum(1).tolist(), group=self.group)

    def _params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.gate_up_proj, self.module.down_proj

    def _flat_weights(self, local: int, dtype: torch.dtype) -> torch.Tensor:
        # sent in the tokens' dtype, so tokens and weights share one buffer
        return torch.cat([p[local].reshape(-1) for p in self._params()]).to(dtype)

    def _weights(self, expert: int, received: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = self._params()
        if expert in self.local:
            return gate_up[expert - self.local.start], down[expert - self.local.start]
        flat = received[expert]
        split = gate_up[0].numel()
        return flat[:split].view(gate_up.shape[1:]), flat[split:].view(down.shape[1:])

    def _mlp(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
        return F.linear(self.module.act_fn(gate) * up, down)  # [n, H]

    def _record(self, stats: DispatchStats, began: float, route: _Route, w_recv: torch.Tensor,
                hidden: torch.Tensor) -> None:
        if hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        stats.layers.append(LayerDispatch(
            layer=self.layer,
            pairs=int(route.recv.sum()),
            standard_pairs=route.standard_pairs,
            capacity=route.capacity,
            weights_received=len(w_recv),
            bytes_received=w_recv.numel() * w_recv.element_size(),
            seconds=time.perf_counter() - began,
        ))


def shard_experts(model: torch.nn.Module, group: Any = None, *, balance: str = "standard", capacity: float = 1.25,
                  replicas: Any = None) -> list[ExpertParallel]:
    """Keep this rank's slice of every experts module of `model` and route its tokens over `group`
    (the EP group; None: the default group). Call before building the optimizer: the expert
    parameters are replaced by new, smaller ones."""
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance={balance!r}: expected one of {BALANCE_MODES}")
    if capacity < 1.0:
        raise ValueError(f"capacity={capacity} must be >= 1.0")
    group = group if group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    found = find_experts(model)
    if not found:
        raise ValueError(f"{type(model).__name__}: no experts modules (gate_up_proj, down_proj, act_fn) to shard")
    handles = []
    for layer, module in enumerate(found):
        experts = module.gate_up_proj.shape[0]
        if experts % size:
            raise ValueError(f"num_experts={experts} must divide by expert_parallel={size}")
        if getattr(module, "expert_parallel", None) is not None:
            raise ValueError(f"layer {layer}: experts already sharded")
        n = experts // size
        for name in EXPERT_PARAMS:
            full = getattr(module, name)
            setattr(module, name, torch.nn.Parameter(full.detach()[rank * n:(rank + 1) * n].clone(),
                                                     requires_grad=full.requires_grad))
        handle = ExpertParallel(module, group, layer, experts, balance, capacity, replicas)
        module.expert_parallel = handle
        module.forward = handle.forward
        handles.append(handle)
    return handles


def reduce_expert_grads(modules: list[ExpertParallel], replicas: Any) -> None:
    """Sum the expert gradients over the ranks that hold the same slices (no-op for None or one rank)."""
    if replicas is None or dist.get_world_size(replicas) == 1:
        return
    for handle in modules:
        for p in handle._params():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=replicas)


def _handle(module: torch.nn.Module | ExpertParallel) -> ExpertParallel:
    return module if isinstance(module, ExpertParallel) else module.expert_parallel


def gather_expert(module: torch.nn.Module | ExpertParallel, name: str) -> torch.Tensor:
    """The full [E, ...] tensor of parameter `name` (a collective over the EP group)."""
    handle = _handle(module)
    local = getattr(handle.module, name).detach().contiguous()  # [E/P, ...]
    parts = [torch.empty_like(local) for _ in range(handle.size)]
    dist.all_gather(parts, local, group=handle.group)
    return torch.cat(parts)


def load_expert(module: torch.nn.Module | ExpertParallel, name: str, full: torch.Tensor) -> None:
    """Copy this rank's slice of the full [E, ...] tensor into parameter `name`."""
    handle = _handle(module)
    if full.shape[0] != handle.num_experts:
        raise ValueError(f"{name}: {full.shape[0]} experts given, the layer has {handle.num_experts}")
    with torch.no_grad():
        getattr(handle.module, name).copy_(full[handle.local.start:handle.local.stop])
