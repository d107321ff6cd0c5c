"""Run pictures for an offline reader: after a run, metrics.jsonl becomes PNGs in plots/.

Sits at the very end of the pipeline: the controller (at the end of training)
and `rlhub plot RUN_DIR` call `plot_run`, which reads `RUN_DIR/metrics.jsonl`
(one JSON object per logged step, written by `tracking.Tracker`) and the bound
`max_staleness` from `RUN_DIR/config.yaml`, and writes three PNGs to
`RUN_DIR/plots/`: success and reward, staleness, and the step-time split.
For an MoE policy (the learner logs `moe/layer{L}/expert{E}`, the share of the
step's routed (token, choice) pairs that went to expert E of layer L) two
more: the expert load as a layers x experts heatmap over the last steps, and
each layer's load over the steps (`expert_heatmaps`; the controller also draws
them at every evaluation for W&B). Nothing here touches the live run;
matplotlib (Agg, no display) is imported only inside the functions that draw,
so importing rlhub stays light.
"""

from __future__ import annotations

import json
import logging
import math
import re
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
EXPERT_LOAD_PNG = "expert_load.png"
EXPERT_STEPS_PNG = "expert_load_steps.png"
EXPERT_LAST_N = 10
"""The layers x experts heatmap averages the last this many logged steps: recent enough to show
where routing is now, long enough to smooth one batch's prompts."""
MAX_LAYER_PANELS = 16
"""The experts-over-steps picture draws at most this many layers (evenly spaced, first and last kept)."""
_EXPERT_KEY = re.compile(r"^moe/layer(\d+)/expert(\d+)$")


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
        *_plot_expert_load(series, out),
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


# ---- expert load (MoE) ---------------------------------------------------------------

def expert_heatmaps(run_dir: Path) -> list[Path]:
    """Draw the expert-load pictures of a run into `run_dir/plots/`; [] for a run without MoE keys.

    `EXPERT_LOAD_PNG`: layers x experts, each expert's share of its layer's routed tokens averaged
    over the last `EXPERT_LAST_N` steps, the layer's imbalance (max/mean) in its row label.
    `EXPERT_STEPS_PNG`: one panel per layer, experts over the steps. Raises FileNotFoundError when
    metrics.jsonl is missing.
    """
    series = read_series(Path(run_dir) / "metrics.jsonl")
    if not any(_EXPERT_KEY.match(k) for k in series):
        return []
    import matplotlib

    matplotlib.use("Agg")
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    return _plot_expert_load(series, out)


def expert_load_history(series: dict[str, Series]) -> tuple[list[int], list[int], np.ndarray]:
    """(layers, steps, load [L, E, S]) from the `moe/layer{L}/expert{E}` series: the layers in
    ascending order, the steps that logged any of them, NaN where a step did not log a key (or a
    layer has fewer experts). ([], [], an empty array) for a run without them."""
    keys = {(int(m[1]), int(m[2])): k for k in series if (m := _EXPERT_KEY.match(k))}
    if not keys:
        return [], [], np.zeros((0, 0, 0))
    layers = sorted({layer for layer, _ in keys})
    steps = sorted({s for k in keys.values() for s in series[k][0]})
    row, col = {layer: i for i, layer in enumerate(layers)}, {s: i for i, s in enumerate(steps)}
    load = np.full((len(layers), 1 + max(e for _, e in keys), len(steps)), np.nan)
    for (layer, expert), key in keys.items():
        key_steps, values = series[key]
        load[row[layer], expert, [col[s] for s in key_steps]] = values
    return layers, steps, load


def expert_load_matrix(series: dict[str, Series], last_n: int = EXPERT_LAST_N) -> np.ndarray:
    """[L, E] each expert's share of its layer's routed (token, choice) pairs, averaged over the
    last `last_n` steps that logged expert load (rows: the layers in ascending order); the matrix
    `EXPERT_LOAD_PNG` draws."""
    return _mean_load(expert_load_history(series)[2], last_n)


def expert_imbalance(series: dict[str, Series], last_n: int = EXPERT_LAST_N) -> np.ndarray:
    """[L] each layer's max/mean expert load per step (what `moe/layer{L}/max_over_mean` logs),
    averaged over the same last `last_n` steps as `expert_load_matrix`."""
    return _imbalance(expert_load_history(series)[2], last_n)


def _mean_load(load: np.ndarray, last_n: int) -> np.ndarray:
    """[L, E] from `load` [L, E, S]: the mean over the last `last_n` steps."""
    return _nanmean(_last(load, last_n), axis=2)


