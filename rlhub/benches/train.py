"""`rlhub bench train [overrides...]`: a whole training run as `rlhub train` starts it, its figures read off its own records.

The run (`rlhub.actors.controller.train`, default `experiment=smollm2_moe_lora`; any `key=value`
is an override) goes to a fresh run directory under a temporary one, with W&B off and no progress
bar, its evaluations as configured. Reported per run: `wall_s`, the call from the config to its
return (Ray's start, the actors' start-up, every evaluation and the shutdown included);
`loop_s`, the steps' own time; the median step and the learner's phases (`time/learner/*`), the
median generation time per step; the held-out greedy accuracy of every evaluation by the version
it evaluated (`eval/pass@1`, the final one from the summary); the training success of the first
and last tenth of the steps; the peak resident memory of the learner process, of the rollout
actors (the largest) and of this process; the bytes a version sends the engines. It runs three
times by default (`rlhub.benches.repeat`): the figures are medians with their range.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULTS = ["wandb.mode=disabled", "progress=false"]
DEFAULT_EXPERIMENT = "experiment=smollm2_moe_lora"
PHASES = ("forward", "backward", "optimizer", "routing_pass", "measure")


def summarize(rows: list[dict[str, Any]], summary: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The run's figures (module docstring) from its metrics rows and summary."""

    def median(key: str) -> float | None:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    evals = {str(int(r["eval/version"])): r["eval/pass@1"] for r in rows if "eval/pass@1" in r}
    final = summary.get("eval") or {}
    if "eval/pass@1" in final:
        evals[str(int(final["eval/version"]))] = final["eval/pass@1"]
    tenth = max(1, len(rows) // 10)
    success = [r.get("rollout/success_rate", 0.0) for r in rows]
    return {
        "status": summary.get("status"),
        "steps": len(rows),
        "wall_s": wall_s,
        "loop_s": sum(r.get("time/step_s", 0.0) for r in rows),
        "step_s": median("time/step_s"),
        "generate_s": median("time/generate_s"),
        "train_s": median("time/train_s"),
        "learner_phases_s": {p: median(f"time/learner/{p}_s") for p in PHASES},
        "held_out": evals,
        "success_first_tenth": sum(success[:tenth]) / tenth,
        "success_last_tenth": sum(success[-tenth:]) / tenth,
        "peak_rss_mb": {"learner": max((r.get("mem/learner_peak_rss_mb", 0.0) for r in rows), default=0.0),
                        "rollout": max((r.get("mem/rollout_peak_rss_mb", 0.0) for r in rows), default=0.0)},
        "sync_bytes": max((r.get("sync/bytes", 0) for r in rows), default=0),
    }


def timed_run(overrides: list[str], bench: str) -> tuple[Any, dict[str, Any], list[dict[str, Any]], float]:
    """(config, summary, metrics rows, wall seconds from the config to the return) of one training run with
    these overrides, in a temporary run directory; RuntimeError when it did not end ok."""
    from rlhub.actors.controller import train
    from rlhub.config import load_config
    from rlhub.tracking import read_rows

    with tempfile.TemporaryDirectory(prefix=f"rlhub-bench-{bench}-") as tmp:
        run_dir = Path(tmp) / "run"
        cfg = load_config([*overrides, f"run_dir={run_dir}"])
        start = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - start
        rows = read_rows(run_dir / "metrics.jsonl")
    if summary.get("status") != "ok":
        raise RuntimeError(f"bench {bench}: the run with {overrides} ended with status {summary.get('status')}: {summary.get('error')}")
    return cfg, summary, rows, wall


def run(args: list[str]) -> dict[str, Any]:
    from rlhub.rollout.records import peak_rss_mb

    overrides = list(args) if any(a.startswith("experiment=") for a in args) else [DEFAULT_EXPERIMENT, *args]
    cfg, summary, rows, wall = timed_run([*DEFAULTS, *overrides], "train")
    out = summarize(rows, summary, wall)
    out["peak_rss_mb"]["driver"] = peak_rss_mb()
    out["overrides"] = overrides
    out["experiment"] = cfg.experiment.name
    return out
