"""Removing a call's directory: iteratively, through directory descriptors, never raising."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhub.sandbox")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove(root: Path) -> None:
    """Remove the call's directory, never raising: iteratively, through directory descriptors (a deep tree's
    paths pass PATH_MAX), one directory open at a time (going back up through ".."), restoring permissions the
    code took away. What still cannot be removed is logged and left."""
    try:
        top = os.open(root.parent, _DIR_FLAGS)
    except OSError as e:
        log.warning("sandbox: could not remove %s: %s", root, e)
        return
    try:
        _remove_tree(top, root.name)
    except OSError as e:
        log.warning("sandbox: could not remove all of %s: %s", root, e)
    finally:
        os.close(top)


def _remove_tree(top: int, name: str) -> None:
    fd = _open_dir(top, name)
    stack = [(name, _clear(fd))]  # per directory from `name` down: its name, its subdirectories left to remove
    while stack:
        current, pending = stack[-1]
        if pending:
            sub = pending.pop()
            try:
                child = _open_dir(fd, sub)
            except OSError as e:
                log.warning("sandbox: left %s in %s: %s", sub[:80], name, e)
                continue
            os.close(fd)
            fd = child
            stack.append((sub, _clear(fd)))
            continue
        stack.pop()
        try:
            up = os.open("..", _DIR_FLAGS, dir_fd=fd) if stack else top
        finally:
            os.close(fd)
        try:
            _retry(up, os.rmdir, current, dir_fd=up)
        except OSError as e:
            log.warning("sandbox: left %s in %s: %s", current[:80], name, e)
        fd = up


def _open_dir(parent: int, name: str) -> int:
    return _retry(parent, os.open, name, _DIR_FLAGS, dir_fd=parent, entry=name)


def _clear(fd: int) -> list[str]:
    """Unlink everything in the directory but subdirectories, whose names are returned."""
    subdirectories = []
    try:
        entries = _retry(fd, lambda: list(os.scandir(fd)))  # noqa: B023 - called at once
    except OSError as e:
        log.warning("sandbox: could not list a directory to remove: %s", e)
        return []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subdirectories.append(entry.name)
        else:
            try:
                _retry(fd, os.unlink, entry.name, dir_fd=fd)
            except OSError as e:
                log.warning("sandbox: left %s: %s", entry.name[:80], e)
    return subdirectories


def _retry(fd: int, action: Any, *args: Any, entry: str | None = None, **kwargs: Any) -> Any:
    """action(*args, **kwargs), again after giving the directory `fd` (and its `entry`) back their owner's permissions."""
    try:
        return action(*args, **kwargs)
    except PermissionError:
        os.chmod(fd, 0o700)
        if entry is not None:
            os.chmod(entry, 0o700, dir_fd=fd)
        return action(*args, **kwargs)
