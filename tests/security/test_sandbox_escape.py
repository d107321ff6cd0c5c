"""Probes: code trying to get out of the sandbox (read, write, start processes, connect), once against the
audit hook and once, where it matters, against the kernel layers alone (`audit=False`)."""

from __future__ import annotations

import os
import socket

import pytest
from sandbox_probe import SECRET, attempt, blocked, needs, refused, score

from rlhub.sandbox import Limits

# ---- reads -----------------------------------------------------------------------------------------------

READS = {
    "a host file": "open({secret!r}).read()",
    "the parent's environment": "open('/proc/' + str(os.getppid()) + '/environ', 'rb').read()",
    "/etc/passwd": "open('/etc/passwd').read()",
    "a host directory": "os.listdir({host!r})",
    "site-packages (where task data may be installed)": "os.listdir({site!r})",
    "rlhub's own task data": "open({data!r}).read()",
}


def leaked(detail: str) -> bool:
    """Whether what the probe read reached its result: the host's secret, or an environment (PATH=...)."""
    return SECRET in detail or "PATH=" in detail


def read_probe(what: str, host) -> str:  # noqa: ANN001
    site = os.path.join(os.path.dirname(os.__file__), "site-packages")  # inside the standard library's directory
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "envs", "data", "python_code.jsonl")
    action = READS[what].format(secret=str(host / "secret.txt"), host=str(host), site=site, data=os.path.normpath(data))
    return attempt(f"x = {action}\nreturn x", prelude="import os")


@pytest.mark.parametrize("what", sorted(READS))
def test_reads_outside_are_refused(what, host):
    result = refused(score(read_probe(what, host)))
    assert not leaked(result.detail)


@needs("landlock")
@pytest.mark.parametrize("what", sorted(READS))
def test_reads_outside_are_blocked_by_landlock_alone(what, host):
    result = blocked(score(read_probe(what, host), audit=False), "PermissionError", "FileNotFoundError")
    assert not leaked(result.detail)


def test_a_symlink_in_a_read_root_does_not_lead_outside(tmp_path, host):
    root = tmp_path / "lib"
    root.mkdir()
    (root / "key").symlink_to(host / "secret.txt")
    code = attempt(f"return open({str(root / 'key')!r}).read()")
    refused(score(code, roots=(str(root),)), "open")
    assert not leaked(blocked(score(code, roots=(str(root),), audit=False, skip=()), "PermissionError").detail)


# ---- writes ----------------------------------------------------------------------------------------------

WRITES = {
    "an absolute path": "open({target!r}, 'w').write('x')",
    "a path through ..": "open('../../../host/written', 'w').write('x')",  # work is calls/<call>/work
    "a symlink": "os.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
    "os.open with a dir_fd": "fd = os.open({host!r}, os.O_PATH)\nos.open('written', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    "a FIFO": "os.mkfifo({target!r})",
    "a FIFO inside": "os.mkfifo('fifo')",
    "mknod": "os.mknod({target!r}, 0o600 | stat.S_IFREG)",
}


@pytest.mark.parametrize("audit", [True, False], ids=["hook", "kernel"])
@pytest.mark.parametrize("what", sorted(WRITES))
def test_writes_outside_and_special_files_are_refused(what, audit, host):
    if not audit and not {"landlock", "seccomp"} <= {layer.rstrip("0123456789") for layer in score("").layers}:
        pytest.skip("Landlock and seccomp do not apply on this machine")
    code = attempt(WRITES[what].format(target=str(host / "written"), host=str(host)), prelude="import os, stat")
    result = score(code, audit=audit)
    refused(result) if audit else blocked(result, "PermissionError")
    assert sorted(p.name for p in host.iterdir()) == ["secret.txt"]


def test_writes_inside_work_and_are_gone_afterwards():
    code = ("open('scratch.txt', 'w').write('x')\nimport os\nos.mkdir('d')\nopen('d/f', 'w').write('y')\n"
            "def add(a, b):\n    return open('scratch.txt').read() + open('d/f').read()\n")
    result = score(code, tests=["assert add(1, 2) == 'xy'"])
    assert (result.outcome, result.passed) == ("ok", 1), result


# ---- processes -------------------------------------------------------------------------------------------

PROCESSES = {
    "os.fork": "os.fork()",
    "os.system": "if os.system('true') != 0:\n    raise OSError('os.system failed')",
    "subprocess": "import subprocess\nsubprocess.run(['true'])",
    "os.posix_spawn": "os.posix_spawn('/bin/true', ['true'], {})",
    "os.execv": "os.execv('/bin/true', ['true'])",
    "pty": "import pty\npty.fork()",
    "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "threading": "import threading\nthreading.Thread(target=print).start()",
}


@pytest.mark.parametrize("what", sorted(PROCESSES))
def test_new_processes_and_threads_are_refused(what):
    refused(score(attempt(PROCESSES[what], prelude="import os")))


@needs("seccomp")
@pytest.mark.parametrize("what", sorted(PROCESSES))
def test_new_processes_and_threads_fail_under_seccomp_alone(what):
    blocked(score(attempt(PROCESSES[what], prelude="import os"), audit=False), "PermissionError", "RuntimeError", "OSError")


# ---- network ---------------------------------------------------------------------------------------------

@pytest.fixture
def unix_listener(host):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(host / "raylet.sock"))
    server.listen(1)
    server.setblocking(False)
    yield server
    server.close()


@pytest.fixture
def tcp_listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    yield server
    server.close()


