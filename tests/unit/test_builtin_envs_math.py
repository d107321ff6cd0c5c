"""The built-in math environments, countdown and gsm8k_style: rewards, shipped data, format examples, threads."""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import datasets
import pytest

from rlhub.envs import countdown, gsm8k_style
from rlhub.envs.base import ModelMessage


@pytest.fixture(scope="module")
def cd():
    return countdown.load_environment(format_reward=0.0)  # success and reward coincide; the shaping is tested apart


@pytest.fixture(scope="module")
def gs():
    return gsm8k_style.load_environment()


def reward(env, state, text, finish_reason="stop"):
    result = env.step(state, ModelMessage(text, finish_reason))
    assert result.done and result.success == (result.reward == 1.0)
    return result.reward


# --- countdown


@pytest.mark.parametrize("text", ["3*5+7", "(3*5)+7", "7+5*3", " 3 * 5 + 7 ", "I multiply, then add.\n3*5+7\n"])
def test_countdown_rewards_a_right_expression(cd, text):
    assert reward(cd, ([3, 5, 7], 22), text) == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "3+5+7",  # wrong value
        "7+7+3+5",  # 7 used twice
        "20+2",  # numbers not given
        "22",  # the target itself
        "-3+5*5",  # unary minus: not an operation of the game
        "3*5+7=22",  # not an expression
        "3*+", "", "3 5 7", "(3*5+7", "0x16", "3_0-8", "22.0",  # malformed
        "3**5", "__import__('os').system('true')", "(3).real*5+7", "[3*5+7][0]", "lambda: 22",  # no code
    ],
)
def test_countdown_refuses_wrong_and_malformed(cd, text):
    assert reward(cd, ([3, 5, 7], 22), text) == 0.0


def test_countdown_cut_off_scores_zero_and_division_is_exact(cd):
    assert reward(cd, ([3, 5, 7], 22), "3*5+7", "length") == 0.0
    assert reward(cd, ([2, 4, 7], 14), "7/2*4") == 1.0  # 3.5 on the way, exact
    assert reward(cd, ([3, 3, 5], 5), "5/(3-3)") == 0.0  # division by zero is a wrong answer
    assert reward(cd, ([3, 3, 5], 5), "5+3-3") == 1.0  # a repeated number given twice may be used twice


def test_countdown_format_reward_only_for_a_valid_expression_that_ended_its_turn():
    env = countdown.load_environment()  # format_reward 0.1
    state = ([3, 5, 7], 22)
    for text, want in [("3*5+7", 1.0), ("3+5+7", 0.1), ("7+7", 0.0), ("20+2", 0.0), ("3+5", 0.1), ("abc", 0.0)]:
        assert env.step(state, ModelMessage(text, "stop")).reward == want, text
    cut = env.step(state, ModelMessage("3+5", "length"))
    assert cut.reward == 0.0 and cut.success is False


def test_countdown_rule_at_most_once_or_exactly_once():
    assert countdown.evaluate("3*5", [3, 5, 7]) == 15
    assert countdown.evaluate("3*5", [3, 5, 7], use_all=True) is None
    assert countdown.evaluate("3*5+7", [3, 5, 7], use_all=True) == 22
    assert countdown.evaluate("1" + "+1" * 150, [1] * 151) is None  # over the length limit
    assert countdown.evaluate("(" * 150 + "1" + ")" * 150, [1]) is None  # nesting the parser refuses


def solvable(values: list[Fraction], target: int) -> bool:
    """Brute force: some expression over some of `values`, each at most once, equals `target`."""
    if target in values:
        return True
    for i in range(len(values)):
        for j in range(len(values)):
            if i == j:
                continue
            a, b, rest = values[i], values[j], [v for k, v in enumerate(values) if k not in (i, j)]
            for c in (a + b, a - b, a * b, a / b if b else None):
                if c is not None and solvable(rest + [c], target):
                    return True
    return False


def test_every_shipped_countdown_row_is_solvable(cd):
    for split in ("train", "test"):
        for row in cd.dataset(split):
            numbers = [Fraction(n) for n in row["numbers"]]
            assert row["target"] not in row["numbers"], row
            assert solvable(numbers, row["target"]), row


def test_countdown_format_examples_teach_shape_not_answers(cd):
    examples = cd.format_examples(500, random.Random(0))
    correct = 0
    for prompt, answer in examples:
        given = [int(n) for n in re.findall(r"[0-9]+", answer)]
        assert countdown.evaluate(answer, given, use_all=True) is not None  # a well-formed expression
        numbers, target = re.search(r"Numbers: ([0-9 ]+)\nTarget: ([0-9]+)", prompt[-1]["content"]).groups()
        correct += reward(cd, ([int(n) for n in numbers.split()], int(target)), answer)
    assert correct / len(examples) < 0.03


def test_countdown_raw_text_prompt(cd):
    env = countdown.CountdownEnv(chat=False, system_prompt="")
    prompt, state = env.reset({"numbers": [3, 5, 7], "target": 22})
    assert prompt == "Numbers: 3 5 7\nTarget: 22\nExpression:" and state == ([3, 5, 7], 22)
    assert cd.reset({"numbers": [3, 5, 7], "target": 22})[0][0]["role"] == "system"


def test_countdown_other_difficulty_writes_its_data_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHUB_CACHE", str(tmp_path))
    env = countdown.load_environment(num_numbers=4, max_number=12)
    rows = env.dataset("train")
    assert len(rows[0]["numbers"]) == 4 and all(max(r["numbers"]) <= 12 for r in rows)
    files = sorted(p.name for p in tmp_path.glob("envs/countdown-*/*.jsonl"))
    assert files == ["countdown.jsonl", "countdown_test.jsonl"]
    assert solvable([Fraction(n) for n in rows[0]["numbers"]], rows[0]["target"])


