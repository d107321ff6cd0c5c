"""Every algorithm preset through the asynchronous pipeline; PPO's critic; corrections at max_staleness=4."""

from __future__ import annotations

import math

import pytest

from rlhub.benches.e2e import PRESETS
from rlhub.checkpoint import latest_checkpoint

pytestmark = pytest.mark.integration

FAST = "warm_start.steps=10"  # a shorter format warm start: these runs test the algorithms, not learning speed


def finite(rows: list[dict]) -> bool:
    """No metric was non-finite: the tracker writes those as null (and counts them), it does not drop them."""
    return all(v is not None and (not isinstance(v, float) or math.isfinite(v)) for r in rows for v in r.values())


# grpo runs in every other pipeline test, ppo in its own test below
@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in ("grpo", "ppo")])
def test_every_preset_runs_through_the_pipeline(ray_local, run_pipeline, tmp_path, preset):
    summary, metrics = run_pipeline(tmp_path, FAST, f"algorithm={preset}", "experiment.total_steps=3", "checkpoint.keep_final=false")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert finite(metrics)
    assert all("train/pg_loss" in m and "train/is_ratio_mean" in m for m in metrics)
    assert summary["store"]["consumed"] == 12


def test_ppo_critic_trains_beside_the_policy_and_resumes(ray_local, run_pipeline, tmp_path):
    steps = 12
    summary, metrics = run_pipeline(tmp_path, FAST, "algorithm=ppo", f"experiment.total_steps={steps}", "algorithm.critic_warmup=3",
                           "max_staleness=1", "checkpoint.every=6")
    assert finite(metrics)
    assert [m["critic/version"] for m in metrics] == list(range(1, steps + 1))
    assert [m["train/policy_updated"] for m in metrics[:4]] == [0.0, 0.0, 0.0, 1.0]
    # values come from a critic at most a couple of versions behind the one that trains on them
    assert all(0 <= m["critic/value_lag_max"] <= 3 for m in metrics)
    assert all("train/kl_ref" in m for m in metrics)  # the reference actor's log-probs reached the learner
    # the first batch was scored by the critic as it started (V = 0): its loss is 0.5 R^2. That the critic
    # learns is tested on a fixed batch in tests/unit and measured over a full run by `rlhub bench presets`
    assert metrics[0]["critic/value_loss"] == pytest.approx(metrics[0]["critic/zero_value_loss"], rel=1e-4)
    assert any(m["critic/values_mean"] != 0.0 for m in metrics[1:])
    ckpt = latest_checkpoint(tmp_path)
    assert (ckpt / "critic" / "learner" / "index.json").is_file() and (ckpt / "reference" / "learner" / "index.json").is_file()
    (tmp_path / "metrics.jsonl").unlink()
    _, more = run_pipeline(tmp_path, FAST, "algorithm=ppo", f"experiment.total_steps={steps + 2}", "max_staleness=1", "resume=true", "checkpoint.keep_final=false")
    assert [m["critic/version"] for m in more] == [steps + 1, steps + 2]


@pytest.mark.parametrize("correction", ["none", "tis"])
def test_corrections_act_on_stale_samples(ray_local, run_pipeline, tmp_path, correction):
    # a slow learner (micro-batches of 1) lets the rollout run up to four versions ahead
    summary, metrics = run_pipeline(tmp_path, FAST, "max_staleness=4", f"algorithm.correction={correction}", "experiment.total_steps=10",
                           "algorithm.micro_batch_size=1", "algorithm.lr=2e-3", "checkpoint.keep_final=false")
    assert finite(metrics)
    assert all(m["staleness/max"] <= 4 for m in metrics)
    stale = [m for m in metrics if m["staleness/max"] >= 1]
    assert stale, "the rollout never ran ahead of the learner"
    # stale tokens: the learner's probabilities differ from the engine's, and the ratio shows it
    assert any(abs(m["train/is_ratio_mean"] - 1.0) > 1e-4 or m["train/is_ratio_max"] > 1.0 + 1e-3 for m in stale)
    if correction == "none":
        assert "train/is_truncated_frac" not in metrics[0]
    else:
        assert all("train/is_truncated_frac" in m for m in metrics)
        assert all(m["train/clip_frac"] == 0.0 for m in metrics)  # the clip is against the proximal policy: ratio 1


