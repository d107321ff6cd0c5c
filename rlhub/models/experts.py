"""The MoE experts' computation in the learner: tokens sorted by expert, one matmul pair per expert.

transformers (5.x) stores a layer's experts as two 3-D parameters, `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I], and picks how to compute them by `config._experts_implementation`. On a CPU
its default, `grouped_mm`, is not autocast-enabled: it casts the input to the weights' dtype, so under
`learner.precision=bf16` the experts, most of an MoE's arithmetic, stayed in fp32. Measured on the
SmolLM2 MoE (4 experts top-2, one core, 4 micro-batches of 8 x 37 tokens, bf16 autocast): a step's
forward 4.1 s and backward 8.4 s with `grouped_mm`; see `rlhub bench learner` for the figures with
this one.

`sorted_experts_forward` gathers the (token, expert) pairs sorted by expert and runs
`F.linear` per expert, which autocast computes in bf16, and adds each expert's own LoRA adapter
(`ExpertAdapters`, `rlhub.lora`) as two thin matmuls on the same rows: the expert weights themselves
are never rebuilt, and their gradient is never formed when they are frozen. `use_sorted_experts`
switches a model to it; the engines keep transformers' own implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMPLEMENTATION = "rlhub_sorted"
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class ExpertAdapters(torch.nn.Module):
    """Per-expert LoRA factors of one experts module: for expert e, `gate_up_proj[e]` gains
    scaling * `gate_up_B[e]` @ `gate_up_A[e]`, and `down_proj[e]` the same with its own pair. A is
    drawn uniform in ±1/sqrt(fan-in) and B is zero, so a new adapter leaves the model as it was."""

    def __init__(self, experts: int, hidden: int, intermediate2: int, intermediate: int, rank: int, scaling: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.scaling = float(scaling)
        self.gate_up_A = torch.nn.Parameter(_uniform((experts, rank, hidden), hidden, generator))
        self.gate_up_B = torch.nn.Parameter(torch.zeros(experts, intermediate2, rank))
        self.down_A = torch.nn.Parameter(_uniform((experts, rank, intermediate), intermediate, generator))
        self.down_B = torch.nn.Parameter(torch.zeros(experts, hidden, rank))

    def delta(self, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
        """scaling * x @ A[e]^T @ B[e]^T for `name` (gate_up or down)."""
        a, b = getattr(self, f"{name}_A")[expert], getattr(self, f"{name}_B")[expert]
        return F.linear(F.linear(x, a), b) * self.scaling


def _uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


ROWS_MULTIPLE = 32
"""Each expert's rows are padded to a multiple of this. On a CPU, oneDNN compiles a kernel for every
matmul shape it meets and keeps the last 1024; an MoE's per-expert row counts differ in every layer
and micro-batch, so without the padding a step met thousands of shapes and compiled most of its
matmuls afresh: on the SmolLM2 MoE (bf16 LoRA, one core, rollout batches) a learner step took 25-28 s
where the same step on shapes seen before took 10 s."""


def padded_rows(counts: list[int], multiple: int = ROWS_MULTIPLE) -> list[int]:
    return [-(-n // multiple) * multiple for n in counts]


def sorted_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output [tokens, H] for `hidden_states` [tokens, H] routed to `top_k_index` [tokens, k]
    with `top_k_weights` [tokens, k]; an expert index >= E (no expert) is skipped. Each expert's rows
    are padded with zero rows (weight 0) to a multiple of `ROWS_MULTIPLE`."""
    experts = self.gate_up_proj.shape[0]
    tokens, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat.clamp(max=experts), minlength=experts + 1)[:experts].tolist()
    padded = padded_rows(counts)
    slots = torch.full((sum(padded),), tokens * k, dtype=torch.long, device=flat.device)  # tokens * k: a zero row
    start, begin = 0, 0
    for n, p in zip(counts, padded):
        slots[begin:begin + n] = order[start:start + n]  # ids >= E (a sentinel for "no expert") sort last and are left out
        start, begin = start + n, begin + p
    token = slots // k  # the pad slots point at row `tokens`, a zero row appended below
    x = torch.cat([hidden_states, hidden_states.new_zeros(1, hidden_states.shape[-1])])[token]
    adapters: ExpertAdapters | None = getattr(self, "rlhub_lora", None)
    gate_ups, downs = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)  # one gradient per parameter, not one per expert
    outputs = []
    start = 0
    for e, n in enumerate(padded):
        if n == 0:
            continue
        xe = x[start:start + n]
        gate_up = F.linear(xe, gate_ups[e])
        if adapters is not None:
            gate_up = gate_up + adapters.delta("gate_up", xe, e)
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        y = F.linear(h, downs[e])
        if adapters is not None:
            y = y + adapters.delta("down", h, e)
        outputs.append(y)
        start += n
    out = hidden_states.new_zeros(tokens + 1, hidden_states.shape[-1])
    if not outputs:
        return out[:tokens]
    weights = torch.cat([top_k_weights.reshape(-1), top_k_weights.new_zeros(1)])[slots].unsqueeze(-1)
    y = torch.cat(outputs) * weights.to(outputs[0].dtype)
    return out.index_add_(0, token, y.to(out.dtype))[:tokens]


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every fused experts module (3-D `gate_up_proj` and `down_proj`, `act_fn`)."""
    return [(n, m) for n, m in model.named_modules()
            if all(isinstance(getattr(m, p, None), torch.Tensor) and getattr(m, p).dim() == 3 for p in EXPERT_PARAMS)
            and hasattr(m, "act_fn")]


def use_sorted_experts(model: torch.nn.Module) -> int:
    """Switch every experts module of `model` to `sorted_experts_forward`; returns how many there are.
    Refuses a layout it does not compute (transposed or biased experts, no gate)."""
    from transformers.integrations.moe import ExpertsInterface

    if IMPLEMENTATION not in ExpertsInterface._global_mapping:
        ExpertsInterface.register(IMPLEMENTATION, sorted_experts_forward)
    found = experts_modules(model)
    for name, module in found:
        if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
            raise ValueError(f"{name}: experts stored transposed, with biases or without a gate are not computed by {IMPLEMENTATION}")
    if found:
        model.config._experts_implementation = IMPLEMENTATION
        for _, module in found:  # each module holds the config it was built with
            module.config._experts_implementation = IMPLEMENTATION
    return len(found)
