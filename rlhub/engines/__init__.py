"""Rollout engines behind one protocol (`base.RolloutEngine`): `hf` (built-in) and `vllm`."""

from __future__ import annotations

from typing import Any


def make_engine(
    cfg: Any, model_path: str, dtype: str, seed: int, core: int | None, torch_threads: int, routing: bool = False, selection_bias: bool = False,
    lora_rank: int = 0,
) -> Any:
    """The engine `cfg.engine` names (a `RolloutConfig`), built in the calling process. `routing`: the
    learner replays the engine's routing (vLLM must be asked to return it; the hf engine always records
    it); `selection_bias`: the routers carry an auxiliary-loss-free selection bias (hf engine only); `lora_rank`: the policy trains adapters of this rank (model.lora.rank),
    which a vLLM engine may apply itself (`cfg.vllm_lora`)."""
    if cfg.engine == "vllm":
        from rlhub.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            kv_cache_gib=cfg.vllm_kv_cache_gib,
            cpu_bind=None if core is None else str(core),
            return_routing=routing,
            continuous=cfg.continuous,
            lora=cfg.vllm_lora,
            lora_rank=lora_rank,
        )
    from rlhub.engines.hf import HFEngine

    return HFEngine(model_path, dtype=dtype, seed=seed, num_threads=torch_threads, selection_bias=selection_bias)
