"""The measuring scripts in tools/ end what they started and check their input before starting anything.

Each runs here with a stand-in for Python (PY) whose `-m benchmarks ...` records its pid and sleeps: what is
checked is the scripts' process handling, not a measurement."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def stand_in(tmp_path):
    pids = tmp_path / "pids"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -m ]; then echo $$ >> {pids}; exec sleep 60; fi\nexit 0\n')
    stub.chmod(0o755)
    return stub, pids


def _started(pids: Path, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pids.exists() and pids.read_text().strip():
            return int(pids.read_text().split()[0])
        time.sleep(0.1)
    raise AssertionError("the stand-in run never started")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _start(script: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    # Started as a terminal starts a foreground job, with SIGINT at its default. A suite launched in the background
    # by a non-interactive shell ignores SIGINT, its children inherit that, and bash can trap no signal that was
    # ignored when it started: the Ctrl-C tests then hung (a handler, unlike SIG_IGN, is reset by exec).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([str(REPO / "tools" / script), *args], cwd=cwd, env={**os.environ, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sighup"])
def test_cpu_round_stopped_stops_its_round(stand_in, tmp_path, how):
    # Ctrl-C never reached the round (`timeout` puts it in a process group of its own) and a SIGTERM ended the
    # script alone: the round went on, and a second start would have run beside it on the same state.
    stub, pids = stand_in
    tool = _start("cpu-round", ["round"], {"PY": str(stub), "LIMIT_S": "120"}, cwd=tmp_path)
    round_pid = _started(pids)
    if how == "ctrl-c":
        os.killpg(tool.pid, signal.SIGINT)  # what a terminal sends its foreground process group
    else:  # the script alone: `kill` or a scheduler; a closing terminal or ssh session
        os.kill(tool.pid, signal.SIGTERM if how == "sigterm" else signal.SIGHUP)
    tool.communicate(timeout=20)
    assert tool.returncode in (129, 130, 143) and _gone(round_pid)
    assert (tmp_path / "round").is_dir() and not (REPO / "round").exists()  # DIR is the caller's, not the repo's


def test_load_change_stopped_stops_its_run(stand_in, tmp_path):
    stub, pids = stand_in
    tool = _start("load-change", ["alone"], {"PY": str(stub)}, cwd=tmp_path)
    run_pid = _started(pids)
    os.killpg(tool.pid, signal.SIGINT)
    tool.communicate(timeout=20)
    assert tool.returncode == 130 and _gone(run_pid)


@pytest.mark.parametrize(("script", "env", "args", "said"), [
    ("load-change", {"ITERS": "1.5"}, [], "error: ITERS=1.5 is not a whole number of at least 1"),
    ("load-change", {"LEAVE_AFTER": "x"}, ["leaves"], "error: LEAVE_AFTER=x is not a whole number of at least 1"),
    ("load-change", {}, ["alone", "bogus"], "error: unknown scenario bogus (alone, arrives, leaves)"),
    ("load-ratio", {"ITERS": "0"}, [], "error: ITERS=0 is not a whole number of at least 1"),
    ("cpu-round", {"LIMIT_S": "abc"}, ["round"], "error: LIMIT_S=abc is not a whole number of at least 1"),
    ("cpu-round", {}, ["--bogus"], "error: unknown option --bogus (tools/cpu-round --help)"),
])
def test_a_tools_bad_input_is_one_line_and_exit_2_before_anything_starts(stand_in, tmp_path, script, env, args, said):
    stub, pids = stand_in
    tool = _start(script, args, {"PY": str(stub), **env}, cwd=tmp_path)
    out, err = tool.communicate(timeout=20)
    assert tool.returncode == 2 and err.strip() == said and out == ""
    assert not pids.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["python"]  # nothing written


def test_load_change_refuses_a_keep_folder_with_results(stand_in, tmp_path):
    # its finished runs would have been skipped and their lines printed as if measured
    stub, pids = stand_in
    keep = tmp_path / "keep"
    (keep / "r1-alone").mkdir(parents=True)
    (keep / "r1-alone" / "seed42.json").write_text("{}")
    tool = _start("load-change", ["alone"], {"PY": str(stub), "KEEP": str(keep)}, cwd=tmp_path)
    _, err = tool.communicate(timeout=20)
    assert tool.returncode == 2 and "already holds results" in err and not pids.exists()
