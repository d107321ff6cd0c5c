"""Run pictures for an offline reader: after a run, metrics.jsonl becomes PNGs in plots/.

Sits at the very end of the pipeline: the controller (at the end of training)
and `rlhub plot RUN_DIR` call `plot_run`, which reads `RUN_DIR/metrics.jsonl`
(one JSON object per logged step, written by `tracking.Tracker`) and the bound
`max_staleness` from `RUN_DIR/config.yaml`, and writes three PNGs to
`RUN_DIR/plots/`: success and reward, staleness, and the step-time split.
Nothing here touches the live run; matplotlib (Agg, no display) is imported
only inside the functions that draw, so importing rlhub stays light.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("rlhub.plots")

Series = tuple[list[int], list[float]]  # (steps, values), sorted by step

REWARD_PNG = "success_reward.png"
STALENESS_PNG = "staleness.png"
STEP_TIME_PNG = "step_time.png"
# Parts of a step, drawn beside its total. Not stacked: generation runs on the
# rollout actors while the learner trains, so the parts overlap and may sum past it.
STEP_PARTS = ("time/wait_s", "time/generate_s", "time/train_s", "time/publish_s", "time/sync_s")
FIGSIZE = (8.0, 4.5)
DPI = 100


def read_series(metrics_file: Path) -> dict[str, Series]:
    """Per-key (steps, values) from a metrics.jsonl, one point per step.

    A resumed run logs again the steps after its last checkpoint, so a step may
    appear twice: the last row of a step replaces the earlier one whole (its
    keys, not a merge). Missing or non-finite values are skipped, and so are
    lines that do not parse (a run killed mid-write leaves a torn last line).
    """
    if not metrics_file.is_file():
        raise FileNotFoundError(f"no metrics file: {metrics_file}")
    rows: dict[int, dict[str, Any]] = {}
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[row["step"]] = row  # last occurrence wins
    series: dict[str, Series] = {}
    for step in sorted(rows):
        for key, value in rows[step].items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def rolling_mean(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` points; the first points average what there is so far."""
    x = np.asarray(values, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(x)])
    ends = np.arange(1, len(x) + 1)
    starts = np.maximum(0, ends - window)
    return (csum[ends] - csum[starts]) / (ends - starts)


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's PNGs to `run_dir/plots/` and return their paths.

    Returns [] (and writes nothing) when metrics.jsonl has no rows; a figure
    whose metrics are all absent is left out. Raises FileNotFoundError when the
    run dir or its metrics.jsonl is missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run dir: {run_dir}")
    series = read_series(run_dir / "metrics.jsonl")
    if not series:
        log.warning("%s has no rows; no plots written", run_dir / "metrics.jsonl")
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display: this runs on headless machines and after the run
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [
        _plot_success_reward(series, out / REWARD_PNG),
        _plot_staleness(series, _max_staleness(run_dir / "config.yaml"), out / STALENESS_PNG),
        _plot_step_time(series, out / STEP_TIME_PNG),
    ]
    return [p for p in written if p is not None]


def _max_staleness(config_file: Path) -> float | None:
    """The run's staleness bound from its config.yaml, or None when unknown."""
    if not config_file.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError:
        return None
    value = cfg.get("max_staleness") if isinstance(cfg, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _plot_success_reward(series: dict[str, Series], path: Path) -> Path | None:
    panels = [(k, label) for k, label in (("rollout/success_rate", "success rate"), ("rollout/reward_mean", "mean reward")) if k in series]
    if not panels:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=FIGSIZE, dpi=DPI, sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        steps, values = series[key]
        window = max(1, round(0.05 * len(steps)))
        ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1, label="per step")
        ax.plot(steps, rolling_mean(values, window), color="tab:blue", linewidth=2, label=f"rolling mean ({window} steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _legend_outside(axes[0, 0])
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("Success and reward over training")
    return _save(fig, path)


def _plot_staleness(series: dict[str, Series], bound: float | None, path: Path) -> Path | None:
    keys = [k for k in ("staleness/mean", "staleness/max") if k in series]
    if not keys:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for key, style in zip(keys, ("-", "--")):
        ax.plot(*series[key], style, linewidth=1.5, label=key.split("/")[1])
    top = max(max(series[k][1]) for k in keys)
    if bound is not None:  # drawn over the data: staleness/max often sits on the bound
        ax.axhline(bound, color="tab:red", linestyle=":", linewidth=2.5, zorder=5, label=f"max_staleness = {bound:g}")
        top = max(top, bound)
    ax.set_ylim(0, 1.1 * top + 0.1)
    ax.set(title="Staleness of trained samples", xlabel="step", ylabel="policy versions behind the learner")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def _plot_step_time(series: dict[str, Series], path: Path) -> Path | None:
    parts = [k for k in STEP_PARTS if k in series]
    if "time/step_s" not in series and not parts:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    if "time/step_s" in series:
        ax.plot(*series["time/step_s"], color="black", linewidth=2.5, label="step (total)")
    for key in parts:
        ax.plot(*series[key], linewidth=1.2, label=key.removeprefix("time/").removesuffix("_s"))
    ax.set_ylim(bottom=0)
    ax.set(title="Step time and its parts (parts overlap: rollout runs beside training)", xlabel="step", ylabel="seconds")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def _legend_outside(ax: Any) -> None:
    """Legend to the right of the axes, so it never hides a curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
