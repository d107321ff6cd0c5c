"""Probes: code trying to forge its reward (frames, gc, objects that lie, shadowed builtins, fake report lines,
early exits), and code exhausting time, CPU, memory, output and disk."""

from __future__ import annotations

import dis
import os
import types

import pytest
from sandbox_probe import attempt, blocked, needs, refused, score, zero
from test_sandbox_escape import LOAD_NATIVE

from rlhub.sandbox import Limits
from rlhub.sandbox.cleanup import remove

# ---- forging ---------------------------------------------------------------------------------------------

FRAME_TRICKS = {
    "sys._getframe": "f = sys._getframe()\nwhile f:\n    f.f_locals\n    f = f.f_back",
    "a traceback's tb_frame": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    e.__traceback__.tb_frame.f_back.f_locals",
    "a generator's gi_frame": "g = (i for i in ())\ng.gi_frame.f_back",
    "inspect.stack": "import inspect\ninspect.stack()",
}


@pytest.mark.parametrize("what", sorted(FRAME_TRICKS))
def test_frames_are_not_available(what):
    """Frames are denied without a refusal (typing, enum and namedtuple ask for one); none holds an expected value."""
    blocked(score(attempt(FRAME_TRICKS[what], prelude="import sys")), "ValueError", "AttributeError")


def test_namedtuple_typing_and_enum_still_work():
    code = ("from typing import List, TypeVar\nfrom collections import namedtuple\nimport enum, dataclasses, functools\n"
            "T = TypeVar('T')\nP = namedtuple('P', 'x y')\nColor = enum.Enum('Color', 'RED GREEN')\n"
            "def add(a: int, b: int) -> int:\n    return P(a, b).x + P(a, b).y + Color.RED.value - 1\n")
    result = score(code)
    assert (result.outcome, result.passed) == ("ok", 3), result


SIGNALS = {
    "signal.signal": "signal.signal(signal.SIGALRM, lambda n, frame: None)",
    "signal.setitimer and a handler": "signal.setitimer(signal.ITIMER_REAL, 0.001)\nsignal.signal(signal.SIGALRM, print)",
    "a fresh _signal module": "import _imp, importlib.machinery\n"
                              "_imp.create_builtin(importlib.machinery.BuiltinImporter.find_spec('_signal'))",
}


@pytest.mark.parametrize("what", sorted(SIGNALS))
def test_signal_handlers_which_receive_frames_are_refused(what):
    result = score(attempt(SIGNALS[what], prelude="import signal"))
    assert result.outcome == "refused" or "blocked: AttributeError" in result.detail, result
    zero(result)


def test_the_job_cannot_be_rewritten_through_gc():
    code = attempt("""
        import gc
        for o in gc.get_objects():
            if isinstance(o, dict) and 'calls' in o:
                o['calls'] = [('3', ())] * len(o['calls'])""")
    refused(score(code), "gc.get_objects")
    refused(score(attempt("import gc\ngc.get_referrers(add)")), "gc.get_referrers")
    refused(score(attempt("import gc\ngc.get_referents(add)")), "gc.get_referents")


def test_code_objects_cannot_be_swapped_or_made():
    refused(score(attempt("add.__code__ = (lambda a, b: a + b).__code__")), "object.__setattr__")
    refused(score(attempt("(lambda: 0).__code__.replace(co_consts=(3,))")), "code.__new__")


LIARS = {
    "an object whose __eq__ is always True": ("class Yes:\n    def __eq__(self, other):\n        return True\n"
                                               "    __hash__ = object.__hash__\n", "Yes()"),
    "an int subclass equal to everything": ("class I(int):\n    def __eq__(self, other):\n        return True\n"
                                             "    __hash__ = int.__hash__\n", "I(0)"),
    "a str subclass": ("class S(str):\n    def __eq__(self, other):\n        return True\n"
                       "    __hash__ = str.__hash__\n", "S('')"),
    "a list subclass": ("class L(list):\n    def __eq__(self, other):\n        return True\n", "L()"),
    "an infinite generator": ("def forever():\n    while True:\n        yield 3\n", "forever()"),
    "a bool where the test says is": ("", "1"),
}


