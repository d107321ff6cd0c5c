"""Mixture-of-Experts routing under rlhub's control: record, replay, balance, measure.

Sits inside every model that routes tokens: the built-in engine records which
experts each position went to, the learner replays those experts and adds the
load-balancing terms, and both log the expert load. `Routing` takes over the
routers of a transformers MoE model (Qwen3-MoE and Mixtral style: a router
module whose forward maps hidden states [N, H] to (logits, top-k weights,
top-k ids)) by replacing their forward with one that

- selects the top-k experts from the softmax of the router logits, plus a
  selection-only bias when the auxiliary-loss-free balance is on (DeepSeek-V3:
  the bias moves which experts win, never the gate weights);
- or, where a replay is given (routing replay, R3), takes the experts the
  engine chose for that position, while the gate weights are still the
  learner's own softmax over those experts, so the router keeps learning;
- records, per layer, the router logits of the real (unpadded) positions and
  the chosen and the fresh (own top-k) expert ids.

Routes are position-aligned: `routes[t, layer]` are the k experts that
position t of the sequence was sent to in that layer, the computation whose
output predicts token t+1. A sequence of length S has S-1 routed positions
that matter (the last token is never an input). Missing positions are -1 and
route freshly under replay.

Load balancing (`moe.balance`):

- `global_batch`: the auxiliary loss E * sum_i f_i * P_i with the expert
  frequencies f_i counted over the whole optimizer batch (all micro-batches,
  and all data-parallel ranks) before any micro-batch's loss, as "Demons in
  the Detail" (Qiu et al., 2025) recommends: a batch whose micro-batches each
  favour one expert is balanced overall and is not penalised. The counts come
  from the replayed routes when every position has one (they are the experts
  the forward will use), else from a routing pass without gradients.
- `micro_batch`: the same loss with f_i and P_i of each micro-batch alone.
- `aux_free`: no auxiliary loss; after each step every router's selection bias
  moves by `bias_update_rate` towards the under-loaded experts.
- `none`.

The router z-loss (mean squared log-sum-exp of the router logits, ST-MoE)
is added with `moe.z_loss_coef` in every mode.
"""

from __future__ import annotations

import types
from collections import deque
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from rlhub.moe_config import BALANCE_MODES, GROUPS_KEY, REPLAY_MODES, MoEConfig, check_groups, engine_records_routing, model_is_moe, replay_enabled  # noqa: F401
from rlhub.parallel.ranks import Ranks

BIAS_NAME = "selection_bias"
"""The buffer holding a router's selection bias (aux_free only); the state-dict key ends with it."""


def route_dtype(num_experts: int) -> torch.dtype:
    """The smallest signed integer type for expert ids and the -1 of an unrecorded position."""
    return torch.int8 if num_experts <= 127 else torch.int16


def find_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The top-k routers of a transformers MoE model, in layer order."""
    routers = [
        m
        for name, m in model.named_modules()
        if (name.endswith("mlp.gate") or name.endswith("block_sparse_moe.gate")) and hasattr(m, "top_k") and hasattr(m, "weight")
    ]
    return routers


@dataclass
class LayerRecord:
    logits: torch.Tensor
    """[n_valid, E] router logits of the real positions (with the graph when training)."""
    used: torch.Tensor
    """[N, K] the experts the forward used, for every position (padding included)."""
    fresh: torch.Tensor
    """[N, K] the router's own top-k (with the selection bias), for every position."""


@dataclass
class Capture:
    """What one call's forward passes record, and the routes they replay. It belongs to the call that
    opened it (`Routing.capture`): a forward run by another thread or task never sees it."""

    layers: list[LayerRecord] = field(default_factory=list)
    valid: torch.Tensor | None = None
    """[N] the real positions among the N the routers saw (their logits are the ones recorded)."""
    replay: torch.Tensor | None = None
    """[N, L, K] the experts to use per position and layer (-1: route freshly); None: no replay."""


