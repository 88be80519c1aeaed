"""Where the runs of a matrix execute: in this process (`local`) or as slurm jobs (`slurm`).

`local` runs the matrix here, one run after another (under torchrun every rank walks the same
list). `slurm` submits one job per run through submitit; a job re-resolves the experiment from the
preset and overrides it was given, checks it hashes to what was submitted, and calls
`runner.execute_run` under the run's lock — so a job that is pre-empted and requeued, or a
command re-run by hand, resumes from the run's checkpoint and never duplicates a finished run.

Runs are claimed through `benchmarks.locking.RunLock`, next to the results they guard.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import plugins
from benchmarks.config import Experiment, load_experiment
from benchmarks.errors import UserError

log = logging.getLogger(__name__)


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
    method_files: tuple[str, ...] = ()
    """The submitting command's --method-file files (absolute), registered again in the job."""


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
        LOCAL_WORLD_SIZE=str(max(job.num_tasks // max(job.num_nodes, 1), 1)),  # the node's share of the cores
        MASTER_ADDR=job.hostnames[0],
        MASTER_PORT=os.environ.get("MASTER_PORT", str(rendezvous_port(job.job_id))),
    )


def rendezvous_port(job_id: str) -> int:
    """A port for the job's process group, from its whole slurm id: the tasks of one array ("1001_0", "1001_1")
    share the array's number, and two of them placed on one node must not bind the same port, so each task
    of an array (up to 20,000) gets its own, and arrays submitted one after the other (ids N, N+1) are 1,009
    ports apart, more tasks than slurm's default MaxArraySize (1,001) lets one array have."""
    array, _, task = job_id.partition("_")
    if array.isdigit() and (task.isdigit() or not task):
        return 20000 + (int(array) * 1009 + int(task or 0)) % 20000
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def run_job(request: JobRequest) -> dict[str, Any] | None:
    """The body of one slurm job: the run of `request.spec`, resumed if it has a checkpoint."""
    from benchmarks import distributed
    from benchmarks.method import use_method_files
    from benchmarks.runner import run_one

    _export_submitit_rank()
    os.chdir(request.cwd)
    use_method_files(list(request.method_files))
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
        raise UserError("--launcher slurm needs submitit: pip install -e '.[slurm]' in the checkout (or pip install submitit)") from None
    cluster = options.cluster or None
    if cluster is None and shutil.which("sbatch") is None:
        # submitit would fall back to running the jobs here: on a login node, the whole matrix would run there.
        raise UserError("--launcher slurm: no slurm on this machine (no sbatch on PATH); run from a slurm login "
                        "node, or pass --slurm-cluster local to run the jobs on this machine on purpose")
    if cluster in ("local", "debug") and options.nodes > 1:  # submitit's ValueError otherwise, as a traceback
        raise UserError(f"--slurm-nodes {options.nodes}: --slurm-cluster {cluster} runs each job on this one machine; "
                        "pass --slurm-nodes 1")
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
    from benchmarks.runner import (
        check_weights_given,
        experiment_for,
        finished_result_of_other_inputs,
        plan_runs,
        refuse_finished_result_of_other_inputs,
    )

    results_dir = exp.resolve_path(exp.run.results_dir)
    specs = plan_runs(exp, methods)
    check_weights_given(exp, specs)
    pending = []
    for spec in specs:
        path = spec.path(experiment_for(exp, spec), results_dir)
        existing = read_result(path) if path.exists() else None
        if existing and existing.get("status") == "finished":
            if changed := finished_result_of_other_inputs(existing, experiment_for(exp, spec), spec):
                refuse_finished_result_of_other_inputs(path, changed)  # before anything is submitted
            log.info("%s: finished earlier, not submitted", existing["run_id"])
            continue
        pending.append(spec)
    if not pending:
        log.info("every run of the matrix is finished; nothing to submit")
        return []
    folder = Path(options.folder).expanduser() if options.folder else results_dir / ".submitit"
    executor = _executor(options, folder)
    requests = [
        JobRequest(preset, tuple(overrides), tuple(weights), exp.config_hash(), spec, str(results_dir), os.getcwd(),
                   tuple(plugins.loaded_method_files()))
        for spec in pending
    ]
    from submitit.core.utils import FailedJobError

    try:
        with executor.batch():
            jobs = [executor.submit(run_job, request) for request in requests]
    except FailedJobError as err:  # sbatch refused them: a partition, account, time or resource request
        why = next((line.strip() for line in str(err).splitlines() if line.strip()), "no reason given")
        raise UserError(f"slurm refused the jobs ({why}); check --slurm-partition, --slurm-account, --slurm-time and "
                        "the resources asked for (--slurm-gpus-per-node, --slurm-cpus-per-task, --slurm-mem-gb)") from None
    for job, request in zip(jobs, requests, strict=True):
        log.info("submitted %s: %s %s %s seed %d", job.job_id, request.spec.setting, request.spec.backbone,
                 request.spec.method, request.spec.seed)
    if wait:
        _wait_for(jobs, requests)
    return jobs


def _wait_for(jobs: list[Any], requests: list[JobRequest]) -> None:
    """Every job to its end: one that failed is a line naming its run, and the others are still waited for
    (their results are the table that follows)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    for job, request in zip(jobs, requests, strict=True):
        try:
            job.results()  # every task's: `result()` of a job of several tasks (data-parallel) is an error
        except (FailedJobError, UncompletedJobError) as err:
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            reason = next((line for line in reversed(lines) if line.startswith("error:") or "Error" in line),
                          lines[-1] if lines else type(err).__name__)
            log.error("job %s (%s seed %d) failed: %s", job.job_id, request.spec.method, request.spec.seed, reason.strip()[:300])


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