def connected(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def unix_connect(server: socket.socket) -> str:
    return attempt(f"s = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\ns.connect({server.getsockname()!r})",
                   prelude="import socket")


def tcp_connect(server: socket.socket) -> str:
    return attempt(f"s = socket.create_connection({server.getsockname()!r}, timeout=1)", prelude="import socket")


def test_unix_and_tcp_connections_are_refused(unix_listener, tcp_listener):
    refused(score(unix_connect(unix_listener)), "socket")
    refused(score(tcp_connect(tcp_listener)), "socket")
    assert not connected(unix_listener) and not connected(tcp_listener)


@needs("seccomp")
def test_unix_and_tcp_connections_fail_under_the_kernel_layers_alone(unix_listener, tcp_listener):
    blocked(score(unix_connect(unix_listener), audit=False), "PermissionError")
    blocked(score(tcp_connect(tcp_listener), audit=False), "PermissionError")
    assert not connected(unix_listener) and not connected(tcp_listener)


@needs("landlock")
def test_tcp_fails_under_landlock_without_seccomp(tcp_listener):
    blocked(score(tcp_connect(tcp_listener), audit=False, skip=("seccomp",)), "PermissionError")
    assert not connected(tcp_listener)


@needs("netns")
def test_tcp_fails_in_the_network_namespace_alone(tcp_listener):
    blocked(score(tcp_connect(tcp_listener), audit=False, skip=("seccomp", "landlock")), "OSError")
    assert not connected(tcp_listener)


def test_the_unix_probe_has_teeth_without_seccomp(unix_listener):
    """Neither Landlock nor a network namespace stops a unix-socket connect: seccomp's socket denial does."""
    result = score(unix_connect(unix_listener), audit=False, skip=("seccomp",))
    assert result.passed == 0 and "'done'" in result.detail and connected(unix_listener), result


def test_disabling_the_hook_through_gc_is_refused(unix_listener):
    code = attempt("""
        import gc
        for f in gc.get_objects():
            if getattr(f, '__name__', '') == 'hook' and f.__closure__:
                for cell in f.__closure__:
                    cell.cell_contents = None
        s = socket.socket(socket.AF_UNIX)
        s.connect(%r)""" % unix_listener.getsockname(), prelude="import socket")
    refused(score(code), "gc.get_objects")
    assert not connected(unix_listener)


# ---- the parent, other processes, the kernel ---------------------------------------------------------------

LOAD_NATIVE = ("import shutil, importlib.util, glob\n"
               "shutil.copy(glob.glob(os.path.dirname(os.__file__) + '/lib-dynload/_bisect.*')[0], f'n{a}.so')\n"
               "importlib.util.module_from_spec(importlib.util.spec_from_file_location('_bisect', f'n{a}.so'))")
"""Copy a compiled module into the directory (a name per call: the mapped file must not change) and load it."""
NATIVE = {
    "read the parent's memory": "open('/proc/%d/mem' % os.getppid(), 'rb')",
    "signal the parent": "os.kill(os.getppid(), 0)",
    "chroot (a capability)": "os.chroot('.')",
    "ptrace the parent": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                         "if libc.ptrace(16, os.getppid(), 0, 0) != 0:\n    raise PermissionError(ctypes.get_errno())",
    "process_vm_readv": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nb = ctypes.create_string_buffer(8)\n"
                        "iov = (ctypes.c_void_p * 2)(ctypes.addressof(b), 8)\n"
                        "if libc.process_vm_readv(os.getppid(), iov, 1, iov, 1, 0) < 0:\n"
                        "    raise PermissionError(ctypes.get_errno())",
    "load native code written to the directory": LOAD_NATIVE,
}


@pytest.mark.parametrize("what", sorted(NATIVE))
def test_native_level_attacks_are_refused_or_blocked(what):
    result = score(attempt(NATIVE[what], prelude="import os"))
    assert result.outcome == "refused" or "blocked" in result.detail, result
    assert result.passed == 0


@needs("nocaps")
def test_capabilities_are_dropped_without_seccomp():
    """chroot needs CAP_SYS_CHROOT, which a process keeps in its own user namespace (or as root) unless dropped."""
    blocked(score(attempt("os.chroot('.')", prelude="import os"), audit=False, skip=("seccomp",)), "PermissionError")


@needs("seccomp", "landlock", "nocaps", "tmpfs")
@pytest.mark.parametrize("what", sorted(NATIVE))
def test_native_level_attacks_fail_under_the_kernel_layers_alone(what):
    why = "failed to map" if what.startswith("load") else "PermissionError"  # the noexec tmpfs; else EPERM or EACCES
    blocked(score(attempt(NATIVE[what], prelude="import os"), audit=False, limits=Limits(timeout_s=3, output_kb=4096)), why)


FIFO = """import os, socket, stat
def fifo(fd):
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False
"""


def test_refusals_cannot_be_hidden_by_swapping_the_report_descriptor():
    """The code puts /dev/null on every pipe it holds (the report's), is refused, and puts the pipes back: the hook
    sees the swap and ends the process (scored 0) rather than let the refusal go unrecorded."""
    code = attempt("""
        null = os.open('/dev/null', os.O_WRONLY)
        pipes = [fd for fd in range(3, 64) if fifo(fd)]
        saved = {fd: os.dup(fd) for fd in pipes}
        for fd in pipes:
            os.dup2(null, fd)
        try:
            socket.socket()
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)""", prelude=FIFO)
    result = score(code)
    assert result.outcome in ("error", "refused") and result.passed == 0, result