def grouped_topk(scores: torch.Tensor, k: int, groups: int) -> torch.Tensor:
    """[N, k] expert ids: the top k/G of `scores` [N, E] inside each of the G contiguous groups of E/G
    experts (group g holds experts g*E/G .. (g+1)*E/G - 1), group by group; G=1 is plain top-k.
    Every group gets k/G choices of every token, so its load is the same as every other's.

    >>> grouped_topk(torch.tensor([[9.0, 8.0, 7.0, 1.0]]), 2, 2).tolist()
    [[0, 2]]
    """
    if groups == 1:
        return torch.topk(scores, k, dim=-1).indices
    n, experts = scores.shape
    size = experts // groups
    local = torch.topk(scores.reshape(n, groups, size), k // groups, dim=-1).indices  # [N, G, k/G] within each group
    offsets = torch.arange(0, experts, size, device=scores.device).view(1, groups, 1)
    return (local + offsets).reshape(n, k)


class Routing:
    """Takes over the routers of one model (see the module docstring).

    The active capture is held in a context variable of this object, not in an attribute: each
    thread (and each asyncio task) sees only the capture it opened, so a scoring forward running
    beside a training step neither records into nor replays from the training step's capture."""

    def __init__(self, model: torch.nn.Module, selection_bias: bool = False, groups: int | None = None) -> None:
        """`groups`: route within that many expert groups (`grouped_topk`); None: as the model's config
        records (`rlhub_expert_groups`, absent: 1). A value that contradicts the record is refused: the
        engines follow the record, and the learner must route as they do."""
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__}: no top-k MoE routers found (expected modules named *.mlp.gate with top_k)")
        first = self.routers[0]
        self.top_k = int(first.top_k)
        self.num_experts = int(first.weight.shape[0])
        recorded = int(getattr(getattr(model, "config", None), GROUPS_KEY, None) or 1)
        if groups is not None and groups != recorded:
            raise ValueError(
                f"moe.groups={groups} (moe.routing={'grouped' if groups > 1 else 'topk'}) contradicts the model, whose config "
                f"records {GROUPS_KEY}={recorded}{' (absent: plain top-k)' if recorded == 1 else ''}; the engines route as the "
                f"model records, so set moe.routing/moe.groups to match it (or convert the model with --groups)"
            )
        self.groups = recorded if groups is None else groups
        check_groups(self.groups, self.num_experts, self.top_k, GROUPS_KEY if groups is None else "moe.groups")
        self.num_layers = len(self.routers)
        self.normalize = [bool(getattr(r, "norm_topk_prob", True)) for r in self.routers]
        self.selection_bias = selection_bias
        self._active: ContextVar[Capture | None] = ContextVar(f"rlhub-routing-{id(self)}", default=None)
        for layer, router in enumerate(self.routers):
            if selection_bias and not hasattr(router, BIAS_NAME):
                router.register_buffer(BIAS_NAME, torch.zeros(self.num_experts, device=router.weight.device))
            router.forward = types.MethodType(self._forward_of(layer), router)

    def _forward_of(self, layer: int):
        routing = self

        def forward(router: torch.nn.Module, hidden: torch.Tensor):
            hidden = hidden.reshape(-1, router.weight.shape[1])
            logits = F.linear(hidden, router.weight, getattr(router, "bias", None))
            probs = torch.softmax(logits.float(), dim=-1)
            scores = probs.detach()
            bias = getattr(router, BIAS_NAME, None)
            if bias is not None:
                scores = scores + bias.float()
            fresh = grouped_topk(scores, routing.top_k, routing.groups)
            used = fresh
            capture = routing._active.get()
            if capture is not None and capture.replay is not None:
                replay = capture.replay[:, layer].to(fresh.device, torch.long)
                known = (replay >= 0).all(-1, keepdim=True)
                used = torch.where(known, replay, fresh)
            weights = probs.gather(-1, used)
            if routing.normalize[layer]:
                weights = weights / weights.sum(-1, keepdim=True)
            if capture is not None:
                real = logits if capture.valid is None else logits[capture.valid]
                capture.layers.append(LayerRecord(real, used.detach(), fresh))
            return logits, weights.to(logits.dtype), used

        return forward

    @contextmanager
    def capture(self, valid: torch.Tensor | None = None, replay: torch.Tensor | None = None) -> Iterator[Capture]:
        """Record the routing of the forward passes run inside; `valid` [B, T] marks real positions,
        `replay` [B, T, L, K] the experts to use (-1: route freshly)."""
        cap = Capture(valid=None if valid is None else valid.reshape(-1).bool(),
                      replay=None if replay is None else replay.reshape(-1, *replay.shape[2:]))
        token = self._active.set(cap)
        try:
            yield cap
        finally:
            self._active.reset(token)

    # ---- the selection bias (aux_free) ----------------------------------------
    def biases(self) -> torch.Tensor | None:
        if not self.selection_bias:
            return None
        return torch.stack([getattr(r, BIAS_NAME) for r in self.routers])

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """Move each layer's bias towards its under-loaded experts: +rate below the mean load, -rate above."""
        for router, row in zip(self.routers, counts):
            bias = getattr(router, BIAS_NAME)
            bias += rate * torch.sign(row.mean() - row).to(bias)


