"""Where the runs of a matrix execute: in this process (`local`) or as slurm jobs (`slurm`).

`local` runs the matrix here, one run after another (under torchrun every rank walks the same
list). `slurm` submits one job per run through submitit; a job re-resolves the experiment from the
preset and overrides it was given, checks it hashes to what was submitted, and calls
`runner.execute_run` under the run's lock — so a job that is pre-empted and requeued, or a
command re-run by hand, resumes from the run's checkpoint and never duplicates a finished run.

Run locks: two runners sharing a results folder (two shells, two slurm jobs, a requeued job and
its ghost) never execute the same run at once. A run's lock is `<result stem>.lock`, created with
O_CREAT|O_EXCL and holding the owner's pid and host. A lock whose pid is dead on this host is
stale and taken over, and so is one that names no owner at all (empty, as a full disk leaves it, or
unreadable) once it has gone unchanged longer than any owner takes to write itself into it; a lock of
a live process, or of another host (whose pids we cannot check), makes this runner skip the run with a
log line.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.config import Experiment, load_experiment
from benchmarks.errors import UserError

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


def _why_stale(path: Path, owner: dict[str, Any]) -> str | None:
    """Why the lock at `path`, holding `owner`, belongs to no live runner; None while one may hold it."""
    if _names_owner(owner):
        pid, host = owner["pid"], owner["host"]
        if host != socket.gethostname() or _pid_alive(pid):
            return None
        return f"of dead process {pid} on {host}"
    try:
        unchanged_s = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if unchanged_s < UNNAMED_LOCK_STALE_AFTER_S:
        return None  # its runner may be writing itself into it right now
    return f"naming no owner (empty or unreadable, unchanged for {unchanged_s:.0f} s)"


@dataclass
class RunLock:
    """An exclusive claim on one run; `acquire()` is False when another live runner holds it."""

    result_path: Path
    owner: dict[str, Any] = field(default_factory=dict)
    held: bool = False

    @property
    def path(self) -> Path:
        return lock_path(self.result_path)

    def acquire(self) -> bool:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
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
            return True
        self.owner = _read_owner(self.path) or {}
        return False

    def _take_over_if_stale(self) -> bool:
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
        if self.held:
            current = _read_owner(self.path)
            if current and current.get("pid") == self.owner.get("pid") and current.get("host") == self.owner.get("host"):
                self.path.unlink(missing_ok=True)
            self.held = False

    def describe_owner(self) -> str:
        if not self.owner:
            return "another runner"
        return f"pid {self.owner.get('pid')} on {self.owner.get('host')}"

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- slurm through submitit -------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmOptions:
    partition: str = ""
    time_minutes: int = 24 * 60
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 0
    account: str = ""
    constraint: str = ""
    array_parallelism: int = 32
    folder: str = ""
    """Where submitit keeps job scripts and logs; "" = <results dir>/.submitit."""
    cluster: str = ""
    """submitit cluster: "" (auto: slurm when available), "slurm", "local" or "debug"."""


@dataclass(frozen=True)
class JobRequest:
    """Everything a job needs to re-resolve the same experiment: plain values, pickled by submitit."""

    preset: str
    overrides: tuple[str, ...]
    weights: tuple[str, ...]
    config_hash: str
    spec: Any  # runner.RunSpec
    results_dir: str
    cwd: str
    """Relative paths in the overrides (data root) resolve as they did where the matrix was submitted."""


def resolve_for_job(request: JobRequest) -> Experiment:
    exp = load_experiment(request.preset, list(request.overrides))
    if request.weights:
        exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, weights=tuple(exp.model.weights) + request.weights))
    if exp.config_hash() != request.config_hash:
        raise UserError(
            f"preset {request.preset!r} changed since the job was submitted (config {exp.config_hash()} != "
            f"{request.config_hash}); submit the matrix again"
        )
    return exp


def _export_submitit_rank() -> None:
    """Under a multi-task slurm job, expose the task's rank as torchrun would (for init_distributed)."""
    try:
        import submitit

        job = submitit.JobEnvironment()
    except (ImportError, RuntimeError):
        return
    if job.num_tasks <= 1:
        return
    os.environ.update(
        RANK=str(job.global_rank),
        WORLD_SIZE=str(job.num_tasks),
        LOCAL_RANK=str(job.local_rank),
        MASTER_ADDR=job.hostnames[0],
        MASTER_PORT=os.environ.get("MASTER_PORT", str(20000 + int(job.job_id.split("_")[0]) % 20000)),
    )


