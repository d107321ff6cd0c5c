"""`rlhub envs check`: a dry run that names what would break a run, with the row it comes from."""

from __future__ import annotations

import json

import pytest

from rlhub.env_check import run


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fussy_reward(tmp_path, monkeypatch):
    """A reward function that raises on one row (its `answer` is missing) and hangs on another."""
    (tmp_path / "fussy_reward.py").write_text('''
import time

def score(prompt, completion, row):
    if row["answer"] is None:
        raise KeyError("answer is empty")
    if row["answer"] == "hang":
        time.sleep(5)
    return float(completion.strip() == row["answer"])
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fussy_reward:score"


def test_a_missing_column_is_named_before_anything_runs(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", [{"q": "1+1=", "answer": "2"}] * 3)
    report = run("reward_fn", ["env.kwargs.fn=rlhub.envs.reward_fn:exact_match", f"env.dataset.path={data}",
                               "env.dataset.columns.prompt=question", "warm_start.steps=0"])
    assert len(report.problems) == 1 and "data: env.dataset.columns.prompt='question'" in report.problems[0]
    assert "has no column 'question'" in report.problems[0] and "['q', 'answer']" in report.problems[0]


def test_a_long_prompt_and_a_raising_and_a_hanging_row_are_each_named(tmp_path, fussy_reward):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": None}, {"prompt": "3+3=", "answer": "hang"},
            {"prompt": "x" * 300, "answer": "1"}, {"prompt": "5+5=", "answer": "10"}]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    report = run("reward_fn", [f"env.kwargs.fn={fussy_reward}", f"env.dataset.path={data}", "warm_start.steps=0", "env.timeout_s=0.5",
                               "eval.every=0"], rows=3)
    problems = "\n".join(report.problems)
    assert "prompts longer than the room for a turn: row 3 (300 tokens)" in problems
    assert "row 1, reply 'empty', turn 1: step KeyError: 'answer is empty'" in problems
    assert "row 2, reply 'empty', turn 1: step EnvTimeout: no answer within env.timeout_s=0.5 s" in problems
    assert not any(p.startswith("row 0") for p in report.problems)  # the good row is only reported
    assert "  row 0, plain text: reward 0, success False, 1 turn(s), done" in report.text()
    assert "4 of 5 sampled prompts fit (80%)" in report.text()


def test_a_sound_environment_has_no_problems_and_shows_its_prompts():
    report = run("calculator_tools", [], rows=1)
    assert report.problems == [] and report.text().endswith("no problems found")
    assert "row 0 as rendered" in report.text() and "What is" in report.text()
    assert "row 0, format example: reward 0, success False, 3 turn(s), done" in report.text()
