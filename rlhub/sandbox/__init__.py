"""Score untrusted Python source against assert-style tests in a child process (the code tasks' reward).

`run_tests(source, tests, entry_point, limits)` turns each test into calls and checks (`plan_test`) and
starts one child (`python -I -S -B` running `rlhub/sandbox/child.py`: no site-packages, no PYTHON*
variables, no bytecode written) in a fresh temporary directory. The child gets the source and the calls'
sources, never an expected value; it loads the source, evaluates each call and writes each output back
as tagged plain data (exact builtin types). This process reads that report as untrusted bytes (size-capped,
json.loads, a strict grammar, depth and size limits; anything else scores 0), evaluates each test's assert
expressions itself on the decoded outputs with pure builtin operations, and removes the directory. The
reward is the fraction of tests passed. About 12 ms a call here, as before this design.

A test is one or more `assert` statements over calls into the candidate's code, literals and pure
operations: `f(x) == expected` (either side), `f(x)`, `not f(x)`, `f(x) is None`, `isinstance(f(x), int)`,
`math.isclose(f(x), 1.5, rel_tol=1e-6)`, `abs(f(x) - 1.5) < 1e-6`, `sorted(f(x)) == [1, 2]`,
`f(x)[0] in (1, 2)`. A call is a call of anything but the pure builtins (`PURE`, `MATH`); the child
evaluates it with the builtins it names bound to the real ones. Anything else (statements, free names,
other attributes) is an `UnsupportedTest`, which an environment raises when it loads its rows.
`mode="asserts"` runs the tests in the child instead: any Python, but the expected values are then in the
code's process, and it can forge its result.

Layers (which applied: `SandboxResult.layers`; the required ones are checked by `check_isolation` at
start-up and by the child before it loads the code):
- rlimits: CPU seconds, address space, file size (printed output included), no core files, 64 open files;
  stdin /dev/null, an environment of PATH, HOME, TMPDIR and LANG, a session of its own; `nproc` besides
  where the parent is not root (the kernel exempts root);
- netns (required): a network namespace with a down loopback, in a new user namespace where those are
  allowed, else as root without one;
- tmpfs (required): a mount namespace in which the working directory is a tmpfs of `disk_mb` and `files`
  inodes, noexec; it vanishes with the child, so nothing the code wrote stays on disk;
- nocaps (required): every capability dropped (root without a user namespace keeps none either);
- landlock<ABI> (required, ABI >= 1): reads only beneath the working directory, the standard library but
  its site-packages, the system's library directories but their python* entries, and a few device files;
  writes only beneath the working directory, where no FIFO, socket, device or symlink may be made. ABI 2
  adds rename and link across directories (denied outright before), 3 truncate, 4 TCP, 6 signals and
  abstract unix sockets out of the domain: seccomp and netns cover each of those too;
- seccomp (required; x86_64, aarch64, no other ABI): fork, vfork, clone (threads too), clone3 (ENOSYS),
  exec, socket and socketpair of every family (AF_UNIX too, which Landlock and netns do not cover), io_uring,
  ptrace, process_vm_readv/writev, mknod, kill and its kin, truncate by path, unshare, setns, mounts, bpf,
  userfaultfd, perf, keys, file handles, modules and reboot fail with EPERM;
- audit: a `sys.addaudithook` hook that reads no global name. It refuses sockets, subprocesses, exec, fork,
  spawn, kill, ctypes and CPython's test modules, rlimit changes, tracing, links, gc.get_objects,
  get_referrers and get_referents, sys._current_frames, new code objects, setting __code__, new audit
  hooks; reads outside the Landlock read roots (symlinks followed), writes, removes, renames, mkdir, chmod
  or utime outside the working directory; relative os.open (its dir_fd is not in the event) and paths that
  are not str or bytes; more than `files` creations where there is no tmpfs (so at most `files` x
  `output_kb` bytes). Before the code runs, os.mkfifo and mknod, new threads and signal handlers (no audit
  events exist for them) become refusals, and `_imp.create_builtin` (fresh copies of those modules) is
  removed. A refusal is written to the report before the code can catch it, and scores 0. Frames are
  denied without a refusal (typing, enum and namedtuple ask for one): sys._getframe raises ValueError,
  tb_frame, gi_frame, cr_frame and ag_frame raise AttributeError.

Guaranteed where the required layers apply, whatever the code does (native code included): it never
holds an expected value, so it earns what its own outputs earn, or 0 (a report missing, cut short or
malformed, any refusal); the wall-clock limit (its process group is killed), CPU, memory, file size, disk
and inode limits; no network, unix sockets, processes, threads or signals out; no writes outside its
directory and no reads outside the read roots (the parent's memory and environment, task data, the host's
files); its directory removed afterwards, whatever its depth, without raising. Against Python code the
hook and this process add: objects whose `__eq__` lies, int or str subclasses, shadowed builtins, gc and
frame walking, fake report lines, early exits and descriptor games score 0 or what honest outputs would.

Not guaranteed:
- under best_effort, where a kernel layer does not apply, only the hook stands in for it, and the hook is
  no boundary: native code bypasses it, and CPython is not memory-safe against crafted bytecode
  (`marshal.loads` cannot be refused: imports need it). Native code may then read and write what the user
  can, connect, and start processes;
- the kernel itself: seccomp denies a list of syscalls, the rest stay reachable (a kernel bug is an escape);
- readable data: task data placed in the standard library's or the system libraries' directories (not
  their site-packages) can be read by the code; keep it elsewhere;
- memory: the tmpfs (`disk_mb`) is memory besides `memory_mb`;
- legitimate code that needs what is refused scores 0: threads, subprocesses, `open(pathlib.Path(...))`
  (pass str), relative `os.open`, `shutil.rmtree`; frames are unavailable (traceback.print_exc fails);
- the reward is as good as the tests: a check the candidate's own outputs can satisfy (`f() is not None`)
  is satisfied. Run code from strangers in a VM or an unprivileged container as well.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import marshal
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rlhub.sandbox.cleanup import remove
from rlhub.sandbox.config import ISOLATION_MODES, SandboxConfig
from rlhub.sandbox.layers import REQUIRED_LAYERS, WHY_MISSING, missing, readable
from rlhub.sandbox.plans import Plan, UnsupportedTest, plan_test
from rlhub.sandbox.report import VALUE_CHARS, judge, parse

__all__ = ["OUTCOMES", "REQUIRED_LAYERS", "IsolationUnavailable", "Limits", "SandboxConfig", "SandboxResult", "UnsupportedTest",
           "adopt", "check_isolation", "configure", "plan_test", "run_tests"]

OUTCOMES = ("ok", "syntax", "error", "timeout", "memory", "output", "refused", "isolation", "malformed")
CHILD = Path(__file__).with_name("child.py")
log = logging.getLogger(__name__)
_policy = SandboxConfig()


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    """Wall-clock limit of the whole call; then the process group is killed (outcome timeout)."""
    cpu_s: int = 5
    """CPU seconds (RLIMIT_CPU; whole seconds)."""
    memory_mb: int = 256
    """Address space (RLIMIT_AS), which Python's own ~30 MB count against."""
    output_kb: int = 256
    """Size of any file written, printed output included (RLIMIT_FSIZE); beyond it: outcome output."""
    disk_mb: int = 16
    """Bytes of the working directory (its tmpfs; held in memory besides memory_mb)."""
    files: int = 256
    """Files and directories the code may create in the working directory."""
    detail_chars: int = 300
    """Characters of detail kept (the first failure, or the tail of the output)."""


