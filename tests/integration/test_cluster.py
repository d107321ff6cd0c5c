"""`cluster.address=auto` joins a Ray cluster started outside rlhub instead of starting one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture()
def ray_head():
    subprocess.run([RAY, "stop", "--force"], capture_output=True)
    started = subprocess.run([RAY, "start", "--head", "--num-cpus=3", "--include-dashboard=false", "--disable-usage-stats"],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    yield
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_train_joins_an_existing_cluster(ray_head, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "rlhub.cli", "train", "cluster.address=auto", "experiment.total_steps=3", "prompts_per_step=4",
         "group_size=4", "warm_start.steps=0", "wandb.mode=disabled", "progress=false", f"run_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["store"]["consumed"] == 12
    # the cluster outlives the run: rlhub did not start it, so it does not stop it
    probe = "import ray; ray.init(address='auto'); print(int(ray.cluster_resources()['CPU']))"
    alive = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert alive.returncode == 0 and alive.stdout.strip().endswith("3"), alive.stderr[-1000:]


def ray_orphans() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["ppid", "cmdline"])
            if p.info["ppid"] == 1 and "ray::" in " ".join(p.info["cmdline"] or [])]


def test_a_killed_run_resumes_with_each_step_once_and_its_ray_cleaned_up(tmp_path):
    import signal
    import time

    from rlhub.ledger import check_run
    from rlhub.tracking import read_rows

    args = [sys.executable, "-m", "rlhub.cli", "train", "experiment.total_steps=400", "checkpoint.every=3", "prompts_per_step=4",
            "group_size=4", "warm_start.steps=0", "wandb.mode=disabled", "progress=false", f"run_dir={tmp_path}"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    before = set(ray_orphans())
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len((tmp_path / "metrics.jsonl").read_text().splitlines() if (tmp_path / "metrics.jsonl").exists() else []) < 8:
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)  # no cleanup at all
    driver.wait()
    killed_at = len(read_rows(tmp_path / "metrics.jsonl"))
    assert killed_at >= 8
    time.sleep(3)
    assert set(ray_orphans()) - before, "the killed driver left no Ray process behind: nothing to clean up"
    total = killed_at + 4  # past wherever the killed run got to (it may log a few steps between the poll and the kill)
    resumed = subprocess.run([*args[:4], f"experiment.total_steps={total}", *args[5:], "resume=true"], capture_output=True, text=True,
                             timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Ray processes left behind by a run that was killed" in resumed.stderr
    assert not set(ray_orphans()) - before  # the dead run's Ray processes are gone, and the new run left none
    steps = [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, total + 1))  # each step once, though the killed run logged past its last checkpoint
    assert check_run(tmp_path).ok


def test_a_cluster_too_small_for_the_actors_is_said_at_start(ray_head, tmp_path):
    import time

    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "rlhub.cli", "train", "cluster.address=auto", "rollout.num_actors=5", "wandb.mode=disabled",
         "progress=false", f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot place the learner and 5 rollout actors: 6 CPU needed, 3 in the cluster" in out.stderr
    assert time.monotonic() - start < 60
