"""The `moe.*` configuration and the start-up checks that need no torch (`rlhub.moe` does the work)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPLAY_MODES = ("auto", "rollout", "none")
BALANCE_MODES = ("global_batch", "micro_batch", "aux_free", "none")
ROUTING_MODES = ("topk", "grouped")
GROUPS_KEY = "rlhub_expert_groups"
"""The key of a model's config.json that records grouped routing (`moe.routing=grouped`): its value G
is the number of expert groups. Transformers keeps it as a config attribute, so every engine and
learner that loads the model sees it; absent means plain top-k."""


@dataclass
class MoEConfig:
    """MoE training: routing replay, load balancing, expert-load metrics (`moe.*`)."""

    routing: str = "topk"
    """topk: each token takes the k experts of highest router probability; grouped: the E experts are
    split into `groups` contiguous groups of E/G and each token takes the top k/G inside every group
    (Mixture of Grouped Experts, Pangu Pro MoE), so every group, one per device under expert
    parallelism, gets the same load by construction. It must agree with the model's recorded grouping
    (`rlhub_expert_groups` in its config.json, which the engines follow)."""
    groups: int = 1
    """grouped: the number of expert groups G; it must divide the model's experts and top_k (1 under topk)."""
    routing_replay: str = "auto"
    """rollout: the learner routes every recorded position to the experts the engine used;
    none: the learner routes freshly; auto: rollout where the engine records routing (hf), else none."""
    balance: str = "global_batch"
    """global_batch | micro_batch | aux_free | none (see rlhub.moe)."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (global_batch, micro_batch)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (0: off). ST-MoE uses 1e-3 for large models; on the tiny default
    model under Adam it moved the routers more than the task did, so it is opt-in."""
    bias_update_rate: float = 0.001
    """aux_free: the step by which each selection bias moves per optimizer step."""
    dead_window: int = 20
    """An expert is dead when no token was routed to it in the last this many steps."""
    mismatch_every: int = 10
    """Every this many steps the learner also runs the forward it does not train with (fresh
    routing under replay, replayed routing without), for the mismatch metrics; 0: never. Every
    step, that forward was 16 % of the default run's training step."""

    def check(self) -> None:
        """ValueError naming the key whose value is not allowed."""
        if self.routing_replay not in REPLAY_MODES:
            raise ValueError(f"moe.routing_replay={self.routing_replay!r}: use one of {list(REPLAY_MODES)}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"moe.balance={self.balance!r}: use one of {list(BALANCE_MODES)}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
        if self.dead_window < 1 or self.mismatch_every < 0:
            raise ValueError("moe.dead_window must be >= 1 and moe.mismatch_every >= 0")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"moe.routing={self.routing!r}: use one of {list(ROUTING_MODES)}")
        if self.groups < 1:
            raise ValueError(f"moe.groups must be >= 1, got {self.groups}")
        if self.routing == "grouped" and self.groups < 2:
            raise ValueError(f"moe.routing=grouped needs moe.groups >= 2, got {self.groups}")
        if self.routing == "topk" and self.groups != 1:
            raise ValueError(f"moe.groups={self.groups} splits experts only under moe.routing=grouped (moe.routing=topk)")


def check_grouping(cfg: MoEConfig, num_experts: int, top_k: int) -> None:
    """ValueError unless moe.groups splits the model's experts and its top-k evenly (moe.routing=grouped)."""
    if cfg.routing == "grouped":
        check_groups(cfg.groups, num_experts, top_k, "moe.groups")


def check_groups(groups: int, num_experts: int, top_k: int, key: str) -> None:
    """ValueError naming `key` unless `groups` divides both `num_experts` and `top_k`: each of the G groups
    holds E/G experts, of which every token takes k/G."""
    if groups < 1 or num_experts % groups or top_k % groups:
        raise ValueError(
            f"{key}={groups} must divide the model's num_experts={num_experts} and top_k={top_k}: each group "
            f"holds num_experts/groups experts and every token takes top_k/groups of them"
        )


def model_expert_groups(model_cfg: Any) -> int:
    """The expert groups the configured policy records in its config.json (1: plain top-k, also for
    the built tiny model and for a directory without a readable config)."""
    if not model_cfg.path:
        return 1
    try:
        data = json.loads((Path(model_cfg.path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return 1
    return int(data.get(GROUPS_KEY) or 1)


def replay_enabled(cfg: MoEConfig, engine: str) -> bool:
    """Whether the learner replays the engine's routing; ValueError when replay is asked of an
    engine that cannot record it, or the selection bias of an engine that cannot apply it."""
    if cfg.balance == "aux_free" and engine != "hf":
        raise ValueError(
            f"moe.balance=aux_free adds a selection bias to every router, which rollout.engine={engine} "
            f"cannot apply (its models have no such parameter). Use rollout.engine=hf or another moe.balance."
        )
    records = engine_records_routing(engine)
    if cfg.routing_replay == "rollout" and not records:
        raise ValueError(
            f"moe.routing_replay=rollout needs the experts the engine routed each token to, and "
            f"rollout.engine={engine} cannot return them here (vLLM returns routed experts only with "
            f"Model Runner V2, on GPU builds). Use rollout.engine=hf or moe.routing_replay=none."
        )
    return cfg.routing_replay == "rollout" or (cfg.routing_replay == "auto" and records)


def engine_records_routing(engine: str) -> bool:
    if engine == "hf":
        return True
    if engine == "vllm":
        import torch

        return torch.cuda.is_available()  # enable_return_routed_experts needs Model Runner V2 (a CUDA build)
    return False


def model_is_moe(model_cfg: Any) -> bool:
    """Whether the configured policy routes tokens to experts (read from its config.json; the built
    tiny model always does)."""
    if not model_cfg.path:
        return model_cfg.source != "smollm2"
    config = Path(model_cfg.path).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False  # resolve_model_path reports a missing directory by name
    return bool(data.get("num_experts") or data.get("num_local_experts"))
