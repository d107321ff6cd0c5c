"""A local Ray per test module, and a short training run that returns its summary and metric rows."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

SMALL = ["prompts_per_step=4", "group_size=4", "rollout.max_new_tokens=4", "warm_start.steps=10", "wandb.mode=disabled", "progress=false"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, configure_logging=False, runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


@pytest.fixture()
def run_pipeline() -> Callable[..., tuple[dict, list[dict]]]:
    """run_pipeline(run_dir, *overrides) -> (summary, metrics rows) of `train` on the small config.

    Every run's ledger must reconcile by group id (each group handed out trained or dropped exactly
    once), checked from the file, apart from the store's counters; and every step's trained groups
    must be the ones the learner's tensors held (its report is in the ledger for every step)."""
    from rlhub.actors.controller import train
    from rlhub.config import load_config
    from rlhub.ledger import check_run, format_report
    from rlhub.tracking import read_rows

    def run(run_dir: Path, *overrides: str) -> tuple[dict, list[dict]]:
        summary = train(load_config([*SMALL, f"run_dir={run_dir}", *overrides]))
        ledger = check_run(run_dir)
        assert ledger.ok, format_report(ledger)
        assert summary["ledger"]["ok"] and summary["status"] == "ok", summary
        rows = read_rows(run_dir / "metrics.jsonl")
        assert ledger.steps_checked >= len({row["step"] for row in rows}) and ledger.steps_checked > 0
        return summary, rows

    return run
