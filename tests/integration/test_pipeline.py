"""The whole pipeline on a local Ray with the hf engine and the tiny MoE."""

from __future__ import annotations

import pytest

from rlhub.checkpoint import latest_checkpoint, read_state

pytestmark = pytest.mark.integration


def assert_accounted(store: dict) -> None:
    assert store["in_flight"] == 0 and store["queued"] == 0
    assert store["produced"] == store["consumed"] + store["dropped_total"]


@pytest.mark.parametrize("staleness", [0, 2])
def test_no_trained_token_older_than_max_staleness(ray_local, run_pipeline, tmp_path, staleness):
    summary, metrics = run_pipeline(tmp_path, f"max_staleness={staleness}", "experiment.total_steps=6", "rollout.num_actors=2")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(m["staleness/max"] <= staleness for m in metrics)
    if staleness == 0:
        assert all(m["staleness/mean"] == 0 for m in metrics)
    store = summary["store"]
    assert_accounted(store)
    assert store["consumed"] == 6 * 4
    # the engines' probe log-probs equal the learner's after every sync
    assert all(m["sync/probe_error"] <= 1e-4 and m["sync/failures"] == 0 for m in metrics)
    assert (tmp_path / "config.yaml").is_file() and latest_checkpoint(tmp_path) is not None


@pytest.mark.vllm
def test_vllm_engine_in_the_pipeline_syncs_exactly(ray_local, run_pipeline, tmp_path):
    pytest.importorskip("vllm")
    summary, metrics = run_pipeline(tmp_path, "rollout.engine=vllm", "experiment.total_steps=4", "max_staleness=1")
    assert all(m["sync/probe_error"] <= 1e-4 and m["sync/rebuilds"] == 0 for m in metrics)
    assert all(m["staleness/max"] <= 1 for m in metrics)
    assert_accounted(summary["store"])


def test_inflight_weight_updates_keep_the_bound(ray_local, run_pipeline, tmp_path):
    summary, metrics = run_pipeline(tmp_path, "rollout.weight_update=inflight", "experiment.total_steps=5", "max_staleness=1")
    assert all(m["staleness/max"] <= 1 for m in metrics)
    assert_accounted(summary["store"])


def test_dropped_prompts_do_not_stall_the_run(ray_local, run_pipeline, tmp_path):
    # "max(a,b)=" prompts (9 tokens) do not fit max_model_len=10 with 4 new tokens; "a+b=" ones do
    summary, metrics = run_pipeline(tmp_path, "env.kwargs.ops=[max,+]", "rollout.max_model_len=10", "experiment.total_steps=4", "max_staleness=0")
    store = summary["store"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert store["dropped"].get("prompt_too_long", 0) > 0
    assert store["consumed"] == 16
    assert_accounted(store)


def test_resume_continues_from_saved_version_and_data_position(ray_local, run_pipeline, tmp_path):
    first, _ = run_pipeline(tmp_path, "experiment.total_steps=4", "checkpoint.every=2", "max_staleness=1")
    ckpt = latest_checkpoint(tmp_path)
    state = read_state(ckpt)
    assert ckpt.name == "step_000004" and state["version"] == 4
    cursor = state["store"]["admission"]["cursor"]
    assert cursor >= 16 and state["store"]["consumed"] == 16
    (tmp_path / "metrics.jsonl").unlink()
    second, metrics = run_pipeline(tmp_path, "experiment.total_steps=7", "checkpoint.every=2", "max_staleness=1", "resume=true")
    assert [m["step"] for m in metrics] == [5, 6, 7]
    store = second["store"]
    assert store["consumed"] == 7 * 4
    assert_accounted(store)
    final = read_state(latest_checkpoint(tmp_path))
    assert final["version"] == 7 and final["store"]["admission"]["cursor"] >= cursor + 12 - len(state["store"]["admission"]["requeued"])
