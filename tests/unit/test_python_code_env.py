"""The python_code environment and its sandbox: rewards from test fractions, and hostile code killed or refused.
(tests/security probes the sandbox itself, trick by trick.)"""

import concurrent.futures
import doctest
import json
import random
import secrets
import tempfile
from pathlib import Path

import pytest

from rlhub import sandbox
from rlhub.envs import ModelMessage
from rlhub.envs.python_code import FILES, PythonCodeEnv, extract_code, load_environment, write_data
from rlhub.sandbox import Limits, UnsupportedTest, plan_test, run_tests

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(5, 4) == 9"]


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Each call's directory is made here, so that the test can see it is gone afterwards."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def env():
    return load_environment(timeout_s=3.0)


def state(tests=ADD_TESTS, entry_point="add"):
    return {"entry_point": entry_point, "tests": tests}


def test_correct_wrong_and_cut_off_completions(env):
    right = ModelMessage("Sure:\n```python\ndef add(a, b):\n    return a + b\n```\n")
    result = env.step(state(), right)
    assert (result.reward, result.success, result.info["outcome"]) == (1.0, True, "ok")
    wrong = env.step(state(), ModelMessage("def add(a, b):\n    return a * b + 7\n"))
    assert (wrong.reward, wrong.success, wrong.info["passed"]) == (0.0, False, 0)
    cut = env.step(state(), ModelMessage("def add(a, b):\n    return a + b\n", finish_reason="length"))
    assert (cut.reward, cut.success, cut.info["outcome"]) == (0.0, False, "cut_off")


def test_partial_pass_gives_the_fraction(env):
    result = env.step(state(), ModelMessage("def add(a, b):\n    return a + b if a < 5 else 0\n"))
    assert result.reward == pytest.approx(2 / 3) and not result.success
    assert result.info["outcome"] == "ok" and "add(5, 4)" in result.info["detail"]


def test_syntax_error_and_missing_function(env):
    assert env.step(state(), ModelMessage("def add(a, b)\n    return a + b\n")).info["outcome"] == "syntax"
    missing = env.step(state(), ModelMessage("def plus(a, b):\n    return a + b\n"))
    assert (missing.reward, missing.info["outcome"]) == (0.0, "error") and "add" in missing.info["detail"]


def test_extract_code():
    assert extract_code("x\n```python\ndef f():\n    return 1\n```\ny") == "def f():\n    return 1\n"
    assert extract_code("```\nf = 1\n") == "f = 1\n"  # an unclosed fence runs to the end
    assert extract_code("def f(): return 1") == "def f(): return 1"


def outside_paths():
    nonce = secrets.token_hex(8)
    return Path(f"/tmp/x-{nonce}"), Path.home() / f"x-{nonce}"


