"""Learner ranks in real runs: two ranks learn, expert parallelism and a resume at another world size,
ranks spread over two Ray nodes, and a killed rank ends the run, named, within 30 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhub.tracking import read_rows

pytestmark = pytest.mark.integration


def test_two_learner_ranks_learn_the_default_task(ray_local, run_pipeline, tmp_path):
    """The default task with the default run's sizes (not the small test config), for 60 of its 300 steps:
    about 20 s of training, in which one rank's run goes from about 0.1 to 0.5 success."""
    summary, rows = run_pipeline(tmp_path, "prompts_per_step=32", "group_size=8", "warm_start.steps=30", "learner.world_size=2",
                                 "experiment.total_steps=60")
    assert {int(r["learner/world_size"]) for r in rows} == {2}
    where = json.loads((tmp_path / "learner_ranks.json").read_text())
    assert [w["rank"] for w in where] == [0, 1] and len({w["pid"] for w in where}) == 2
    assert summary["success_last_tenth"] > summary["success_first_tenth"] + 0.2, summary
    # the groups of each step were split over the ranks by tokens: neither rank idled while the other trained
    assert max(r["learner/rank_tokens_max_over_mean"] for r in rows) < 1.5


def test_expert_parallel_llep_run_resumes_at_one_rank_with_its_ledger_whole(ray_local, run_pipeline, tmp_path):
    _, rows = run_pipeline(tmp_path, "learner.world_size=2", "learner.expert_parallel=2", "learner.ep_balance=llep",
                           "learner.ep_capacity=1.0", "experiment.total_steps=4", "checkpoint.every=2")
    assert all(r["learner/ep_pairs_max_over_mean"] <= 1.0 + 0.1 for r in rows)  # capacity 1.0: every rank near the mean
    assert any(r["learner/ep_weights_moved"] > 0 for r in rows)
    sharded = tmp_path / "checkpoints" / "step_000004"
    assert (sharded / "learner" / "index.json").is_file()
    # rlhub export of the 2-rank checkpoint: the weights the ranks' shards hold, read back by another route
    from transformers import AutoModelForCausalLM

    from rlhub.export import export
    from rlhub.parallel.checkpoint import read_full

    export(sharded, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).state_dict()
    shards = read_full(sharded, "model")
    assert set(exported) <= set(shards) and all(bool((exported[k] == shards[k]).all()) for k in exported)
    (tmp_path / "metrics.jsonl").unlink()
    _, more = run_pipeline(tmp_path, "learner.world_size=1", "experiment.total_steps=6", "resume=true")
    assert [r["step"] for r in more] == [5, 6] and "learner/world_size" not in more[0]


@pytest.fixture()
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def train_args(tmp_path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rlhub.cli", "train", "prompts_per_step=4", "group_size=4", "rollout.max_new_tokens=4",
            "warm_start.steps=0", "wandb.mode=disabled", "progress=false", f"run_dir={tmp_path}", *overrides]


def test_learner_ranks_spread_over_two_nodes_of_a_cluster(two_nodes, tmp_path):
    out = subprocess.run(train_args(tmp_path, f"cluster.address={two_nodes.address}", "learner.world_size=2", "learner.placement=spread",
                                    "experiment.total_steps=3"), capture_output=True, text=True, timeout=400, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    where = json.loads((tmp_path / "learner_ranks.json").read_text())
    assert len({w["node_id"] for w in where}) == 2  # one rank on each node
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize("overrides, named", [
    (["learner.world_size=2"], "learner rank 1 of 2"),
    # separate policies: the second policy's learner (its one rank) is the second in learner_ranks.json
    (["experiment=propose_check", "agents.policies=separate", "warm_start.steps=0", "eval.every=0"], "policy checker: learner rank 0 of 1"),
], ids=["ranks", "separate_policies"])
def test_a_killed_learner_rank_ends_the_run_named_within_30_s(tmp_path, overrides, named):
    # with recoveries off: the loss is found and named at once (tests/integration/test_faults.py recovers from it)
    driver = subprocess.Popen(train_args(tmp_path, *overrides, "experiment.total_steps=100000", "checkpoint.max_recoveries=0"),
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not (tmp_path / "metrics.jsonl").exists() or len(read_rows(tmp_path / "metrics.jsonl")) < 3):
            time.sleep(0.5)
        assert (tmp_path / "metrics.jsonl").exists(), "the run never trained"
        rank1 = json.loads((tmp_path / "learner_ranks.json").read_text())[1]
        os.kill(rank1["pid"], signal.SIGKILL)
        killed = time.monotonic()
        _, err = driver.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        driver.kill()
    assert driver.returncode != 0
    assert f"{named} (node {rank1['node']}, pid {rank1['pid']}) died" in err, err[-3000:]
    assert took < 30, took
