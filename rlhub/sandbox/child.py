"""The code-reward sandbox's child program: `python -I -S -B`, one process per call.

`rlhub.sandbox` starts it with a job (marshal, written by the parent) on stdin. It isolates itself (the
layers are described in `rlhub.sandbox`'s docstring), loads the candidate's source, evaluates each call
expression it was sent, and reports what came back as plain data. It never holds an expected value: the
parent compares. Started with -I, it can import only the standard library (the parent puts this
directory first on its path just long enough to import this module), and it imports only cheap modules,
since every call starts it. Nothing in rlhub imports it.

The report, one JSON array a line on the pipe `job["result_fd"]`, which the parent parses as untrusted:
    ["layers", [name, ...]]             first, before any of the candidate's code runs
    ["load", status, detail]            status: ok, syntax, error, memory, output or isolation
    ["call", i, "value", value]         or ["call", i, "raised", kind, detail] (kind: error, memory,
                                        output), or ["call", i, "unencodable", why]
    ["test", i, status, detail]         asserts mode only; status: pass, fail, error, memory, output
    ["refused", event, argument]        written by the audit hook, at any point
    ["end"]
A value is [tag, payload], exact types only (a subclass, or any other object, is unencodable):
["none", null], ["bool", b], ["int", n], ["float", x], ["complex", [re, im]], ["str", s], ["bytes", hex],
["list" | "tuple" | "set" | "frozenset" | "iter", [value, ...]], ["dict", [[key, value], ...]],
["range", [start, stop, step]]; "iter" is a drained generator, map, filter, zip, enumerate, reversed
or iterator over a builtin container.
"""

import os
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
MAX_DEPTH = 32
"""Nesting of one value (a deeper value is unencodable)."""
MAX_ITEMS = 10_000
"""Items drained from one iterator."""
# Syscalls the seccomp filter fails with EPERM (clone3 fails with ENOSYS, so that the C library falls
# back to clone): new processes and programs, sockets of every family, io_uring, reading or writing
# other processes, device and FIFO nodes, signals, truncate by path, and the kernel's attack surface
# (namespaces, mounts, bpf, userfaultfd, perf, keys, file handles, modules, reboot).
SECCOMP_DENIED = {
    "x86_64": (0xC000003E, (57, 58, 56, 59, 322, 41, 53, 425, 426, 427, 101, 310, 311, 133, 259, 62, 200, 234, 129,
                            297, 424, 76, 272, 308, 165, 166, 155, 161, 321, 323, 298, 250, 248, 249, 438, 304, 303,
                            428, 429, 430, 431, 432, 433, 169, 246, 175, 313, 176)),
    "aarch64": (0xC00000B7, (220, 221, 281, 198, 199, 425, 426, 427, 117, 270, 271, 33, 129, 130, 131, 138, 240,
                             424, 45, 97, 268, 40, 39, 41, 51, 280, 282, 241, 219, 217, 218, 438, 265, 264, 428, 429,
                             430, 431, 432, 433, 142, 104, 105, 273, 106)),
}
REFUSED_MODULES = ("ctypes", "_ctypes", "_posixsubprocess", "_posixshmem", "_test", "_xx", "xx")
"""Modules the code may not import (a name or a file name starting with one of these): foreign
functions, process spawning, shared memory outside the directory, and CPython's test helpers."""


def main() -> None:
    import _json  # noqa: F401 - the report's string encoder
    import marshal
    import resource  # noqa: F401 - imported while files may still be read
    import types  # noqa: F401 - much of the standard library imports it, and it reads tb_frame, which the hook denies

    data = b""
    while chunk := os.read(0, 1 << 20):
        data += chunk
    job = marshal.loads(data)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    # the report moves to the lowest free descriptor (3), whatever number the parent's pipe had: where it
    # is does not depend on how many files the parent holds open, so the probes that look for it find it
    report_fd = os.dup(job["result_fd"])
    if report_fd < job["result_fd"]:
        os.close(job["result_fd"])
        job["result_fd"] = report_fd
    else:
        os.close(report_fd)
    emit = emitter(job["result_fd"])
    uid, work = os.getuid(), os.getcwd()  # the uid before a user namespace maps it
    layers = isolate(job, work)
    set_limits(job, uid, layers)
    if job["audit"]:
        disarm(job)
        sys.addaudithook(audit_hook(work, job["read_roots"], job["result_fd"], None if "tmpfs" in layers else job["files"]))
        layers.insert(0, "audit")
    emit("layers", text(layers))
    missing = [name for name in job["required"] if not any(layer.startswith(name) for layer in layers)]
    if missing:
        emit("load", '"isolation"', quote("missing: " + " ".join(missing)))
    else:
        run(job, emit)
    emit("end")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - whatever the code left there
            pass
    os._exit(0)  # no atexit handlers or finalizers of the code's


