"""Learner state-dict names -> checkpoint names, for pushing weights into engines.

Sits between the learner and the rollout engines: the learner hands over
`model.state_dict()` of its transformers model, and an engine that loads
weights the way a checkpoint is loaded (vLLM's `load_weights`, or
`save_file` for a rebuild) needs the names and layout `save_pretrained` writes.

The two differ for MoE models: transformers 5 keeps the experts of a layer
fused in memory,

    {layer}.mlp.experts.gate_up_proj   [E, 2*I, H]   (gate rows first, then up)
    {layer}.mlp.experts.down_proj      [E, H, I]

while checkpoints (and vLLM) name one tensor per expert,

    {layer}.mlp.experts.{e}.gate_proj.weight   [I, H]
    {layer}.mlp.experts.{e}.up_proj.weight     [I, H]
    {layer}.mlp.experts.{e}.down_proj.weight   [H, I]

(Mixtral checkpoints say `block_sparse_moe` for `mlp` and w1/w3/w2 for
gate/up/down). Names that are already checkpoint-style pass through, so dense
Llama-like models and per-expert state dicts need nothing. The split tensors
are views of the fused ones: no copy is made here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

_FUSED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class ExpertNaming:
    """How a checkpoint names one expert's three projections, and the MoE block."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    block: str = "mlp"
    """Name of the layer's MoE block in the checkpoint (transformers 5 calls it `mlp` in memory)."""


_QWEN_STYLE = ExpertNaming()
_MIXTRAL_STYLE = ExpertNaming(gate="w1", up="w3", down="w2", block="block_sparse_moe")
# transformers 5 loads these with a `.block_sparse_moe.` -> `.mlp.` rename and w1/w3/w2 experts.
_NAMING_BY_MODEL_TYPE = {"mixtral": _MIXTRAL_STYLE, "minimax": _MIXTRAL_STYLE}

_NOT_WEIGHTS = ("rotary_emb.inv_freq",)
"""Buffers some older models put in the state dict; not checkpoint weights."""


def naming_for(model_type: str) -> ExpertNaming:
    return _NAMING_BY_MODEL_TYPE.get(model_type, _QWEN_STYLE)


def to_checkpoint_names(
    state: dict[str, torch.Tensor],
    *,
    model_type: str = "",
    tie_word_embeddings: bool = False,
) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors (views where split) for a learner `state_dict()`.

    A tied `lm_head.weight` is left out: checkpoints do not store it, vLLM ties
    it itself, and safetensors refuses two names for one storage.
    """
    naming = naming_for(model_type)
    fused: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith(_NOT_WEIGHTS):
            continue
        match = _FUSED.match(name)
        if match and tensor.dim() == 3:
            fused.setdefault(match["prefix"], {})[match["kind"]] = tensor
            continue
        out[rename_block(name, naming)] = tensor
    for prefix, parts in fused.items():
        out.update(_split_experts(rename_block(prefix, naming), parts, naming))
    return out


def to_checkpoint_names_for(state: dict[str, torch.Tensor], hf_config: Any) -> dict[str, torch.Tensor]:
    """`to_checkpoint_names` with the model type and tying read from a transformers config."""
    return to_checkpoint_names(
        state,
        model_type=getattr(hf_config, "model_type", ""),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def rename_block(name: str, naming: ExpertNaming) -> str:
    if naming.block == "mlp":
        return name
    return name.replace(".mlp.", f".{naming.block}.")


def _split_experts(prefix: str, parts: dict[str, torch.Tensor], naming: ExpertNaming) -> dict[str, torch.Tensor]:
    gate_up, down = parts.get("gate_up_proj"), parts.get("down_proj")
    if gate_up is None or down is None:
        raise ValueError(f"{prefix}: fused experts need both gate_up_proj and down_proj, got {sorted(parts)}")
    _check_layout(prefix, gate_up, down)
    inter = down.shape[2]
    out: dict[str, torch.Tensor] = {}
    for e in range(gate_up.shape[0]):
        out[f"{prefix}.{e}.{naming.gate}.weight"] = gate_up[e, :inter]
        out[f"{prefix}.{e}.{naming.up}.weight"] = gate_up[e, inter:]
        out[f"{prefix}.{e}.{naming.down}.weight"] = down[e]
    return out


def _check_layout(prefix: str, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    # Some models (e.g. gpt-oss) keep the fused experts transposed, [E, H, 2I];
    # splitting those by rows would silently load garbage, so refuse them.
    experts, two_inter, hidden = gate_up.shape
    ok = down.shape[0] == experts and down.shape[1] == hidden and two_inter == 2 * down.shape[2]
    if not ok:
        raise NotImplementedError(
            f"{prefix}: fused expert layout gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} "
            "is not [E, 2I, H] / [E, H, I]; add a converter for this model"
        )
