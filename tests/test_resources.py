"""CPU threads and loader workers sized to the machine (benchmarks.resources)."""

from __future__ import annotations

import pytest

from benchmarks.errors import UserError
from benchmarks.resources import plan


def test_a_cpu_run_gets_one_worker_beside_a_thread_per_core() -> None:
    cpu = plan(-1, "cpu", cpus=2, env={})
    assert (cpu.threads, cpu.workers) == (2, 1)
    assert plan(-1, "cpu", cpus=1, env={}).workers == 0  # one core: load in the training process
    assert plan(-1, "cpu", cpus=16, env={}).workers == 1


def test_a_gpu_run_gets_workers_up_to_eight() -> None:
    assert plan(-1, "cuda", cpus=16, env={}).workers == 8
    assert plan(-1, "cuda", cpus=4, env={}).workers == 3


def test_the_processes_of_one_node_share_its_cores() -> None:
    # Each of 4 GPU processes took 8 loader workers of a 16-core node (32 workers); 2 CPU processes on 2 cores
    # took 2 threads and a worker each.
    four = plan(-1, "cuda", cpus=16, env={"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}, sees_whole_node=True)
    assert (four.threads, four.workers) == (1, 3) and "4 for each of 4 processes" in four.reason
    two = plan(-1, "cpu", cpus=2, env={"LOCAL_WORLD_SIZE": "2"}, sees_whole_node=True)
    assert (two.threads, two.workers) == (1, 0)
    assert plan(-1, "cuda", cpus=16, env={"LOCAL_WORLD_SIZE": "1"}, sees_whole_node=True).workers == 8
    # slurm bound each task to its own 8 cores already: its mask is its share, not divided again
    bound = plan(-1, "cuda", cpus=8, env={"LOCAL_WORLD_SIZE": "4"}, sees_whole_node=False)
    assert (bound.threads, bound.workers) == (8, 7)


def test_a_cgroup_cpu_quota_bounds_the_cores(tmp_path) -> None:
    # `docker --cpus 2` on a 16-core host leaves the affinity mask at 16: only the cgroup's quota says 2.
    from benchmarks.resources import available_cpus, cgroup_cpu_quota

    cpu_max = tmp_path / "cpu.max"
    for text, cpus in (("200000 100000\n", 2), ("150000 100000\n", 2), ("max 100000\n", None), ("junk", None)):
        cpu_max.write_text(text)
        assert cgroup_cpu_quota(tmp_path) == cpus
    cpu_max.write_text("100000 100000\n")
    assert available_cpus(tmp_path) == 1
    assert cgroup_cpu_quota(tmp_path / "absent") is None
    # cgroup v1 (no cpu.max; the cpu controller's CFS files), which was never read
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, cpus in (("100000", 1), ("250000", 3), ("-1", None)):
        (v1 / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
        assert cgroup_cpu_quota(v1) == cpus
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert available_cpus(v1) == 1


def test_what_the_user_gives_wins() -> None:
    given = plan(3, "cpu", cpus=2, env={"OMP_NUM_THREADS": "1"})
    assert (given.threads, given.workers) == (1, 3)
    assert "OMP_NUM_THREADS" in given.reason and "data.num_workers" in given.reason
    junk = plan(-1, "cpu", cpus=4, env={"OMP_NUM_THREADS": "junk"})
    assert junk.threads == 4 and "4 threads (cores; OMP_NUM_THREADS='junk' is no count)" in junk.reason
    # OpenMP's list form gives the outermost level first (it was read as no count, then torch took the last)
    nested = plan(-1, "cpu", cpus=4, env={"OMP_NUM_THREADS": "3,2"})
    assert nested.threads == 3 and "3 threads (OMP_NUM_THREADS)" in nested.reason


def test_the_plan_says_whose_wait_policy_it_is_and_after_how_many_restarts() -> None:
    from benchmarks.resources import WAIT_POLICY_CHOSEN, WAIT_RESTARTS

    assert plan(-1, "cpu", cpus=2, env={}).reason.endswith("OpenMP waits: spinning (OpenMP default)")
    assert plan(-1, "cpu", cpus=2, env={"OMP_WAIT_POLICY": "PASSIVE"}).reason.endswith("OpenMP waits: PASSIVE")
    chosen = {"OMP_WAIT_POLICY": "PASSIVE", WAIT_POLICY_CHOSEN: "1", WAIT_RESTARTS: "3"}
    assert plan(-1, "cpu", cpus=2, env=chosen).reason.endswith(
        "OpenMP waits: PASSIVE (chosen: other work was running), restart 3 of the command for the machine's load")


def test_a_negative_count_other_than_auto_is_a_user_error() -> None:
    with pytest.raises(UserError, match="data.num_workers=-2"):
        plan(-2, "cpu", cpus=2, env={})


def test_the_run_records_and_uses_the_plan(tmp_path, monkeypatch) -> None:
    import torch

    from benchmarks.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        assert main(["run", "--preset", "smoke", "--methods", "freeze", "--results-dir", str(tmp_path),
                     "--no-progress", "--set", "train.iters=1", "--set", "data.num_workers=-1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    from benchmarks.resources import available_cpus
    from benchmarks.results import iter_results

    (result,) = iter_results([tmp_path])
    assert result["environment"]["loader_workers"] == min(1, available_cpus() - 1)
    assert "1 threads (OMP_NUM_THREADS)" in result["environment"]["cpu_plan"]


def test_waiting_is_passive_only_when_other_work_runs() -> None:
    from benchmarks.resources import WAIT_POLICY_CHOSEN, choose_wait_policy, others_running

    env: dict[str, str] = {}
    assert choose_wait_policy(env, busy=0) is None and "OMP_WAIT_POLICY" not in env
    assert choose_wait_policy(env, busy=2) == "PASSIVE" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env[WAIT_POLICY_CHOSEN] == "1"  # ours, so the process may revise it
    given = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose_wait_policy(given, busy=5) is None and given == {"OMP_WAIT_POLICY": "ACTIVE"}
    spins = {"GOMP_SPINCOUNT": "300000"}  # libgomp's own spin setting: the user's choice as well
    assert choose_wait_policy(spins, busy=5) is None and spins == {"GOMP_SPINCOUNT": "300000"}
    reads = iter([3, 1, 3, 3, 2])  # ourselves plus a competitor, one sample caught between slices
    assert others_running(read=lambda: next(reads), interval=0) == 2


def _watch(passive: bool, reads: list[int], now: list[float]):
    from benchmarks.resources import WaitPolicyWatch

    remaining = iter(reads)
    return WaitPolicyWatch(passive, interval=10, samples=3, read=lambda: next(remaining), clock=lambda: now[0],
                           pause=lambda seconds: None), remaining


def test_work_that_arrives_counts_only_when_seen_at_consecutive_checks():
    now = [0.0]
    watch, reads = _watch(False, [1, 1, 0,  0, 0, 1,  2, 2, 2,  1, 2, 1], now)
    assert watch.restart_due() is None  # not yet due: nothing read
    now[0] = 10
    assert watch.restart_due() is None  # median 1: seen once
    now[0] = 15
    assert watch.restart_due() is None  # not due
    now[0] = 20
    assert watch.restart_due() is None  # median 0: a passing command, forgotten
    now[0] = 30
    assert watch.restart_due() is None  # seen once again
    now[0] = 40
    restart = watch.restart_due()  # seen twice in a row
    assert restart is not None and restart.passive
    assert next(reads, None) is None


def test_a_passive_process_returns_to_spinning_only_after_consecutive_looks_see_no_other_work():
    now = [0.0]
    quiet, busy = [0, 0, 1], [2, 2, 0]  # medians 0 and 2
    watch, reads = _watch(True, quiet * 3 + busy + quiet * 3 + quiet, now)
    for look in range(1, 8):  # three quiet looks, a busy one (the job only paused), three quiet again
        now[0] = 10 * look
        assert watch.restart_due() is None
    now[0] = 80
    restart = watch.restart_due()  # the fourth quiet look in a row
    assert restart is not None and not restart.passive
    assert next(reads, None) is None


def test_only_a_run_process_whose_wait_policy_the_harness_chose_watches(monkeypatch):
    from benchmarks import resources
    from benchmarks.resources import MAX_WAIT_RESTARTS, WAIT_POLICY_CHOSEN, WAIT_RESTARTS, WaitPolicyWatch

    monkeypatch.setattr(resources, "_wait_policy_watch", None)
    assert resources.wait_policy_watch("cpu", 1) is None  # a library call or a test: the CLI set none up
    assert not resources.watch_wait_policy({"OMP_WAIT_POLICY": "PASSIVE"})  # the user's
    assert not resources.watch_wait_policy({"GOMP_SPINCOUNT": "0"})
    chosen_passive = {"OMP_WAIT_POLICY": "PASSIVE", WAIT_POLICY_CHOSEN: "1"}
    assert not resources.watch_wait_policy({**chosen_passive, WAIT_RESTARTS: str(MAX_WAIT_RESTARTS)})
    assert resources.wait_policy_watch("cpu", 1) is None

    assert resources.watch_wait_policy({**chosen_passive, WAIT_RESTARTS: str(MAX_WAIT_RESTARTS - 1)})
    watch = resources.wait_policy_watch("cpu", 1)
    assert isinstance(watch, WaitPolicyWatch) and watch.passive
    assert resources.watch_wait_policy({WAIT_RESTARTS: str(MAX_WAIT_RESTARTS + 1)})  # spinning: always watched
    watch = resources.wait_policy_watch("cpu", 1)
    assert isinstance(watch, WaitPolicyWatch) and not watch.passive
    assert resources.wait_policy_watch("cuda", 1) is None and resources.wait_policy_watch("cpu", 2) is None


def test_the_tasks_counted_leave_out_this_process_and_its_loader_workers(tmp_path):
    from benchmarks.resources import tasks_running_besides_ours

    def task(pid: str, tid: str, comm: str, state: str, children: str | None = None) -> None:
        folder = tmp_path / pid / "task" / tid
        folder.mkdir(parents=True)
        (folder / "stat").write_text(f"{tid} ({comm}) {state} 1 1 1 0 -1\n")
        if children is not None:
            (folder / "children").write_text(children)

    (tmp_path / "stat").write_text("cpu  1 2 3\nprocs_running 6\nprocs_blocked 0\n")
    task("self", "100", "python", "R", children="200 ")
    task("self", "101", "omp) R thread", "S", children="")  # a name with ") R" in it: the state follows the last ")"
    task("self", "102", "python", "R", children="")
    task("200", "200", "pt_data_worker", "R")
    assert tasks_running_besides_ours(str(tmp_path)) == 3
    (tmp_path / "stat").write_text("procs_running 2\n")
    assert tasks_running_besides_ours(str(tmp_path)) == 0  # never below none


def test_no_shipped_preset_fixes_a_loader_worker_count_above_the_machine_sizing():
    # A fixed count in a preset would override the sizing: 8 workers beside 2 intra-op threads on a 2-core
    # CPU is the oversubscription docs/performance.md measured.
    from benchmarks.config import load_experiment
    from benchmarks.resources import AUTO, plan

    for preset in ("paper", "proxy"):
        exp = load_experiment(preset)
        assert exp.data.num_workers == AUTO, preset
        assert plan(exp.data.num_workers, "cpu", cpus=2, env={}).workers == 1
        assert plan(exp.data.num_workers, "cuda", cpus=16, env={}).workers == 8
    assert load_experiment("smoke").data.num_workers == 0  # loads in the process: no worker at all


def test_cpu_name_gives_the_model_the_vector_level_and_amx(tmp_path, monkeypatch):
    import torch

    from benchmarks.resources import cpu_name

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n"
                       "\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512f amx_bf16\n")
    assert cpu_name(str(cpuinfo)) == "Intel(R) Xeon(R) Processor (AVX512, AMX)"

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpuinfo.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 amx_tile_not_bf16\n")
    assert cpu_name(str(cpuinfo)) == "AMD EPYC 7B13 (AVX2)"


def test_cpu_name_without_cpuinfo_falls_back_to_the_platform(tmp_path, monkeypatch):
    import platform

    import torch

    from benchmarks.resources import cpu_name

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert cpu_name(str(tmp_path / "missing")) == "arm64 (DEFAULT)"


def test_package_versions_names_missing_packages_none_and_covers_what_results_record():
    import importlib.metadata as md

    from benchmarks.resources import RECORDED_PACKAGES, package_versions

    versions = package_versions(("torch", "no-such-package-dgss"))
    assert versions == {"torch": md.version("torch"), "no-such-package-dgss": None}
    assert tuple(package_versions()) == RECORDED_PACKAGES
    # what a result file and a profile header record, both from that one list
    import torch

    from benchmarks.reports.profiles import environment_summary
    from benchmarks.runner import environment

    for recorded in (environment(torch.device("cpu")), environment_summary(torch.device("cpu"))):
        assert {package: recorded[package] for package in RECORDED_PACKAGES} == package_versions()


def test_device_name_names_a_gpu_by_model_a_cpu_by_model_and_another_kind_by_its_kind(monkeypatch):
    import torch

    from benchmarks import resources

    monkeypatch.setattr(resources, "cpu_name", lambda: "Intel(R) Xeon(R) Processor (AVX512, AMX)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert resources.device_name(torch.device("cpu")) == "Intel(R) Xeon(R) Processor (AVX512, AMX)"
    assert resources.device_name("cuda:0") == "NVIDIA H200"
    assert resources.device_name("mps") == "mps"  # not the CPU beside it


def test_both_entry_points_choose_the_wait_policy_before_a_training_command_runs(monkeypatch):
    """`python -m benchmarks` and the installed `dgss-bench` script go through the same `entry`, which reads the
    machine's state (before torch loads) only for the commands that train."""
    import sys
    from pathlib import Path

    from benchmarks import __main__ as entry_point
    from benchmarks import cli

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'dgss-bench = "benchmarks.__main__:entry"' in pyproject
    calls: list[str] = []
    monkeypatch.setattr(entry_point, "choose_wait_policy", lambda: calls.append("choose"))
    monkeypatch.setattr(entry_point, "watch_wait_policy", lambda: calls.append("watch"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 0)
    for argv, expected in ([["run", "--methods", "lora"], ["choose", "watch", "main"]],
                           [["check"], ["choose", "main"]],
                           [["table"], ["main"]]):
        calls.clear()
        monkeypatch.setattr(sys, "argv", ["dgss-bench", *argv])
        assert entry_point.entry() == 0 and calls == expected


def test_synchronize_waits_for_each_asynchronous_device_kind_and_not_for_a_cpu(monkeypatch):
    # A step timed on MPS or XPU without waiting measured how fast its kernels were queued: the timers
    # and the evaluation's clock waited for CUDA alone.
    import torch

    from benchmarks.resources import synchronize

    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    monkeypatch.setattr(torch.xpu, "synchronize", lambda device=None: calls.append(str(device)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(str(device)))
    for device in ("cpu", "mps", "xpu:1", torch.device("cuda", 0)):
        synchronize(device)
    assert calls == ["mps", "xpu:1", "cuda:0"]
