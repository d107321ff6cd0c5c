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
