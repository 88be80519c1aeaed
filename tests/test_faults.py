"""Faults a long run must survive without losing work (issue 18): checkpoints by default, the data
checked before the first step, stray label values, a full disk, a corrupt file read in a loader worker."""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import checkpoint
from benchmarks.errors import UserError
from benchmarks.protocol import CheckpointCadence


def _experiment(root: Path, *extra: str):
    from benchmarks.config import load_experiment

    return load_experiment("smoke", [f"data.root={str(root)!r}", "train.iters=4", "data.eval_limit=1", *extra])


def _spec():
    from benchmarks.runner import RunSpec

    return RunSpec("G->CBM", "proxy_vit", "full", 42)


def _comparable(result: dict) -> dict:
    return {"targets": result["targets"], "average": result["average_miou"], "history": result["history"]}


@pytest.fixture
def world_copy(tiny_world, tmp_path) -> Path:
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    return root


# -- checkpoints by default ----------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["smoke", "proxy", "paper"])
def test_every_preset_checkpoints_by_training_time(preset):
    from benchmarks.config import load_experiment

    assert load_experiment(preset).train.checkpoint_interval == -1


def test_cadence_first_save_after_the_auto_period_then_spaced_by_the_save_cost():
    cadence = CheckpointCadence(-1, start_step=0)
    step_seconds = 1.0
    due = [step for step in range(1, 2000) if cadence.due(step, step * step_seconds)]
    assert due[0] == 300  # 10 probe steps of 1 s, then the rest of the 300 s
    cadence.saved(300, 300.0, duration=10.0)  # a slow save: the next waits 100× its duration
    assert cadence.next_step == 300 + 1000
    assert not cadence.due(1299, 1299.0) and cadence.due(1300, 1300.0)


def test_cadence_final_save_only_when_worth_it():
    cadence = CheckpointCadence(-1, start_step=0)
    assert not cadence.final_due(30, 30.0)  # 30 s of training are cheaper to redo than to save
    assert cadence.final_due(120, 120.0)
    cadence.saved(120, 120.0, duration=0.1)
    assert not cadence.final_due(120, 120.0)  # just saved at this step


def test_cadence_fixed_interval_and_never():
    every_two, never = CheckpointCadence(2, start_step=0), CheckpointCadence(0, start_step=0)
    assert [s for s in range(1, 9) if every_two.due(s, 1e6)] == [2, 4, 6, 8]
    assert not any(never.due(s, 1e6) for s in range(1, 9))
    assert not every_two.final_due(9, 1e6) and not never.final_due(9, 1e6)


def test_cadence_follows_rank_zeros_measurements():
    """Under torchrun every rank must save at the same iterations: rank 0 decides them. The ranks' clocks
    start apart (each at its own arrival in training); sharing only the step time left each rank its own
    seconds to wait, and two ranks chose iterations 1000 and 999 (a collective mismatch in the save)."""
    said: list = []  # what rank 0 broadcast, in order; rank 1 receives the same call's value

    def rank0_share(value):
        said.append(value)
        return value

    received = iter(said)
    rank0 = CheckpointCadence(-1, start_step=0, share=rank0_share)
    rank1 = CheckpointCadence(-1, start_step=0, share=lambda value: next(received))
    step_seconds, late = 0.3, 0.5  # rank 1's clock started half a second after rank 0's
    for step in range(1, 1100):
        due0 = rank0.due(step, step * step_seconds)
        assert rank1.due(step, step * step_seconds - late) == due0, step
    assert rank0.next_step == rank1.next_step == 1000
    rank0.saved(1000, 300.0, duration=1.0)
    rank1.saved(1000, 299.5, duration=4.0)  # a slower save here: rank 0's duration and its next step count
    assert rank1.save_duration == 1.0 and rank0.next_step == rank1.next_step


@pytest.fixture
def quick_cadence(monkeypatch):
    """The default cadence with its periods shrunk to a smoke run's seconds (the logic is the default's)."""
    monkeypatch.setattr(CheckpointCadence, "AUTO_SECONDS", 0.0)
    monkeypatch.setattr(CheckpointCadence, "FINAL_SECONDS", 0.0)
    monkeypatch.setattr(CheckpointCadence, "PROBE_STEPS", 1)
    monkeypatch.setattr(CheckpointCadence, "OVERHEAD_BUDGET", float("inf"))


def test_default_run_killed_in_evaluation_resumes_into_evaluation(tiny_world, tmp_path, monkeypatch, quick_cadence):
    from benchmarks import protocol
    from benchmarks.runner import execute_run, experiment_for

    exp = _experiment(tiny_world)
    assert exp.train.checkpoint_interval == -1
    reference = execute_run(_spec(), exp, tmp_path / "reference", progress=False)

    real_evaluate = protocol.evaluate

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(protocol, "evaluate", killed)
    results = tmp_path / "victim"
    with pytest.raises(KeyboardInterrupt):
        execute_run(_spec(), exp, results, progress=False)
    path = _spec().path(experiment_for(exp, _spec()), results)
    assert checkpoint.read_checkpoint(checkpoint.checkpoint_file(path))["train_state"]["step"] == 4

    monkeypatch.setattr(protocol, "evaluate", real_evaluate)
    steps = []
    monkeypatch.setattr(protocol, "poly_lr_factor", lambda step, cfg: steps.append(step) or 1.0)
    resumed = execute_run(_spec(), exp, results, progress=False)
    assert resumed["resumed_from_iter"] == 4 and steps == []  # no training step ran again
    assert _comparable(resumed) == _comparable(reference)


