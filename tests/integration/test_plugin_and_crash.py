"""An environment from a separately installed package, and a rollout actor that dies mid-run.

The test writes a tiny plugin distribution (a module plus a dist-info with an
`rlhub.envs` entry point) and puts it on the path of this process and of the
Ray workers, exactly as `pip install` of a plugin would make it visible. Its
environment kills its own process once, the first time it scores a sample, so
the run must replace the actor, start its groups again, and finish with every
group accounted for.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

from rlhub.actors.controller import train
from rlhub.config import load_config
from rlhub.ledger import check_run, format_report

pytestmark = pytest.mark.integration

PLUGIN = '''
import os
from rlhub.envs.arithmetic import ArithmeticEnv


class CrashOnceEnv(ArithmeticEnv):
    """The built-in task, but the process dies the first time a marker file is absent (always: every time)."""

    def __init__(self, marker: str, always: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.marker, self.always = marker, always

    def step(self, state, message):
        if self.always or not os.path.exists(self.marker):
            open(self.marker, "a").write("x")
            os._exit(1)
        return super().step(state, message)


def load_environment(marker: str, always: bool = False, **kwargs):
    return CrashOnceEnv(marker, always, **kwargs)


class HugeRewardEnv(ArithmeticEnv):
    """Rewards of +-3e38 (finite, but advantages that large overflow the loss): every step is non-finite."""

    def step(self, state, message):
        result = super().step(state, message)
        result.reward = 3e38 if len(message) % 2 else -3e38
        return result


def load_huge_reward(**kwargs):
    return HugeRewardEnv(**kwargs)


class PickyEnv(ArithmeticEnv):
    """Raises on every prompt whose answer is 7: those samples are dropped, counted and reported, the run goes on."""

    def step(self, state, message):
        if state == "7":
            raise ValueError("no sevens here")
        return super().step(state, message)


def load_picky(**kwargs):
    return PickyEnv(**kwargs)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    (root / "crash_once_env.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "crash_once_env-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crash-once-env\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rlhub.envs]\ncrash_once = crash_once_env:load_environment\nhuge_reward = crash_once_env:load_huge_reward\npicky = crash_once_env:load_picky\n")
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
    assert metrics[-1]["failures/actor_restarts"] == 1 and summary["failures"]["actor_restarts"] == 1
    store = summary["store"]
    assert store["consumed"] == 16 and store["in_flight"] == 0
    assert store["produced"] == store["consumed"] + store["dropped_total"]
    # by group id, from the ledger: the dead actor's groups were started again, and every group ended once
    ledger = check_run(tmp_path / "run")
    assert ledger.ok, format_report(ledger)
    assert ledger.requeued.get("actor_crash", 0) >= 1 and ledger.trained == 16


def test_actors_that_die_again_and_again_with_no_step_between_end_the_run(ray_with_plugin, tmp_path):
    """rollout.max_restarts bounds replacements in a row: an actor that dies at every start ends the run,
    named. (Replacements with steps between them do not add up: tests/integration/test_faults.py replaces
    four actors in one run at the default bound of 3.)"""
    from rlhub.actors.pipeline import RunFailed

    marker = tmp_path / "crashed"
    cfg = load_config([
        "env.name=crash_once", f"env.kwargs.marker={marker}", "env.kwargs.always=true", "prompts_per_step=4", "group_size=4",
        "rollout.max_new_tokens=4", "experiment.total_steps=4", "rollout.max_restarts=1", "wandb.mode=disabled", "progress=false",
        f"run_dir={tmp_path / 'run'}",
    ])
    with pytest.raises(RunFailed, match=r"rollout actor 0 crashed \(2 replacements in a row with no training step between them, more than "
                       r"rollout.max_restarts=1\)"):
        train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failures"]["actor_restarts"] == 2, summary  # the second one ended the run


def test_nonfinite_steps_stop_the_run_with_a_clear_message(ray_with_plugin, tmp_path):
    from rlhub.actors.pipeline import RunFailed

    cfg = load_config([
        "env.name=huge_reward", "algorithm=dr_grpo", "prompts_per_step=4", "group_size=4", "rollout.max_new_tokens=4",
        "experiment.total_steps=20", "learner.max_nonfinite_steps=2", "wandb.mode=disabled", "progress=false",
        f"run_dir={tmp_path}",
    ])
    with pytest.raises(RunFailed, match="2 learner steps in a row had a non-finite loss or gradient"):
        train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failures"]["nonfinite_steps"] == 2
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/nonfinite_skipped"] for m in metrics] == [1.0, 1.0]
    ledger = check_run(tmp_path, allow_open=True)  # a failed run leaves groups open; none may end twice
    assert ledger.ok and ledger.dropped.get("nonfinite_step") == 8 and ledger.trained == 0


def test_a_step_whose_data_cannot_be_fetched_reports_the_groups_lost(ray_with_plugin):
    """Objects that cannot be had (never ready, or their creator died) are reported, not raised.

    (An object whose owner died may still be served from the node's object store; then nothing is lost.)"""
    import time

    import ray

    from rlhub.actors.learner import resolve_batch

    @ray.remote
    class Slow:
        def wait(self) -> list:
            time.sleep(600)
            return ["never"]

    slow = Slow.remote()
    pending = slow.wait.remote()
    kept = ray.put(["kept"])
    tensors, lost = resolve_batch([(pending, [0], [7, 9]), (kept, [0], [8])], timeout_s=2)
    assert lost == [7, 9] and tensors == ["kept"]
    ray.kill(slow)  # now the object's creator is gone for good
    tensors, lost = resolve_batch([(kept, [0], [8]), (pending, [0], [7, 9])], timeout_s=30)
    assert lost == [7, 9] and tensors == ["kept"]


def test_an_env_that_raises_is_reported_with_row_and_traceback(ray_with_plugin, tmp_path):
    cfg = load_config(["env.name=picky", "prompts_per_step=4", "group_size=4", "rollout.max_new_tokens=4", "experiment.total_steps=4",
                       "wandb.mode=disabled", "progress=false", f"run_dir={tmp_path}"])
    summary = train(cfg)
    errors = summary["failures"]["env_error/ValueError"]
    assert errors > 0 and summary["failures"]["env_errors"] == errors
    assert summary["store"]["dropped_samples"]["env_error"] == errors  # counted, sample by sample
    log = (tmp_path / "train.log").read_text()
    rows = re.findall(r"environment picky raised ValueError in step \(occurrence \d\) on row (\{.*\})", log)
    assert len(rows) == 3  # the first three in full, then only counted
    assert all("7" in ast.literal_eval(row)["prompt"] for row in rows)  # the dataset rows that failed
    assert log.count("ValueError: no sevens here") == 3  # each with its traceback
    assert check_run(tmp_path).ok
