"""A local Ray per test module, and a short training run that returns its summary and metric rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

SMALL = ["prompts_per_step=4", "group_size=4", "rollout.max_new_tokens=4", "wandb.mode=disabled", "progress=false"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, configure_logging=False, runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


@pytest.fixture()
def run_pipeline() -> Callable[..., tuple[dict, list[dict]]]:
    """run_pipeline(run_dir, *overrides) -> (summary, metrics rows) of `train` on the small config."""
    from rlhub.actors.controller import train
    from rlhub.config import load_config

    def run(run_dir: Path, *overrides: str) -> tuple[dict, list[dict]]:
        summary = train(load_config([*SMALL, f"run_dir={run_dir}", *overrides]))
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return summary, metrics

    return run
