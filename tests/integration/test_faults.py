"""Fault injection against real runs: each kind of process killed by its pid while the run trains
(`rlhub.faults`). Every run must finish (the driver's: resume) with its ledger reconciled, no group
lost and none trained twice. With RLHUB_FAULT_RECORDS=FILE each test appends its measured record
there; the README's table of faults is made from those records (`rlhub.faults.table`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    out = {**recovery(run_dir, fault, summary.get("recoveries", [])), "fault": kind, "response": response, "recoveries": len(summary.get("recoveries", [])),
           "ledger": f"reconciled: {ledger.issued} issued, {ledger.trained} trained, 0 lost, 0 twice"}
    assert out["resumed_s"] is not None and out["caught_up_s"] is not None, out  # it trained again, and past where it was hit
    if os.environ.get("RLHUB_FAULT_RECORDS"):
        with open(os.environ["RLHUB_FAULT_RECORDS"], "a") as f:
            f.write(json.dumps(out) + "\n")
    print(json.dumps(out))
    return out


RESTORES = "restores the last checkpoint in the same run, starts every actor again, re-issues what was queued or in flight"


def run_sequence(run_dir: Path, faults: list[tuple], *overrides: str) -> tuple[list[Fault], dict, str]:
    """One run that loses each (target, at step[, how: kill by default]) of `faults` in turn, each after the
    run recovered from the one before: (the faults, the summary, stderr). Every loss must be recovered from
    the newest checkpoint written before it (every 2 steps), named, and shown in the ledger."""
    proc = start(run_dir, f"experiment.total_steps={faults[-1][1] + 3}", "checkpoint.every=2", *overrides)
    sent = [inject(run_dir, target, step, *how, alive=lambda: proc.poll() is None, timeout_s=300) for target, step, *how in faults]
    summary, err = finish(proc, run_dir)
    recoveries = summary["recoveries"]
    assert len(recoveries) == len(faults) and summary["failures"]["recoveries"] == len(faults), recoveries
    for (target, step, *_), recovered in zip(faults, recoveries):
        at, restored = recovered["at_step"], recovered["restored"]
        assert at >= step and restored % 2 == 0 and at - 2 <= restored <= at, recovered  # the newest checkpoint before the loss
        assert target.split()[0] in recovered["lost"], (target, recovered)
        assert f"restoring step_{restored:06d}" in err
    ledger = check_run(run_dir)
    assert (ledger.rollbacks, ledger.redone_steps) == (len(faults), sum(r["at_step"] - r["restored"] for r in recoveries))
    return sent, summary, err


def test_a_lost_learner_rank_store_shard_coordinator_and_weight_registry_are_each_recovered(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    order = [("learner rank 0", 3), ("store shard", 7), ("store coordinator", 11), ("weight registry", 15)]
    sent, summary, _ = run_sequence(run_dir, order, "datastore.num_shards=2")
    for fault, (target, _) in zip(sent, order):
        record(fault, run_dir, f"{target} killed", RESTORES, summary)


PPO = ("algorithm=ppo", "algorithm.critic_warmup=1")


def test_a_lost_critic_and_reference_are_each_recovered(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sent, summary, _ = run_sequence(run_dir, [("critic", 3), ("reference", 7)], *PPO)
    ckpt = run_dir / "checkpoints" / "step_000010"
    assert (ckpt / "critic").is_dir() and (ckpt / "reference").is_dir()  # the new scorers were saved with the policy
    for fault, kind in zip(sent, ("critic killed", "reference killed")):
        record(fault, run_dir, kind, RESTORES, summary)


def test_a_lost_rank_of_a_sharded_scorer_is_recovered(tmp_path):
    """A scorer's rank behind its front: the critic sharded over two ranks, as the policy is."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    [fault], summary, _ = run_sequence(run_dir, [("critic rank 1", 3)], *PPO, "learner.world_size=2")
    record(fault, run_dir, "a scorer rank (critic rank 1 of 2) killed", RESTORES, summary)


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


