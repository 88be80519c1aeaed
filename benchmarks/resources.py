"""How many CPU threads and data-loader workers a run uses, sized to the machine it is on.

On a CPU, a training step already uses every core through intra-op (OpenMP) threads; data-loader
workers are further processes on the same cores. With more busy threads than cores, OpenMP's
barriers wait on descheduled threads every operator, and a step slows far beyond the machine's fair
share: measured on 2 cores with 2 workers and a competing 2-thread job, see docs/performance.md.
So on a CPU the default is one loader worker beside as many intra-op threads as the process may use
(a worker only decodes and crops, a small part of a step); and when other work already runs on the
machine as a run starts, OpenMP's threads wait passively (they sleep rather than spin, so the worker
and the other jobs get the cores) — on an idle machine spinning is faster, so it stays. OpenMP reads its
policy once per process, so when other work arrives later, `run` saves the run's checkpoint and restarts
itself with passive waiting, and when the work it waited passively for has gone, with spinning again
(`WaitPolicyWatch`, `RestartForWaitPolicy`); the run resumes exactly.

What the user gives wins: `data.num_workers` ≥ 0 (or `run --num-workers N`), and
`OMP_NUM_THREADS` for the threads.

Also here: what the machine is, as result files and profiles record it (`device_name`, `cpu_name`,
`package_versions`).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.errors import UserError

log = logging.getLogger(__name__)

AUTO = -1
"""`data.num_workers = -1`: sized to the machine (the default)."""
GPU_WORKERS_MAX = 8
"""Loader workers per GPU process at most when sized automatically (the paper preset's 8)."""


WAIT_POLICY_CHOSEN = "BENCHMARKS_WAIT_POLICY_CHOSEN"
"""Set beside `OMP_WAIT_POLICY` when this harness chose it (the machine was busy), so a process can tell its
own choice, which it may revise, from the user's, which it never does."""
WAIT_RESTARTS = "BENCHMARKS_WAIT_RESTARTS"
"""How many times the command restarted for its wait policy; set in each restarted process."""
MAX_WAIT_RESTARTS = 4
"""A restarted process at this count no longer returns to spinning: a job that comes and goes every minute or
two would otherwise cost a restart each time. Arrivals are always watched, so the count ends in passive waiting."""


RECORDED_PACKAGES = ("torch", "torchvision", "timm", "transformers", "peft", "torchmetrics", "numpy", "pillow",
                     "opencv-python-headless", "segmentation-models-pytorch", "safetensors")
"""The packages whose versions a result and a profile record: those that compute a number in them (Pillow and
OpenCV decode and resize the images, segmentation-models-pytorch is the UPerNet decoder, safetensors reads the
weights)."""


def package_versions(packages: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package, None where it is not installed."""
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return versions


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model, the vector instructions torch dispatches to, and AMX where present, e.g.
    "Intel(R) Xeon(R) Processor (AVX512, AMX)".

    Two CPUs can give the same seed different numbers (their kernels differ) and bf16 is fast only with
    AMX, so a result names the CPU itself; `platform.machine()` alone says "x86_64" for all of them.
    """
    import torch

    model, flags = "", ""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "cpu"
    features = [torch.backends.cpu.get_cpu_capability()]
    if "amx_bf16" in flags.split():
        features.append("AMX")
    return f"{model} ({', '.join(features)})"


def device_name(device) -> str:
    """What a result calls the device it ran on: a GPU's name, the CPU's (`cpu_name`), or another kind's
    (`mps`) by that kind, not by the CPU beside it."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name() if kind == "cpu" else kind


def synchronize(device) -> None:
    """Wait until the device has done the work queued on it, so that a clock read next closes that work.

    CUDA, XPU and MPS queue kernels and return at once (a step timed without waiting measures how fast
    they were queued); a CPU's work is done when its call returns."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "synchronize"):
        return
    if device.type == "mps":  # one device, and its synchronize takes none
        backend.synchronize()
    else:
        backend.synchronize(device)


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on: its affinity mask (taskset, a scheduler's cpuset), and no more than its
    cgroup's CPU quota allows (`docker --cpus 2` on a 16-core host leaves the mask at 16)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return min(cores, quota) if quota else cores


def _sees_whole_node() -> bool:
    try:
        return len(os.sched_getaffinity(0)) >= (os.cpu_count() or 1)
    except AttributeError:  # not Linux: no masks to tell
        return True


def cgroup_cpu_quota(cgroup_root: Path) -> int | None:
    """Whole CPUs the cgroup's quota grants, rounded up; None without one. cgroup v2 keeps it in `cpu.max`
    ("200000 100000": 2), v1 in the cpu controller's `cpu.cfs_quota_us` over `cpu.cfs_period_us` (-1: none)."""
    def words(*names: str) -> list[str] | None:  # the files' words in order; None when one cannot be read
        try:
            return [word for name in names for word in (cgroup_root / name).read_text().split()]
        except (OSError, ValueError):
            return None

    for found in (words("cpu.max"), *(words(f"{v1}/cpu.cfs_quota_us", f"{v1}/cpu.cfs_period_us")
                                      for v1 in ("cpu", "cpu,cpuacct"))):
        if found is None:
            continue
        quota, period = (*found, "", "")[:2]
        if quota.isdigit() and period.isdigit() and int(period) > 0 and int(quota) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
        return None  # "max" or -1: the cgroup sets no quota
    return None


def others_running(samples: int = 5, interval: float = 0.05, read=None) -> float:
    """Runnable processes besides this one right now: the median of a few reads of /proc/stat's
    procs_running (the load average lags by a minute; this does not). 0 where /proc is missing."""
    def procs_running() -> int:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
        return 1

    read = read or procs_running
    counts = []
    try:
        for i in range(samples):
            if i:
                time.sleep(interval)
            counts.append(read())
    except OSError:
        return 0.0
    return max(0.0, statistics.median(counts) - 1)


def choose_wait_policy(env: dict[str, str] | None = None, busy: float | None = None) -> str | None:
    """OpenMP's wait policy for this process: the user's if set; PASSIVE when other work is already
    running on the cores (idle threads then sleep instead of spinning, and a descheduled thread costs
    its team less); otherwise OpenMP's default (spinning), the faster one on an idle machine.
    Read once by the OpenMP runtime when torch loads it, so the CLI calls this before importing torch.
    Returns the policy it set, or None. A user's `GOMP_SPINCOUNT` (libgomp's own spin setting) is the
    user's choice of how threads wait too, and is left alone as `OMP_WAIT_POLICY` is."""
    env = os.environ if env is None else env
    if users_wait_setting(env) or env.get("OMP_WAIT_POLICY"):  # the user's, or ours from before a restart
        return None
    busy = others_running() if busy is None else busy
    if busy >= 1:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env[WAIT_POLICY_CHOSEN] = "1"
        return "PASSIVE"
    return None


def users_wait_setting(env: dict[str, str]) -> bool:
    """Whether the user decided how OpenMP threads wait: `OMP_WAIT_POLICY` not set by the harness, or libgomp's
    own `GOMP_SPINCOUNT`. The harness then neither chooses a policy nor revises it."""
    return bool(env.get("GOMP_SPINCOUNT") or (env.get("OMP_WAIT_POLICY") and not env.get(WAIT_POLICY_CHOSEN)))


def _tasks(pid: str, root: str) -> list[Path]:
    try:
        return list(Path(root, pid, "task").iterdir())
    except OSError:  # a process that ended meanwhile, or no /proc
        return []


def child_pids(pid: str = "self", root: str = "/proc") -> list[str]:
    """The children of every thread of `pid` (this process by default)."""
    children: list[str] = []
    for task in _tasks(pid, root):
        try:
            children += (task / "children").read_text().split()
        except OSError:  # the thread ended between listing and reading
            continue
    return children


def tasks_running_besides_ours(root: str = "/proc") -> int:
    """Runnable tasks on the machine that are not this process's threads or its children's (the loader
    workers): /proc/stat's procs_running less ours in state R, read back to back."""
    def running(pid: str) -> int:
        count = 0
        for task in _tasks(pid, root):
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the task ended between listing and reading
                continue
            count += stat[stat.rfind(")") + 2] == "R"
        return count

    with open(Path(root, "stat")) as f:
        total = next((int(line.split()[1]) for line in f if line.startswith("procs_running")), 1)
    return max(0, total - running("self") - sum(running(child) for child in child_pids("self", root)))


class RestartForWaitPolicy(BaseException):
    """Raised by training, after it saved the run's checkpoint, when the machine's load no longer suits the
    process's OpenMP wait policy, which OpenMP reads only as a process starts: other work has come to share
    the cores of a process whose threads spin (`passive` True), or the work a passive process made room for
    has gone (`passive` False). The CLI runs the command again with the policy wanted; finished runs are
    skipped and this one resumes from its checkpoint. A BaseException, like KeyboardInterrupt, so the runner
    does not record the run as failed."""

    def __init__(self, passive: bool):
        super().__init__("passive" if passive else "spinning")
        self.passive = passive


LOOKS_FOR_AN_ARRIVAL = 2
"""Looks in a row that must see other work before a spinning process restarts: one could be a passing
command. Beside a job that arrived, a spinning step took 9–13× its idle time, so the watch is quick."""
LOOKS_FOR_A_DEPARTURE = 4
"""Looks in a row that must see no other work before a passive process restarts to spin: passive waiting
costs 26–31 % of an idle step, a restart a few seconds, and a job that paused briefly should not be left."""


class WaitPolicyWatch:
    """Whether the machine's load has turned against the process's wait policy, for a process whose policy
    the harness chose (`watch_wait_policy`). Asked after every training step, it looks at most every
    `interval` seconds (reading /proc `samples` times, 20 ms apart, the median counting); a spinning process
    restarts once other work is seen at `LOOKS_FOR_AN_ARRIVAL` looks in a row, a passive one once none is seen
    at `LOOKS_FOR_A_DEPARTURE` looks in a row.

    Beside a 2-thread job that arrived after the start, a proxy training step of a spinning process took
    9–13× its idle time, of a passive one 2.1–2.3× (the fair share is 2×); alone, passive waiting cost
    26–31 % (docs/performance.md, "Threads and loader workers on a CPU")."""

    def __init__(self, passive: bool, interval: float = 15.0, samples: int = 3,
                 read=tasks_running_besides_ours, clock=time.monotonic, pause=time.sleep):
        self.passive = passive
        self.needed = LOOKS_FOR_A_DEPARTURE if passive else LOOKS_FOR_AN_ARRIVAL
        self.interval, self.samples = interval, samples
        self.read, self.clock, self.pause = read, clock, pause
        self.next_check = clock() + interval
        self.seen = 0

    def restart_due(self) -> RestartForWaitPolicy | None:
        now = self.clock()
        if now < self.next_check:
            return None
        self.next_check = now + self.interval
        counts = []
        for i in range(self.samples):
            if i:
                self.pause(0.02)
            try:
                counts.append(self.read())
            except OSError:  # no /proc here: nothing to watch
                return None
        other_work = statistics.median(counts) >= 1
        self.seen = self.seen + 1 if other_work != self.passive else 0
        return RestartForWaitPolicy(passive=not self.passive) if self.seen >= self.needed else None


_wait_policy_watch: WaitPolicyWatch | None = None


def watch_wait_policy(env: dict[str, str] | None = None) -> bool:
    """Called by the CLI after `choose_wait_policy`: when the harness, not the user, decided how this process's
    OpenMP threads wait, training watches whether the machine's load still suits that decision. A process
    already restarted `MAX_WAIT_RESTARTS` times keeps passive waiting for good."""
    global _wait_policy_watch
    env = os.environ if env is None else env
    if users_wait_setting(env):
        return False
    passive = bool(env.get("OMP_WAIT_POLICY"))
    if passive and int(env.get(WAIT_RESTARTS) or 0) >= MAX_WAIT_RESTARTS:
        return False
    _wait_policy_watch = WaitPolicyWatch(passive)
    return True


def wait_policy_watch(device_type: str, world_size: int) -> WaitPolicyWatch | None:
    """The process's watch for a training run on `device_type`; None on a GPU, under torchrun (one process of
    several cannot restart alone) or where the CLI set none up (a library call, a test)."""
    return _wait_policy_watch if device_type == "cpu" and world_size == 1 else None


@dataclass(frozen=True)
class CpuPlan:
    threads: int
    workers: int
    reason: str


def plan(num_workers: int, device_type: str, cpus: int | None = None, env: dict[str, str] | None = None,
         sees_whole_node: bool | None = None) -> CpuPlan:
    """Intra-op threads and loader workers for a run on `device_type` ("cpu" or "cuda"). `sees_whole_node`
    (default: whether this process's affinity mask is every core) decides whether the node's processes
    share its cores here, or a scheduler gave each its own already (slurm's task binding)."""
    if num_workers < AUTO:
        raise UserError(f"data.num_workers={num_workers}: give a count ≥ 0, or -1 to size it to the machine")
    env = os.environ if env is None else env
    machine = cpus or available_cpus()
    # The processes of one node (torchrun's LOCAL_WORLD_SIZE) share its cores: each sizes itself to its share.
    local = env.get("LOCAL_WORLD_SIZE", "").strip()
    processes = int(local) if local.isdigit() and int(local) > 1 else 1
    if processes > 1 and not (_sees_whole_node() if sees_whole_node is None else sees_whole_node):
        processes = 1  # its mask is its own share of the node
    cpus = max(1, machine // processes)
    share = f"{machine} cores, {cpus} for each of {processes} processes" if processes > 1 else f"{machine} cores"
    threads_given = env.get("OMP_NUM_THREADS", "").strip()
    outermost = threads_given.split(",")[0].strip()  # OpenMP's list form counts threads per nesting level
    if outermost.isdigit() and int(outermost) > 0:
        threads, source = int(outermost), "OMP_NUM_THREADS"
    else:
        threads, source = cpus, f"cores; OMP_NUM_THREADS={threads_given!r} is no count" if threads_given else "cores"
    if num_workers >= 0:
        workers, why = num_workers, "data.num_workers"
    elif device_type == "cuda":
        workers, why = min(GPU_WORKERS_MAX, max(cpus - 1, 0)), f"auto: {share}, a GPU"
    else:
        workers, why = min(1, cpus - 1), f"auto: {share}, training on the CPU"
    waiting = env.get("OMP_WAIT_POLICY") or "spinning (OpenMP default)"
    if env.get("OMP_WAIT_POLICY") and env.get(WAIT_POLICY_CHOSEN):
        waiting += " (chosen: other work was running)"
    restarts = int(env.get(WAIT_RESTARTS) or 0)
    if restarts:
        waiting += f", restart {restarts} of the command for the machine's load"
    return CpuPlan(threads=threads, workers=workers,
                   reason=f"{threads} threads ({source}), {workers} loader workers ({why}), OpenMP waits: {waiting}")


def apply(cpu_plan: CpuPlan) -> None:
    import torch

    if torch.get_num_threads() != cpu_plan.threads:
        torch.set_num_threads(cpu_plan.threads)
    log.info("CPU: %s", cpu_plan.reason)