# ---- load-balancing terms ---------------------------------------------------------
def expert_counts(used: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] how many (position, choice) pairs went to each expert; `used` [n, K], -1 ignored."""
    flat = used.reshape(-1).long()
    return torch.bincount(flat[flat >= 0], minlength=num_experts).float()


def balance_loss(logits: torch.Tensor, frequencies: torch.Tensor, total_tokens: float) -> torch.Tensor:
    """This slice's share of E * sum_i f_i * P_i, where P_i is the mean router probability over
    `total_tokens` positions and `frequencies` f [E] sums to 1 (taken as constants)."""
    probs = torch.softmax(logits.float(), dim=-1)  # [n, E]
    num_experts = logits.shape[-1]
    return num_experts * (frequencies.to(probs) * probs.sum(0)).sum() / max(total_tokens, 1.0)


def z_loss(logits: torch.Tensor, total_tokens: float) -> torch.Tensor:
    """This slice's share of the mean of logsumexp(logits)^2 over `total_tokens` positions."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).sum() / max(total_tokens, 1.0)


def load_balancing_loss(micro_batches: list[tuple[torch.Tensor, torch.Tensor]], mode: str) -> torch.Tensor:
    """The load-balancing loss of one layer over a batch given as micro-batches of
    (router logits [n, E], chosen experts [n, K]): `global_batch` counts the frequencies over all of
    them, `micro_batch` over each alone (each micro-batch weighted by its share of positions)."""
    total = float(sum(logits.shape[0] for logits, _ in micro_batches))
    num_experts = micro_batches[0][0].shape[-1]
    if mode == "global_batch":
        counts = sum(expert_counts(used, num_experts) for _, used in micro_batches)
        freq = counts / counts.sum().clamp(min=1.0)
        return sum(balance_loss(logits, freq, total) for logits, _ in micro_batches)
    if mode == "micro_batch":
        out = torch.zeros(())
        for logits, used in micro_batches:
            counts = expert_counts(used, num_experts)
            out = out + balance_loss(logits, counts / counts.sum().clamp(min=1.0), total)  # n/total * E sum f P_mb
        return out
    raise ValueError(f"load_balancing_loss: mode {mode!r}")


# ---- metrics ---------------------------------------------------------------------
EXPERT_LOAD = "expert_load.safetensors"
"""Beside a learner's or critic's checkpointed state: the expert counts of the steps the dead-expert count looks back over."""


