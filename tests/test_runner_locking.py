"""Two runners on one results folder never execute the same run; stale locks are taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.locking import RunLock, lock_path

ROOT = Path(__file__).resolve().parent.parent


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (reuse within the test is negligible)


def _write_lock(result: Path, pid: int, host: str) -> None:
    result.parent.mkdir(parents=True, exist_ok=True)
    lock_path(result).write_text(json.dumps({"pid": pid, "host": host, "since": 0}))


def test_lock_is_exclusive_and_released(tmp_path):
    result = tmp_path / "run.json"
    first, second = RunLock(result), RunLock(result)
    assert first.acquire()
    owner = json.loads(lock_path(result).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    # Same pid, but the lock is held and that pid is alive: a second claimant must back off.
    assert not second.acquire()
    first.release()
    assert not lock_path(result).exists()
    assert second.acquire()
    second.release()


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    result = tmp_path / "run.json"
    _write_lock(result, _dead_pid(), socket.gethostname())
    lock = RunLock(result)
    assert lock.acquire()
    assert json.loads(lock_path(result).read_text())["pid"] == os.getpid()
    assert not list(tmp_path.glob("*.stale-*"))
    lock.release()


def test_a_lock_naming_this_pid_that_this_process_does_not_hold_was_left_by_an_earlier_life(tmp_path):
    # A runner restarted in a container gets the same pid (often 1) and host as the one that died.
    result = tmp_path / "run.json"
    _write_lock(result, os.getpid(), socket.gethostname())
    lock = RunLock(result)
    assert lock.acquire()
    assert json.loads(lock_path(result).read_text())["since"] > 0  # ours now, not the one written above
    assert not RunLock(result).acquire()  # while this process holds it, it is held
    lock.release()


def test_lock_of_other_host_written_before_heartbeats_is_never_taken_over(tmp_path):
    result = tmp_path / "run.json"
    _write_lock(result, _dead_pid(), "some-other-node")
    os.utime(lock_path(result), (0, 0))  # however old: it says nothing of its owner
    lock = RunLock(result)
    assert not lock.acquire()
    assert "some-other-node" in lock.describe_owner()


def _write_foreign_lock(result: Path, untouched_s: float, **owner) -> None:
    result.parent.mkdir(parents=True, exist_ok=True)
    lock_path(result).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0,
                                             "heartbeat_s": 60.0, **owner}))
    then = time.time() - untouched_s
    os.utime(lock_path(result), (then, then))


def test_a_foreign_lock_is_stale_once_its_owner_stopped_touching_it(tmp_path):
    # Another node's job killed hard (its requeue on another node was skipped as "locked" for ever), or a
    # container sharing this host's name, whose pids are not this namespace's (a live runner there had its
    # lock taken over as "dead process").
    from benchmarks.locking import FOREIGN_STALE_AFTER_S

    for owner in ({"host": "some-other-node"}, {"pid_namespace": "pid:[1]"}):
        result = tmp_path / f"{len(owner['host']) if 'host' in owner else 'ns'}" / "run.json"
        _write_foreign_lock(result, FOREIGN_STALE_AFTER_S / 2, **owner)
        assert not RunLock(result).acquire()  # still touched lately: its owner lives
        _write_foreign_lock(result, FOREIGN_STALE_AFTER_S + 60, **owner)
        lock = RunLock(result)
        assert lock.acquire()
        lock.release()


def test_a_lock_whose_pid_lives_on_in_another_process_is_stale_once_untouched(tmp_path):
    # After a reboot a dead runner's pid may be a live process's: the run was skipped on every invocation.
    import subprocess

    from benchmarks.locking import FOREIGN_STALE_AFTER_S

    other = subprocess.Popen(["sleep", "60"])
    try:
        result = tmp_path / "run.json"
        _write_foreign_lock(result, FOREIGN_STALE_AFTER_S / 2, pid=other.pid)
        assert not RunLock(result).acquire()  # touched lately: its runner may live
        _write_foreign_lock(result, FOREIGN_STALE_AFTER_S + 60, pid=other.pid)
        lock = RunLock(result)
        assert lock.acquire()
        lock.release()
    finally:
        other.kill()
        other.wait()


def test_a_requeued_slurm_job_takes_over_its_earlier_attempt_s_lock_at_once(tmp_path, monkeypatch):
    # A job killed hard and requeued within 10 minutes found its own lock "live" on the lost node, skipped its
    # run and ended COMPLETED with no result. Slurm never runs two attempts of one job at once.
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    result = tmp_path / "run.json"
    _write_foreign_lock(result, 30, host="lost-node", slurm_job="4242", slurm_restart=0)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not RunLock(result).acquire()  # the same attempt elsewhere (or another job): its owner may live
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(result)
    assert lock.acquire() and lock.owner["slurm_job"] == "4242" and lock.owner["slurm_restart"] == 1
    lock.release()
    _write_foreign_lock(result, 30, host="lost-node", slurm_job="777", slurm_restart=0)
    assert not RunLock(result).acquire()  # another job's lock is no attempt of this one


def test_a_held_lock_is_touched_while_held(tmp_path, monkeypatch):
    from benchmarks import locking

    monkeypatch.setattr(locking, "HEARTBEAT_S", 0.05)
    result = tmp_path / "run.json"
    lock = RunLock(result)
    assert lock.acquire()
    os.utime(lock_path(result), (0, 0))
    deadline = time.time() + 10
    while lock_path(result).stat().st_mtime == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() - lock_path(result).stat().st_mtime < 10
    assert json.loads(lock_path(result).read_text())["heartbeat_s"] == 0.05
    lock.release()
    assert not lock_path(result).exists()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    result = tmp_path / "run.json"
    lock = RunLock(result)
    assert lock.acquire()
    _write_lock(result, 1, "some-other-node")  # e.g. an operator replaced it by hand
    lock.release()
    assert lock_path(result).exists()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from datasets.synthetic import generate_world

    root = tmp_path_factory.mktemp("world") / "synthetic"
    generate_world(root, size="tiny")
    return root


def _experiment(world: Path, results: Path):
    from benchmarks.config import load_experiment

    return load_experiment("smoke", [f"data.root={str(world)!r}", f"run.results_dir={str(results)!r}", "train.iters=1",
                                     "data.eval_limit=1"])


def test_run_held_by_live_runner_is_skipped_and_reported(world, tmp_path, caplog):
    from benchmarks.runner import RunSpec, experiment_for, run_matrix

    exp = _experiment(world, tmp_path / "results")
    held = RunSpec("G->CBM", "proxy_vit", "full", 42)
    held_path = held.path(experiment_for(exp, held), tmp_path / "results")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        _write_lock(held_path, sleeper.pid, socket.gethostname())
        with caplog.at_level(logging.INFO, logger="benchmarks"):
            results = run_matrix(exp, "full,freeze", progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [r["method"]["name"] for r in results] == ["freeze"]
    assert not held_path.exists()
    messages = [r.getMessage() for r in caplog.records]
    assert any("locked by pid" in m and f"pid {sleeper.pid}" in m for m in messages), messages
    assert any("1 run(s) skipped" in m for m in messages), messages
    # The lock was the other runner's: still there; ours (freeze) was released.
    assert lock_path(held_path).exists()
    assert not list((tmp_path / "results").rglob("freeze/*.lock"))


@pytest.mark.slow
def test_two_runner_processes_share_a_results_folder(world, tmp_path):
    """Two `python -m benchmarks run` on the same matrix: each run is executed by exactly one."""
    results = tmp_path / "results"
    command = [sys.executable, "-m", "benchmarks", "run", "--preset", "smoke", "--methods", "full,freeze,lora",
               "--data-root", str(world), "--results-dir", str(results), "--no-progress",
               "--set", "train.iters=2", "--set", "data.eval_limit=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runners = [subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    logs = [runner.communicate(timeout=900)[1] for runner in runners]
    assert [r.returncode for r in runners] == [0, 0], logs
    files = sorted(results.rglob("*.json"))
    assert len(files) == 3
    assert not list(results.rglob("*.lock")) and not list(results.rglob("*.ckpt"))
    for method in ("full", "freeze", "lora"):
        # A runner that did not execute a run says so: it found it locked or finished.
        executed = [log for log in logs if not _skipped(log, method)]
        assert len(executed) == 1, (method, logs)


def _skipped(log: str, method: str) -> bool:
    marker = f"/{method}/seed"
    return any(marker in line and ("locked by" in line or "finished earlier" in line) for line in log.splitlines())


def test_lock_creation_is_atomic_under_contention(tmp_path):
    """Many processes racing for one lock: exactly one wins."""
    result = tmp_path / "run.json"
    script = (
        "import sys, time; from pathlib import Path; from benchmarks.locking import RunLock\n"
        f"time.sleep(max(0.0, {time.time() + 3.0!r} - time.time()))\n"
        f"lock = RunLock(Path({str(result)!r}))\n"
        "print(int(lock.acquire())); sys.stdout.flush(); time.sleep(2)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    wins = [int(p.communicate(timeout=60)[0].strip()) for p in procs]
    assert sum(wins) == 1, wins



def test_three_runners_meeting_one_stale_lock_leave_one_holder(tmp_path):
    """C reads a stale lock and is descheduled; B takes the lock over meanwhile; C then moves B's live lock
    aside, and D, arriving while it is aside, creates its own: C, giving B's back, found D's in its place and
    dropped B's, so B and D both ran the run. Deciding and removing a stale lock is one runner's at a time."""
    result = tmp_path / "run.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    lock_path(result).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0}))
    start = time.time() + 3.0
    common = (
        "import os, sys, time; from pathlib import Path; from benchmarks import locking\n"
        f"result = Path({str(result)!r})\n"
    )
    slow_c = (  # C: descheduled for a second after reading the lock, and again after moving it aside
        "read, rename = locking._read_owner, os.rename\n"
        "def slow_read(path, calls=[0]):\n"
        "    owner = read(path); calls[0] += 1\n"
        "    if calls[0] == 1: time.sleep(1.0)\n"
        "    return owner\n"
        "def slow_rename(src, dst, calls=[0]):\n"
        "    rename(src, dst); calls[0] += 1\n"
        "    if calls[0] == 1: time.sleep(1.0)\n"
        "locking._read_owner, locking.os.rename = slow_read, slow_rename\n"
    )
    def runner(delay: float, patch: str = "") -> str:
        return (common + patch + f"time.sleep(max(0.0, {start + delay!r} - time.time()))\n"
                "lock = locking.RunLock(result); held = lock.acquire(); time.sleep(3.5 - " + repr(delay) + ")\n"
                "print(int(held))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    scripts = [runner(0.0, slow_c), runner(0.3), runner(1.5)]  # C, then B, then D
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for script in scripts]
    holders = [int(proc.communicate(timeout=60)[0].strip() or 0) for proc in procs]
    assert sum(holders) == 1, holders

@pytest.mark.slow
def test_slurm_launcher_through_submitit_local_executor(world, tmp_path):
    """`--launcher slurm` with submitit's local executor: one job per unfinished run, same results path."""
    pytest.importorskip("submitit")
    from benchmarks.config import load_experiment
    from benchmarks.results import read_result
    from benchmarks.runner import RunSpec, experiment_for

    results = tmp_path / "results"
    overrides = ["--set", "train.iters=1", "--set", "data.eval_limit=1"]
    command = [sys.executable, "-m", "benchmarks", "run", "--preset", "smoke", "--methods", "freeze",
               "--data-root", str(world), "--results-dir", str(results), "--no-progress", *overrides,
               "--launcher", "slurm", "--slurm-cluster", "local", "--slurm-wait"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    exp = load_experiment("smoke", [f"data.root={str(world)!r}", "train.iters=1", "data.eval_limit=1"])
    spec = RunSpec("G->CBM", "proxy_vit", "freeze", 42)
    result = read_result(spec.path(experiment_for(exp, spec), results))
    assert result is not None and result["status"] == "finished"
    # Submitting the same matrix again submits nothing: the run is finished.
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "not submitted" in again.stderr, again.stderr[-3000:]


def test_the_tasks_of_one_slurm_array_rendezvous_on_different_ports():
    # submitit names an array task "<array id>_<task>"; the port came from the array id alone, so two tasks on one
    # node both bound it and the second died in its process group's setup (EADDRINUSE).
    from benchmarks.launchers import rendezvous_port

    ports = [rendezvous_port(f"1001_{task}") for task in range(64)]
    assert len(set(ports)) == len(ports) and all(20000 <= port < 40000 for port in ports)
    assert rendezvous_port("1001_3") == rendezvous_port("1001_3")  # every task of one job computes the same
    # two matrices submitted one after the other: arrays N and N+1 of up to 1,001 tasks (slurm's default maximum)
    assert not set(ports_of := [rendezvous_port(f"1001_{t}") for t in range(1001)]) & {
        rendezvous_port(f"1002_{t}") for t in range(1001)}, len(ports_of)