def run_job(request: JobRequest) -> dict[str, Any] | None:
    """The body of one slurm job: the run of `request.spec`, resumed if it has a checkpoint."""
    from benchmarks import distributed
    from benchmarks.runner import run_one

    _export_submitit_rank()
    os.chdir(request.cwd)
    exp = resolve_for_job(request)
    distributed.init_distributed(exp.train.device)
    try:
        return run_one(request.spec, exp, Path(request.results_dir), progress=False)
    finally:
        distributed.shutdown()


def _executor(options: SlurmOptions, folder: Path):
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs submitit: pip install 'dgss-bench[slurm]' (or pip install submitit)") from None
    cluster = options.cluster or None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = {
        "timeout_min": options.time_minutes,
        "nodes": options.nodes,
        "tasks_per_node": max(1, options.gpus_per_node),
        "cpus_per_task": options.cpus_per_task,
    }
    if executor.cluster == "slurm":
        params["slurm_array_parallelism"] = options.array_parallelism
        params["gpus_per_node"] = options.gpus_per_node
        if options.partition:
            params["slurm_partition"] = options.partition
        if options.account:
            params["slurm_account"] = options.account
        if options.constraint:
            params["slurm_constraint"] = options.constraint
        if options.mem_gb:
            params["mem_gb"] = options.mem_gb
    else:
        params["tasks_per_node"] = 1  # the local executors run one process per job
    executor.update_parameters(name="dgss-bench", **params)
    return executor


def submit_matrix(
    exp: Experiment,
    preset: str,
    overrides: list[str],
    weights: list[str],
    methods: str | None,
    options: SlurmOptions,
    wait: bool = False,
) -> list[Any]:
    """Submit the matrix's unfinished runs as jobs; returns the submitit jobs (and waits if asked)."""
    from benchmarks.results import read_result
    from benchmarks.runner import experiment_for, plan_runs

    results_dir = exp.resolve_path(exp.run.results_dir)
    specs = plan_runs(exp, methods)
    pending = []
    for spec in specs:
        path = spec.path(experiment_for(exp, spec), results_dir)
        existing = read_result(path) if path.exists() else None
        if existing and existing.get("status") == "finished":
            log.info("%s: finished earlier, not submitted", existing["run_id"])
            continue
        pending.append(spec)
    if not pending:
        log.info("every run of the matrix is finished; nothing to submit")
        return []
    folder = Path(options.folder).expanduser() if options.folder else results_dir / ".submitit"
    executor = _executor(options, folder)
    requests = [
        JobRequest(preset, tuple(overrides), tuple(weights), exp.config_hash(), spec, str(results_dir), os.getcwd())
        for spec in pending
    ]
    with executor.batch():
        jobs = [executor.submit(run_job, request) for request in requests]
    for job, request in zip(jobs, requests, strict=True):
        log.info("submitted %s: %s %s %s seed %d", job.job_id, request.spec.setting, request.spec.backbone,
                 request.spec.method, request.spec.seed)
    if wait:
        for job in jobs:
            job.result()
    return jobs


def collect_results(exp: Experiment, methods: str | None) -> tuple[list[dict[str, Any]], list[Any]]:
    """The matrix's result files as they stand: (results found, specs without one)."""
    from benchmarks.results import read_result
    from benchmarks.runner import experiment_for, plan_runs

    results_dir = exp.resolve_path(exp.run.results_dir)
    found, missing = [], []
    for spec in plan_runs(exp, methods):
        path = spec.path(experiment_for(exp, spec), results_dir)
        result = read_result(path) if path.exists() else None
        (found.append(result) if result else missing.append(spec))
    return found, missing
