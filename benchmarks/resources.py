"""How many CPU threads and data-loader workers a run uses, sized to the machine it is on.

On a CPU, a training step already uses every core through intra-op (OpenMP) threads; data-loader
workers are further processes on the same cores. With more busy threads than cores, OpenMP's
barriers wait on descheduled threads every operator, and a step slows far beyond the machine's fair
share: measured on 2 cores with 2 workers and a competing 2-thread job, see docs/performance.md.
So on a CPU the default is one loader worker beside as many intra-op threads as the process may use
(a worker only decodes and crops, a small part of a step), and the threads wait passively (they
sleep rather than spin when idle, so the worker and other jobs get the cores).

What the user gives wins: `data.num_workers` ≥ 0 (or `run --num-workers N`), and
`OMP_NUM_THREADS` for the threads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from benchmarks.errors import UserError

log = logging.getLogger(__name__)

AUTO = -1
"""`data.num_workers = -1`: sized to the machine (the default)."""
GPU_WORKERS_MAX = 8
"""Loader workers per GPU process at most when sized automatically (the paper preset's 8)."""


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a scheduler's cgroup)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def prefer_passive_waiting() -> None:
    """OpenMP threads sleep when idle instead of spinning, unless the user chose otherwise.

    Read once by the OpenMP runtime when torch loads it, so the CLI calls this before importing torch.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass(frozen=True)
class CpuPlan:
    threads: int
    workers: int
    reason: str


def plan(num_workers: int, device_type: str, cpus: int | None = None, env: dict[str, str] | None = None) -> CpuPlan:
    """Intra-op threads and loader workers for a run on `device_type` ("cpu" or "cuda")."""
    if num_workers < AUTO:
        raise UserError(f"data.num_workers={num_workers}: give a count ≥ 0, or -1 to size it to the machine")
    env = os.environ if env is None else env
    cpus = cpus or available_cpus()
    threads_given = env.get("OMP_NUM_THREADS", "").strip()
    threads = int(threads_given) if threads_given.isdigit() and int(threads_given) > 0 else cpus
    if num_workers >= 0:
        workers, why = num_workers, "data.num_workers"
    elif device_type == "cuda":
        workers, why = min(GPU_WORKERS_MAX, max(cpus - 1, 0)), f"auto: {cpus} cores, a GPU"
    else:
        workers, why = min(1, cpus - 1), f"auto: {cpus} cores, training on the CPU"
    source = "OMP_NUM_THREADS" if threads_given else "cores"
    return CpuPlan(threads=threads, workers=workers, reason=f"{threads} threads ({source}), {workers} loader workers ({why})")


def apply(cpu_plan: CpuPlan) -> None:
    import torch

    if torch.get_num_threads() != cpu_plan.threads:
        torch.set_num_threads(cpu_plan.threads)
    log.info("CPU: %s", cpu_plan.reason)