def run(job: dict, emit) -> None:  # noqa: ANN001
    """Load the source, then evaluate each call (calls mode) or run each test (asserts mode)."""
    # the code runs in this process and may rebind builtins: what this function relies on is held in locals
    exec_, eval_, compile_, str_, callable_ = exec, eval, compile, str, callable
    builtins = __builtins__ if isinstance(__builtins__, dict) else __builtins__.__dict__
    calls = [(source, {name: builtins[name] for name in protect if name in builtins}) for source, protect in job["calls"]]
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec_(compile_(job["source"], "<solution>", "exec"), namespace)
    except SyntaxError as e:
        return emit("load", '"syntax"', quote(f"SyntaxError: {e.msg} (line {e.lineno})"))
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: the code's, not ours
        return emit("load", quote(failure(e)), quote(describe(e)))
    entry = job["entry_point"]
    if entry and not callable_(namespace.get(entry)):
        return emit("load", '"error"', quote(f"defines no function {entry}()"))
    emit("load", '"ok"', '""')
    for i, (source, protected) in enumerate(calls):
        try:
            scope = {**namespace, **protected} if protected else namespace  # the builtins it names are the real ones
            value = encode(eval_(compile_(source, f"<call {i}>", "eval"), scope))
            emit("call", str_(i), '"value"', value)
        except Unencodable as e:
            emit("call", str_(i), '"unencodable"', quote(e.args[0]))
        except BaseException as e:  # noqa: BLE001
            emit("call", str_(i), '"raised"', quote(failure(e)), quote(describe(e)))
    for i, test in enumerate(job["tests"]):
        try:
            exec_(compile_(test, f"<test {i}>", "exec"), namespace)
            emit("test", str_(i), '"pass"', '""')
        except AssertionError as e:
            emit("test", str_(i), '"fail"', quote(describe(e)))
        except BaseException as e:  # noqa: BLE001
            emit("test", str_(i), quote(failure(e)), quote(describe(e)))


def emitter(fd: int):  # noqa: ANN201
    """emit(*json_texts): write one record; a report that cannot be written ends the process (scored 0)."""
    write, exit_ = os.write, os._exit

    def emit(*parts: str) -> None:
        data = ("[" + ",".join(('"' + parts[0] + '"',) + parts[1:]) + "]\n").encode()
        try:
            while data:
                data = data[write(fd, data):]
        except BaseException:  # noqa: BLE001
            exit_(3)

    return emit


def quote(s: str) -> str:
    from _json import encode_basestring_ascii

    return encode_basestring_ascii(s if type(s) is str else "?")


def text(names: list) -> str:
    return "[" + ",".join(quote(n) for n in names) + "]"


def failure(e: BaseException) -> str:
    """Python ignores SIGXFSZ: past RLIMIT_FSIZE (the output limit), a write raises OSError EFBIG."""
    if type(e) is MemoryError:
        return "memory"
    return "output" if isinstance(e, OSError) and e.errno == 27 else "error"


def describe(e: BaseException) -> str:
    try:
        described = f"{type(e).__name__}: {e}"
        return described[:300] if type(described) is str else type(e).__name__
    except BaseException:  # noqa: BLE001 - a __str__ of the code's may raise
        return "an exception that cannot be described"


class Unencodable(Exception):
    pass


ITERATORS = frozenset(type(x) for x in (
    (i for i in ()), map(None, ()), filter(None, ()), zip(), enumerate(()), reversed(()), reversed([]),
    iter([]), iter(()), iter(range(0)), iter(""), iter({}), iter({}.values()), iter({}.items()), iter(set())))
FLOATS = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}


