"""Bad files and folders (issue 18, items 10, 11, 14, 15): one line, exit 2, before any work; nothing lost.

- a run lock that names no live owner (empty after a full disk, garbage) is stale and taken over;
- `pretrain` never overwrites an existing checkpoint unless asked, and refuses out-of-range options;
- output paths that are files where folders belong (or the reverse), or not writable, are refused up front;
- `data check` finds dataset folders that are broken symbolic links, and colour labels in every header
  it reads.

Commands run in this process through `benchmarks.cli.main`; rendering, training and the synthetic world's
generation are replaced by stand-ins that fail the test if they start (the checks must come first).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.errors import UserError
from benchmarks.locking import RunLock, lock_path
from tests.cli_helpers import error_line as _error_line
from tests.cli_helpers import run_cli as _cli


def _age(path: Path, seconds: float = 3600.0) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


# -- item 10: a lock naming no live owner -------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b'{"pid": 12', b"\x00\xff\xfe", b"[1, 2]", b'{"since": 0}',
                                     b'{"pid": "12", "host": "x"}'],
                         ids=["empty", "truncated", "binary", "not-an-object", "no-pid", "pid-not-a-number"])
def test_lock_naming_no_owner_is_stale_and_taken_over_with_a_warning(tmp_path, caplog, content):
    result = tmp_path / "run.json"
    lock_path(result).write_bytes(content)
    _age(lock_path(result))
    lock = RunLock(result)
    with caplog.at_level(logging.WARNING, logger="benchmarks.launchers"):
        assert lock.acquire()
    owner = json.loads(lock_path(result).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stale lock" in m and str(lock_path(result)) in m for m in warnings), warnings
    assert not list(tmp_path.glob("*.stale-*"))
    lock.release()
    assert not lock_path(result).exists()


def test_empty_lock_seconds_old_is_left_to_the_runner_writing_it(tmp_path):
    """Between creating its lock and writing its owner into it a live runner's lock is empty."""
    result = tmp_path / "run.json"
    lock_path(result).write_bytes(b"")
    assert not RunLock(result).acquire()
    assert lock_path(result).read_bytes() == b""


def test_lock_whose_owner_cannot_be_written_is_removed(tmp_path, monkeypatch):
    """A full disk fails the owner's write: the empty lock goes with one line instead of blocking the run."""
    import benchmarks.locking as locking

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locking.json, "dump", full_disk)
    result = tmp_path / "run.json"
    with pytest.raises(UserError, match="No space left on device") as caught:
        RunLock(result).acquire()
    assert "\n" not in str(caught.value) and str(lock_path(result)) in str(caught.value)
    assert not lock_path(result).exists()


def test_run_whose_lock_was_left_empty_by_a_full_disk_is_run(tiny_world, tmp_path, caplog):
    from benchmarks.config import load_experiment
    from benchmarks.runner import RunSpec, experiment_for, run_matrix

    results = tmp_path / "results"
    exp = load_experiment("smoke", [f"data.root={str(tiny_world)!r}", f"run.results_dir={str(results)!r}",
                                    "train.iters=1", "data.eval_limit=1"])
    spec = RunSpec("G->CBM", "proxy_vit", "freeze", 42)
    path = spec.path(experiment_for(exp, spec), results)
    path.parent.mkdir(parents=True)
    lock_path(path).write_bytes(b"")
    _age(lock_path(path))
    with caplog.at_level(logging.INFO, logger="benchmarks"):
        found = run_matrix(exp, "freeze", progress=False)
    assert [(r["method"]["name"], r["status"]) for r in found] == [("freeze", "finished")]
    assert path.exists() and not lock_path(path).exists()
    assert any("stale lock" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# -- item 11: pretrain over an existing checkpoint, and its options' ranges ----------------------------
@pytest.fixture
def pretraining_calls(monkeypatch) -> list:
    """Records what `pretrain` would train instead of rendering and training (minutes)."""
    import benchmarks.pretrain as pretrain

    calls: list = []

    def record(stages, out, device="cpu", first_stage=1, finished=None):
        keep_finished = finished is None or bool(finished)  # whether what an earlier run finished is kept
        calls.append((stages, Path(out), first_stage, keep_finished))
        return {"recorded": True}

    monkeypatch.setattr(pretrain, "finished_stages", lambda stages, out, first_stage=1: [])  # tested in test_pretrain

    monkeypatch.setattr(pretrain, "pretrain_recipe", record)
    monkeypatch.setattr(pretrain, "render_pool", lambda cfg: pytest.fail("rendering started"))
    return calls


def test_pretrain_with_default_out_refuses_to_overwrite_the_shipped_checkpoint(tmp_path, monkeypatch, capsys,
                                                                               pretraining_calls):
    monkeypatch.chdir(tmp_path)  # the default --out is relative: this checkout's shipped file is out of reach
    shipped = Path("benchmarks/weights/proxy_vit.safetensors")
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"the shipped weights")
    code, out, err = _cli(["pretrain"], capsys)
    line = _error_line(err)
    assert code == 2
    assert str(shipped) in line and "--overwrite" in line, line
    assert shipped.read_bytes() == b"the shipped weights"
    assert pretraining_calls == [] and out == ""