@pytest.mark.parametrize("what", sorted(LIARS))
def test_outputs_that_lie_about_equality_pass_nothing(what):
    prelude, value = LIARS[what]
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) is True", "assert 9 == add(5, 4)"]
    result = score(f"{prelude}def add(a, b):\n    return {value}\n", tests=tests)
    assert result.outcome == "ok", result
    zero(result)


def test_shadowed_builtins_do_not_change_the_checks():
    code = ("import builtins\nisinstance = lambda *a: True\nbuiltins.isinstance = isinstance\nlen = lambda x: 3\n"
            "builtins.len = len\nsorted = lambda x: [1, 2]\nbuiltins.sorted = sorted\nbuiltins.abs = lambda x: 0\n"
            "def add(a, b):\n    return 'x'\n")
    tests = ["assert isinstance(add(1, 2), int)", "assert len(add(1, 2)) == 3", "assert sorted(add(1, 2)) == [1, 2]",
             "assert abs(add(1, 2) - 3) < 1"]
    result = score(code, tests=tests)
    assert result.outcome == "ok", result
    zero(result)


def test_builtins_a_call_names_are_the_real_ones():
    code = "list = lambda x: [3]\ndef add(a, b):\n    return a[0] + b\n"
    result = score(code, tests=["assert add(list((1,)), 2) == 3"])
    assert (result.outcome, result.passed) == ("ok", 1), result  # list((1,)) is [1], not the code's [3]


def test_printed_report_lines_are_ignored():
    code = ("print('[\"layers\", []]')\nprint('[\"call\", 0, \"value\", [\"int\", 3]]')\nprint('[\"end\"]')\n"
            "def add(a, b):\n    print('[\"call\", 1, \"value\", [\"int\", 0]]')\n    return -1\n")
    assert score(code).outcome == "ok"
    zero(score(code))


def test_fake_lines_written_to_every_descriptor_score_zero():
    code = ("import os\nfor fd in range(65):\n    try:\n"
            "        os.write(fd, b'[\"call\", 0, \"value\", [\"int\", 3]]\\n[\"end\"]\\n')\n    except OSError:\n        pass\n"
            "def add(a, b):\n    return -1\n")
    result = zero(score(code))
    assert result.outcome == "malformed", result


EXITS = {
    "os._exit(0) at load": ("import os\nos._exit(0)\n", "return -1"),
    "sys.exit(0) at load": ("import sys\nsys.exit(0)\n", "return -1"),
    "SystemExit at load": ("raise SystemExit\n", "return -1"),
    "KeyboardInterrupt at load": ("raise KeyboardInterrupt\n", "return -1"),
    "os._exit(0) in a call": ("import os\n", "os._exit(0)"),
    "sys.exit(0) in a call": ("import sys\n", "sys.exit(0)"),
    "KeyboardInterrupt in a call": ("", "raise KeyboardInterrupt"),
    "infinite recursion": ("", "return add(a, b)"),
    "closing the report": ("import os\n", "[os.close(fd) for fd in range(3, 64) if fd]\nreturn -1"),
}


@pytest.mark.parametrize("what", sorted(EXITS))
def test_exiting_early_scores_zero(what):
    prelude, body = EXITS[what]
    body = body.replace("\n", "\n    ")
    zero(score(f"{prelude}def add(a, b):\n    {body}\n"))


def test_the_hook_reads_no_global_name():
    """The code can rebind builtins and the child module's names; the hook must not look any of them up."""
    from rlhub.sandbox import child

    hook = child.audit_hook(os.getcwd(), ("/usr/lib",), 1, 10)
    codes = [hook.__code__]
    for code in codes:
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        loads = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
        assert not loads, (code.co_name, loads)
    cells = [cell.cell_contents for cell in hook.__closure__]
    assert not any(isinstance(v, (list, dict, set)) for v in cells), cells  # nothing the hook decides by can be edited


# ---- limits ----------------------------------------------------------------------------------------------