class ExpertLoad:
    """Per-step expert-load metrics, and dead experts over a window of steps."""

    def __init__(self, num_layers: int, num_experts: int, window: int) -> None:
        self.history: deque[torch.Tensor] = deque(maxlen=window)

    def metrics(self, counts: torch.Tensor, entropy: torch.Tensor) -> dict[str, float]:
        """`counts` [L, E] this step's (position, choice) pairs per expert; `entropy` [L] mean router entropy."""
        self.history.append(counts.detach().cpu())
        recent = torch.stack(list(self.history)).sum(0)  # [L, E]
        frac = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
        out: dict[str, float] = {}
        for layer, row in enumerate(frac):
            out[f"moe/layer{layer}/max_over_mean"] = float(row.max() / row.mean().clamp(min=1e-9))
            out[f"moe/layer{layer}/router_entropy"] = float(entropy[layer])
            out[f"moe/layer{layer}/dead_experts"] = float((recent[layer] == 0).sum())
            for e, f in enumerate(row.tolist()):
                out[f"moe/layer{layer}/expert{e}"] = f
        out["moe/max_over_mean"] = max(out[f"moe/layer{i}/max_over_mean"] for i in range(len(frac)))
        out["moe/dead_experts"] = float((recent == 0).sum())
        out["moe/router_entropy"] = float(entropy.mean())
        return out

    def save(self, path: Path) -> None:
        """The window's counts (a checkpoint's: a resumed run counts dead experts over the steps before it too)."""
        from safetensors.torch import save_file

        save_file({"counts": torch.stack(list(self.history)) if self.history else torch.zeros(0)}, str(path))

    def load(self, path: Path) -> None:
        """The window `save` wrote; none (a checkpoint of an earlier rlhub) starts it empty."""
        from safetensors.torch import load_file

        self.history.clear()
        if path.is_file():
            self.history.extend(load_file(str(path))["counts"])


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Summed entropy of the router distribution over the positions of `logits` [n, E]."""
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    return -(logp.exp() * logp).sum()


def set_differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[...] whether the top-k sets a [..., K] and b [..., K] differ."""
    return (a.sort(-1).values != b.sort(-1).values.to(a)).any(-1)


# ---- one model's routing over an optimizer step --------------------------------------
class PrefixCapture:
    """The routing of a forward split at a shared prefix: the prefix's positions, run once per
    distinct prefix, then every row's rest. `suffix()` switches the replay between the two forwards;
    `merged()` is the capture one whole forward would have made: every row's records in its own
    [b, T] order, the prefix's copied to each row that shares it (with the graph, so the balance
    losses' gradients of the copies add up in the one computation, as the positions' would)."""

    def __init__(self, capture: Capture, rest: torch.Tensor | None, valid: torch.Tensor, prefix: Any, num_layers: int) -> None:
        self.capture = capture
        self.rest = rest
        self.valid = valid  # [b, T]
        self.prefix = prefix
        self.num_layers = num_layers

    def suffix(self) -> None:
        self.capture.replay = None if self.rest is None else self.rest.reshape(-1, *self.rest.shape[2:])

    def merged(self) -> Capture:
        layers = self.capture.layers
        if len(layers) != 2 * self.num_layers:
            raise RuntimeError(f"a split forward's capture holds {len(layers)} layer records, not 2 x {self.num_layers}: "
                               "forwards of two calls were mixed")
        b, width = self.valid.shape
        n, distinct = self.prefix.length, self.prefix.firsts.shape[0]

        def join(head: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
            head = head.reshape(distinct, n, -1)[self.prefix.of_row.to(head.device)]
            return torch.cat([head, tail.reshape(b, width - n, -1)], dim=1).reshape(b * width, -1)

        valid = self.valid.reshape(-1)
        records = [LayerRecord(join(h.logits, t.logits)[valid], join(h.used, t.used), join(h.fresh, t.fresh))
                   for h, t in zip(layers[: self.num_layers], layers[self.num_layers :])]
        return Capture(records, valid)


def routed_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose output predicts a real next token. They are the ones routing
    replay records and the balance counts; a sequence's last token is never an input that matters."""
    mask = attention_mask.bool()
    return mask & torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False)