def _imbalance(load: np.ndarray, last_n: int) -> np.ndarray:
    """[L] from `load` [L, E, S]: max/mean over the experts per step, averaged over the last `last_n` steps."""
    recent = _last(load, last_n)  # [L, E, n]
    peak = np.where(np.isnan(recent), -np.inf, recent).max(axis=1, initial=-np.inf)  # [L, n]
    mean = _nanmean(recent, axis=1)
    ratio = np.divide(peak, mean, out=np.full(mean.shape, np.nan), where=mean > 0)
    return _nanmean(ratio, axis=1)


def _last(load: np.ndarray, last_n: int) -> np.ndarray:
    if last_n < 1:
        raise ValueError(f"last_n must be >= 1, got {last_n}")
    return load[:, :, -last_n:]


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over the finite entries along `axis`; NaN where there are none (without numpy's warning)."""
    ok = np.isfinite(x)
    count = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def _plot_expert_load(series: dict[str, Series], out: Path) -> list[Path]:
    """The two expert-load PNGs in `out`; [] without expert-load keys."""
    layers, steps, load = expert_load_history(series)
    if not layers:
        return []
    return [_plot_expert_matrix(series, layers, steps, load, out / EXPERT_LOAD_PNG),
            _plot_expert_steps(layers, steps, load, out / EXPERT_STEPS_PNG)]


def _plot_expert_matrix(series: dict[str, Series], layers: list[int], steps: list[int], load: np.ndarray, path: Path) -> Path:
    import matplotlib.pyplot as plt

    n_layers, n_experts = load.shape[:2]
    last = min(EXPERT_LAST_N, len(steps))
    matrix, ratio = _mean_load(load, EXPERT_LAST_N), _imbalance(load, EXPERT_LAST_N)
    labels = []
    for layer, r in zip(layers, ratio):
        dead = series.get(f"moe/layer{layer}/dead_experts")  # logged by newer learners only
        labels.append(f"layer {layer}  max/mean {r:.2f}" + (f", dead {dead[1][-1]:g}" if dead else ""))
    size = (min(16.0, max(8.5, 4.5 + 0.4 * n_experts)), min(16.0, max(3.0, 1.5 + 0.4 * n_layers)))
    fig, ax = plt.subplots(figsize=size, dpi=DPI, layout="constrained")
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the layer's routed tokens")
    if matrix.size <= 256:  # small enough to print the numbers in the cells
        light = 0.6 * np.nanmax(matrix)  # above it the colour map is light: black text
        for (i, e), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize="x-small", color="black" if v > light else "white")
    if n_experts <= 32:
        ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers), labels)
    ax.set_xlabel("expert")
    ax.set_title(f"Expert load, mean of the last {last} steps ({steps[-last]}-{steps[-1]}); uniform = {1 / n_experts:.3g}",
                 fontsize="medium")
    return _save(fig, path, tight=False)


def _plot_expert_steps(layers: list[int], steps: list[int], load: np.ndarray, path: Path) -> Path:
    import matplotlib.pyplot as plt

    n_experts = load.shape[1]
    picks = sorted({int(i) for i in np.linspace(0, len(layers) - 1, min(len(layers), MAX_LAYER_PANELS)).round()})
    panel = min(3.0, max(1.3, 0.1 * n_experts))
    fig, axes = plt.subplots(len(picks), 1, figsize=(9.0, 1.0 + panel * len(picks)), dpi=DPI, sharex=True, squeeze=False,
                             layout="constrained")
    x, y = _cell_edges(steps), _cell_edges(range(n_experts))
    vmax = float(np.nanmax(load))
    for ax, i in zip(axes[:, 0], picks):
        mesh = ax.pcolormesh(x, y, np.ma.masked_invalid(load[i]), cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_ylabel(f"layer {layers[i]}\nexpert")
    fig.colorbar(mesh, ax=axes[:, 0].tolist(), label="share of the layer's routed tokens")
    axes[-1, 0].set_xlabel("step")
    shown = "" if len(picks) == len(layers) else f" ({len(picks)} of {len(layers)} layers)"
    fig.suptitle(f"Expert load over the steps{shown}")
    return _save(fig, path, tight=False)


def _cell_edges(centers: Any) -> np.ndarray:
    """The n + 1 edges of cells centred on `centers` (sorted): halfway between neighbours, and
    half a cell past the ends (a single cell is 1 wide). Steps may have gaps (a resume)."""
    c = np.asarray(list(centers), dtype=float)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _legend_outside(ax: Any) -> None:
    """Legend to the right of the axes, so it never hides a curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if tight:  # figures made with layout="constrained" lay themselves out
        fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