# --- gsm8k_style


@pytest.mark.parametrize(
    "text",
    ["#### 7", "3+4=7\n#### 7", "#### 7 apples", "\\boxed{7}", "The answer is $\\boxed{7}$.", "#### 7.0", "#### 14/2",
     "\\boxed{\\frac{14}{2}}", "She has 3+4=7 apples now.", "\\boxed{7}\n#### 8"],
)
def test_gsm8k_style_accepts_equal_answers(gs, text):
    assert reward(gs, "7", text) == 1.0


@pytest.mark.parametrize(
    "text",
    ["#### 8", "\\boxed{8}\n#### 7", "#### 7\n#### 8", "", "no idea", "\\boxed{7", "#### ", "#### seven",
     "#### 9^9^9^9", "#### 9**9**9**9", "\\boxed{7^{1}}", "#### 99999!", "\\boxed{\\sqrt{49}}", "#### " + "7" * 50],
)
def test_gsm8k_style_refuses_wrong_malformed_and_costly(gs, text):
    start = time.perf_counter()
    assert reward(gs, "7", text) == 0.0
    assert time.perf_counter() - start < 2.0


def test_gsm8k_style_cut_off_scores_zero(gs):
    assert reward(gs, "7", "#### 7", "length") == 0.0


def test_gsm8k_style_extraction_order():
    assert gsm8k_style.extract_answer("#### 8 then \\boxed{7}") == "7"
    assert gsm8k_style.extract_answer("4 then 5\n#### 6\nbye") == "6"
    assert gsm8k_style.extract_answer("4 then 5.5.") == "5.5"
    assert gsm8k_style.extract_answer("no number") is None


def solve_question(question: str) -> int:
    """The answer from the words, read sentence by sentence (independently of the generator's code)."""
    value = int(re.match(r"\w+ has ([0-9]+) ", question).group(1))
    for sentence in re.findall(r"[^.?]+[.?]", question)[1:-1]:
        b = int(re.search(r"[0-9]+", sentence).group())
        if "times as many" in sentence:
            value *= b
        elif re.search(r"gives [0-9]+ to|loses|sells", sentence):
            value -= b
        else:
            assert re.search(r"buys|finds|gives \w+ [0-9]+ more", sentence), sentence
            value += b
    return value


def test_shipped_gsm8k_style_rows_are_right(gs):
    for split in ("train", "test"):
        for row in gs.dataset(split):
            assert int(row["answer"]) == solve_question(row["question"]), row
    some = random.Random(0).sample(list(gs.dataset("test")), 20)
    assert all(reward(gs, gs.reset(row)[1], f"#### {row['answer']}") == 1.0 for row in some)


def test_gsm8k_style_format_examples_teach_shape_not_answers(gs):
    answers = {row["question"]: row["answer"] for row in gs.dataset("train")}
    examples = gs.format_examples(1000, random.Random(0))
    assert all(re.fullmatch(r"#### [0-9]+", answer) for _, answer in examples)
    hits = sum(answer == f"#### {answers[prompt[-1]['content']]}" for prompt, answer in examples)
    chance = 1 / len(set(answers.values()))
    assert hits / len(examples) < 2 * chance + 0.02


def test_gsm8k_style_raw_text_prompt():
    env = gsm8k_style.GSM8KStyleEnv(chat=False, system_prompt=None)
    prompt, state = env.reset({"question": "Ann has 3 apples. She buys 4 more. How many apples does Ann have now?", "answer": "7"})
    assert prompt.endswith("have now?\nAnswer:") and state == "7"


# --- both


def test_step_works_from_worker_threads(cd, gs):
    handler = signal.getsignal(signal.SIGALRM)
    calls = [(cd, ([3, 5, 7], 22), "3*5+7"), (gs, "7", "#### 14/2"), (gs, "7", "\\boxed{\\frac{14}{2}}")] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: (threading.current_thread() is threading.main_thread(), reward(*c)), calls))
    assert results == [(False, 1.0)] * len(calls)
    assert signal.getsignal(signal.SIGALRM) == handler


@pytest.mark.parametrize("module, key", [(countdown, lambda r: (tuple(sorted(r["numbers"])), r["target"])),
                                         (gsm8k_style, lambda r: r["question"])])
def test_load_environment_reads_the_shipped_files(module, key):
    env = module.load_environment()
    train, test = env.dataset("train"), env.dataset("test")
    assert isinstance(train, datasets.Dataset) and isinstance(test, datasets.Dataset)
    assert len(train) >= 1000 and len(test) >= 200
    assert module.load_environment.__doc__.splitlines()[0].strip()  # a description for `rlhub envs list`
    assert all(f in train.column_names and f in test.column_names for f in env.row_fields)
    assert not {key(r) for r in train} & {key(r) for r in test}
    with pytest.raises(KeyError):
        env.dataset("validation")


@pytest.mark.parametrize("module, name", [(countdown, "countdown"), (gsm8k_style, "gsm8k_style")])
def test_shipped_files_are_what_write_data_writes(module, name, tmp_path):
    module.write_data(tmp_path)
    for suffix in ("", "_test"):
        file = f"{name}{suffix}.jsonl"
        assert (tmp_path / file).read_bytes() == (Path(module.__file__).parent / "data" / file).read_bytes()
