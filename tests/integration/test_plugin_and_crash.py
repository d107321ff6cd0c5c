"""An environment from a separately installed package, and a rollout actor that dies mid-run.

The test writes a tiny plugin distribution (a module plus a dist-info with an
`rlhub.envs` entry point) and puts it on the path of this process and of the
Ray workers, exactly as `pip install` of a plugin would make it visible. Its
environment kills its own process once, the first time it scores a sample, so
the run must replace the actor, start its groups again, and finish with every
group accounted for.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from rlhub.actors.controller import train
from rlhub.config import load_config

pytestmark = pytest.mark.integration

PLUGIN = '''
import os
from rlhub.envs.arithmetic import ArithmeticEnv


class CrashOnceEnv(ArithmeticEnv):
    """The built-in task, but the process dies the first time a marker file is absent."""

    def __init__(self, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = marker

    def step(self, state, message):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().step(state, message)


def load_environment(marker: str, **kwargs):
    return CrashOnceEnv(marker, **kwargs)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    (root / "crash_once_env.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "crash_once_env-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crash-once-env\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rlhub.envs]\ncrash_once = crash_once_env:load_environment\n")
    return root


@pytest.fixture(scope="module")
def ray_with_plugin(plugin_path):
    import ray

    sys.path.insert(0, str(plugin_path))
    pythonpath = os.pathsep.join([str(plugin_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=3, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()
    sys.path.remove(str(plugin_path))


def test_plugin_env_and_actor_crash_lose_nothing(ray_with_plugin, tmp_path):
    from rlhub.envs import available_envs

    assert "crash_once" in available_envs()
    marker = tmp_path / "crashed"
    cfg = load_config([
        "env.name=crash_once", f"env.kwargs.marker={marker}", "prompts_per_step=4", "group_size=4",
        "rollout.max_new_tokens=4", "experiment.total_steps=4", "max_staleness=1",
        "wandb.mode=disabled", "progress=false", f"run_dir={tmp_path / 'run'}",
    ])
    summary = train(cfg)
    assert marker.exists()  # the actor did die once
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["rollout/restarts"] == 1
    store = summary["store"]
    assert store["consumed"] == 16 and store["in_flight"] == 0
    assert store["produced"] == store["consumed"] + store["dropped_total"]