@pytest.mark.parametrize("existing", ["x.safetensors", "x.json", "x-stage1.safetensors", "x-stage1.json"])
def test_pretrain_refuses_to_overwrite_any_file_of_the_recipe(tmp_path, capsys, pretraining_calls, existing):
    (tmp_path / existing).write_text("earlier")
    code, _, err = _cli(["pretrain", "--out", str(tmp_path / "x.safetensors")], capsys)
    line = _error_line(err)
    assert code == 2 and str(tmp_path / existing) in line and "--overwrite" in line, line
    assert (tmp_path / existing).read_text() == "earlier"
    assert pretraining_calls == []


def test_pretrain_goes_on_after_the_stages_an_earlier_run_of_the_recipe_finished(tmp_path, capsys, monkeypatch,
                                                                                pretraining_calls):
    import benchmarks.pretrain as pretrain

    out = tmp_path / "x.safetensors"
    for name in ("x-stage1.safetensors", "x-stage1.json", "x-stage2.safetensors", "x-stage2.json", "x.resume.pt"):
        (tmp_path / name).write_text("earlier")
    monkeypatch.setattr(pretrain, "finished_stages",
                        lambda stages, out, first_stage=1: [{"stage": 1}, {"stage": 2}])
    code, _, err = _cli(["pretrain", "--out", str(out)], capsys)
    assert code == 0, err
    [(_, written, _, keep_finished)] = pretraining_calls
    assert written == out and keep_finished
    # a file of a stage after them is not this recipe's: refused, as any other
    (tmp_path / "x-stage3.json").write_text("earlier")
    code, _, err = _cli(["pretrain", "--out", str(out)], capsys)
    line = _error_line(err)
    assert code == 2 and str(tmp_path / "x-stage3.json") in line and "--overwrite" in line, line
    assert len(pretraining_calls) == 1


def test_pretrain_overwrites_when_asked(tmp_path, capsys, pretraining_calls):
    out = tmp_path / "x.safetensors"
    out.write_text("earlier")
    code, _, err = _cli(["pretrain", "--out", str(out), "--overwrite", "--steps", "1"], capsys)
    assert code == 0, err
    from benchmarks.pretrain import PROXY_RECIPE

    assert [(call[1], [stage.steps for stage in call[0]]) for call in pretraining_calls] == [(out, [1] * len(PROXY_RECIPE))]
    assert pretraining_calls[0][3] is False  # asked to replace: nothing an earlier run finished is kept


def _tiny_checkpoint(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(path))


def test_pretrain_init_that_is_no_checkpoint_is_one_line_before_rendering(tmp_path, capsys, pretraining_calls):
    start = tmp_path / "notes.pt"
    start.write_text("some text, not weights\n")
    code, _, err = _cli(["pretrain", "--stage", "2", "--init", str(start), "--out", str(tmp_path / "x.safetensors")],
                        capsys)
    assert code == 2 and str(start) in _error_line(err) and pretraining_calls == []


