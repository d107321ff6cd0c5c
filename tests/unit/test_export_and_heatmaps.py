"""Expert-load heatmaps (drawn from the numbers logged, reaching W&B) and the export of a trained policy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from rlhub.plots import EXPERT_LOAD_PNG, EXPERT_STEPS_PNG, expert_heatmaps, expert_imbalance, expert_load_matrix, plot_run, read_series

LAYERS, EXPERTS = 3, 4
EARLY = [0.25, 0.25, 0.25, 0.25]  # steps 0-4: balanced everywhere
DOMINANT = [0.1, 0.1, 0.7, 0.1]  # steps 5-14 in layer 1: expert 2 takes 70 %


def load_at(step: int, layer: int) -> list[float]:
    if layer == 1 and step >= 5:
        return DOMINANT
    if layer == 2 and step >= 5:  # shifts by step: its 10-step mean is known in closed form
        return [0.4, 0.3, 0.2, 0.1] if step % 2 else [0.1, 0.2, 0.3, 0.4]
    return EARLY


@pytest.fixture
def moe_run(tmp_path) -> Path:
    rows = []
    for step in range(15):
        row = {"step": step, "time/step_s": 1.0, "moe/max_over_mean": 2.8}
        for layer in range(LAYERS):
            row.update({f"moe/layer{layer}/expert{e}": f for e, f in enumerate(load_at(step, layer))})
        if step >= 10:  # a newer learner also logs these; older runs lack them
            row.update({f"moe/layer{layer}/dead_experts": 0.0 for layer in range(LAYERS)})
        rows.append(row)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


# ---- heatmaps -----------------------------------------------------------------------
def test_expert_load_matrix_is_the_mean_of_the_last_steps(moe_run):
    series = read_series(moe_run / "metrics.jsonl")
    want = np.array([EARLY, DOMINANT, [0.25, 0.25, 0.25, 0.25]])  # layer 2 alternates over 10 steps: mean 0.25
    np.testing.assert_allclose(expert_load_matrix(series, 10), want, atol=1e-12)
    # over all 15 steps the balanced start is averaged in
    np.testing.assert_allclose(expert_load_matrix(series, 15)[1], (5 * np.array(EARLY) + 10 * np.array(DOMINANT)) / 15, atol=1e-12)
    np.testing.assert_allclose(expert_load_matrix(series, 1)[2], [0.1, 0.2, 0.3, 0.4], atol=1e-12)  # step 14 is even
    # max/mean per step, as moe/layer{L}/max_over_mean logs it (not the max/mean of the mean)
    np.testing.assert_allclose(expert_imbalance(series, 10), [1.0, 2.8, 1.6], atol=1e-12)
    with pytest.raises(ValueError, match="last_n"):
        expert_load_matrix(series, 0)


def test_a_step_missing_a_key_averages_what_was_logged(tmp_path):
    rows = [{"step": 0, "moe/layer0/expert0": 0.5, "moe/layer0/expert1": 0.5},
            {"step": 1, "moe/layer0/expert0": 0.9},  # expert1's value lost (logged as null)
            {"step": 2, "moe/layer0/expert0": 0.1, "moe/layer0/expert1": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.testing.assert_allclose(expert_load_matrix(read_series(tmp_path / "metrics.jsonl"), 3), [[0.5, 0.7]])


def test_heatmaps_are_drawn_into_plots_and_by_plot_run(moe_run):
    paths = expert_heatmaps(moe_run)
    assert [p.name for p in paths] == [EXPERT_LOAD_PNG, EXPERT_STEPS_PNG]
    for p in paths:
        img = read_png(p)
        assert p.parent == moe_run / "plots" and img.shape[0] >= 250 and img.shape[1] >= 700
        assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20, f"{p.name} is nearly flat"
    # viridis' top colour (yellow) is the 70 % cell, and only it: one cell of 12 in the matrix
    matrix = read_png(moe_run / "plots" / EXPERT_LOAD_PNG)[..., :3]
    yellow = (np.abs(matrix - np.array([0.993, 0.906, 0.144])).max(-1) < 0.05).sum()
    assert 0.01 * matrix.shape[0] * matrix.shape[1] < yellow < 0.1 * matrix.shape[0] * matrix.shape[1]
    assert {EXPERT_LOAD_PNG, EXPERT_STEPS_PNG} <= {p.name for p in plot_run(moe_run)}


def test_a_run_without_moe_keys_draws_no_heatmap(tmp_path):
    rows = [{"step": s, "time/step_s": 1.0, "moe/max_over_mean": 1.0} for s in range(3)]  # a dense policy: no per-expert keys
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert expert_heatmaps(tmp_path) == []
    assert not (tmp_path / "plots").exists()
    assert [p.name for p in plot_run(tmp_path)] == ["step_time.png"]
    np.testing.assert_array_equal(expert_load_matrix(read_series(tmp_path / "metrics.jsonl")), np.zeros((0, 0)))


def test_tracker_logs_images_into_the_offline_wandb_run(moe_run, monkeypatch):
    from rlhub.config import RunConfig
    from rlhub.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = RunConfig(progress=False)
    cfg.wandb.mode = "offline"
    tracker = Tracker(moe_run, cfg, total_steps=5, start_step=0)
    try:
        tracker.log(3, {"time/step_s": 1.0})
        tracker.log_images(expert_heatmaps(moe_run), step=3)
    finally:
        tracker.close()
    media = sorted((moe_run / "wandb").glob("offline-run-*/files/media/images/plots/*.png"))
    assert {p.name.split("_3_")[0] for p in media} == {"expert_load", "expert_load_steps"}, media
    assert media[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cfg.wandb.mode = "disabled"  # without W&B it is a no-op
    off = Tracker(moe_run, cfg, total_steps=5, start_step=0)
    off.log_images([moe_run / "plots" / EXPERT_LOAD_PNG], step=4)
    off.close()


def test_controller_draws_and_logs_and_a_failure_never_ends_the_run(moe_run, caplog):
    from rlhub.actors.controller import draw_expert_load

    class Tracker:
        def __init__(self, fail: bool) -> None:
            self.fail, self.logged = fail, []

        def log_images(self, paths, step):
            if self.fail:
                raise RuntimeError("wandb is down")
            self.logged.append(([p.name for p in paths], step))

    ok = Tracker(False)
    assert [p.name for p in draw_expert_load(moe_run, ok, 10)] == [EXPERT_LOAD_PNG, EXPERT_STEPS_PNG]
    assert ok.logged == [([EXPERT_LOAD_PNG, EXPERT_STEPS_PNG], 10)]
    with caplog.at_level(logging.WARNING, logger="rlhub"):
        assert draw_expert_load(moe_run, Tracker(True), 20) == []
        (moe_run / "metrics.jsonl").unlink()
        assert draw_expert_load(moe_run, ok, 30) == []
    assert "wandb is down" in caplog.text and "no metrics file" in caplog.text


# ---- export -------------------------------------------------------------------------
PROMPTS = [[51, 43, 52, 61], [49, 61], [55, 43, 55, 43, 55, 61]]
EOS = 258


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """(learner trained for two supervised steps, its run directory with one checkpoint)."""
    from rlhub.algorithms.config import AlgorithmConfig
    from rlhub.checkpoint import write_checkpoint
    from rlhub.learner import Learner
    from rlhub.models.build import ModelConfig
    from rlhub.moe import MoEConfig
    from rlhub.weight_sync import probe_sequence

    learner = Learner(tiny_model_path, ModelConfig(), AlgorithmConfig(), probe_sequence(259), moe=MoEConfig(balance="aux_free"))
    initial = {k: v.clone() for k, v in learner.state_dict().items()}
    examples = [([49 + i % 9, 43, 50 + i % 7, 61], [48 + (i * 3 + j) % 10 for j in range(8)] + [EOS]) for i in range(16)]
    learner.warm_start(examples, steps=2, batch_size=4, lr=3e-3)  # enough to move greedy outputs, not to collapse them
    assert any(not torch.equal(initial[k], v) for k, v in learner.state_dict().items())  # the weights moved
    run_dir = tmp_path_factory.mktemp("run")
    write_checkpoint(run_dir, 2, learner.save, {}, keep_last=2)  # as the pipeline does: checkpoints/step_000002/
    return learner, run_dir


def transformers_greedy(model, prompt: list[int], tokens: int) -> list[int]:
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=tokens,
                             do_sample=False, eos_token_id=EOS, pad_token_id=256)
    return out[0, len(prompt):].tolist()


def test_export_loads_in_the_engine_and_generates_as_the_trained_model(trained, tmp_path):
    from rlhub.engines.base import SamplingConfig
    from rlhub.engines.hf import HFEngine
    from rlhub.export import EXPORT_RECORD, export

    learner, run_dir = trained
    report = export(run_dir, tmp_path / "export")
    assert report["path"] == str(tmp_path / "export") and report["source"] == str(run_dir / "checkpoints" / "step_000002" / "policy")
    assert report["dtype"] == "float32" and report["checked_tensors"] == len(learner.model.state_dict()) - 2  # all but the biases
    assert report["parameters"] == sum(p.numel() for p in learner.model.parameters())
    assert report["dropped"] == ["model.layers.0.mlp.gate.selection_bias", "model.layers.1.mlp.gate.selection_bias"]
    assert report["warnings"] == []  # the biases are all zero: routing is unchanged without them
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", EXPORT_RECORD} <= files
    assert not any(p.name.startswith(".export") for p in tmp_path.iterdir())  # no temporary left behind

    engine = HFEngine(str(tmp_path / "export"))
    completions = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0, stop_token_ids=(EOS,)))
    want = [transformers_greedy(learner.model, p, 12) for p in PROMPTS]
    assert [c.token_ids for c in completions] == want
    assert len(set(map(tuple, want))) > 1  # not a degenerate model that says one thing


def test_nonzero_selection_bias_is_dropped_with_a_warning_and_bfloat16(trained, tmp_path):
    from rlhub.export import export
    from rlhub.moe import BIAS_NAME

    learner, _ = trained
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    routers = learner.balancer.routing.routers
    try:
        getattr(routers[1], BIAS_NAME).copy_(torch.linspace(-0.02, 0.03, 8))
        learner.save(ckpt)
    finally:
        getattr(routers[1], BIAS_NAME).zero_()
    report = export(ckpt, tmp_path / "out", dtype="bfloat16")  # a checkpoint directory, not a run
    assert report["dtype"] == "bfloat16" and len(report["dropped"]) == 2
    assert len(report["warnings"]) == 1 and "1 of 2 routers" in report["warnings"][0] and "0.03" in report["warnings"][0]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert not any(k.endswith(BIAS_NAME) for k in f.keys())
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    again = export(ckpt, tmp_path / "out", dtype="float32")  # an earlier export is replaced
    assert again["dtype"] == "float32" and json.loads((tmp_path / "out" / "rlhub_export.json").read_text())["dtype"] == "float32"


def test_bad_paths_give_clear_errors(tmp_path, trained, capsys):
    from rlhub.cli import main
    from rlhub.export import export

    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        export(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run directory with a checkpoint"):
        export(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export(trained[1], tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert main(["export", str(tmp_path / "empty")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_cli_export_prints_the_report(trained, tmp_path, capsys):
    from rlhub.cli import USAGE, main

    assert "export RUN_DIR|CHECKPOINT" in USAGE
    assert main(["export", str(trained[1]), "--out", str(tmp_path / "e"), "--dtype", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bfloat16" and report["path"] == str(tmp_path / "e") and report["checked_tensors"] > 0
