"""The isolation layers: which are required, why one may be missing, and what the child may read."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Sequence

REQUIRED_LAYERS = ("netns", "tmpfs", "nocaps", "landlock", "seccomp")
log = logging.getLogger("rlhub.sandbox")

WHY_MISSING = {
    "netns": "no network namespace: user namespaces are disabled (kernel.unprivileged_userns_clone=0, or "
             "Ubuntu's kernel.apparmor_restrict_unprivileged_userns=1) and the process is not root",
    "tmpfs": "no private tmpfs on the working directory: no mount namespace (as for netns)",
    "nocaps": "capabilities could not be dropped",
    "landlock": "no Landlock: Linux >= 5.13 with landlock in the lsm= list is needed",
    "seccomp": "no seccomp filter: a kernel with CONFIG_SECCOMP_FILTER on x86_64 or aarch64 is needed",
}


def missing(layers: Sequence[str]) -> list[str]:
    return [name for name in REQUIRED_LAYERS if not any(layer.startswith(name) for layer in layers)]


@functools.lru_cache(maxsize=None)
def warn_missing(missing: Sequence[str]) -> None:
    log.warning("sandbox: isolation=best_effort and the kernel layers %s do not apply; an audit hook stands in, "
                "which native code can bypass", ", ".join(missing))


@functools.lru_cache(maxsize=1)
def readable() -> tuple[str, ...]:
    """What the child may read besides its directory and /dev/null: the standard library's entries but
    site-packages and dist-packages (where task data may be installed), the entries of the system's library
    directories but python* (the same), and a few files. Symlinked entries are left out: a symlink's target
    is readable where it lies beneath another root."""
    roots: set[str] = set()
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    for directory, leave_out in [(stdlib, ("site-packages", "dist-packages"))] + [
            (os.path.realpath(d), ("python",)) for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")]:
        with contextlib.suppress(OSError):
            roots |= {os.path.join(directory, n) for n in os.listdir(directory) if not n.startswith(leave_out)}
    roots |= {os.path.realpath(p) for p in ("/dev/urandom", "/dev/zero", "/etc/ld.so.cache", "/etc/localtime")}
    return tuple(sorted(r for r in roots if os.path.exists(r) and not os.path.islink(r)))
