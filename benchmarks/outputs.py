"""Where a command will write, checked before it starts any work.

A results folder that is a file, a table path that is a folder, a folder nobody may write into: each
is one `UserError` line naming the option and the path before training, rendering or generating
starts, instead of a traceback at the first write (after the work, or with half of the output
written). Nothing is left here: a refused command leaves no empty folder behind.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.errors import UserError


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (a dangling link counts: it is in the way)."""
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def _folder_problem(folder: Path) -> tuple[Path, str] | None:
    """(the path in the way, what is wrong with it) when files cannot be written into `folder`, created
    if missing; None when they can."""
    existing = _nearest_existing(folder.absolute())
    if existing.is_symlink() and not existing.exists():
        return existing, f"is a symbolic link to {os.readlink(existing)}, which does not exist"
    if not existing.is_dir():
        return existing, "is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return existing, "is not writable"
    try:  # access() answers from the mode bits, which root passes on /proc, a read-only bind or root-squashed NFS
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return existing, f"is not writable ({err.strerror or err})"
    return None


def _said_of(given: Path, problem: tuple[Path, str]) -> str:
    in_the_way, what = problem
    return what if in_the_way == given.absolute() else f"{in_the_way} {what}"


def require_writable_folder(folder: Path | str, option: str) -> None:
    """`folder` is, or can be created as, a folder this process can write into."""
    folder = Path(folder).expanduser()
    problem = _folder_problem(folder)
    if problem:
        raise UserError(f"{option} {folder}: {_said_of(folder, problem)}; pass a folder you can write to "
                        "(it is created if missing)")


def require_writable_file(path: Path | str, option: str, example_name: str) -> None:
    """`path` names a file, new or to be replaced, in a folder this process can write into."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; pass the path of a file, e.g. {path / example_name}")
    problem = _folder_problem(path.parent)
    if problem:
        in_the_way, what = problem
        raise UserError(f"{option} {path}: {in_the_way} {what}; pass a file in a folder you can write to")


def given_path(text: str) -> Path:
    """The argparse type of a path option: an empty value (an unset shell variable) is refused rather than read
    as the current folder, where a report or profile would be written and a table's search would start."""
    if not text.strip():
        raise argparse.ArgumentTypeError("given with no value (an unset shell variable?); give a path or leave the "
                                         "option out")
    return Path(text).expanduser()
