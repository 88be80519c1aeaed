"""The file system as runs meet it: a full disk said in one line, and walks into linked folders.

A write that fails for lack of space surfaces as `OSError(ENOSPC)` from Python's own I/O but as a
`RuntimeError` ("enforce fail at inline_container.cc") from `torch.save`'s zip writer; both become one
`UserError` naming the mount point, so the user frees space and re-runs (which resumes).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from benchmarks.errors import UserError


def walk_following_links(folder: Path) -> Iterator[Path]:
    """Every entry under `folder`, into linked folders too (`Path.rglob` skips them before Python 3.13), each
    real folder once so that a link to a folder above cannot loop."""
    seen: set[str] = set()
    for current, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        for name in (*files, *folders):
            yield Path(current) / name

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(mount_point(path)).free
    except OSError:
        return None


def is_out_of_space(err: BaseException, path: Path, needed_bytes: int) -> bool:
    """Whether `err`, raised writing about `needed_bytes` to `path`, means the disk is full."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return True
    if isinstance(err, RuntimeError):  # torch.save loses the errno; what is left on the disk tells
        free = free_bytes(path)
        return free is not None and free < needed_bytes
    return False


def out_of_space_error(path: Path, needed_bytes: int, what: str, survives: str) -> UserError:
    free = free_bytes(path)
    shown_free = f", {free / 2**20:,.0f} MB free" if free is not None else ""
    return UserError(
        f"no space left on {mount_point(path)} writing {f'{what} ' if what else ''}{path} (needs ~{max(needed_bytes / 2**20, 0.1):,.1f} MB"
        f"{shown_free}); free some space and run the same command again: {survives}"
    )