def test_the_pretrain_bound_on_target_layers_is_the_proxy_depth():
    from benchmarks.backbones import BACKBONES
    from benchmarks.commands.pretrain import PROXY_DEPTH

    assert PROXY_DEPTH == BACKBONES["proxy_vit"].depth


def test_pretrain_seeds_stay_below_2_to_the_32_where_numpy_would_split_them_into_a_worlds_seed_list(
        tmp_path, capsys, pretraining_calls):
    # From `--seed 330` on, a scene's seed passed 2**32, and numpy's [lo, 1] stream equalled the world pair
    # [lo, 1, 1, 0] of `data synth --seed lo` (a seed that command accepts).
    import numpy as np

    from benchmarks.commands.pretrain import MAX_SEED, SCENES_PER_SEED
    from benchmarks.pretrain import SCENES_PER_SEED as STRIDE
    from benchmarks.pretrain import scene_seed
    from datasets.synthetic import PRETRAINING_SEEDS_FROM

    assert SCENES_PER_SEED == STRIDE
    assert PRETRAINING_SEEDS_FROM <= scene_seed(0, 0) and scene_seed(MAX_SEED, SCENES_PER_SEED - 1) < 2**32
    assert scene_seed(MAX_SEED + 1, SCENES_PER_SEED - 1) >= 2**32  # the largest bound that keeps them apart
    lo = scene_seed(330, 0) % 2**32
    assert np.array_equal(np.random.default_rng([scene_seed(330, 0), 1]).random(2),
                          np.random.default_rng([lo, 1, 1, 0]).random(2))  # what the bound prevents
    for option, value in (("--seed", MAX_SEED + 1), ("--scenes", SCENES_PER_SEED + 1)):
        code, _, err = _cli(["pretrain", option, str(value), "--out", str(tmp_path / "x.safetensors")], capsys)
        line = _error_line(err)
        assert code == 2 and option in line and "must be at most" in line, line
    assert pretraining_calls == [] and not list(tmp_path.iterdir())


def test_pretrain_init_named_like_a_stage_reference_is_the_file(tmp_path, capsys, monkeypatch, pretraining_calls):
    # "stage8" in the recipe names stage 8's output; a user's file of that name is a file
    monkeypatch.chdir(tmp_path)
    _tiny_checkpoint(tmp_path / "stage9")
    code, _, err = _cli(["pretrain", "--stage", "10", "--init", "stage9", "--out", str(tmp_path / "x.safetensors")],
                        capsys)
    assert code == 0, err
    [(stages, _, _, _)] = pretraining_calls
    assert [stage.init for stage in stages] == ["./stage9"]


def test_pretrain_runs_one_stage_from_the_checkpoint_given(tmp_path, capsys, pretraining_calls):
    start = tmp_path / "start.safetensors"
    _tiny_checkpoint(start)
    out = tmp_path / "x.safetensors"
    code, _, err = _cli(["pretrain", "--stage", "2", "--init", str(start), "--out", str(out), "--steps", "3"], capsys)
    assert code == 0, err
    [(stages, written, first_stage, _)] = pretraining_calls
    assert (written, first_stage) == (out, 2)
    assert [(stage.init, stage.steps) for stage in stages] == [(str(start), 3)]


def test_pretrain_amp_reaches_the_stage_and_an_unknown_precision_is_refused(tmp_path, capsys, pretraining_calls):
    start = tmp_path / "start.safetensors"
    _tiny_checkpoint(start)
    base = ["pretrain", "--stage", "2", "--init", str(start), "--out", str(tmp_path / "x.safetensors")]
    code, _, err = _cli([*base, "--amp", "bf16"], capsys)
    assert code == 0, err
    assert [stage.amp for stage in pretraining_calls[0][0]] == ["bf16"]
    code, _, err = _cli(base, capsys)
    assert code == 0 and [stage.amp for stage in pretraining_calls[1][0]] == ["none"]  # as every shipped stage
    with pytest.raises(SystemExit) as refused:  # argparse's own usage error
        _cli([*base, "--amp", "fp16"], capsys)
    assert refused.value.code == 2 and "--amp" in capsys.readouterr().err and len(pretraining_calls) == 2


