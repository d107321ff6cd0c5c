"""Fault injection against real runs: each kind of process killed by its pid while the run trains
(`rlhub.faults`). Every run must finish (the driver's: resume) with its ledger reconciled, no group
lost and none trained twice. With RLHUB_FAULT_RECORDS=FILE each test appends its measured record
there; the README's table of faults is made from those records (`rlhub.faults.table`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhub.faults import Fault, inject, recovery
from rlhub.ledger import check_run, format_report
from rlhub.tracking import read_rows

pytestmark = pytest.mark.integration

SMALL = ["prompts_per_step=4", "group_size=4", "rollout.max_new_tokens=4", "warm_start.steps=10", "wandb.mode=disabled",
         "progress=false", "eval.final=false"]


def start(run_dir: Path, *overrides: str, log: str = "train.err") -> subprocess.Popen:
    args = [sys.executable, "-m", "rlhub.cli", "train", *SMALL, f"run_dir={run_dir}", *overrides]
    path = run_dir.parent / f"{run_dir.name}.{log}"
    with open(path, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "RAY_ADDRESS": ""})
    proc.err_path = path  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 600) -> tuple[dict, str]:
    """(summary, stderr) of a run that must end well: exit 0, every group accounted for."""
    code = proc.wait(timeout=timeout_s)
    err = proc.err_path.read_text()  # type: ignore[attr-defined]
    assert code == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger = check_run(run_dir)
    assert ledger.ok and ledger.open == 0, format_report(ledger)
    assert summary["status"] == "ok", summary
    steps = [r["step"] for r in read_rows(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)), steps  # each step once, redone ones included
    return summary, err


def record(fault: Fault, run_dir: Path, kind: str, response: str, summary: dict) -> dict:
    """The measured record of one fault (appended to $RLHUB_FAULT_RECORDS when set)."""
    ledger = check_run(run_dir)
    out = {**recovery(run_dir, fault), "fault": kind, "response": response, "recoveries": len(summary.get("recoveries", [])),
           "ledger": f"reconciled: {ledger.issued} issued, {ledger.trained} trained, 0 lost, 0 twice"}
    assert out["resumed_s"] is not None and out["caught_up_s"] is not None, out  # it trained again, and past where it was hit
    if os.environ.get("RLHUB_FAULT_RECORDS"):
        with open(os.environ["RLHUB_FAULT_RECORDS"], "a") as f:
            f.write(json.dumps(out) + "\n")
    print(json.dumps(out))
    return out


RESTORES = "restores the last checkpoint in the same run, starts every actor again, re-issues what was queued or in flight"


@pytest.mark.parametrize("target,overrides", [
    ("learner rank 0", ()),
    ("store shard", ("datastore.num_shards=2",)),
    ("store coordinator", ()),
    ("weight registry", ()),
])
def test_a_lost_learner_or_store_is_recovered_from_the_last_checkpoint(tmp_path, target, overrides):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start(run_dir, "experiment.total_steps=8", "checkpoint.every=2", *overrides)
    fault = inject(run_dir, target, 3, alive=lambda: proc.poll() is None, timeout_s=300)
    summary, err = finish(proc, run_dir)
    [recovered] = summary["recoveries"]
    at, restored = recovered["at_step"], recovered["restored"]
    assert at >= 3 and restored % 2 == 0 and at - 2 <= restored <= at, recovered  # the newest checkpoint written before the loss
    assert target.split()[0] in recovered["lost"], recovered
    assert "recovered in" in err and f"restoring step_{restored:06d}" in err
    ledger = check_run(run_dir)
    assert (ledger.rollbacks, ledger.redone_steps) == (1, at - restored)  # the ledger shows the redone steps
    assert summary["failures"]["recoveries"] == 1
    record(fault, run_dir, f"{target} killed", RESTORES, summary)


PPO = ("algorithm=ppo", "algorithm.critic_warmup=1")


@pytest.mark.parametrize("target,overrides,kind", [
    ("critic", PPO, "critic killed"),
    ("reference", PPO, "reference killed"),
    # a scorer's rank behind its front: the critic sharded over two ranks, as the policy is
    ("critic rank 1", (*PPO, "learner.world_size=2"), "a scorer rank (critic rank 1 of 2) killed"),
])
def test_a_lost_scorer_is_recovered_from_the_last_checkpoint(tmp_path, target, overrides, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start(run_dir, "experiment.total_steps=7", "checkpoint.every=2", *overrides)
    fault = inject(run_dir, target, 3, alive=lambda: proc.poll() is None, timeout_s=300)
    summary, err = finish(proc, run_dir)
    [recovered] = summary["recoveries"]
    assert target.split()[0] in recovered["lost"] and recovered["restored"] >= 2, recovered
    assert check_run(run_dir).rollbacks == 1
    ckpt = run_dir / "checkpoints" / "step_000007"
    assert (ckpt / "critic").is_dir() and (ckpt / "reference").is_dir()  # the new scorers were saved with the policy
    record(fault, run_dir, kind, RESTORES, summary)


def test_a_killed_rollout_actor_is_replaced_and_its_groups_start_again(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start(run_dir, "experiment.total_steps=7", "rollout.num_actors=2")
    fault = inject(run_dir, "rollout actor", 3, seed=1, alive=lambda: proc.poll() is None, timeout_s=300)
    summary, _ = finish(proc, run_dir)
    assert summary["recoveries"] == [] and summary["failures"]["actor_restarts"] == 1
    assert json.loads((run_dir / "processes.json").read_text())[fault.target]["pid"] != fault.pid  # its replacement
    ledger = check_run(run_dir)
    assert ledger.requeued.get("actor_crash", 0) + ledger.requeued.get("lost_object", 0) >= 1, format_report(ledger)
    record(fault, run_dir, "a rollout actor killed", "replaces the actor; its queued and in-flight groups start again", summary)


def test_a_killed_judge_is_restarted_in_place(tmp_path, tiny_model_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start(run_dir, "experiment.total_steps=6", f"reward.judge.model={tiny_model_path}", "reward.judge.weight=0.5")
    fault = inject(run_dir, "judge", 2, alive=lambda: proc.poll() is None, timeout_s=300)
    summary, _ = finish(proc, run_dir)
    assert summary["recoveries"] == [] and summary["failures"]["actor_restarts"] == 0, summary["failures"]
    rows = read_rows(run_dir / "metrics.jsonl")
    assert all(m["rollout/reward_mean"] > m["rollout/success_rate"] for m in rows)  # every step's samples were judged
    record(fault, run_dir, "the judge killed", "Ray restarts it in place and sends it again the calls it had", summary)


def test_a_killed_driver_resumes_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start(run_dir, "experiment.total_steps=100000", "checkpoint.every=2")
    fault = inject(run_dir, "driver", 3, alive=lambda: proc.poll() is None, timeout_s=300)
    assert proc.wait(timeout=60) == -9
    total = fault.at_step + 3
    resumed = start(run_dir, f"experiment.total_steps={total}", "checkpoint.every=2", "resume=true", log="resume.err")
    summary, err = finish(resumed, run_dir)
    assert summary["steps"] >= 3 and check_run(run_dir).resumes == 1
    record(fault, run_dir, "the driver killed (`kill -9`), then `resume=true`",
           "the next run stops the dead run's Ray, resumes at the last checkpoint, re-issues what was queued or in flight", summary)


def test_a_group_queued_by_an_actor_killed_before_it_told_the_coordinator_ends_once(ray_local):
    """The window `rlhub fault` can hit: the shard holds the group, the coordinator still has it in flight."""
    import ray

    from rlhub.actors.store import RayDataStore
    from rlhub.datastore import GroupMeta

    store = RayDataStore.create(1, prompts_per_step=2, max_staleness=0, num_rows=10)
    ids = store.admit(0, 2)
    metas = [GroupMeta(g, g, 0, 0, 0, 2, 4, 0.5, 0.5, 2.0, 0.1) for g in ids]
    ray.get(store.shards[0].put_many.remote(metas, [(ray.put(None), i) for i in range(len(ids))]))  # and then it died
    batch = store.get_batch(2, 0, timeout_s=10)
    assert sorted(m.group_id for m, _ in batch) == ids
    assert store.requeue_actor(0) == []  # taken for training: its actor's crash cannot start it again
    assert store.close_out("run_end") == 0  # nor can the run's end drop it
    assert not [e for e in store.take_events() if e["event"] in ("requeued", "dropped")]