def encode(value: object, limit: int = 1 << 16) -> str:
    """The value as tagged JSON text (see the module docstring), at most `limit` characters."""
    from _json import encode_basestring_ascii as q

    out: list[str] = []
    size = 0

    def number(x: float) -> str:
        s = float.__repr__(x)
        return FLOATS.get(s, s)

    def walk(v: object, depth: int) -> None:
        nonlocal size
        if depth > MAX_DEPTH:
            raise Unencodable(f"nested deeper than {MAX_DEPTH}")
        t = type(v)
        if v is None:
            out.append('["none",null]')
        elif t is bool:
            out.append('["bool",true]' if v else '["bool",false]')
        elif t is int:
            try:
                out.append('["int",' + int.__repr__(v) + "]")
            except ValueError:  # more digits than int's string conversion allows
                raise Unencodable("an int too large") from None
        elif t is float:
            out.append('["float",' + number(v) + "]")
        elif t is complex:
            out.append('["complex",[' + number(v.real) + "," + number(v.imag) + "]]")
        elif t is str:
            out.append('["str",' + q(v) + "]")
        elif t is bytes:
            out.append('["bytes","' + v.hex() + '"]')
        elif t is range:
            out.append(f'["range",[{int.__repr__(v.start)},{int.__repr__(v.stop)},{int.__repr__(v.step)}]]')
        elif t is dict:
            out.append('["dict",[')
            for n, (key, item) in enumerate(dict.items(v)):
                out.append("[" if n == 0 else ",[")
                walk(key, depth + 1)
                out.append(",")
                walk(item, depth + 1)
                out.append("]")
            out.append("]]")
        elif t in (list, tuple, set, frozenset) or t in ITERATORS:
            out.append('["' + ("iter" if t in ITERATORS else t.__name__) + '",[')
            for n, item in enumerate(v):
                if n == MAX_ITEMS:
                    raise Unencodable(f"more than {MAX_ITEMS} items")
                if n:
                    out.append(",")
                walk(item, depth + 1)
            out.append("]]")
        else:
            raise Unencodable(f"a {t.__name__ if type(t.__name__) is str else 'value'} is not plain data")
        size += len(out[-1])
        if size > limit:
            raise Unencodable(f"more than {limit} characters")

    walk(value, 0)
    return "".join(out)


def isolate(job: dict, work: str) -> list[str]:
    """The kernel layers that applied: netns, tmpfs, nocaps, landlock<ABI>, seccomp (see rlhub.sandbox)."""
    try:
        import ctypes
    except ImportError:
        return []
    skip = job["skip"]  # tests only: layers to leave out, as if the kernel lacked them
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    layers = []
    uid, gid = os.getuid(), os.getgid()
    wanted = (0 if "netns" in skip else CLONE_NEWNET) | (0 if "tmpfs" in skip else CLONE_NEWNS)
    done = 0
    for flags in (CLONE_NEWUSER | wanted, wanted, CLONE_NEWUSER | (wanted & CLONE_NEWNET), wanted & CLONE_NEWNET):
        if flags and libc.unshare(flags) == 0:  # a new user namespace where allowed, else as root without one
            done = flags
            break
    mapped = not done & CLONE_NEWUSER or map_ids(uid, gid)  # files on a tmpfs of a user namespace need mapped ids
    if done & CLONE_NEWNET:
        layers.append("netns")
    if done & CLONE_NEWNS and mapped and mount_tmpfs(libc, work, job["disk_bytes"], job["files"]):
        layers.append("tmpfs")
    if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS, which Landlock and seccomp need unprivileged
        if "nocaps" not in skip and drop_capabilities(ctypes, libc):
            layers.append("nocaps")
        abi = 0 if "landlock" in skip else landlock(ctypes, libc, work, job["read_roots"])
        layers += [f"landlock{abi}"] if abi else []
        if "seccomp" not in skip and seccomp(ctypes, libc):
            layers.append("seccomp")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # the audit hook refuses importing it again
    return layers