@dataclass(frozen=True)
class SandboxResult:
    passed: int
    total: int
    outcome: str
    """One of OUTCOMES: ok (the code loaded and every call or test ran, passing or not), syntax, error (the code
    raised while loading, or the child died), timeout, memory, output (printed too much), refused, isolation
    (a required layer did not apply: the code was not run), malformed (the report broke its grammar)."""
    detail: str = ""
    layers: tuple[str, ...] = ()
    """The isolation that applied (see the module docstring)."""
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


class IsolationUnavailable(RuntimeError):
    """isolation=required, and a required layer does not apply on this machine."""


def configure(cfg: SandboxConfig) -> None:
    """The process's default policy (the run's `sandbox.*`), for callers that pass no `isolation`."""
    cfg.check()
    global _policy
    _policy = cfg


def adopt(cfg: SandboxConfig) -> tuple[str, ...]:
    """Make the run's `sandbox.*` this process's policy and check that its isolation applies here
    (`check_isolation`: IsolationUnavailable or a warning); returns the layers that apply."""
    configure(cfg)
    return check_isolation(cfg.isolation)


def run_tests(source: str, tests: Sequence[str], entry_point: str | None = None, limits: Limits = Limits(),
              isolation: str | None = None, mode: str = "calls") -> SandboxResult:
    """Score `source` against `tests` (Python asserts) in one child process; `entry_point`: a name the source
    must define (else outcome error). `isolation`: required or best_effort (None: the configured policy).
    `mode`: calls (the checks are made here) or asserts (the tests run in the child: forgeable). Raises
    UnsupportedTest for a test `plan_test` cannot turn (an environment checks its rows when it loads them).
    Thread-safe; uses no signals in the calling process."""
    if mode not in ("calls", "asserts"):
        raise ValueError(f"mode={mode!r}: use calls or asserts")
    plans = [plan_test(t, entry_point) for t in tests] if mode == "calls" else None
    return _run(source, tests, plans, entry_point, limits, isolation or _policy.isolation)




