"""Checkpoints: what they hold, that writes are atomic, and that a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import checkpoint
from benchmarks.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from datasets.synthetic import generate_world

    root = tmp_path_factory.mktemp("world") / "synthetic"
    generate_world(root, size="tiny")
    return root


def _experiment(world: Path, *extra: str):
    from benchmarks.config import load_experiment

    return load_experiment("smoke", [f"data.root={str(world)!r}", "train.iters=4", "train.checkpoint_interval=2",
                                     "train.log_interval=1", "data.eval_limit=1", *extra])


def _model(method_name: str, world: Path):
    from benchmarks.method import build_method
    from benchmarks.model import build_model

    method = build_method(method_name)
    return build_model(_experiment(world), method), method


# -- what a checkpoint holds ---------------------------------------------------------------------------
def test_trainable_state_leaves_out_the_frozen_backbone(world):
    model, _ = _model("freeze", world)
    state = checkpoint.trainable_state(model)
    assert not any(name.startswith("backbone.") for name in state if name in dict(model.named_parameters()))
    assert {n for n, _ in model.head.named_parameters()} <= {n.removeprefix("head.") for n in state}


def test_trainable_state_keeps_added_modules(world):
    model, _ = _model("lora", world)
    state = checkpoint.trainable_state(model)
    added = [n for n, p in model.backbone.named_parameters() if id(p) not in model._pretrained_ids]
    assert added and all(f"backbone.{n}" in state for n in added)
    frozen = [n for n, p in model.backbone.named_parameters() if id(p) in model._pretrained_ids and not p.requires_grad]
    assert frozen and not any(f"backbone.{n}" in state for n in frozen)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    saved = checkpoint.rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    checkpoint.atomic_torch_save({"rng": saved}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    random.random(), np.random.rand(), torch.rand(())
    checkpoint.set_rng_state(loaded)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_an_optimiser_state_saved_before_the_schedule_keys_resumes_on_its_schedule():
    from benchmarks.config import TrainConfig
    from benchmarks.protocol import apply_schedules, build_optimizer, restore_optimizer

    cfg = TrainConfig(iters=10, lr=1e-3, weight_decay=0.05)
    weights = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    saved = build_optimizer([{"params": [weights[0]]}, {"params": [weights[1]], "weight_decay": 0.0}],
                            cfg, torch.device("cpu")).state_dict()
    for group in saved["param_groups"]:  # as written before lr_mult and initial_weight_decay existed
        del group["lr_mult"], group["initial_weight_decay"]
    fresh = build_optimizer([{"params": [weights[0]], "lr_mult": 10.0}, {"params": [weights[1]]}], cfg,
                            torch.device("cpu"))
    restore_optimizer(fresh, saved)
    assert [g["lr_mult"] for g in fresh.param_groups] == [1.0, 1.0]  # the saved groups, not the fresh ones
    assert [g["initial_weight_decay"] for g in fresh.param_groups] == [0.05, 0.0]
    factor = apply_schedules(fresh, 5, cfg, None)
    assert factor == pytest.approx(0.5 ** 0.9)
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([1e-3 * factor] * 2)


def test_a_killed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.atomic_torch_save({"value": torch.tensor(1)}, path)

    def dies_halfway(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as a signal would, in the middle of the write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_torch_save({"value": torch.tensor(2)}, path)
    assert torch.load(path, weights_only=True)["value"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_stale_temporaries_are_cleared_and_mismatches_refused(tmp_path):
    result = tmp_path / "seed42-abc.json"
    folder = checkpoint.checkpoint_dir(result)
    folder.mkdir()
    (folder / ".last.pt.123.tmp").write_bytes(b"killed mid-write")
    assert checkpoint.find_checkpoint(result, "abc", 1) is None
    assert not list(folder.iterdir())
    checkpoint.atomic_torch_save({"format": checkpoint.FORMAT_VERSION, "config_hash": "abc", "world_size": 2},
                                 checkpoint.checkpoint_file(result))
    with pytest.raises(UserError, match="2 process"):
        checkpoint.find_checkpoint(result, "abc", 1)
    with pytest.raises(UserError, match="belongs to config"):
        checkpoint.find_checkpoint(result, "other", 2)


# -- resuming ---------------------------------------------------------------------------------------------
def _comparable(result: dict) -> dict:
    return {
        "history": result["history"],
        "targets": result["targets"],
        "params": result["params"],
        "batch": result["batch"],
    }


@pytest.mark.parametrize("killed_at,amp", [(2, "none"), (4, "none"), (2, "fp16")],
                         ids=["mid-training", "before-scoring", "fp16-mid-training"])
def test_interrupted_run_resumes_to_the_same_result(world, tmp_path, monkeypatch, killed_at, amp):
    """Interrupted right after a checkpoint (mid-training, or after the last iteration, before scoring),
    re-run: the result equals an uninterrupted run; in fp16 with the loss scale it had reached."""
    from benchmarks.runner import RunSpec, execute_run, experiment_for

    exp = _experiment(world, f"train.amp={amp}", "train.device=cpu")
    spec = RunSpec("G->CBM", "proxy_vit", "full", 42)
    reference = execute_run(spec, exp, tmp_path / "reference", progress=False)
    assert reference["status"] == "finished"

    real_save = checkpoint.save_checkpoint
    saved_at = []

    def save_then_die(result_path, **kwargs):
        real_save(result_path, **kwargs)
        saved_at.append(kwargs["train_state"].step)
        if saved_at[-1] == killed_at:
            raise KeyboardInterrupt  # not an Exception: the runner must not record it as a failure

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    results = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, exp, results, progress=False)
    path = spec.path(experiment_for(exp, spec), results)
    assert saved_at == [2, 4][: killed_at // 2] and not path.exists() and checkpoint.checkpoint_file(path).is_file()
    # The optimiser's state is kept while there are iterations left, and only then.
    saved = checkpoint.read_checkpoint(checkpoint.checkpoint_file(path))
    assert (saved["optimizer"] is None) == (killed_at == 4) and saved["model"]
    assert (saved["train_state"]["loss_scaler"] is None) == (amp != "fp16")

    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    resumed = execute_run(spec, exp, results, progress=False)
    assert resumed["resumed_from_iter"] == killed_at
    assert _comparable(resumed) == _comparable(reference)
    assert not checkpoint.checkpoint_dir(path).exists()  # deleted once the run finished


def test_a_run_resumed_by_other_code_says_so_and_records_which_code_trained_which_iterations(world, tmp_path,
                                                                                           monkeypatch, caplog):
    # Killed at iteration 2, resumed after a commit (or a package upgrade): the result named only the new code.
    from benchmarks import provenance
    from benchmarks.runner import RunSpec, execute_run

    exp = _experiment(world, "train.device=cpu")
    spec = RunSpec("G->CBM", "proxy_vit", "freeze", 42)
    real_save = checkpoint.save_checkpoint

    def save_then_die(result_path, **kwargs):
        real_save(result_path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(provenance, "git_state", lambda root: ("a" * 40, []))
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, exp, tmp_path, progress=False)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    monkeypatch.setattr(provenance, "git_state", lambda root: ("b" * 40, ["benchmarks/protocol.py"]))
    monkeypatch.setattr(provenance, "working_tree_sha256", lambda root: "d" * 64)
    with caplog.at_level("WARNING", logger="benchmarks.runner"):
        resumed = execute_run(spec, exp, tmp_path, progress=False)
    assert resumed["status"] == "finished" and resumed["resumed_from_iter"] == 2
    environment = resumed["environment"]
    assert environment["git_commit"] == "b" * 40 and environment["git_dirty_sha256"] == "d" * 64
    [earlier] = environment["earlier_code"]
    assert earlier["git_commit"] == "a" * 40 and earlier["git_dirty_sha256"] is None
    assert (earlier["from_iter"], earlier["until_iter"], environment["code_since_iter"]) == (0, 2, 2)
    assert earlier["packages"]["torch"] == torch.__version__.split("+")[0]
    assert "written by other code (git_commit, git_dirty_sha256 differ) at iterations 0-2" in caplog.text


def test_the_working_tree_digest_tells_two_edits_of_one_file_apart(tmp_path):
    from benchmarks.provenance import working_tree_sha256

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "protocol.py").write_text("lr = 1.0\n")
    (tmp_path / "load.log").write_text("07:39 0.86\n")
    git("add", "protocol.py", "load.log")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    assert working_tree_sha256(tmp_path) is None  # clean
    # A tracked log appended to beside a run is not code (a resumed run named its own code as other code).
    (tmp_path / "load.log").write_text("07:39 0.86\n07:40 2.10\n")
    assert working_tree_sha256(tmp_path) is None
    (tmp_path / "protocol.py").write_text("lr = 0.5\n")
    halved = working_tree_sha256(tmp_path)
    (tmp_path / "protocol.py").write_text("lr = 2.0\n")
    doubled = working_tree_sha256(tmp_path)
    assert halved and doubled and halved != doubled
    # No user's git configuration shapes it (a reviewer had four digests of one edit from four settings) ...
    for setting in ("diff.noprefix=true", "color.diff=always", "diff.mnemonicPrefix=true", "diff.algorithm=patience"):
        git("config", *setting.split("="))
        assert working_tree_sha256(tmp_path) == doubled, setting
    # ... and what a run writes into a results folder inside the checkout (results, locks) is not code.
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "seed42.json").write_text("{}")
    (tmp_path / "runs" / "seed42.lock").write_text("pid")
    assert working_tree_sha256(tmp_path) == doubled
    (tmp_path / "load.log").write_text("07:39 0.86\n07:40 2.10\n07:41 2.20\n")
    assert working_tree_sha256(tmp_path) == doubled
    (tmp_path / "protocol.py").write_text("lr = 1.0\n")
    (tmp_path / "method.py").write_text("an untracked method file")
    assert working_tree_sha256(tmp_path) not in (None, halved, doubled)

@pytest.mark.parametrize("passive", [True, False], ids=["work-arrived", "work-left"])
def test_a_run_that_restarts_for_its_wait_policy_resumes_to_the_same_result(world, tmp_path, monkeypatch, passive):
    """Work arriving on the cores of a process whose OpenMP threads spin, or leaving those of a passive one: the
    run saves its checkpoint, the command runs again with the other policy (here in this process, standing in
    for the new one) and the run resumes to the uninterrupted result, with nothing recorded as failed. The
    checkpoint falls between two log lines (iteration 3 of every 2nd), so the loss logged at 4 holds a loss
    from before the restart."""
    from benchmarks import cli, resources

    class ChangesAtTheThirdStep:
        asked = 0

        def restart_due(self) -> resources.RestartForWaitPolicy | None:
            self.asked += 1
            return resources.RestartForWaitPolicy(passive) if self.asked == 3 else None

    args = ["run", "--preset", "smoke", "--methods", "full", "--data-root", str(world), "--no-progress",
            "--set", "train.iters=4", "--set", "data.eval_limit=1"]
    monkeypatch.setattr(resources, "_wait_policy_watch", None)
    assert cli.main([*args, "--results-dir", str(tmp_path / "reference")]) == 0
    restarts = []

    def restart_here(argv, wanted):
        restarts.append((argv, wanted))
        monkeypatch.setattr(resources, "_wait_policy_watch", None)  # the new process's watch sees no change
        return cli.main(argv)

    monkeypatch.setattr(cli, "restart_with_wait_policy", restart_here)
    monkeypatch.setattr(resources, "_wait_policy_watch", ChangesAtTheThirdStep())
    argv = [*args, "--results-dir", str(tmp_path / "restarted")]
    assert cli.main(argv) == 0
    assert restarts == [(argv, passive)]
    (ref_file,) = (tmp_path / "reference").rglob("*.json")
    (res_file,) = (tmp_path / "restarted").rglob("*.json")
    ref, res = json.loads(ref_file.read_text()), json.loads(res_file.read_text())
    assert res["status"] == "finished" and res["resumed_from_iter"] == 3
    assert _comparable(res) == _comparable(ref)


@pytest.mark.parametrize("passive", [True, False], ids=["to-passive", "to-spinning"])
def test_the_restart_replaces_the_process_with_the_same_command_and_the_policy_wanted(monkeypatch, passive):
    from benchmarks import cli
    from benchmarks.resources import WAIT_POLICY_CHOSEN, WAIT_RESTARTS

    class Replaced(Exception):
        pass

    def execve(path, args, env):
        raise Replaced(path, args, env)

    monkeypatch.setattr(cli.os, "execve", execve)
    monkeypatch.setattr(cli, "child_pids", lambda: [])
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the harness's choice, so the restart may change it
    monkeypatch.setenv(WAIT_POLICY_CHOSEN, "1")
    monkeypatch.setenv(WAIT_RESTARTS, "2")
    with pytest.raises(Replaced) as replaced:
        cli.restart_with_wait_policy(["run", "--methods", "all"], passive=passive)
    path, args, env = replaced.value.args
    assert path == sys.executable and args == [sys.executable, "-m", "benchmarks", "run", "--methods", "all"]
    assert env[WAIT_RESTARTS] == "3" and env["OMP_NUM_THREADS"] == "2"
    policy = (env.get("OMP_WAIT_POLICY"), env.get(WAIT_POLICY_CHOSEN))
    assert policy == (("PASSIVE", "1") if passive else (None, None))


def test_children_still_running_at_the_restart_are_waited_for_then_stopped(caplog):
    from benchmarks import cli
    from benchmarks.resources import child_pids

    lingering = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ending = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])  # ends within the grace
    try:
        assert {str(lingering.pid), str(ending.pid)} <= set(child_pids())
        with caplog.at_level(logging.WARNING, logger="benchmarks"):
            cli.stop_children([ending.pid, lingering.pid], grace_s=3.0)
        stopped = [r.getMessage() for r in caplog.records if "stopping child process" in r.getMessage()]
        assert len(stopped) == 1 and str(lingering.pid) in stopped[0]  # the one that ended by itself was waited for
        assert {str(lingering.pid), str(ending.pid)}.isdisjoint(child_pids())  # ended and reaped: no zombie left
    finally:
        lingering.kill()


def test_diverged_run_is_failed_and_keeps_its_last_good_checkpoint(world, tmp_path):
    from benchmarks.results import read_result
    from benchmarks.runner import RunSpec, execute_run, experiment_for

    exp = _experiment(world, "train.lr=1e30", "train.iters=4", "train.checkpoint_interval=1", "train.log_interval=2")
    spec = RunSpec("G->CBM", "proxy_vit", "full", 42)
    result = execute_run(spec, exp, tmp_path, progress=False)
    path = spec.path(experiment_for(exp, spec), tmp_path)
    assert result["status"] == "failed" and "loss became" in result["failure"]
    assert read_result(path)["status"] == "failed"
    saved = checkpoint.read_checkpoint(checkpoint.checkpoint_file(path))
    # The check runs at logging intervals: the kept checkpoint predates the first non-finite mean.
    history = saved["train_state"]["history"]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert saved["train_state"]["step"] < int(result["failure"].split("iteration ")[1].split()[0])


def test_a_checkpoint_between_log_lines_is_not_kept_once_the_weights_diverged(world, tmp_path):
    from benchmarks.runner import RunSpec, execute_run, experiment_for

    # Log lines every 6 steps, checkpoints every step: the divergence shows at a checkpoint first.
    exp = _experiment(world, "train.lr=1e30", "train.iters=8", "train.checkpoint_interval=1", "train.log_interval=6")
    spec = RunSpec("G->CBM", "proxy_vit", "full", 42)
    result = execute_run(spec, exp, tmp_path, progress=False)
    assert result["status"] == "failed" and "non-finite by iteration" in result["failure"]
    failed_at = int(result["failure"].split("iteration ")[1].split()[0])
    assert failed_at < 6  # before the first log line
    saved = checkpoint.read_checkpoint(checkpoint.checkpoint_file(spec.path(experiment_for(exp, spec), tmp_path)))
    assert saved["train_state"]["step"] < failed_at
    assert math.isfinite(saved["train_state"]["unlogged_loss_sum"])
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(world, tmp_path):
    """A real `python -m benchmarks run` killed with SIGKILL mid-training, then the same command again."""
    # Enough steps after the first checkpoint that the random delay below ends inside training on a fast
    # machine too (with 8, an idle 2-core box reached the pre-evaluation checkpoint within 1.5 s).
    iters = 40
    args = ["--preset", "smoke", "--methods", "full", "--data-root", str(world), "--no-progress",
            "--set", f"train.iters={iters}", "--set", "train.checkpoint_interval=2", "--set", "data.eval_limit=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def command(results: Path) -> list[str]:
        return [sys.executable, "-m", "benchmarks", "run", *args, "--results-dir", str(results)]

    reference = subprocess.Popen(command(tmp_path / "reference"), cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim_dir = tmp_path / "victim"
    victim = subprocess.Popen(command(victim_dir), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list(victim_dir.rglob("last.pt")) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))  # somewhere in the steps after the first checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed; raise train.iters"
    assert not list(victim_dir.rglob("*.json"))  # no half-written (or any) result
    saved = checkpoint.read_checkpoint(next(victim_dir.rglob("last.pt")))  # a complete checkpoint
    assert saved["train_state"]["step"] in range(2, iters, 2)

    resumed = subprocess.run(command(victim_dir), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    (ref_file,) = (tmp_path / "reference").rglob("*.json")
    (res_file,) = victim_dir.rglob("*.json")
    ref, res = json.loads(ref_file.read_text()), json.loads(res_file.read_text())
    assert res["resumed_from_iter"] == saved["train_state"]["step"]
    assert _comparable(res) == _comparable(ref)
    assert not list(victim_dir.rglob("*.ckpt")) and not list(victim_dir.rglob("*.lock"))


def test_a_checkpoint_of_other_code_is_refused_in_one_line_not_resumed_with_fresh_values(tmp_path):
    from benchmarks.protocol import TrainState

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    path = tmp_path / "run.ckpt" / "last.pt"
    saved = checkpoint.trainable_state(model)
    for name in ("0.bias", "1.running_mean"):  # a parameter that trains, a buffer
        lacking = {k: v for k, v in saved.items() if k != name}
        with pytest.raises(UserError, match=f"1 missing entries, e.g. {name}") as err:
            checkpoint.load_trainable_state(model, lacking, path)
        assert f"delete {path.parent}" in str(err.value)
    checkpoint.load_trainable_state(model, saved, path)  # the whole state loads

    class NoMethodState:
        def load_state_dict(self, state):
            pass

    payload = {"model": saved, "method": {}, "rng": [checkpoint.rng_state()], "path": path,
               "train_state": {**TrainState().__dict__, "grad_scaler": {}}, "optimizer": None}
    with pytest.raises(UserError, match="training state of other code"):
        checkpoint.restore(payload, model, NoMethodState())


def test_a_checkpoint_of_bytes_no_pickle_holds_is_called_damaged_not_pickled_objects(tmp_path):
    damaged = tmp_path / "run" / "last.pt"
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match=r"last\.pt is unreadable \(not a PyTorch checkpoint") as err:
        checkpoint.read_checkpoint(damaged)
    assert "pickled" not in str(err.value) and f"delete {damaged.parent}" in str(err.value)


def test_a_checkpoint_holds_the_group_s_stray_label_count_and_rank_0_alone_resumes_it(world, monkeypatch):
    # Each rank counts its own stray label pixels and the result sums the ranks' counts. Only rank 0's state
    # was saved, and every rank resumed with it: rank 0's count was summed W times, the others' lost.
    from benchmarks import distributed
    from benchmarks.data import source_dataset
    from benchmarks.protocol import TrainHooks, train

    exp = _experiment(world)
    model, method = _model("freeze", world)
    other_ranks = 7
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda value, device: value + other_ranks)
    saved: list[int] = []
    final = train(model, method, source_dataset(exp, "gtav", world), exp, torch.device("cpu"),
                  hooks=TrainHooks(checkpoint=lambda state, optimizer: saved.append(state.stray_label_pixels)),
                  progress=False, num_workers=0)
    assert saved == [final.stray_label_pixels + other_ranks] * 2  # the group's count, at iterations 2 and 4
    assert final.stray_label_pixels == 0  # this process's own (the tiny world has no stray value)

    payload = {"model": checkpoint.trainable_state(model), "method": method.state_dict(), "path": world / "last.pt",
               "rng": [checkpoint.rng_state()] * 2, "optimizer": None,
               "train_state": {**asdict(final), "stray_label_pixels": saved[-1]}}
    assert [checkpoint.restore(payload, model, method, rank)[0].stray_label_pixels for rank in (0, 1)] == [saved[-1], 0]
