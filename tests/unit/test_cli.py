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
        (["train", "rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["train", "env=python_code", "sandbox.isolation=sometimes"], "sandbox.isolation='sometimes': use one of"),
        # nothing listens there: said at once, naming the address, instead of Ray retrying for minutes
        (["train", "cluster.address=127.0.0.1:1"], "cluster.address='127.0.0.1:1': nothing answers at 127.0.0.1:1"),
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


def test_check_reconciles_a_ledger_and_fails_on_a_double_training(tmp_path):
    import json

    events = [{"event": "issued", "group": 0, "row": 3, "actor": 0, "version": 0},
              {"event": "trained", "group": 0, "row": 3, "actor": 0, "version": 0, "step": 1}]
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    ok = subprocess.run([sys.executable, "-m", "rlhub.cli", "check", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "reconciled" in ok.stdout and "1 trained" in ok.stdout
    with (tmp_path / "ledger.jsonl").open("a") as f:
        f.write(json.dumps(events[1]) + "\n")
    bad = subprocess.run([sys.executable, "-m", "rlhub.cli", "check", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "trained twice" in bad.stdout


def test_plot_draws_a_run(tmp_path):
    import json

    rows = [{"step": s, "rollout/success_rate": s / 10, "rollout/reward_mean": s / 10, "staleness/mean": 0.5, "staleness/max": 1,
             "time/step_s": 0.3, "time/train_s": 0.2} for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "rlhub.cli", "plot", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["staleness.png", "step_time.png", "success_reward.png"]


def test_reading_a_config_imports_no_torch_and_the_core_no_actor():
    code = "import sys, rlhub.config; heavy = [m for m in ('torch', 'transformers', 'vllm', 'ray') if m in sys.modules]; assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    # the core library below the command-line entry points (cli, benches) does not reach up into the Ray actors
    import re
    from pathlib import Path

    import rlhub

    root = Path(rlhub.__file__).parent
    core = [p for p in root.rglob("*.py") if p.name != "cli.py" and p.parent != root / "benches"]
    reaching_up = [p.name for p in core if re.search(r"^\s*(from|import) rlhub\.actors", p.read_text(), re.MULTILINE)]
    assert len(core) > 10 and not reaching_up


def test_a_code_task_row_whose_tests_cannot_be_judged_is_named_before_ray(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "entry_point": "f", "tests": ["assert f(1) == 1"]}\n'
                    '{"prompt": "q", "entry_point": "g", "tests": ["x = g(1)\\nassert x == 2"]}\n')
    result = rlhub("train", "env=python_code", f"env.dataset.path={rows}", "warm_start.steps=0", tmp_path=tmp_path)
    assert result.returncode != 0 and "row 1" in result.stderr and "test_mode=asserts" in result.stderr, result.stderr
    assert "Ray" not in result.stderr
