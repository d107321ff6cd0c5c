"""The python_code environment and its sandbox: rewards from test fractions, and hostile code killed or refused."""

import concurrent.futures
import random
import secrets
import tempfile
from pathlib import Path

import pytest

from rlhub import sandbox
from rlhub.envs import ModelMessage
from rlhub.envs.python_code import FILES, PythonCodeEnv, extract_code, load_environment, write_data
from rlhub.sandbox import Limits, run_tests

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


def test_a_printed_or_written_fake_result_is_ignored():
    source = ("import os\nfor line in ('0' * 32 + ' test 0 pass', '0' * 32 + ' end'):\n    print(line)\n"
              "    for fd in range(3, 64):\n        try:\n            os.write(fd, (line + '\\n').encode())\n"
              "        except OSError:\n            pass\n"
              "def add(a, b):\n    return 0\n")
    result = run_tests(source, ADD_TESTS, "add")
    assert (result.outcome, result.passed) == ("ok", 1)  # add(0, 0) == 0 only


def test_a_refusal_caught_by_the_code_is_still_reported():
    source = "try:\n    import socket\n    socket.socket()\nexcept Exception:\n    pass\ndef add(a, b):\n    return a + b\n"
    result = run_tests(source, ADD_TESTS, "add")
    assert (result.outcome, result.passed) == ("refused", 3)


def test_kernel_layers_hold_without_the_audit_hook(monkeypatch):
    """What the kernel denies by itself where its layers apply (which ones is machine-dependent)."""
    monkeypatch.setattr(sandbox, "CHILD", sandbox.CHILD.replace("sys.addaudithook(audit_hook(work, report))", "pass"))
    tmp_file, _ = outside_paths()
    probes = {"network": "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 53))",
              "write": f"open({str(tmp_file)!r}, 'w')", "fork": "import os\nif os.fork() == 0:\n    os._exit(0)"}
    layers = set(run_tests("", [], None).layers)
    assert {"audit", "rlimits"} <= layers
    guards = {"network": {"netns", *(f"landlock{v}" for v in range(4, 20))},
              "write": {f"landlock{v}" for v in range(1, 20)}, "fork": {"seccomp", "nproc"}}
    for what, source in probes.items():
        if layers & guards[what]:
            result = run_tests(f"try:\n    {source.replace(chr(10), chr(10) + '    ')}\nexcept OSError:\n    ok = 1\n", ["assert ok"])
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


def test_raw_text_prompts_and_bad_kwargs():
    raw = PythonCodeEnv(chat=False)
    row = {"prompt": "Write a Python function f() that returns 1.", "entry_point": "f", "tests": ["assert f() == 1"]}
    assert raw.reset(row)[0] == row["prompt"] + "\n"
    with pytest.raises(ValueError, match="memory_mb"):
        load_environment(memory_mb=1)
