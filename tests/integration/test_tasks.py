"""Users' own tasks through the whole asynchronous pipeline: every built-in environment, data from
jsonl and parquet files with resume, an installed environment package, a model judge, evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhub.data import write_jsonl
from rlhub.tracking import read_rows

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EVAL = ["eval.rows=4", "eval.k=2"]
TOOL_WARM_START = ["warm_start.steps=80", "warm_start.batch_size=8", "warm_start.lr=3e-3"]
TOOL_TURN = ["rollout.max_new_tokens=64"]
"""A whole call fits a turn (the small config's 4 tokens would cut every call before its tag)."""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_an_installed_environment_package_is_listed_and_trains(tmp_path):
    plugin = ROOT / "examples" / "env-plugin"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(plugin)]
    subprocess.run(pip, check=True, capture_output=True)
    try:
        env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        rlhub = [sys.executable, "-m", "rlhub.cli"]
        listed = subprocess.run([*rlhub, "envs", "list"], check=True, capture_output=True, text=True, env=env).stdout
        line = next(row for row in listed.splitlines() if row.startswith("reverse_word "))
        assert "rlhub-env-reverse 0.1.0" in line and "Reverse a short word" in line
        shown = subprocess.run([*rlhub, "config", "env=reverse_word", "rollout.max_model_len=96"], check=True, capture_output=True,
                               text=True, env=env).stdout
        assert "#   rollout.max_new_tokens=4" in shown and "#   env.dataset.columns.word=\"text\"" in shown
        assert "rollout.max_model_len=64" not in shown and "max_model_len: 96" in shown  # the command line's value wins
        # the task's data, columns, held-out rows and token budget come from the package: none on the command line
        run = subprocess.run([*rlhub, "train", "env=reverse_word", "experiment.total_steps=3", "prompts_per_step=4", "group_size=4",
                              "progress=false", f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["steps"] == 3 and summary["eval"]["eval/rows"] > 0
        resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
        assert resolved["env"]["dataset"]["path"].endswith("rlhub_reverse/data/words.jsonl") and resolved["rollout"]["max_new_tokens"] == 4
        assert "site-packages" in resolved["env"]["dataset"]["path"]  # the installed package's own file
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(plugin / "tests")],
                               capture_output=True, text=True, env=env, cwd=plugin)
        assert tests.returncode == 0, tests.stdout[-3000:]
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "rlhub-env-reverse"], capture_output=True)


@pytest.mark.parametrize("env, overrides", [
    ("countdown", ["env.kwargs.system_prompt=", "rollout.max_new_tokens=6"]),
    ("gsm8k_style", ["rollout.max_new_tokens=6", "rollout.max_model_len=384"]),
    # turns, tokens, context: the env's own; the warm start teaches the shape of a call (<tool_call>{...}) well enough
    # that some episodes call the tool (loss 5.6 -> 0.4 on calculator_tools; once per cache)
    ("calculator_tools", ["env.kwargs.system_prompt=", *TOOL_WARM_START, *TOOL_TURN]),
    ("shop_tools", [*TOOL_WARM_START, *TOOL_TURN]),
    ("python_code", ["rollout.max_new_tokens=24", "rollout.max_model_len=512"]),
    ("reasoning_gym", ["rollout.max_new_tokens=4", "warm_start.steps=5"]),
])
def test_every_builtin_environment_trains_and_evaluates(ray_local, run_pipeline, tmp_path, env, overrides):
    summary, metrics = run_pipeline(tmp_path, f"env={env}", "experiment.total_steps=3", *EVAL, *overrides)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert summary["failures"]["env_errors"] == 0
    assert summary["eval"]["eval/rows"] == 4 and 0 <= summary["eval"]["eval/pass@1"] <= 1
    trained = sum(m["train/groups"] for m in metrics)
    assert trained == 3 * 4  # prompts_per_step groups at every step: the environment's samples reached the learner
    if env == "calculator_tools":  # the model called the tool and was answered: episodes went past one turn
        # (shop_tools' three turn shapes are not learned as far in 80 warm-start steps; its turns are tested by hand)
        assert max(m["rollout/turns"] for m in metrics) > 1


