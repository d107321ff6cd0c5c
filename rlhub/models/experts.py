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


def sorted_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output [tokens, H] for `hidden_states` [tokens, H] routed to `top_k_index` [tokens, k]
    with `top_k_weights` [tokens, k]; an expert index >= E (no expert) is skipped."""
    experts = self.gate_up_proj.shape[0]
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat.clamp(max=experts), minlength=experts + 1)[:experts].tolist()
    rows = order[:sum(counts)]  # ids >= E (a sentinel for "no expert") sort last and are left out
    token = rows // k
    x = hidden_states[token]
    adapters: ExpertAdapters | None = getattr(self, "rlhub_lora", None)
    gate_ups, downs = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)  # one gradient per parameter, not one per expert
    outputs = []
    start = 0
    for e, n in enumerate(counts):
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
    out = torch.zeros_like(hidden_states)
    if not outputs:
        return out
    weights = top_k_weights.reshape(-1)[rows].unsqueeze(-1)
    y = torch.cat(outputs) * weights.to(outputs[0].dtype)
    return out.index_add_(0, token, y.to(out.dtype))


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
