"""Bad input fails with one line naming the cause, before Ray starts."""

import subprocess
import sys

import pytest


def rlhub(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhub.cli", *args, f"run_dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["train", "env.name=no_such_env"], "env.name='no_such_env': no such environment"),
        (["train", "model.path=/nonexistent/model"], "model.path='/nonexistent/model'"),
        (["train", "rollout.num_actors=zero"], "rollout.num_actors"),
        (["train", "algorithm=ppo", "algorithm.reference=learner"], "kl_penalty=reward needs algorithm.reference=actor"),
        (["bench", "e2e", "algorithm=ppo"], "use rlhub bench presets"),
    ],
)
def test_bad_input_is_one_line(args, says, tmp_path):
    out = rlhub(*args, tmp_path=tmp_path)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and says in err[0], out.stderr
    assert "Traceback" not in out.stderr


def test_help_is_instant():
    out = subprocess.run([sys.executable, "-m", "rlhub.cli", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "rlhub train" in out.stdout