def _run(source: str, tests: Sequence[str], plans: list[Plan] | None, entry_point: str | None, limits: Limits,
         isolation: str, *, _audit: bool = True, _pretend_missing: Sequence[str] = (),
         _read_roots: Sequence[str] = ()) -> SandboxResult:
    """One child, its report judged. Tests only: `_audit=False` leaves out the audit hook and what `disarm`
    takes away (to show the kernel layers hold by themselves), `_pretend_missing` leaves out kernel layers,
    `_read_roots` adds read roots."""
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation={isolation!r}: use one of {list(ISOLATION_MODES)}")
    start = time.monotonic()
    calls = [call for plan in plans for call in plan.calls] if plans is not None else []
    asserts = [str(t) for t in tests] if plans is None else []
    root = Path(tempfile.mkdtemp(prefix="rlhub-sandbox-")).resolve()
    try:
        work = root / "work"
        work.mkdir(mode=0o700)
        read_fd, write_fd = os.pipe()
        try:
            job = {"source": str(source), "entry_point": str(entry_point or ""), "calls": calls, "tests": asserts,
                   "result_fd": write_fd, "cpu_s": max(1, int(limits.cpu_s)), "memory": limits.memory_mb << 20,
                   "fsize": limits.output_kb << 10, "disk_bytes": limits.disk_mb << 20, "files": int(limits.files),
                   "read_roots": readable() + tuple(_read_roots), "audit": bool(_audit), "skip": tuple(_pretend_missing),
                   "required": REQUIRED_LAYERS if isolation == "required" else ()}
            (root / "job").write_bytes(marshal.dumps(job))
            with open(root / "job", "rb") as job_file, open(root / "output", "wb") as output:
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _BOOT, str(_compiled_child())],
                                        stdin=job_file, stdout=output, stderr=output, cwd=work, env=_child_env(work),
                                        pass_fds=(write_fd,), start_new_session=True)
            os.close(write_fd)
            write_fd = -1
            cap = (1 << 20) + (len(calls) + len(asserts)) * (VALUE_CHARS + 1024)
            data, timed_out, overflow = _collect(proc, read_fd, limits.timeout_s, cap)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        report = parse(data, len(calls), len(asserts))
        passed, outcome, detail = judge(report, plans, len(tests), isolation, proc.returncode, timed_out, overflow,
                                         limits, _tail(root / "output", limits.detail_chars))
        return SandboxResult(passed, len(tests), outcome, detail[:limits.detail_chars], report.layers or (),
                             time.monotonic() - start)
    finally:
        remove(root)