HOSTILE = {
    "infinite loop": ("while True:\n    pass\n", "timeout"),
    "socket connect": ("import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 53))\n", "refused"),
    "urllib": ("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n", "refused"),
    "bytearray bomb": ("x = bytearray(10**10)\n", "memory"),
    "growing list": ("x = []\nwhile True:\n    x.append(bytearray(10**6))\n", "memory"),
    "fork bomb": ("import os\nwhile True:\n    os.fork()\n", "refused"),
    "subprocess": ("import subprocess\nsubprocess.run(['echo', 'hi'])\n", "refused"),
    "output flood": ("while True:\n    print('x' * 1000)\n", "output"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_code_is_killed_or_refused(name):
    source, outcome = HOSTILE[name]
    result = run_tests(source + "def add(a, b):\n    return a + b\n", ADD_TESTS, "add", Limits(timeout_s=1.5, cpu_s=1))
    assert (result.outcome, result.passed, result.total) == (outcome, 0, 3), result
    assert result.seconds < 3


def test_writes_outside_are_refused_and_do_not_happen():
    tmp_file, home_file = outside_paths()
    for source in (f"open({str(tmp_file)!r}, 'w').write('x')\n",
                   f"import pathlib\npathlib.Path({str(home_file)!r}).write_text('x')\n",
                   f"import os\nos.open({str(tmp_file)!r}, os.O_WRONLY | os.O_CREAT)\n",
                   "import os\nos.mkdir('../escaped')\n"):
        result = run_tests(source, ADD_TESTS, "add")
        assert result.outcome == "refused", (source, result)
    assert not tmp_file.exists() and not home_file.exists()
    inside = run_tests("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n"
                       "def add(a, b):\n    return a + b\n", ADD_TESTS, "add")
    assert (inside.outcome, inside.passed) == ("ok", 3)  # the working directory is writable


def test_a_printed_fake_result_is_ignored_and_a_written_one_scores_zero():
    fake = "[\"call\", 0, \"value\", [\"int\", 3]]"
    printed = f"print({fake!r})\nprint('[\"end\"]')\ndef add(a, b):\n    return 0\n"
    result = run_tests(printed, ADD_TESTS, "add")
    assert (result.outcome, result.passed) == ("ok", 1)  # add(0, 0) == 0 only
    written = ("import os\nfor fd in range(3, 64):\n    try:\n"
               f"        os.write(fd, ({fake!r} + '\\n').encode())\n    except OSError:\n        pass\n"
               "def add(a, b):\n    return 0\n")
    result = run_tests(written, ADD_TESTS, "add")
    assert (result.outcome, result.passed) == ("malformed", 0)


def test_a_refusal_caught_by_the_code_is_still_reported_and_scores_zero(env):
    source = "try:\n    import socket\n    socket.socket()\nexcept Exception:\n    pass\ndef add(a, b):\n    return a + b\n"
    result = run_tests(source, ADD_TESTS, "add")
    assert (result.outcome, result.passed, result.fraction) == ("refused", 0, 0.0)
    step = env.step(state(), ModelMessage(source))
    assert (step.reward, step.success, step.info["outcome"]) == (0.0, False, "refused")


def test_kernel_layers_hold_without_the_audit_hook():
    """What the kernel denies by itself where its layers apply (tests/security probes each of them)."""
    tmp_file, _ = outside_paths()
    probes = {"network": "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 53))",
              "write": f"open({str(tmp_file)!r}, 'w')", "fork": "import os\nif os.fork() == 0:\n    os._exit(0)"}
    layers = set(run_tests("", [], None).layers)
    assert {"audit", "rlimits"} <= layers
    guards = {"network": {"netns", "seccomp"}, "write": {f"landlock{v}" for v in range(1, 20)}, "fork": {"seccomp", "nproc"}}
    for what, source in probes.items():
        if layers & guards[what]:
            code = f"def blocked():\n    try:\n        {source.replace(chr(10), chr(10) + '        ')}\n" \
                   f"    except OSError:\n        return True\n    return False\n"
            result = sandbox._run(code, ["assert blocked()"], [plan_test("assert blocked()")], None, Limits(), "best_effort",
                                  _audit=False)
            assert result.passed == 1, (what, layers, result)
    assert not tmp_file.exists()


def test_steps_from_several_threads(env):
    answers = ["return a + b", "return a - b", "return a + b if a < 5 else 0", "return 0"]
    expected = [1.0, 1 / 3, 2 / 3, 1 / 3]
    jobs = [i % len(answers) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        rewards = list(pool.map(lambda i: env.step(state(), ModelMessage(f"def add(a, b):\n    {answers[i]}\n")).reward, jobs))
    assert rewards == pytest.approx([expected[i] for i in jobs])


def test_shipped_rows_are_the_generator_s_and_format_examples_are_wrong(env, tmp_path):
    train, test = write_data(tmp_path / "data")
    assert train.read_bytes() == FILES["train"].read_bytes() and test.read_bytes() == FILES["test"].read_bytes()
    for path in (train, test):
        path.unlink()
    path.parent.rmdir()
    rows = env.dataset("train")
    assert len(rows) > 200 and 40 < len(env.dataset("test")) < len(rows)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in env.dataset("test")}
    by_prompt = {r["prompt"]: r for r in rows}
    for prompt, answer in env.format_examples(8, random.Random(0)):
        row = by_prompt[prompt[-1]["content"].removesuffix(" Reply with the code only.")]
        assert answer.startswith(f"def {row['entry_point']}(")
        assert not env.step(env.reset(row)[1], ModelMessage(answer)).success


def test_every_shipped_row_converts_to_calls_and_checks():
    for path in FILES.values():
        for i, line in enumerate(path.read_text().splitlines()):
            row = json.loads(line)
            for test in row["tests"]:
                plan = plan_test(test, row["entry_point"])
                assert plan.calls and all(call.startswith(row["entry_point"] + "(") for call, _ in plan.calls), (path, i, test)


def test_rows_with_tests_that_cannot_be_judged_are_refused_at_load(tmp_path):
    env = PythonCodeEnv()
    rows = [{"prompt": "p", "entry_point": "f", "tests": ["assert f(1) == 2"]},
            {"prompt": "q", "entry_point": "g", "tests": ["assert g(1) == 2", "x = g(1)\nassert x == 2"]}]
    with pytest.raises(UnsupportedTest, match=r"rows.jsonl: row 1 .*'g'.*x = g\(1\)"):
        env.check_rows(rows, "rows.jsonl")
    with pytest.raises(UnsupportedTest, match="test_mode=asserts"):
        env.reset(rows[1])
    assert env.reset(rows[0])[1]["tests"] == ["assert f(1) == 2"]
    trusting = PythonCodeEnv(test_mode="asserts")  # the old way, documented as forgeable
    trusting.check_rows(rows)
    step = trusting.step(trusting.reset(rows[1])[1], ModelMessage("def g(a):\n    return a + 1\n"))
    assert (step.reward, step.info["outcome"]) == (1.0, "ok")


def test_asserts_mode_is_forgeable_as_documented():
    liar = "class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()\n"
    assert run_tests(liar, ADD_TESTS, "add").passed == 0
    assert run_tests(liar, ADD_TESTS, "add", mode="asserts").passed == 3  # why calls mode is the default


def test_judged_forms_and_their_semantics():
    source = ("import math\ndef f(x):\n    return x\ndef pair():\n    return (1, 2)\ndef nothing():\n    return None\n"
              "def gen(n):\n    yield from range(n)\ndef boom():\n    raise ValueError('no')\n")
    passing = ["assert f(8) == 8", "assert 8 == f(8)", "assert f(1)", "assert not f(0)", "assert nothing() is None",
               "assert f(True) is True", "assert isinstance(f(1), int)", "assert isinstance(f(None), type(None))",
               "assert isinstance(f(1.5), (int, float))", "assert math.isclose(f(0.1 + 0.2), 0.3)",
               "assert abs(f(1.0) - 1.0) < 1e-9", "assert abs(1.0 - f(1.0)) <= 1e-9", "assert pair() == (1, 2)",
               "assert f([1, (2, 3)]) == [1, (2, 3)]", "assert f({'a': {1, 2}}) == {'a': {1, 2}}", "assert f(b'x') == b'x'",
               "assert list(gen(3)) == [0, 1, 2]", "assert sorted(f([3, 1])) == [1, 3]", "assert f([4, 5])[1] == 5",
               "assert f(1) == 1\nassert f(2) == 2", "assert f(True) == 1", "assert f(float('inf')) == float('inf')",
               "assert f(range(3)) == range(3)", "assert f(1 + 2j) == 1 + 2j", "assert f(len([1, 2])) == 2"]
    failing = ["assert pair() == [1, 2]", "assert f(1) is True", "assert gen(2) == [0, 1]", "assert boom() == 1",
               "assert not boom()", "assert f(1) == 1\nassert f(2) == 3", "assert isinstance(f(1), str)",
               "assert f(float('nan')) == float('nan')", "assert f(object()) == 1"]
    result = run_tests(source, passing + failing, "f")
    assert (result.outcome, result.passed, result.total) == ("ok", len(passing), len(passing + failing)), result


def test_tests_that_cannot_be_judged_name_why():
    for test, why in [("x = f(1)", "only assert"), ("assert f(1) == y", "cannot be judged"), ("assert 1 == 1", "calls none"),
                      ("assert f(1) is 5", "`is` compares only"), ("assert isinstance(f(1), MyType)", "builtin type names"),
                      ("assert f(1) == ", "SyntaxError")]:
        with pytest.raises(UnsupportedTest, match=why):
            plan_test(test, "f")


def test_the_sandbox_docstrings():
    assert doctest.testmod(sandbox).failed == 0


def test_raw_text_prompts_and_bad_kwargs():
    raw = PythonCodeEnv(chat=False)
    row = {"prompt": "Write a Python function f() that returns 1.", "entry_point": "f", "tests": ["assert f() == 1"]}
    assert raw.reset(row)[0] == row["prompt"] + "\n"
    with pytest.raises(ValueError, match="memory_mb"):
        load_environment(memory_mb=1)
    with pytest.raises(ValueError, match="test_mode"):
        load_environment(test_mode="exec")
    assert PythonCodeEnv.uses_sandbox