def map_ids(uid: int, gid: int) -> bool:
    """Map the uid and gid to themselves in the new user namespace (the one mapping an unprivileged
    process may write)."""
    try:
        for name, line in (("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1"), ("uid_map", f"{uid} {uid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)
        return True
    except OSError:
        return False


def mount_tmpfs(libc, work: str, size: int, files: int) -> bool:  # noqa: ANN001
    """A tmpfs of `size` bytes and `files` inodes on the working directory, private to this process's mount
    namespace, without exec, devices or setuid; it vanishes with the process, whatever was written."""
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    options = f"size={size},nr_inodes={files + 1},mode=0700".encode()  # the root directory takes an inode
    if libc.mount(b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options) != 0:
        return False
    os.chdir(work)  # into the tmpfs: the old directory lies beneath it
    return True


def drop_capabilities(ctypes, libc) -> bool:  # noqa: ANN001
    """No capabilities left, in any namespace (root without a user namespace included)."""
    number = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)
    if number is None:
        return False
    header = (0x20080522).to_bytes(4, sys.byteorder) + bytes(4)  # _LINUX_CAPABILITY_VERSION_3, this process
    return libc.syscall(ctypes.c_long(number), header, bytes(24)) == 0  # effective, permitted, inheritable: none


def landlock(ctypes, libc, work: str, read_roots: tuple) -> int:
    """The Landlock ABI version applied, or 0. Writes, and making directories and regular files, only beneath
    `work`; reads only there and beneath `read_roots` (the standard library without site-packages, the
    system's libraries, a few files); no executing, device, FIFO, socket or symlink nodes; no TCP (ABI >= 4);
    no signals to, or abstract unix sockets of, processes outside (ABI >= 6)."""
    syscall = libc.syscall
    create, add_rule, restrict = 444, 445, 446  # the same numbers on every architecture
    abi = syscall(ctypes.c_long(create), None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # 1: ask for the ABI version
    if abi < 1:
        return 0
    execute, write_file, read_file, read_dir = 1, 2, 4, 8
    remove, make_dir, make_reg = 16 | 32, 128, 256
    refer, truncate = (1 << 13 if abi >= 2 else 0), (1 << 14 if abi >= 3 else 0)
    handled = (1 << 13) - 1 | refer | truncate | (1 << 15 if abi >= 5 else 0)  # every right this ABI knows
    u64 = lambda n: n.to_bytes(8, sys.byteorder)  # noqa: E731
    attr = u64(handled) + u64(3 if abi >= 4 else 0) + u64(3 if abi >= 6 else 0)  # fs, net (TCP), scoped
    ruleset = syscall(ctypes.c_long(create), attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    rules = [(work, read_file | read_dir | write_file | remove | make_dir | make_reg | refer | truncate),
             ("/dev/null", read_file | write_file | truncate)]
    rules += [(path, read_file | read_dir) for path in read_roots]
    for path, allowed in rules:
        try:
            parent = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            allowed &= read_file | write_file | truncate | execute  # the rights a file may carry
        rule = u64(allowed) + parent.to_bytes(4, sys.byteorder, signed=True)  # a packed landlock_path_beneath_attr
        syscall(ctypes.c_long(add_rule), ctypes.c_long(ruleset), ctypes.c_long(1), rule, ctypes.c_uint32(0))
        os.close(parent)  # a rule the kernel refused leaves its path unreadable, no more
    ok = syscall(ctypes.c_long(restrict), ctypes.c_long(ruleset), ctypes.c_uint32(0)) == 0
    os.close(ruleset)
    return abi if ok else 0


def seccomp(ctypes, libc) -> bool:
    """A seccomp filter failing SECCOMP_DENIED's syscalls; syscalls of another architecture or of the x32
    ABI fail too."""
    arch, denied = SECCOMP_DENIED.get(os.uname().machine, (0, ()))
    if not arch:
        return False
    load, jump_eq, jump_ge, ret = 0x20, 0x15, 0x35, 0x06  # classic BPF: ld [k]; jeq #k; jge #k; ret #k
    eperm, enosys, allow = 0x50000 | 1, 0x50000 | 38, 0x7FFF0000  # SECCOMP_RET_ERRNO | errno, SECCOMP_RET_ALLOW
    program = [(load, 0, 0, 4), (jump_eq, 1, 0, arch), (ret, 0, 0, eperm), (load, 0, 0, 0),  # seccomp_data.arch, .nr
               (jump_eq, 0, 1, 435), (ret, 0, 0, enosys), (jump_ge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]
    for number in denied:
        program += [(jump_eq, 0, 1, number), (ret, 0, 0, eperm)]
    program.append((ret, 0, 0, allow))
    order = sys.byteorder
    code = b"".join(c.to_bytes(2, order) + bytes((t, f)) + k.to_bytes(4, order) for c, t, f, k in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = len(program).to_bytes(8, order) + ctypes.addressof(buffer).to_bytes(8, order)  # struct sock_fprog
    return libc.prctl(22, 2, fprog, 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def set_limits(job: dict, uid: int, layers: list) -> None:
    """Soft and hard rlimits (the CPU's hard limit a second later: SIGXCPU first, then SIGKILL)."""
    import resource

    cpu = job["cpu_s"]
    for name, value in (("RLIMIT_CPU", cpu), ("RLIMIT_AS", job["memory"]), ("RLIMIT_FSIZE", job["fsize"]),
                        ("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", 64)):
        limit(resource, getattr(resource, name), value, cpu + 1 if name == "RLIMIT_CPU" else value)
    layers.insert(0, "rlimits")
    if uid != 0 and limit(resource, resource.RLIMIT_NPROC, 0, 0):
        layers.append("nproc")  # the kernel exempts root


def limit(resource, which: int, soft: int, hard: int) -> bool:  # noqa: ANN001
    """Lower an rlimit (never above the current hard limit); False when the kernel refused."""
    old_hard = resource.getrlimit(which)[1]
    if old_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, old_hard), min(hard, old_hard)
    try:
        resource.setrlimit(which, (soft, hard))
        return True
    except (ValueError, OSError):
        return False


def disarm(job: dict) -> None:
    """What Python does without an audit event, taken away before the code runs: mkfifo and mknod, new threads,
    signal handlers (which receive the current frame); and `_imp.create_builtin`, which would make fresh copies
    of those modules. So that imports still work, every builtin module is imported first, where the code or
    its tests mention "import" at all (about a millisecond: code that imports nothing skips it)."""
    import _imp
    import posix

    if any("import" in text for text in (job["source"], *job["tests"], *(call for call, _ in job["calls"]))):
        for name in sys.builtin_module_names:
            __import__(name)
    del _imp.create_builtin
    audit = sys.audit

    def stub(name: str):  # noqa: ANN202
        def refused(*args: object, **kwargs: object) -> None:
            audit("sandbox." + name)  # the hook records the refusal and raises
            raise PermissionError(f"sandbox: {name} is not allowed")
        return refused

    import _signal
    import _thread

    for module, names in ((posix, ("mkfifo", "mknod")), (os, ("mkfifo", "mknod")), (_thread, ("start_new_thread", "start_new")),
                          (_signal, ("signal", "set_wakeup_fd", "siginterrupt"))):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, stub(f"{module.__name__}.{name}"))


def audit_hook(work: str, read_roots: tuple, result_fd: int, max_files: int | None):  # noqa: ANN201
    """The hook refusing what the code may not do (see rlhub.sandbox). It reads no global name: everything it
    calls is bound here, so that the code, which can rebind builtins and this module's names, cannot change it.
    Paths must be exact str or bytes (a path object could name one path to the check and another to the call);
    symlinks are followed as the kernel would. `max_files`: where no tmpfs bounds the directory, the files and
    directories the code may create (each open for creating and each mkdir counts)."""
    import posix
    from _json import encode_basestring_ascii as q

    getcwd, lstat, readlink, fstat = posix.getcwd, posix.lstat, posix.readlink, posix.fstat
    write, exit_ = posix.write, posix._exit
    type_, str_, bytes_, int_ = type, str, bytes, int
    refuse_error, frame_error, attribute_error = PermissionError, ValueError, AttributeError
    pipe = fstat(result_fd)
    pipe_id = (pipe.st_dev, pipe.st_ino)
    writing_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    create_flag = os.O_CREAT
    work_below = work + "/"
    roots = frozenset(read_roots) | {work}
    roots_below = tuple(r.rstrip("/") + "/" for r in read_roots) + (work_below,)
    denied = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
              "os.kill", "os.killpg", "os.link", "os.symlink", "pty.", "ctypes.", "resource.setrlimit", "resource.prlimit",
              "urllib.Request", "webbrowser.", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
              "gc.get_referents", "sys._current_frames", "sys._current_exceptions", "code.__new__", "sys.addaudithook",
              "signal.pthread_kill", "sandbox.")
    frames = ("tb_frame", "gi_frame", "cr_frame", "ag_frame")
    refused_modules = REFUSED_MODULES
    # event, positions of the paths it changes, positions of its dir_fd arguments
    path_events = (("os.remove", (0,), (1,)), ("os.rmdir", (0,), (1,)), ("os.rename", (0, 1), (2, 3)),
                   ("os.mkdir", (0,), (2,)), ("os.chmod", (0,), (2,)), ("os.chown", (0,), (3,)), ("os.utime", (0,), (3,)),
                   ("os.truncate", (0,), ()), ("os.setxattr", (0,), ()), ("os.removexattr", (0,), ()),
                   ("shutil.rmtree", (0,), (1,)))
    path_event_names = frozenset(e for e, _, _ in path_events)
    created = 0

    def resolve(path):  # noqa: ANN001, ANN202
        """The absolute path, symlinks followed as the kernel would; None for a path that is not a str or bytes."""
        if type_(path) is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        elif type_(path) is not str_:
            return None
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        todo = path.split("/")
        todo.reverse()
        done, hops = "", 0
        while todo:
            part = todo.pop()
            if part == "..":
                done = done[:done.rfind("/")] if done else ""
            elif part and part != ".":
                candidate = done + "/" + part
                try:
                    link = lstat(candidate).st_mode & 0o170000 == 0o120000
                except OSError:  # missing (to be created) or not searchable: the kernel decides
                    link = False
                if link:
                    hops += 1
                    if hops > 40:
                        return None
                    target = readlink(candidate).split("/")
                    target.reverse()
                    todo += target
                    if target[-1] == "":  # absolute
                        done = ""
                else:
                    done = candidate
        return done or "/"

    def readable(full):  # noqa: ANN001, ANN202
        return full is not None and (full in roots or full.startswith(roots_below))

    def inside(full):  # noqa: ANN001, ANN202
        return full is not None and (full == work or full.startswith(work_below))

    def refuse(event, args):  # noqa: ANN001, ANN202
        try:
            now = fstat(result_fd)
            if (now.st_dev, now.st_ino) != pipe_id:  # the code put something else on the report's fd
                exit_(3)
        except OSError:
            exit_(3)
        first = args[0] if args and type_(args[0]) in (str_, int_) else ""
        line = ('["refused",' + q(event) + "," + q(str_(first)[:200]) + "]\n").encode()
        while line:
            line = line[write(result_fd, line):]
        raise refuse_error(f"sandbox: {event} is not allowed")

    def hook(event, args):  # noqa: ANN001, ANN202
        nonlocal created
        if event == "open":
            path, mode, flags = args
            if type_(path) is int_:  # a descriptor the code already holds
                return
            writing = (type_(flags) is int_ and flags & writing_flags) or (type_(mode) is str_ and mode.strip("rbt") != "")
            if mode is None and type_(path) in (str_, bytes_) and not path.startswith(("/", b"/")[type_(path) is bytes_]):
                refuse(event, args)  # os.open with a relative path may take a dir_fd that the event does not show
            full = resolve(path)
            if not writing:
                if readable(full):
                    return
            elif full == "/dev/null":
                return
            elif inside(full):
                if max_files is not None and type_(flags) is int_ and flags & create_flag:
                    created += 1
                    if created > max_files:
                        refuse("sandbox.files", (path,))
                return
            refuse(event, args)
        elif event in ("os.listdir", "os.scandir"):
            path = args[0]
            if path is None or type_(path) is int_ or readable(resolve(path)):
                return
            refuse(event, args)
        elif event in path_event_names:
            for spec in path_events:
                if spec[0] == event:
                    break
            _, changed, dir_fds = spec
            for i in dir_fds:
                if args[i] is not None and args[i] != -1:
                    refuse(event, args)
            for i in changed:
                descriptor = type_(args[i]) is int_ and event in ("os.truncate", "os.chmod", "os.chown", "os.utime")
                if not descriptor and not inside(resolve(args[i])):
                    refuse(event, args)
            if event == "os.mkdir" and max_files is not None:
                created += 1
                if created > max_files:
                    refuse("sandbox.files", args)
        elif event == "sys._getframe":
            raise frame_error("sandbox: frames are not available")  # what typing, enum and namedtuple expect then
        elif event == "object.__getattr__":
            if args[1] in frames:
                raise attribute_error("sandbox: frames are not available")
        elif event == "object.__setattr__":
            if args[1] == "__code__":
                refuse(event, args)
        elif event == "import":
            name, file = args[0], args[1]
            base = file[file.rfind("/") + 1:] if type_(file) is str_ else ""
            if type_(name) is not str_ or name.startswith(refused_modules) or base.startswith(refused_modules):
                refuse(event, args)
        elif event.startswith(denied):
            refuse(event, args)

    return hook


if __name__ == "__main__":
    main()