# The child imports its module rather than running it as a script, so that it loads the bytecode compiled
# once by `_compiled_child` instead of compiling the source in every call (7 ms of a 17 ms call).
_BOOT = "import sys; sys.path[:0] = sys.argv[1:2]; import child; del sys.path[0]; child.main()"


@functools.lru_cache(maxsize=1)
def _compiled_child() -> Path:
    """The child's directory, after writing its bytecode cache there where it is missing or stale (where the
    directory is not writable, an installer compiled it, or each child compiles the source)."""
    import py_compile

    with contextlib.suppress(OSError, py_compile.PyCompileError):
        py_compile.compile(str(CHILD), doraise=True)
    return CHILD.parent


def _child_env(work: Path) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    if "LD_LIBRARY_PATH" in os.environ:  # a Python built against its own shared libraries needs it to start
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _collect(proc: subprocess.Popen, fd: int, timeout_s: float, cap: int) -> tuple[bytes, bool, bool]:
    """(the report, whether the child ran past the deadline, whether the report passed `cap` bytes); the child's
    process group is killed in either case. The report is read while the child runs (a pipe holds 64 KiB)."""
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    size, overflow = 0, False
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    while not overflow:
        left = deadline - time.monotonic()
        if left <= 0 or not poll.poll(int(left * 1000) + 1):
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:  # every writer closed it: the child has exited, or is exiting
            break
        chunks.append(chunk)
        size += len(chunk)
        overflow = size > cap
    exited = not overflow and _wait_exit(proc, deadline)
    if not exited:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the group id is still the child's
    proc.wait()
    return b"".join(chunks), not exited and not overflow, overflow


def _wait_exit(proc: subprocess.Popen, deadline: float) -> bool:
    """Whether the child exited by the deadline. Waits on a pidfd where the kernel has them (Linux >= 5.3):
    `Popen.wait(timeout)` polls with sleeps of up to 50 ms, more than a whole call costs."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        return bool(poll.poll(max(0, int((deadline - time.monotonic()) * 1000))))
    finally:
        os.close(pidfd)



def _tail(path: Path, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * chars))
        return f.read().decode(errors="replace")[-chars:]



def check_isolation(isolation: str = "required", *, _pretend_missing: Sequence[str] = ()) -> tuple[str, ...]:
    """The layers that apply on this machine (a child is started to find out). isolation=required: raises
    IsolationUnavailable naming each required layer that does not apply, and why; best_effort: logs a
    warning naming them. `_pretend_missing` (tests only): layers the child leaves out."""
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"sandbox.isolation={isolation!r}: use one of {list(ISOLATION_MODES)}")
    result = _run("", [], [], None, Limits(timeout_s=30), "best_effort", _pretend_missing=_pretend_missing)
    absent = missing(result.layers) if result.outcome == "ok" else list(REQUIRED_LAYERS)
    if absent:
        reasons = "; ".join(f"{name}: {WHY_MISSING[name]}" for name in absent)
        started = "" if result.outcome == "ok" else f" (the sandbox's child failed: {result.outcome} {result.detail})"
        if isolation == "required":
            raise IsolationUnavailable(f"sandbox.isolation=required, and these layers do not apply here{started}: "
                                       f"{reasons}. Set sandbox.isolation=best_effort to run without them (an audit "
                                       f"hook stands in, which native code can bypass).")
        log.warning("sandbox: isolation=best_effort, and these layers do not apply here%s: %s", started, reasons)
    return result.layers
