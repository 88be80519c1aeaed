"""Run locks: two runners sharing a results folder (two shells, two slurm jobs, a requeued job and
its ghost) never execute the same run at once.

A run's lock is `<result stem>.lock`, next to the result it guards, created with O_CREAT|O_EXCL and
holding the owner's pid, host and pid namespace; while it holds the lock, the owner touches it every
`HEARTBEAT_S`. A lock whose pid is dead on this host, in this pid namespace, is stale and taken over (as is
one whose pid lives but which has gone untouched, its pid reused, and one of an earlier attempt of this slurm
job); so is
a lock of another host or another pid namespace (a container sharing the host's name, whose pids we cannot
check) once its owner has not touched it for `FOREIGN_STALE_AFTER_S` (it died without releasing it: a node
lost, a job killed), and one that names no owner at all (empty, as a full disk leaves it, or unreadable) once
it has gone unchanged longer than any owner takes to write itself into it. A lock of a live process, or a
foreign lock still being touched (or written before locks were touched), makes this runner skip the run with
a log line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: `exclusive` has no lock to take there
    fcntl = None

log = logging.getLogger(__name__)


# -- run locks --------------------------------------------------------------------------------------
def lock_path(result_path: Path) -> Path:
    return result_path.with_name(result_path.stem + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# A runner writes its pid and host into the lock right after creating it. A lock still naming no owner
# this long after its last change was left by a runner that died, or hit a full disk, while writing it.
UNNAMED_LOCK_STALE_AFTER_S = 60.0
HEARTBEAT_S = 60.0
"""How often a runner touches the lock it holds."""
FOREIGN_STALE_AFTER_S = 600.0
"""A lock of another host or pid namespace untouched this long has lost its owner: ten missed touches, wide
enough for clocks of machines sharing a folder to differ by minutes."""


def _pid_namespace() -> str | None:
    """This process's pid namespace ("pid:[4026531836]"): pids compare only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _slurm_attempt() -> dict[str, Any]:
    """This process's slurm job (with its array task) and restart count, when slurm started it: slurm never runs
    two attempts of one job at once, so a lock of an earlier attempt of this job is stale whatever its age."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"slurm_job": f"{job}_{task}" if task else job, "slurm_restart": int(restarts) if restarts.isdigit() else 0}


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
        return {}  # being written right now, or garbage: stale once unchanged for a while (`_why_stale`)
    return owner if isinstance(owner, dict) else {}


def _names_owner(owner: dict[str, Any]) -> bool:
    pid, host = owner.get("pid"), owner.get("host")
    return isinstance(pid, int) and not isinstance(pid, bool) and isinstance(host, str) and bool(host)


# The run locks this process holds now: a lock naming this process's pid that is not among them was left by
# an earlier process that had the same pid (a runner restarted in the same pid namespace).
_HELD_HERE: set[str] = set()


def _why_stale(path: Path, owner: dict[str, Any]) -> str | None:
    """Why the lock at `path`, holding `owner`, belongs to no live runner; None while one may hold it."""
    if _names_owner(owner):
        attempt = _slurm_attempt()
        if attempt and owner.get("slurm_job") == attempt["slurm_job"] and \
                isinstance(owner.get("slurm_restart"), int) and owner["slurm_restart"] < attempt["slurm_restart"]:
            return f"of attempt {owner['slurm_restart']} of slurm job {attempt['slurm_job']}, requeued since"
        pid, host, namespace = owner["pid"], owner["host"], _pid_namespace()
        if host != socket.gethostname() or owner.get("pid_namespace", namespace) != namespace:  # absent: an older lock
            return _why_foreign_stale(path, owner)
        if pid == os.getpid():
            if os.path.abspath(path) in _HELD_HERE:
                return None
            return f"of an earlier process with this one's pid {pid} on {host}"
        if _pid_alive(pid):
            # Alive, but untouched as long as a foreign lock's limit: its runner died and the pid is another
            # process's now (after a reboot, whose first pid namespace has the same id every time).
            reused = _why_foreign_stale(path, owner)
            return f"{reused}, its pid now another process's" if reused else None
        return f"of dead process {pid} on {host}"
    try:
        unchanged_s = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if unchanged_s < UNNAMED_LOCK_STALE_AFTER_S:
        return None  # its runner may be writing itself into it right now
    return f"naming no owner (empty or unreadable, unchanged for {unchanged_s:.0f} s)"


def _why_foreign_stale(path: Path, owner: dict[str, Any]) -> str | None:
    """A lock whose pid this process cannot check: stale once its owner stopped touching it (a lock written
    before locks were touched says nothing by its age, and is left to its owner or the user)."""
    if not owner.get("heartbeat_s"):
        return None
    try:
        untouched_s = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if untouched_s < FOREIGN_STALE_AFTER_S:
        return None
    return f"of process {owner['pid']} on {owner['host']}, untouched for {untouched_s:.0f} s"


TAKEOVER_GUARD_NAME = ".run-lock-takeover"
"""Held (`exclusive`) while a runner looks at a run lock, judges it stale and removes it. Without it, a runner
that looked just before another took the lock over removed the new owner's lock, and a third runner created its
own: two holders. Never removed (a removed flock file no longer excludes anyone); where the file system has no
locks, the rename in `_take_over_if_stale` still orders two runners, not three."""


@contextlib.contextmanager
def exclusive(path: Path, required: bool = True) -> Iterator[None]:
    """An exclusive `flock` on `path` (a folder, or a file made if missing) for the block, released by the kernel
    if the process dies. Where there is none to take (Windows; a file system without locks), a `required` one
    is a one-line error naming the path, another is done without."""
    fd = None
    try:
        if fcntl is None:
            raise OSError(errno.ENOSYS, "no flock on this system")
        fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        if fd is not None:
            os.close(fd)
            fd = None
        if required:
            raise UserError(f"{path}: cannot lock it ({err.strerror or err}); run on a file system with locks, "
                            "one command at a time") from None
        log.debug("no lock on %s: %s", path, err)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # and with it the flock


class _Heartbeat(threading.Thread):
    """Touches a held lock every `every` seconds, telling other hosts and containers its owner still lives."""

    def __init__(self, path: Path, every: float):
        super().__init__(name=f"lock heartbeat {path.name}", daemon=True)
        self.path, self.every, self.stopped = path, every, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                os.utime(self.path)
            except OSError:  # released meanwhile, or the folder is gone: nothing left to keep alive
                return


@dataclass
class RunLock:
    """An exclusive claim on one run; `acquire()` is False when another live runner holds it."""

    result_path: Path
    owner: dict[str, Any] = field(default_factory=dict)
    held: bool = False
    _heartbeat: _Heartbeat | None = None

    @property
    def path(self) -> Path:
        return lock_path(self.result_path)

    def acquire(self) -> bool:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "pid_namespace": _pid_namespace(),
              "since": time.time(), "heartbeat_s": HEARTBEAT_S, **_slurm_attempt()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._take_over_if_stale():
                    continue
                return False
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(me, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as err:
                # An empty lock left behind would keep every later runner off this run.
                self.path.unlink(missing_ok=True)
                fix = "free space on that disk or " if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
                raise UserError(f"{self.path}: cannot write the run lock ({err.strerror or err}); "
                                f"{fix}pass another --results-dir") from None
            self.owner, self.held = me, True
            _HELD_HERE.add(os.path.abspath(self.path))
            self._heartbeat = _Heartbeat(self.path, HEARTBEAT_S)
            self._heartbeat.start()
            return True
        self.owner = _read_owner(self.path) or {}
        return False

    def _take_over_if_stale(self) -> bool:
        with exclusive(self.path.parent / TAKEOVER_GUARD_NAME, required=False):
            return self._take_over_if_stale_guarded()

    def _take_over_if_stale_guarded(self) -> bool:
        owner = _read_owner(self.path)
        if owner is None:
            return True  # released meanwhile: try again
        self.owner = owner
        reason = _why_stale(self.path, owner)
        if reason is None:
            return False
        # Rename first: of several runners that found the same stale lock exactly one moves it.
        grave = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return True
        if _why_stale(grave, _read_owner(grave) or {}) is None:
            # A live lock replaced the stale one between our read and our rename: give it back.
            try:
                os.link(grave, self.path)
            except OSError as err:
                if err.errno != errno.EEXIST:
                    raise
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        log.warning("took over the stale lock %s: %s", reason, self.path)
        return True

    def release(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stopped.set()
            self._heartbeat = None
        if self.held:
            current = _read_owner(self.path)
            if current and current.get("pid") == self.owner.get("pid") and current.get("host") == self.owner.get("host"):
                self.path.unlink(missing_ok=True)
            _HELD_HERE.discard(os.path.abspath(self.path))
            self.held = False

    def describe_owner(self) -> str:
        if not self.owner:
            return "another runner"
        return f"pid {self.owner.get('pid')} on {self.owner.get('host')}"

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