def test_pretrain_one_stage_past_the_recipe_is_another_round_of_its_last(tmp_path, capsys, pretraining_calls):
    from benchmarks.pretrain import PROXY_RECIPE

    start = tmp_path / "shipped.safetensors"
    _tiny_checkpoint(start)
    after = str(len(PROXY_RECIPE) + 1)
    code, _, err = _cli(["pretrain", "--stage", after, "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "--init" in _error_line(err) and pretraining_calls == []
    code, _, err = _cli(["pretrain", "--stage", after, "--init", str(start), "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 0, err
    [([stage], _, first_stage, _)] = pretraining_calls
    assert first_stage == len(PROXY_RECIPE) + 1 and stage.init == str(start)
    assert stage.seed not in {s.seed for s in PROXY_RECIPE}  # new scenes
    assert dataclasses.replace(stage, seed=PROXY_RECIPE[-1].seed, init=PROXY_RECIPE[-1].init) == PROXY_RECIPE[-1]


def test_pretrain_beside_another_recipes_interrupted_round_is_one_line_and_keeps_it(tmp_path, capsys, monkeypatch):
    import torch

    import benchmarks.pretrain as pretrain

    monkeypatch.setattr(pretrain, "render_pool", lambda cfg: pytest.fail("rendering started"))
    out = tmp_path / "round.safetensors"
    state = pretrain.round_state_path(out)
    recipe = pretrain._recipe_identity(pretrain.PROXY_RECIPE[0])
    torch.save({"format": pretrain.ROUND_STATE_FORMAT, "recipe": recipe, "init_sha256": None}, state)
    written = state.read_bytes()
    code, _, err = _cli(["pretrain", "--stage", "1", "--out", str(out), "--steps", "7"], capsys)
    line = _error_line(err)
    assert code == 2 and str(state) in line and "differs in steps" in line, line
    assert state.read_bytes() == written and not out.exists()


def test_pretrain_out_that_is_a_folder_is_refused(tmp_path, capsys, pretraining_calls):
    code, _, err = _cli(["pretrain", "--out", str(tmp_path)], capsys)
    line = _error_line(err)
    assert code == 2 and str(tmp_path) in line and "folder" in line, line
    assert pretraining_calls == []


def _numeric_options() -> list[str]:
    from benchmarks.pretrain import PretrainConfig

    numeric = [f.name for f in dataclasses.fields(PretrainConfig) if f.type in ("int", "float")]
    return [f"--{name.replace('_', '-')}" for name in numeric]


def test_every_numeric_pretrain_option_is_covered():
    """Guards the test below: an option added later is checked too."""
    assert {"--steps", "--warmup-steps", "--batch-size", "--views", "--lr"} <= set(_numeric_options())


@pytest.mark.parametrize("option", _numeric_options())
def test_pretrain_option_below_its_range_is_one_line(tmp_path, capsys, pretraining_calls, option):
    code, _, err = _cli(["pretrain", "--out", str(tmp_path / "new.safetensors"), option, "-1"], capsys)
    line = _error_line(err)
    assert code == 2 and option in line and "-1" in line, line
    assert pretraining_calls == []


def _float_options() -> list[str]:
    from benchmarks.pretrain import PretrainConfig

    return [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(PretrainConfig) if f.type == "float"]


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("option", _float_options())
def test_pretrain_option_that_is_not_finite_is_one_line(tmp_path, capsys, pretraining_calls, option, value):
    # NaN passed every bound; --lr inf trained a checkpoint of NaN weights and exited 0
    code, _, err = _cli(["pretrain", "--out", str(tmp_path / "new.safetensors"), option, value], capsys)
    line = _error_line(err)
    assert code == 2 and option in line and "finite" in line, line
    assert pretraining_calls == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("option,value,expected", [
    ("--steps", "0", "at least 1"),
    ("--warmup-steps", "0", "at least 1"),
    ("--batch-size", "0", "at least 1"),
    ("--scenes", "0", "at least 1"),
    ("--views", "0", "at least 1"),
    ("--workers", "0", "at least 1"),
    ("--mask-ratio", "0", "above 0"),
    ("--mask-ratio", "1.5", "at most 1"),
    ("--zoom", "0", "above 0"),
    ("--crop-size", "36", "multiple of 8"),
    ("--scene-height", "100", "128"),
    ("--head-warmup-steps", "3000", "below --steps"),  # every stage of the recipe runs fewer steps than that
    ("--target-layers", "7", "at most 6"),  # the proxy has 6 blocks: 7 averaged them all and recorded 7
])
def test_pretrain_option_out_of_range_is_one_line(tmp_path, capsys, pretraining_calls, option, value,
                                                  expected):
    code, _, err = _cli(["pretrain", "--out", str(tmp_path / "new.safetensors"), option, value], capsys)
    line = _error_line(err)
    assert code == 2 and option in line and value in line and expected in line, line
    assert pretraining_calls == [] and not list(tmp_path.iterdir())


# -- item 14: output paths ----------------------------------------------------------------------------
@pytest.fixture
def no_training(monkeypatch) -> None:
    import benchmarks.protocol as protocol

    monkeypatch.setattr(protocol, "train", lambda *args, **kwargs: pytest.fail("training started"))


def _run_args(world: Path, results: Path) -> list[str]:
    return ["run", "--preset", "smoke", "--methods", "freeze", "--data-root", str(world), "--results-dir",
            str(results), "--no-progress", "--set", "train.iters=1"]


@pytest.mark.parametrize("below", [False, True], ids=["the-file", "a-folder-below-it"])
def test_run_results_dir_that_is_a_file_is_one_line(tiny_world, tmp_path, capsys, no_training, below):
    notes = tmp_path / "notes"
    notes.write_text("my notes\n")
    results = notes / "results" if below else notes
    code, _, err = _cli(_run_args(tiny_world, results), capsys)
    line = _error_line(err)
    assert code == 2 and str(notes) in line and "is a file" in line and "--results-dir" in line, line
    assert notes.read_text() == "my notes\n" and sorted(tmp_path.iterdir()) == [notes]


def test_run_results_dir_read_only_is_one_line(tiny_world, tmp_path, capsys, no_training):
    results = tmp_path / "results"
    results.mkdir()
    (results / "earlier.json").write_text("{}")
    results.chmod(0o555)
    try:
        if os.access(results, os.W_OK):
            # Root writes through any mode: run the command as a root without that power (CI runs as root).
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv (util-linux): cannot drop the write-anywhere capability")
            proc = subprocess.run(
                ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "benchmarks",
                 *_run_args(tiny_world, results)],
                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                capture_output=True, text=True, timeout=600,
            )
            code, err = proc.returncode, proc.stderr
        else:
            code, _, err = _cli(_run_args(tiny_world, results), capsys)
        line = _error_line(err)
        assert code == 2 and str(results) in line and "not writable" in line, line
        assert sorted(p.name for p in results.iterdir()) == ["earlier.json"]
    finally:
        results.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder no file can be created in")
def test_report_into_a_folder_whose_mode_allows_writing_but_refuses_it_is_one_line(runs_dir, capsys):
    """/proc passes access(W_OK) as root; creating a file there fails all the same (so does a read-only bind
    mount or root-squashed NFS): refused before any figure is drawn."""
    code, _, err = _cli(["report", "--runs", str(runs_dir), "--out", "/proc/dgss-report"], capsys)
    line = _error_line(err)
    assert code == 2 and "--out /proc/dgss-report" in line and "not writable" in line, line
    assert not Path("/proc/dgss-report").exists()


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    from benchmarks.results import write_result
    from tests.test_reports import cbm, make_result

    folder = tmp_path / "runs"
    write_result(folder / "freeze.json", make_result("freeze", 1, cbm(30.0, 25.0, 22.0), curves=True))
    write_result(folder / "full.json", make_result("full", 1, cbm(50.0, 20.0, 30.0), curves=True))
    return folder


def test_table_output_that_is_a_folder_is_one_line(runs_dir, tmp_path, capsys):
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "earlier.md").write_text("earlier")
    code, out, err = _cli(["table", "--runs", str(runs_dir), "--output", str(folder)], capsys)
    line = _error_line(err)
    assert code == 2 and str(folder) in line and "is a folder" in line and "--output" in line, line
    assert out == "" and [p.name for p in folder.iterdir()] == ["earlier.md"]


def test_report_out_that_is_a_file_is_one_line(runs_dir, tmp_path, capsys):
    page = tmp_path / "report.html"
    page.write_text("an earlier report")
    code, out, err = _cli(["report", "--runs", str(runs_dir), "--out", str(page)], capsys)
    line = _error_line(err)
    assert code == 2 and str(page) in line and "is a file" in line and "--out" in line, line
    assert page.read_text() == "an earlier report" and out == ""


@pytest.fixture
def no_generation(monkeypatch) -> None:
    import datasets.synthetic as synthetic

    def fail(*args, **kwargs):
        pytest.fail("generation started")

    monkeypatch.setattr(synthetic, "generate_world", fail)


def test_data_synth_out_that_is_a_file_is_one_line(tmp_path, capsys, no_generation):
    target = tmp_path / "world"
    target.write_text("not a folder")
    code, _, err = _cli(["data", "synth", "--out", str(target)], capsys)
    line = _error_line(err)
    assert code == 2 and str(target) in line and "is a file" in line and "--out" in line, line
    assert target.read_text() == "not a folder"


def test_data_synth_preview_that_is_a_folder_is_one_line(tmp_path, capsys, no_generation):
    argv = ["data", "synth", "--out", str(tmp_path / "world"), "--preview", str(tmp_path)]
    code, _, err = _cli(argv, capsys)
    line = _error_line(err)
    assert code == 2 and str(tmp_path) in line and "is a folder" in line and "--preview" in line, line
    assert not (tmp_path / "world").exists()


# -- item 15: broken links and colour labels under a data root ----------------------------------------
@pytest.fixture
def world_copy(tiny_world, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_world, root, symlinks=True)
    return root


def _dangling(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(path.parent / "gone")


def _looping(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(path.name)  # relative to its own folder: itself


@pytest.mark.parametrize("inside", ["mapillary", "bdd100k", "gta/labels", "cityscapes/leftImg8bit",
                                    "cityscapes/gtFine/val/frankfurt", "bdd100k/images/10k/val",
                                    "mapillary/validation/v1.2/labels"])
@pytest.mark.parametrize("breaking", [_dangling, _looping], ids=["dangling", "loop"])
def test_data_check_names_a_broken_link_to_a_dataset_folder(world_copy, capsys, inside, breaking):
    link = world_copy / inside
    breaking(link)
    code, out, err = _cli(["data", "check", "--root", str(world_copy)], capsys)
    line = _error_line(err)
    assert code == 2 and str(link) in line and "symbolic link" in line, line


def test_data_check_names_a_broken_link_to_an_image(world_copy, capsys):
    image = next(iter(sorted((world_copy / "bdd100k/images/10k/val").iterdir())))
    _dangling(image)
    code, out, err = _cli(["data", "check", "--root", str(world_copy)], capsys)
    line = _error_line(err)
    assert code == 2 and str(image) in line and "symbolic link" in line, line


def _rgb_label_like(label: Path) -> None:
    width, height = Image.open(label).size
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(label)


def test_data_check_reports_an_rgb_label_outside_its_sample(world_copy, capsys):
    """20 GTAV pairs: 8 evenly spaced ones are decoded (0, 2, 5, ...), every other header is read."""
    images, labels = world_copy / "gta/images", world_copy / "gta/labels"
    for number in range(len(list(images.iterdir())) + 1, 21):
        shutil.copy(images / "00001.png", images / f"{number:05d}.png")
        shutil.copy(labels / "00001.png", labels / f"{number:05d}.png")
    _rgb_label_like(labels / "00002.png")
    code, out, err = _cli(["data", "check", "--root", str(world_copy)], capsys)
    line = _error_line(err)
    assert code == 2 and str(labels / "00002.png") in line and "mode RGB" in line, line


def test_check_reads_label_headers_for_every_pair_not_only_the_sampled(world_copy):
    from datasets.registry import get_adapter

    adapter = get_adapter("cityscapes")(world_copy, "val")
    last = adapter.pairs()[-1].label  # with one sample only the first pair is decoded
    _rgb_label_like(last)
    problems = adapter.check(sample=1)
    assert len(problems) == 1 and str(last) in problems[0] and "mode RGB" in problems[0], problems


def test_synthia_labels_with_three_channels_are_its_encoding_not_a_problem(tmp_path):
    """SYNTHIA ships 16-bit multi-channel labels (class in the first channel): their header is fine."""
    from datasets.registry import get_adapter
    from tests.test_datasets_adapters import build_synthia

    build_synthia(tmp_path)
    assert get_adapter("synthia")(tmp_path, "train").check(sample=1) == []


def test_data_root_that_is_a_broken_link_is_named_by_check_and_by_run(tmp_path, capsys, no_generation,
                                                                      no_training):
    """`run` would otherwise generate the synthetic world for minutes and fail at the final rename."""
    root = tmp_path / "data"
    root.symlink_to(tmp_path / "unmounted")
    code, _, err = _cli(["data", "check", "--root", str(root)], capsys)
    line = _error_line(err)
    assert code == 2 and str(root) in line and "symbolic link" in line, line
    code, _, err = _cli(_run_args(root, tmp_path / "results"), capsys)
    line = _error_line(err)
    assert code == 2 and str(root) in line and "symbolic link" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# -- mistakes refused before the work, not after it (or as a traceback) --------------------------------
def test_data_synth_negative_seed_is_one_line_before_any_folder(tmp_path, capsys, no_generation):
    code, _, err = _cli(["data", "synth", "--out", str(tmp_path / "world"), "--seed", "-1"], capsys)
    assert code == 2 and "--seed -1: must be at least 0" in _error_line(err)
    assert not (tmp_path / "world").exists()


def test_data_synth_seed_of_the_pretraining_scenes_is_refused(tmp_path, capsys, no_generation):
    # numpy pads [seed, domain, split, index] and pretraining's [seed] alike: with --seed 1010000007 the
    # world's first GTAV, Cityscapes and BDD100K pairs drew pretraining stage 2's first scene's streams.
    from datasets.synthetic import PRETRAINING_SEEDS_FROM

    code, _, err = _cli(["data", "synth", "--out", str(tmp_path / "world"), "--seed", "1010000007"], capsys)
    assert code == 2 and f"must be below {PRETRAINING_SEEDS_FROM:,}" in _error_line(err)
    assert not (tmp_path / "world").exists()


@pytest.mark.parametrize(("out", "version", "expected"), [
    ("world", "1", "--world-version 1: this generator draws versions 2, 3"),
    ("synthetic-v2", "3", "--out {out} is named for world version 2, asked for version 3; pass --out "
                          ".../synthetic-v3 or --world-version 2"),
    ("synthetic-v0", None, "--out {out} is named for world version 0, which this generator does not draw (it draws "
                           "2, 3)"),
])
def test_data_synth_world_version_is_checked_before_any_folder(tmp_path, capsys, no_generation, out, version, expected):
    # a folder named synthetic-v2 is read by the presets as version 2: another version written there would be
    # trained on as if it were
    out = tmp_path / out
    code, _, err = _cli(["data", "synth", "--out", str(out)] + (["--world-version", version] if version else []), capsys)
    assert code == 2 and expected.format(out=out) in _error_line(err), err
    assert not out.exists()


@pytest.mark.parametrize("device", ["tpu", "cuda"], ids=["not-a-device", "no-cuda-here"])
def test_pretrain_device_is_checked_before_rendering(tmp_path, capsys, pretraining_calls, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to refuse")
    code, _, err = _cli(["pretrain", "--device", device, "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and f"--device={device}" in _error_line(err).replace("'", "")
    assert pretraining_calls == []


def test_profile_out_that_is_a_file_and_an_unknown_device_are_one_line_before_profiling(tmp_path, capsys, monkeypatch):
    import benchmarks.profiling as profiling

    monkeypatch.setattr(profiling, "profile_methods", lambda *a, **k: pytest.fail("profiling started"))
    existing = tmp_path / "profile.md"
    existing.write_text("an earlier profile")
    code, _, err = _cli(["profile", "--preset", "smoke", "--methods", "freeze", "--out", str(existing)], capsys)
    assert code == 2 and "is a file" in _error_line(err) and existing.read_text() == "an earlier profile"
    code, _, err = _cli(["profile", "--preset", "smoke", "--methods", "freeze", "--device", "gpu",
                         "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "--device='gpu' is not a device" in _error_line(err)


def test_check_keep_runs_that_is_a_file_is_one_line(tmp_path, capsys):
    existing = tmp_path / "notes.md"
    existing.write_text("mine")
    code, _, err = _cli(["check", "--keep-runs", str(existing)], capsys)
    assert code == 2 and "is a file, not a folder" in _error_line(err) and existing.read_text() == "mine"


def test_launcher_slurm_without_slurm_is_one_line_and_runs_nothing_here(tiny_world, tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    import shutil as shell

    monkeypatch.setattr(shell, "which", lambda name, *a, **k: None)  # no sbatch on PATH: a laptop, a CI box
    results = tmp_path / "results"
    code, _, err = _cli(["run", "--preset", "smoke", "--methods", "freeze", "--data-root", str(tiny_world),
                         "--results-dir", str(results), "--launcher", "slurm"], capsys)
    line = _error_line(err)
    assert code == 2 and "no slurm on this machine" in line and "--slurm-cluster local" in line, line
    assert not results.exists()


def test_jobs_slurm_refuses_are_one_line_naming_its_reason(tiny_world, tmp_path, capsys, monkeypatch):
    # A wrong partition was submitit's FailedJobError traceback.
    pytest.importorskip("submitit")
    from submitit.core.utils import FailedJobError

    import benchmarks.launchers as launchers

    class RefusingExecutor:
        def batch(self):
            raise FailedJobError("sbatch: error: invalid partition specified: gpux\nsbatch: error: Batch job submission failed")

    monkeypatch.setattr(launchers, "_executor", lambda options, folder: RefusingExecutor())
    code, _, err = _cli(["run", "--preset", "smoke", "--methods", "freeze", "--data-root", str(tiny_world),
                         "--results-dir", str(tmp_path / "results"), "--launcher", "slurm", "--slurm-partition", "gpux"],
                        capsys)
    line = _error_line(err)
    assert code == 2 and "invalid partition specified: gpux" in line and "--slurm-partition" in line, line


def test_data_synth_on_a_full_disk_is_one_line_saying_the_pairs_written_are_kept(tmp_path, capsys, monkeypatch):
    import datasets.synthetic as synthetic

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "generate_world", full)
    code, _, err = _cli(["data", "synth", "--out", str(tmp_path / "world")], capsys)
    line = _error_line(err)
    assert code == 2 and "No space left on device" in line and "run the same command again" in line, line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the message for a machine without CUDA")
def test_a_malformed_cuda_device_is_called_not_a_device_not_a_missing_gpu(tmp_path, capsys, monkeypatch):
    import benchmarks.profiling as profiling

    monkeypatch.setattr(profiling, "profile_methods", lambda *a, **k: pytest.fail("profiling started"))
    code, _, err = _cli(["profile", "--preset", "smoke", "--methods", "freeze", "--device", "cuda:x",
                         "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "--device='cuda:x' is not a device" in _error_line(err)
    code, _, err = _cli(["profile", "--preset", "smoke", "--methods", "freeze", "--device", "cuda:0",
                         "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "no CUDA device is available" in _error_line(err)