@pytest.fixture()
def four_nodes():
    """A head with no CPU of its own (the driver and the store's zero-CPU actors) and four one-CPU nodes:
    three for the learner and two rollout actors, one spare for what a lost node held."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(4):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.mark.parametrize("holding", ["rollout actor 0", "learner rank 0"])
def test_a_lost_node_is_survived(four_nodes, tmp_path, holding):

    from rlhub.faults import processes, wait_for_step

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start(run_dir, f"cluster.address={four_nodes.address}", "rollout.num_actors=2", "experiment.total_steps=8",
                 "checkpoint.every=2")
    alive = lambda: proc.poll() is None  # noqa: E731
    wait_for_step(run_dir, 3, 300, alive)
    found = processes(run_dir)
    # nodes on one machine share an address, so the driver (and beside it the store and the weight registry)
    # may sit on any of them: a rollout actor's node is lost where the driver is not (the other actor's, if need be)
    home = found["driver"]["node"]
    assert all(w["node"] == home for role, w in found.items() if role.startswith(("store", "weight registry")))
    if holding.startswith("rollout") and found[holding]["node"] == home:
        holding = "rollout actor 1"
    node_id = found[holding]["node"]
    [node] = [n for n in four_nodes.list_all_nodes() if n.node_id == node_id and n is not four_nodes.head_node]
    held = sorted(role for role, w in found.items() if w["node"] == node_id)
    raylet = node.all_processes["raylet"][0].process.pid
    at, sent = wait_for_step(run_dir, 3, 10), time.time()
    four_nodes.remove_node(node, allow_graceful=False)  # every process of the node at once, its raylet among them
    fault = Fault(f"the node of {holding}", raylet, "kill", at, sent)
    summary, _ = finish(proc, run_dir)
    if any(r.startswith("learner") for r in held):
        assert len(summary["recoveries"]) >= 1, summary["recoveries"]
        response = "restores the last checkpoint, starts every actor again on the nodes left"
    else:
        assert summary["recoveries"] == [] and summary["failures"]["actor_restarts"] == len(held), (held, summary["failures"])
        response = "replaces the node's rollout actors on the nodes left; their groups start again"
    record(fault, run_dir, f"a node holding {', '.join(held)} lost", response, summary)


HANGS = ("cluster.call_timeout_s=5", "learner.step_timeout_s=10", "rollout.engine_timeout_s=4")
"""Short deadlines, so that a hang is found within seconds."""


def test_a_hung_store_shard_and_a_hung_learner_are_each_found_and_recovered(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    order = [("store shard", 3, "stop"), ("learner rank 0", 7, "stop")]
    sent, summary, _ = run_sequence(run_dir, order, *HANGS, "datastore.num_shards=2")
    store, learner = summary["recoveries"]
    # a frozen learner is found by a step, or by its part of a checkpoint, not done in learner.step_timeout_s
    assert "did not answer within 5 s" in store["lost"] and "did not finish" in learner["lost"], summary["recoveries"]
    record(sent[0], run_dir, "a store shard hung (SIGSTOP)", "a call past cluster.call_timeout_s: the probe names the shard; restored "
           "from the last checkpoint", summary)
    record(sent[1], run_dir, "a learner rank hung (SIGSTOP)", "a step past learner.step_timeout_s: restored from the last checkpoint", summary)


def replaced(run_dir: Path, fault: Fault, proc: subprocess.Popen, timeout_s: float = 120) -> int:
    """Wait until the run has replaced the process `fault` hit (processes.json names another pid for its
    role), then for two more steps; returns the step reached."""
    from rlhub.faults import last_step, processes, wait_for_step

    deadline = time.monotonic() + timeout_s
    while processes(run_dir).get(fault.target, {}).get("pid") == fault.pid:
        assert proc.poll() is None and time.monotonic() < deadline, f"{fault.target} was not replaced"
        time.sleep(0.05)
    return wait_for_step(run_dir, last_step(run_dir) + 2, timeout_s, lambda: proc.poll() is None)


def test_a_rollout_actor_killed_frozen_or_hung_is_replaced_and_its_groups_start_again_and_rlhub_stop_ends_the_run(tmp_path):
    """One run with two rollout actors, hit in turn, each after the one before was replaced: killed while it
    surely holds a group (inside an environment step that never returns: an actor killed at a random
    moment may be waiting for work, with nothing of its own to start again), frozen (SIGSTOP), its engine
    call hung, and both of its environment threads hung. Then `rlhub stop` ends the run after its step."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start(run_dir, "experiment.total_steps=100000", "checkpoint.every=0", "rollout.num_actors=2", "env.timeout_s=2", "env.workers=2",
                 *HANGS)
    alive = lambda: proc.poll() is None  # noqa: E731
    held = inject(run_dir, "rollout actor", 3, how="hang-env", seed=1, alive=alive, timeout_s=300)
    trigger = run_dir / "faults" / f"hang-env-{held.target.split()[-1]}"
    deadline = time.monotonic() + 120
    while trigger.exists():  # used up when the step begins
        assert time.monotonic() < deadline and alive(), "the actor never took an environment step"
        time.sleep(0.02)
    killed = inject(run_dir, held.target, 0, alive=alive)
    at = replaced(run_dir, killed, proc)
    ledger_then = (run_dir / "ledger.jsonl").read_text().splitlines()
    frozen = inject(run_dir, "rollout actor 0", at, how="stop", alive=alive)
    at = replaced(run_dir, frozen, proc)
    engine = inject(run_dir, "rollout actor 0", at, how="hang-engine", alive=alive)
    at = replaced(run_dir, engine, proc)
    env = inject(run_dir, "rollout actor 1", at, how="hang-env", count=2, alive=alive)
    replaced(run_dir, env, proc)
    assert subprocess.run([sys.executable, "-m", "rlhub.cli", "stop", str(run_dir)]).returncode == 0
    summary, err = finish(proc, run_dir, timeout_s=120)
    assert "stopped at step" in err and summary["steps"] < 1000
    assert (run_dir / "checkpoints" / f"step_{summary['steps']:06d}").is_dir()  # the final checkpoint, as at a planned end
    failures = summary["failures"]
    assert summary["recoveries"] == [] and failures["actor_restarts"] == 4, failures
    assert [failures.get(f"actor_crash/{kind}") for kind in ("Unresponsive", "EngineHung", "EnvHung")] == [1, 1, 1], failures
    # the killed actor's groups started again, before the next fault
    assert any('"requeued"' in line and '"actor_crash"' in line for line in ledger_then), "the killed actor held no group"
    assert "rollout actor 0 hung (Unresponsive" in err and "rollout actor 0 hung (EngineHung" in err
    assert "rollout actor 1 crashed (EnvHung: 2 step calls of the environment still run past env.timeout_s=2 s" in err
    assert failures["dropped/env_timeout"] >= 1
    record(killed, run_dir, "a rollout actor killed", "replaces the actor; its queued and in-flight groups start again", summary)
    record(frozen, run_dir, "a rollout actor hung (SIGSTOP)",
           "no answer within cluster.call_timeout_s: the actor is replaced, its groups start again", summary)
    record(engine, run_dir, "a rollout actor's engine call hung",
           "an engine call past rollout.engine_timeout_s: the actor is replaced, its groups start again", summary)
    record(env, run_dir, "an environment thread hung (two steps that never return)",
           "each step past env.timeout_s drops its sample; once every thread of the pool is held, the actor is replaced", summary)


def test_a_loss_that_comes_back_at_once_ends_the_run_after_max_recoveries(tmp_path):
    import signal

    from rlhub.faults import processes

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start(run_dir, "experiment.total_steps=100000", "checkpoint.every=2", "checkpoint.max_recoveries=1")
    first = inject(run_dir, "learner rank 0", 3, alive=lambda: proc.poll() is None, timeout_s=300)
    deadline = time.monotonic() + 120
    while processes(run_dir)["learner rank 0"]["pid"] == first.pid and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(processes(run_dir)["learner rank 0"]["pid"], signal.SIGKILL)  # the new learner, before it gets past step 3
    assert proc.wait(timeout=120) == 1
    err = proc.err_path.read_text()  # type: ignore[attr-defined]
    assert "after 1 recoveries in a row, none of which got past the step it was lost at: checkpoint.max_recoveries=1" in err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert check_run(run_dir, allow_open=True).ok  # failed, and still nothing trained twice
