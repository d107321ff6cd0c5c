"""Run pictures: metrics.jsonl (resumed, with gaps) becomes three readable PNGs."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest

from rlhub.plots import REWARD_PNG, STALENESS_PNG, STEP_TIME_PNG, plot_run, read_series, rolling_mean

FIRST_RUN = range(0, 25)  # checkpoint at step 20, then a crash after step 24
RESUMED = range(20, 40)  # the resume logs steps 20..24 again, with other values
TAB_RED = np.array([0.839, 0.153, 0.157])  # the colour of the max_staleness line


def row(step: int, resumed: bool) -> dict:
    r = {
        "step": step,
        "rollout/success_rate": step / 40 + (0.5 if resumed else 0.0),
        "rollout/reward_mean": 2.0 * step + (100.0 if resumed else 0.0),
        "time/step_s": 3.0 + step % 4,
        "time/wait_s": 0.5,
        "time/generate_s": 2.0 + step % 3,
        "time/train_s": 1.0,
        "time/sync_s": 0.2,
    }
    if step % 2 == 0:
        r["staleness/mean"] = 0.5 + step % 3 / 2
        r["staleness/max"] = 1 + step % 2
    if step % 5 == 0:
        r["time/publish_s"] = 0.3
    if resumed and step == 20:
        del r["staleness/mean"]  # the resumed row replaces the old one whole
    return r


@pytest.fixture
def run_dir(tmp_path):
    lines = [json.dumps(row(s, False)) for s in FIRST_RUN]
    lines.append('{"step": 25, "rollout/rew')  # torn line from the crash
    lines += [json.dumps(row(s, True)) for s in RESUMED]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "config.yaml").write_text("experiment:\n  name: t\nmax_staleness: 2\nseed: 0\n")
    return tmp_path


def read_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_series_are_deduplicated_last_wins(run_dir):
    series = read_series(run_dir / "metrics.jsonl")
    steps = list(range(40))
    assert series["rollout/reward_mean"] == (steps, [2.0 * s + (100.0 if s >= 20 else 0.0) for s in steps])
    assert series["rollout/success_rate"][1] == pytest.approx([s / 40 + (0.5 if s >= 20 else 0.0) for s in steps])
    even = [s for s in steps if s % 2 == 0]
    assert series["staleness/max"] == (even, [1.0] * len(even))
    assert series["staleness/mean"][0] == [s for s in even if s != 20]
    assert series["time/publish_s"][0] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert "step" not in series


def test_rolling_mean_is_trailing():
    assert rolling_mean([1.0, 2.0, 3.0, 4.0], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert rolling_mean([5.0, 7.0], 1).tolist() == [5.0, 7.0]


def test_plot_run_writes_three_readable_pngs(run_dir):
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == [REWARD_PNG, STALENESS_PNG, STEP_TIME_PNG]
    for p in paths:
        assert p.parent == run_dir / "plots" and p.is_file()
        img = read_png(p)
        assert img.shape[:2] == (450, 800) and img.shape[2] in (3, 4)
        assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20, f"{p.name} is nearly flat"


def test_staleness_bound_is_drawn_only_when_known(run_dir):
    def red_pixels() -> int:
        img = read_png(run_dir / "plots" / STALENESS_PNG)[..., :3]
        return int((np.abs(img - TAB_RED).max(axis=-1) < 0.05).sum())

    plot_run(run_dir)
    assert red_pixels() > 100
    (run_dir / "config.yaml").unlink()
    plot_run(run_dir)
    assert red_pixels() == 0


def test_figure_without_its_metrics_is_left_out(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time/step_s": 1.0 + s}) + "\n" for s in range(5)))
    assert [p.name for p in plot_run(tmp_path)] == [STEP_TIME_PNG]


def test_empty_metrics_write_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_run(tmp_path) == []
    assert not (tmp_path / "plots").exists()


def test_missing_run_dir_or_metrics_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plot_run(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)
