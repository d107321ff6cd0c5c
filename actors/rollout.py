"""RolloutActor: a Ray actor that owns one engine and runs a `RolloutWorker` loop."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import ray

from rlhub.rollout import RolloutConfig, RolloutWorker


def make_engine(cfg: RolloutConfig, model_path: str, dtype: str, seed: int, core: int | None, torch_threads: int) -> Any:
    """The configured engine, built inside the actor's process."""
    if cfg.engine == "vllm":
        from rlhub.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            kv_cache_gib=cfg.vllm_kv_cache_gib,
            cpu_bind=None if core is None else str(core),
        )
    from rlhub.engines.hf import HFEngine

    return HFEngine(model_path, dtype=dtype, seed=seed, num_threads=torch_threads)


def pick_core(actor_id: int) -> int | None:
    """Engines in different actors get different cores (round robin over the ones we may use)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    return cores[actor_id % len(cores)] if len(cores) > 1 else None


@ray.remote(max_concurrency=2)  # a second thread answers stats() while run() loops
class RolloutActor:
    def __init__(self, actor_id: int, run: Any, model_path: str, store: Any, weight_sync: Any, probe_ids: list[int]) -> None:
        import torch

        from rlhub.algorithms import get_advantage
        from rlhub.envs import make_env
        from transformers import AutoTokenizer

        cfg: RolloutConfig = run.rollout
        core = pick_core(actor_id) if cfg.pin_cores else None
        if core is not None and cfg.engine == "hf":
            os.sched_setaffinity(0, {core})
        torch.set_num_threads(run.cluster.torch_threads)
        seed = run.seed * 1000 + actor_id
        torch.manual_seed(seed)
        self.core = core
        self.engine = make_engine(cfg, model_path, run.model.dtype, seed, core, run.cluster.torch_threads)
        self.worker = RolloutWorker(
            actor_id=actor_id,
            cfg=cfg,
            group_size=run.group_size,
            prompts_per_step=run.prompts_per_step,
            engine=self.engine,
            env=make_env(run.env.name, **run.env.kwargs),
            tokenizer=AutoTokenizer.from_pretrained(model_path),
            store=store,
            weight_sync=weight_sync,
            advantage_fn=get_advantage(run.algorithm.advantage),
            probe_ids=probe_ids,
            seed=run.seed,
        )

    def ready(self) -> int | None:
        return self.core

    def run(self) -> dict[str, Any]:
        return asdict(self.worker.run())

    def stats(self) -> dict[str, Any]:
        return asdict(self.worker.stats)