@pytest.mark.vllm
def test_multi_turn_tool_episodes_on_the_vllm_engine(ray_local, run_pipeline, tmp_path):
    """Per-prompt token budgets and contexts that grow by tool messages, through vLLM."""
    pytest.importorskip("vllm")
    summary, metrics = run_pipeline(tmp_path, "env=calculator_tools", "rollout.engine=vllm", "experiment.total_steps=3",
                                    "env.kwargs.system_prompt=", "rollout.max_new_tokens=18", "rollout.max_turns=3",
                                    "rollout.max_episode_tokens=30", *TOOL_WARM_START, "rollout.log_samples=4", *EVAL)
    assert [m["step"] for m in metrics] == [1, 2, 3] and max(m["rollout/turns"] for m in metrics) > 1
    generated = [len(s["logprobs"]) for s in read_jsonl(tmp_path / "samples.jsonl")]  # the assistant's tokens per episode
    assert len(generated) == 3 * 4 * 4 and max(generated) <= 30  # no episode past its token budget


def test_rows_from_jsonl_and_parquet_are_the_same_and_resume_continues_at_the_saved_row(ray_local, run_pipeline, tmp_path):
    import datasets

    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(6)]
    write_jsonl(rows, tmp_path / "rows.jsonl")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    task = ["env=reward_fn", "env.kwargs.fn=rlhub.envs.reward_fn:exact_match", "env.dataset.columns.prompt=question",
            "warm_start.steps=0", "max_staleness=0", "rollout.log_samples=4", "eval.final=false"]
    run_pipeline(tmp_path / "a", *task, f"env.dataset.path={tmp_path}/rows.jsonl", "experiment.total_steps=4")
    run_pipeline(tmp_path / "b", *task, f"env.dataset.path={tmp_path}/rows.parquet", "experiment.total_steps=2",
                 "checkpoint.every=2", "checkpoint.keep_final=false")
    run_pipeline(tmp_path / "b", *task, f"env.dataset.path={tmp_path}/rows.parquet", "experiment.total_steps=4", "resume=true")

    def trained(run: Path) -> dict[int, list[tuple[int, str]]]:
        """step -> sorted (row index, prompt text): the ledger says which rows, the samples what they said"""
        prompts = {(s["step"], s["row"]): s["prompt"] for s in read_jsonl(run / "samples.jsonl")}
        out: dict[int, list] = {}
        for e in read_jsonl(run / "ledger.jsonl"):
            if e["event"] == "trained":
                out.setdefault(e["step"], []).append((e["row"], prompts[(e["step"], e["row"])]))
        return {step: sorted(v) for step, v in out.items()}

    a, b = trained(tmp_path / "a"), trained(tmp_path / "b")
    assert sorted(a) == [1, 2, 3, 4] and a == b  # the same rows, the same text, step by step, across the resume
    assert all(text == rows[row]["question"] for step in a.values() for row, text in step)
    assert len({row for step in a.values() for row, _ in step}) == 16  # 4 steps x 4 different rows


def test_a_model_judge_scores_every_trained_sample(ray_local, run_pipeline, tmp_path, tiny_model_path):
    summary, metrics = run_pipeline(tmp_path, "experiment.total_steps=3", f"reward.judge.model={tiny_model_path}", "reward.judge.weight=0.5",
                                    "eval.final=false")
    judged = metrics[-1]["judge/samples"]
    assert judged >= 3 * 4 * 4  # every sample of every trained group went through the judge
    # env reward is 0/1 success; the judge adds 0.5 * p(yes) > 0 to every sample
    assert all(m["rollout/reward_mean"] > m["rollout/success_rate"] for m in metrics)


def test_evaluation_during_the_run_and_from_the_checkpoint_agree(ray_local, run_pipeline, tmp_path):
    summary, metrics = run_pipeline(tmp_path, "experiment.total_steps=8", "eval.every=2", "eval.rows=0", "eval.k=2", "eval.before=true")
    evaluated = [m for m in metrics if "eval/pass@1" in m]  # results join the metrics of the step at which they come back
    assert evaluated and {int(m["eval/step"]) for m in evaluated} <= {0, 2, 4, 6}
    assert all(int(m["eval/step"]) < m["step"] for m in evaluated)
    before = [m for m in evaluated if m["eval/step"] == 0]
    assert before and before[0]["eval/version"] == 0  # the starting policy, not a version trained since
    final = summary["eval"]
    assert final["eval/step"] == 8 and final["eval/rows"] == 20  # every row of arithmetic's test split
    out = subprocess.run([sys.executable, "-m", "rlhub.cli", "eval", str(tmp_path), "eval.rows=0", "eval.k=0"],
                         capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    again = json.loads(out.stdout)
    # greedy decoding of the same weights: the same rows solved, computed in another process from the checkpoint
    assert again["eval/pass@1"] == final["eval/pass@1"] and again["eval/reward_greedy"] == final["eval/reward_greedy"]
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == list(range(1, 9))