def test_default_run_killed_mid_training_resumes_to_the_same_result(tiny_world, tmp_path, monkeypatch, quick_cadence):
    from benchmarks.runner import execute_run

    exp = _experiment(tiny_world)
    reference = execute_run(_spec(), exp, tmp_path / "reference", progress=False)
    real_save = checkpoint.save_checkpoint

    def save_then_die(result_path, **kwargs):
        real_save(result_path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        execute_run(_spec(), exp, tmp_path / "victim", progress=False)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    resumed = execute_run(_spec(), exp, tmp_path / "victim", progress=False)
    assert resumed["resumed_from_iter"] == 2  # the first automatic save: the step after the one probe step
    assert _comparable(resumed) == _comparable(reference)


# -- the data checked before the first step --------------------------------------------------------
def _no_training(monkeypatch):
    from benchmarks import protocol

    def train(*args, **kwargs):
        raise AssertionError("training started before the data was checked")

    monkeypatch.setattr(protocol, "train", train)


def test_a_corrupt_target_label_fails_the_run_before_training(world_copy, tmp_path, monkeypatch):
    from benchmarks.runner import execute_run

    label = sorted((world_copy / "cityscapes" / "gtFine" / "val").rglob("*_labelIds.png"))[0]
    label.write_bytes(b"not a png")
    _no_training(monkeypatch)
    with pytest.raises(UserError, match=r"preflight of cityscapes: .*labelIds.png"):
        execute_run(_spec(), _experiment(world_copy), tmp_path / "runs", progress=False)


def test_an_unreadable_source_image_fails_the_run_before_training(world_copy, tmp_path, monkeypatch):
    from benchmarks.runner import execute_run

    image = sorted((world_copy / "gta" / "images").glob("*.png"))[2]
    image.write_bytes(b"\x89PNG but no more")
    _no_training(monkeypatch)
    with pytest.raises(UserError, match=r"preflight of gtav \(train\)"):
        execute_run(_spec(), _experiment(world_copy), tmp_path / "runs", progress=False)


def test_a_stray_label_value_is_ignored_counted_and_still_refused_by_data_check(world_copy, tmp_path, caplog):
    from benchmarks.runner import execute_run
    from datasets.cityscapes import Cityscapes

    label = sorted((world_copy / "cityscapes" / "gtFine" / "val").rglob("*_labelIds.png"))[0]
    raw = np.asarray(Image.open(label)).copy()
    raw[:3, :5] = 250  # not a Cityscapes id
    Image.fromarray(raw).save(label)

    result = execute_run(_spec(), _experiment(world_copy), tmp_path / "runs", progress=False)
    assert result["status"] == "finished"
    assert result["stray_label_pixels"]["cityscapes"] == 15
    assert "outside the expected encoding" in caplog.text and label.name in caplog.text
    problems = Cityscapes(world_copy, "val").check(full=True)
    assert any(label.name in problem and "outside the expected encoding" in problem for problem in problems)


# -- a full disk -----------------------------------------------------------------------------------
def test_full_disk_at_the_result_keeps_the_trained_state(tiny_world, tmp_path, monkeypatch, quick_cadence):
    from benchmarks.runner import execute_run, experiment_for

    real_fsync = os.fsync

    def full_for_results(fd):
        if ".json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_results)
    exp = _experiment(tiny_world)
    results = tmp_path / "runs"
    with pytest.raises(UserError, match=r"^no space left on /.* writing .*\.json \(needs ~.* MB.*resumes from the checkpoint"):
        execute_run(_spec(), exp, results, progress=False)
    path = _spec().path(experiment_for(exp, _spec()), results)
    assert not path.exists() and not list(results.rglob("*.tmp"))
    assert checkpoint.checkpoint_file(path).is_file()

    monkeypatch.setattr(os, "fsync", real_fsync)
    assert execute_run(_spec(), exp, results, progress=False)["resumed_from_iter"] == 4


def test_full_disk_at_a_checkpoint_is_one_line(tiny_world, tmp_path, monkeypatch):
    from benchmarks import storage
    from benchmarks.runner import execute_run

    def zip_writer_fails(obj, handle):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4376")

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    exp = _experiment(tiny_world, "train.checkpoint_interval=2")
    with pytest.raises(UserError, match=r"^no space left on .* writing the checkpoint .*last\.pt \(needs ~"):
        execute_run(_spec(), exp, tmp_path / "runs", progress=False)

    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    failed = execute_run(_spec(), exp, tmp_path / "runs", progress=False)  # with room on the disk: not disguised
    assert failed["status"] == "failed" and "enforce fail" in failed["failure"]


# -- a corrupt file read in a loader worker --------------------------------------------------------
def test_a_corrupt_image_in_a_loader_worker_is_one_line_naming_it(world_copy, tmp_path):
    from benchmarks.cli import main

    image = sorted((world_copy / "gta" / "images").glob("*.png"))[1]
    image.write_bytes(image.read_bytes()[:120])  # the header survives, the pixels do not
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["run", "--preset", "smoke", "--methods", "freeze", "--data-root", str(world_copy), "--no-progress",
                     "--results-dir", str(tmp_path / "runs"), "--num-workers", "1", "--set", "train.iters=8",
                     "--set", "data.preflight=off"])
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stderr.getvalue()
    assert len(errors) == 1 and errors[0].startswith(f"error: {image}: cannot decode the image"), stderr.getvalue()[-2000:]