def test_wall_clock():
    result = zero(score("import time\ndef add(a, b):\n    while True:\n        time.sleep(0.01)\n", limits=Limits(timeout_s=1)))
    assert result.outcome == "timeout" and "wall-clock" in result.detail and result.seconds < 2


def test_cpu():
    result = zero(score("def add(a, b):\n    while True:\n        pass\n", limits=Limits(timeout_s=5, cpu_s=1)))
    assert result.outcome == "timeout" and "CPU" in result.detail and result.seconds < 3


def test_memory():
    assert zero(score("x = bytearray(10**10)\ndef add(a, b):\n    return -1\n")).outcome == "memory"
    assert zero(score("def add(a, b):\n    x = []\n    while True:\n        x.append(bytearray(10**6))\n")).outcome == "memory"


def test_output_flood():
    assert zero(score("while True:\n    print('x' * 1000)\n")).outcome == "output"


def test_a_file_over_the_per_file_limit():
    result = zero(score("open('big', 'wb').write(b'x' * (1 << 20))\ndef add(a, b):\n    return -1\n"))
    assert result.outcome == "output", result


DISK = {
    "bytes": "for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * 60_000)",
    "inodes": "for i in range(10_000):\n    open(f'e{i}', 'w').close()",
    "a deep tree": "for i in range(1500):\n    os.mkdir('d')\n    os.chdir('d')",
}


@pytest.mark.parametrize("what", sorted(DISK))
def test_disk_budget_of_the_tmpfs(what):
    """2 MiB and 64 inodes (FAST): the tmpfs answers ENOSPC; nothing reaches the disk."""
    if "tmpfs" not in score("").layers:
        pytest.skip("no tmpfs on this machine")
    blocked(score(attempt(DISK[what], prelude="import os"), audit=False), "OSError")


@pytest.mark.parametrize("what", sorted(DISK))
def test_disk_budget_of_the_hook_without_a_tmpfs(what):
    """Without a tmpfs, the hook counts creations (64 here), each file at most output_kb (64 KiB here)."""
    refused(score(attempt(DISK[what], prelude="import os"), skip=("tmpfs",)), "sandbox.files")


def test_a_deep_tree_with_long_names_on_the_disk_is_removed(calls_dir):
    """Without the tmpfs and the hook, 1,500 levels of 200-character names reach the disk (paths far past
    PATH_MAX): clean-up removes them all, without recursion or error, and the reward is 0."""
    code = attempt("for i in range(1500):\n    os.mkdir('d' * 200)\n    os.chdir('d' * 200)\n    open('f', 'w').close()",
                   prelude="import os")
    result = zero(score(code, audit=False, skip=("tmpfs", "landlock"), limits=Limits(timeout_s=10, files=10_000),
                        tests=["assert add(1, 2) == 3"]))
    assert "'done'" in result.detail  # it was all created; the fixture checks it is all gone


def test_clean_up_restores_permissions_and_never_raises(tmp_path, caplog):
    top = tmp_path / "call"
    path = top
    for _ in range(1500):
        path = path / ("n" * 100)
    os.makedirs(top)
    fd = os.open(top, os.O_RDONLY)
    for _ in range(1500):  # paths past PATH_MAX: built through directory descriptors
        os.mkdir("n" * 100, dir_fd=fd)
        sub = os.open("n" * 100, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = sub
    open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "w").close()
    os.chmod(fd, 0o000)
    os.close(fd)
    (top / "locked").mkdir()
    (top / "locked" / "f").write_text("x")
    os.chmod(top / "locked", 0o000)
    os.symlink("/etc", top / "link")
    remove(top)
    assert not top.exists() and os.path.isdir("/etc")
    remove(tmp_path / "missing")  # logged, not raised
    assert "could not remove" in caplog.text


@needs("tmpfs")
def test_the_native_code_probe_has_teeth_without_the_tmpfs():
    """Native code copied into the directory loads where no noexec tmpfs covers it (hence the tmpfs layer)."""
    code = attempt(LOAD_NATIVE, prelude="import os")
    assert "'done'" in score(code, audit=False, skip=("tmpfs",), limits=Limits(timeout_s=3, output_kb=4096)).detail