def test_lora_bf16_ppo_publishes_adapters_and_resumes_from_them(ray_local, run_pipeline, tmp_path):
    """model.lora with the bf16 learner and engine, PPO's critic and routing replay: every version the engines load
    is the adapters alone (sync/bytes), merged onto the base and verified; the checkpoint holds adapters and resumes."""
    from rlhub import lora

    args = (FAST, "algorithm=ppo", "model.lora.rank=4", "learner.precision=bf16", "rollout.dtype=bfloat16", "max_staleness=1")
    summary, metrics = run_pipeline(tmp_path, *args, "experiment.total_steps=4", "checkpoint.every=4")
    assert finite(metrics) and [m["critic/version"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["moe/routing_replay"] == 1.0 for m in metrics)
    ckpt = latest_checkpoint(tmp_path)
    adapters, meta = lora.read(ckpt)
    assert meta["rank"] == 4 and not (ckpt / "policy").exists() and not (ckpt / "learner").exists()
    assert all(0 < m["sync/bytes"] <= lora.nbytes(adapters) for m in metrics)  # adapters only, never the model
    assert all(m["sync/probe_error"] <= 0.5 for m in metrics)
    (tmp_path / "metrics.jsonl").unlink()
    _, more = run_pipeline(tmp_path, *args, "experiment.total_steps=6", "resume=true", "checkpoint.keep_final=false")
    assert [m["step"] for m in more] == [5, 6] and finite(more)


def test_spo_branches_through_the_pipeline_and_stops_at_the_generation_budget(ray_local, run_pipeline, tmp_path):
    budget = 2500
    summary, metrics = run_pipeline(tmp_path, FAST, "algorithm=spo", "algorithm.spo.interval=1", "experiment.total_steps=200",
                                    f"experiment.max_generated_tokens={budget}", "checkpoint.keep_final=false")
    assert finite(metrics)
    last = metrics[-1]
    # branches are counted when they end, cuts when they are branched from (some still running at the last record)
    assert 0 < last["spo/branches"] <= 4 * last["spo/cuts"] and last["spo/branches"] % 4 == 0 and last["spo/branch_tokens"] > 0
    assert 0 < last["train/selected_frac"] <= 1.0  # the probability mask: cutpoint tokens only
    # the budget ends the run: the first step past it, and the one queued behind it, are the last
    generated = [m["perf/generated_tokens"] for m in metrics]
    first_past = next(i for i, g in enumerate(generated) if g >= budget)
    assert len(metrics) <= first_past + 2 < 200
    assert summary["generated_tokens"] == generated[-1] >= budget
    assert sum(s["generated_tokens"] for s in summary["rollout"]) >= generated[-1]


def test_difficulty_curation_runs_through_the_pipeline_and_resumes_with_its_rates(ray_local, run_pipeline, tmp_path):
    args = (FAST, "data.curation=difficulty", "algorithm.correction=tis", "data.frontier_group_size=6", "data.hard_below=0.5")
    summary, metrics = run_pipeline(tmp_path, *args, "experiment.total_steps=8", "checkpoint.every=8")
    assert finite(metrics)
    seen = metrics[-1]["curation/rows_seen"]
    assert 0 < seen <= 8 * 4 + 8  # every finished group's row (admission runs a step or so ahead)
    assert all("staleness/max" not in m or m["staleness/max"] <= 1 for m in metrics)  # replayed samples are counted apart
    (tmp_path / "metrics.jsonl").unlink()
    _, more = run_pipeline(tmp_path, *args, "experiment.total_steps=10", "resume=true", "checkpoint.keep_final=false")
    assert [m["step"] for m in more] == [9, 10]
    # the rates came back with the checkpoint (taken after step 8's record): a fresh sampler would have seen a step's rows or two
    assert more[0]["curation/rows_seen"] >= seen


def test_a_scorer_busy_with_a_long_call_answers_the_probe_and_a_frozen_one_does_not(ray_local, tiny_model_path):
    """The controller's probe must not take a reference in the middle of a long score for a lost one
    (that would restart the whole run), yet must still find one that is frozen."""
    import os
    import signal
    import time

    import ray
    from rlhub.actors.controller import Actors
    from rlhub.actors.pipeline import ActorLost
    from rlhub.actors.scorers import ReferenceActor

    from rlhub.config import load_config

    cfg = load_config(["algorithm=ppo", f"model.path={tiny_model_path}", "wandb.mode=disabled"])
    reference = ReferenceActor.options(num_cpus=0).remote(cfg, tiny_model_path, None)
    pid = ray.get(reference.__ray_call__.remote(lambda self: os.getpid()))
    actors = Actors(weight_sync=None, store=None, learner=None, critic=None, reference=reference, fleet=None, partners={"reference": reference},
                    call_timeout_s=2)
    busy = reference.__ray_call__.remote(lambda self: time.sleep(8))  # the actor's one calling thread, held
    time.sleep(0.5)
    # Ray's own readiness call waits behind the running one: a probe by it would find this reference silent
    assert ray.wait([reference.__ray_ready__.remote()], timeout=2)[1]
    actors.probe()  # busy, not lost
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(ActorLost, match="reference did not answer within 2 s"):
            actors.probe()
    finally:
        os.kill(pid, signal.SIGCONT)
    ray.get(busy)
    ray.kill(reference)


def test_a_weight_pull_waits_at_most_the_transfer_deadline(ray_local):
    """cluster.transfer_timeout_s bounds a pull: a registry that does not answer fails the puller (whose
    loss the controller then handles) instead of holding it forever."""
    import time

    import ray

    from rlhub.weight_sync import ObjectStoreWeightSync, WeightRegistry

    registry = ray.remote(num_cpus=0)(WeightRegistry).remote()
    busy = registry.__ray_call__.remote(lambda self: time.sleep(8))
    sync = ObjectStoreWeightSync(registry, timeout_s=1.0)
    began = time.monotonic()
    with pytest.raises(ray.exceptions.GetTimeoutError):
        sync.pull(-1)
    assert time.monotonic() - began < 4
    ray.get(busy)
    assert sync.pull(-1) is None  # answered once free: nothing published yet
    ray.kill(registry)