def replay_tensor(routes: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """[B, T-1, L, K] batch routes -> [B, width, L, K] for a forward over `width` positions (-1 beyond)."""
    if routes is None:
        return None
    pad = width - routes.shape[1]
    return torch.cat([routes, routes.new_full((routes.shape[0], pad, *routes.shape[2:]), -1)], dim=1) if pad > 0 else routes[:, :width]


@dataclass
class BalanceStep:
    """One optimizer step's balance state, owned by the call that runs the step (`Balancer.begin`
    makes it; `loss` and `end` take it), so two steps or a step and a scoring pass share nothing."""

    total: float
    """Routed positions in the whole batch: every micro-batch's terms are its share of the batch's."""
    counts: torch.Tensor
    """[L, E] (position, choice) pairs per expert counted so far this step."""
    entropy: torch.Tensor
    """[L] summed router entropy so far this step."""
    freq: torch.Tensor | None = None
    """[L, E] the whole batch's expert frequencies under global_batch (None: each micro-batch's own)."""


class Balancer:
    """The routers of one model (the policy or the critic) through one optimizer step: replay,
    the load-balancing and z-loss terms of each micro-batch, then expert-load metrics and the
    auxiliary-loss-free bias update. A step's state lives in the `BalanceStep` it returns."""

    def __init__(self, model: torch.nn.Module, cfg: MoEConfig, replay: bool = False) -> None:
        self.cfg = cfg
        self.replay = replay
        self.routing = Routing(model, selection_bias=cfg.balance == "aux_free", groups=cfg.groups if cfg.routing == "grouped" else 1)
        self.load = ExpertLoad(self.routing.num_layers, self.routing.num_experts, cfg.dead_window)

    def begin(self, attention_mask: torch.Tensor, routes: torch.Tensor | None, prepass=None, ranks: Ranks | None = None) -> BalanceStep:
        """Start a step over a batch. Under global_batch the expert frequencies of the whole batch are
        fixed here: from the routes when replay covers every position, else from `prepass()`, a
        routing pass without gradients that the caller runs over its micro-batches inside
        `micro_batch` (None: the batch is one micro-batch, counted in its own forward).

        `ranks`: the learner ranks the batch is split over (`rlhub.parallel.ranks`). The routed
        positions and the expert counts are then summed over them, so each rank's terms are its share of
        the whole batch's, and every rank takes the same branch (a prepass is then always given: its
        forwards are collectives)."""
        ranks = ranks or Ranks.single()
        valid = routed_positions(attention_mask)
        layers, experts = self.routing.num_layers, self.routing.num_experts
        step = BalanceStep(ranks.sum([valid.sum()])[0], torch.zeros(layers, experts), torch.zeros(layers))
        if self.cfg.balance != "global_batch":
            return step
        routed = None if routes is None else valid[:, : routes.shape[1]]
        covered = self.replay and routes is not None and bool((routes >= 0).all(-1).all(-1)[routed].all())
        if ranks.all_true(covered):
            used = routes[routed]  # [n, L, K]
            counts = torch.stack([expert_counts(used[:, layer], experts) for layer in range(layers)])
        elif prepass is not None:
            counts = torch.zeros(layers, experts)
            with torch.no_grad():
                for capture in prepass():
                    counts += torch.stack([expert_counts(rec.used[capture.valid], experts) for rec in capture.layers]).cpu()
        else:
            return step  # one micro-batch: its own forward gives the batch's frequencies
        step.freq = self._normalise(ranks.sum_tensor(counts))
        return step

    def routing_pass(self, parts: list[tuple[torch.Tensor, torch.Tensor | None]], forward, rounds: int | None = None, idle=None):
        """`begin`'s `prepass` for a batch in micro-batches, given as (attention mask, routes) each:
        `forward(i)` runs the model on the i-th. `rounds`: the forwards to run in all, for a learner rank
        whose collectives must pair with busier ranks': after its own parts, `idle()` runs the rest."""

        def run():
            for i in range(len(parts) if rounds is None else rounds):
                if i >= len(parts):
                    idle()
                    continue
                with self.micro_batch(*parts[i]) as capture:
                    forward(i)
                yield capture

        return run

    @staticmethod
    def _normalise(counts: torch.Tensor) -> torch.Tensor:
        return counts / counts.sum(-1, keepdim=True).clamp(min=1.0)

    def micro_batch(self, attention_mask: torch.Tensor, routes: torch.Tensor | None, replay: bool | None = None):
        """A capture (context manager) of the routing of the forward run inside it, in this thread,
        replaying `routes` ([b, T-1, L, K]) when replay is on (`replay` overrides the configured
        choice, for the mismatch metrics)."""
        use = self.replay if replay is None else replay
        return self.routing.capture(routed_positions(attention_mask), replay_tensor(routes, attention_mask.shape[1]) if use else None)

    @contextmanager
    def shared_micro_batch(self, attention_mask: torch.Tensor, routes: torch.Tensor | None, prefix: Any,
                           replay: bool | None = None) -> Iterator["PrefixCapture"]:
        """`micro_batch` for a forward split at a shared prefix (`rlhub.models.logprobs.SharedPrefix`):
        the prefix's forward replays the routes of its first row, the rest's forward every row's own."""
        use = self.replay if replay is None else replay
        width = attention_mask.shape[1]
        full = replay_tensor(routes, width) if use else None  # [b, T, L, K]
        head = None if full is None else full[prefix.firsts, : prefix.length]
        rest = None if full is None else full[:, prefix.length :]
        with self.routing.capture(None, head) as capture:
            yield PrefixCapture(capture, rest, routed_positions(attention_mask), prefix, self.routing.num_layers)

    def loss(self, step: BalanceStep, capture: Capture) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss) of one micro-batch, each its share of the batch value
        (summed over micro-batches they give the batch's), averaged over layers; counts its load
        into `step`."""
        cfg, num_experts = self.cfg, self.routing.num_experts
        if len(capture.layers) != self.routing.num_layers:
            raise RuntimeError(f"a routing capture holds {len(capture.layers)} layer records for a model of "
                               f"{self.routing.num_layers} MoE layers: forwards of two calls were mixed")
        aux = z = torch.zeros((), device=capture.layers[0].logits.device)
        for layer, rec in enumerate(capture.layers):
            used = rec.used[capture.valid]
            counts = expert_counts(used, num_experts)
            step.counts[layer] += counts.cpu()
            step.entropy[layer] += float(router_entropy(rec.logits))
            if cfg.balance in ("global_batch", "micro_batch") and cfg.aux_loss_coef > 0:
                freq = self._normalise(counts) if step.freq is None or cfg.balance == "micro_batch" else step.freq[layer]
                aux = aux + balance_loss(rec.logits, freq, step.total)
            if cfg.z_loss_coef > 0:
                z = z + z_loss(rec.logits, step.total)
        layers = max(len(capture.layers), 1)
        return aux / layers, z / layers

    def weighted(self, aux: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z

    def end(self, step: BalanceStep, updated: bool, ranks: Ranks | None = None) -> dict[str, float]:
        """Expert-load metrics of the step (over all `ranks`); moves the selection bias (aux_free) when
        the weights moved, by the load of the whole batch."""
        ranks = ranks or Ranks.single()
        counts = ranks.sum_tensor(step.counts)
        entropy = torch.tensor(ranks.sum_always(step.entropy.tolist()))
        if updated and self.cfg.balance == "aux_free":
            self.routing.update_bias(counts, self.cfg.bias_update_rate)
        out = self.load.metrics(counts, entropy / max(step.total, 1.0))
        biases = self.routing.biases()
        if biases is not None:
            out["moe/selection_bias_absmax"] = float(biases.abs().max())
        return out
