"""Provenance (issue 17): every result names the weights and data it came from, a resume or a skip onto
other files is refused, the table marks rows that mix them, and `check` compares them before numbers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from benchmarks import checkpoint, provenance
from benchmarks.backbones import get_spec
from benchmarks.config import PROJECT_ROOT as ROOT


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def weights_copy(tmp_path) -> Path:
    path = tmp_path / "weights" / "proxy.safetensors"
    path.parent.mkdir()
    shutil.copy(get_spec("proxy_vit").default_weights, path)
    return path


def _perturb(path: Path) -> None:
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(path))


def _main(*args: str) -> tuple[int, str]:
    from benchmarks.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return code, stderr.getvalue()


def _run_args(world: Path, results: Path, weights: Path, *extra: str) -> list[str]:
    return ["run", "--preset", "smoke", "--methods", "freeze", "--data-root", str(world), "--no-progress",
            "--results-dir", str(results), "--weights", f"proxy_vit={weights}", "--set", "train.iters=3",
            "--set", "data.eval_limit=1", *extra]


def test_file_fingerprint_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    first = provenance.file_sha256(path)
    assert provenance.cache_file().is_file()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    assert provenance.file_sha256(path) == first and str(path.resolve()) not in map(str, reads)  # from the cache
    monkeypatch.setattr("builtins.open", real_open)
    path.write_bytes(b"b" * 1000)  # same size, new content and modification time
    os.utime(path, ns=(1, 1))
    assert provenance.file_sha256(path) != first


def test_a_result_records_the_weights_and_each_split(tiny_world, tmp_path, weights_copy):
    from benchmarks.results import read_result

    code, stderr = _main(*_run_args(tiny_world, tmp_path / "runs", weights_copy))
    assert code == 0, stderr[-2000:]
    (path,) = (tmp_path / "runs").rglob("*.json")
    record = read_result(path)["provenance"]
    assert record["weights"]["sha256"] == provenance.file_sha256(weights_copy)
    assert record["weights"]["file"] == str(weights_copy)
    assert set(record["data"]) == {"gtav (train)", "cityscapes", "bdd100k", "mapillary"}
    assert record["data"]["cityscapes"]["pairs"] == 1  # only what the run read (data.eval_limit=1)


def test_resume_onto_a_changed_weight_file_is_refused_naming_both(tiny_world, tmp_path, weights_copy, monkeypatch):
    real_save = checkpoint.save_checkpoint

    def save_then_die(result_path, **kwargs):
        real_save(result_path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    args = _run_args(tiny_world, tmp_path / "runs", weights_copy, "--set", "train.checkpoint_interval=1")
    assert _main(*args)[0] == 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    before = provenance.file_sha256(weights_copy)
    _perturb(weights_copy)
    code, stderr = _main(*args)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, stderr[-2000:]
    assert "cannot resume" in errors[0] and before[:12] in errors[0]
    assert provenance.file_sha256(weights_copy)[:12] in errors[0]
    assert list((tmp_path / "runs").rglob("last.pt"))  # the checkpoint is left for the user to decide


def test_a_finished_run_is_not_skipped_onto_other_weights(tiny_world, tmp_path, weights_copy):
    args = _run_args(tiny_world, tmp_path / "runs", weights_copy)
    assert _main(*args)[0] == 0
    _perturb(weights_copy)
    code, stderr = _main(*args)
    assert code == 2 and "finished from other files" in stderr and "weights" in stderr, stderr[-2000:]
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 1  # the earlier result is kept



def test_a_finished_run_on_other_data_files_than_its_root_holds_now_is_named_in_a_warning(tiny_world, tmp_path,
                                                                                       weights_copy, caplog):
    # A world rewritten in place (or another world under the same relative root) was skipped as finished without a
    # word, its earlier numbers shown as the new data's. Warned, not refused: a Mapillary val halved once after
    # the run is other files holding the same pixels.
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    args = _run_args(world, tmp_path / "runs", weights_copy)
    assert _main(*args)[0] == 0
    with caplog.at_level("INFO", logger="benchmarks.runner"):
        assert _main(*args)[0] == 0
    assert "finished earlier, skipped" in caplog.text and "other data files" not in caplog.text
    caplog.clear()
    image = sorted((world / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")  # another file of another size
    with caplog.at_level("INFO", logger="benchmarks.runner"):
        assert _main(*args)[0] == 0
    assert "finished earlier on other data files than a run would read now (cityscapes data" in caplog.text
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 1  # the earlier result is kept


def test_a_finished_run_of_a_built_in_method_whose_file_changed_is_named_in_a_warning(tiny_world, tmp_path,
                                                                                       weights_copy, caplog):
    # README: a run made from other method code is not skipped silently; only a --method-file's was compared,
    # and an edit of methods/freeze.py skipped the earlier run as finished without a word.
    args = _run_args(tiny_world, tmp_path / "runs", weights_copy)
    assert _main(*args)[0] == 0
    (path,) = (tmp_path / "runs").rglob("*.json")
    result = json.loads(path.read_text())
    source = dict(result["provenance"]["method_source"])
    assert source == {"file": "methods/freeze.py", "sha256": provenance.file_sha256(ROOT / "methods" / "freeze.py")}
    with caplog.at_level("INFO", logger="benchmarks.runner"):
        assert _main(*args)[0] == 0
    assert "finished earlier, skipped" in caplog.text and "another version" not in caplog.text
    caplog.clear()
    result["provenance"]["method_source"]["sha256"] = "0" * 64  # as an earlier version of the file made it
    path.write_text(json.dumps(result))
    with caplog.at_level("INFO", logger="benchmarks.runner"):
        assert _main(*args)[0] == 0
    assert "finished earlier by another version of the method's code (methods/freeze.py 000000000000… then, " \
           f"{source['sha256'][:12]}… now)" in caplog.text
    assert json.loads(path.read_text()) == result  # kept as it was


def _lora_resolving_alpha(monkeypatch, alpha: float) -> None:
    """The code's LoRA now resolves `alpha` to this (as an edited default would): the config hash does not move."""
    import dataclasses

    from methods.lora import LoRA

    monkeypatch.setattr(LoRA, "hyperparameters", lambda self: {**dataclasses.asdict(self.config), "alpha": alpha})


def test_a_finished_run_is_not_skipped_once_the_code_resolves_its_recipe_otherwise(tiny_world, tmp_path, weights_copy,
                                                                                  monkeypatch):
    from benchmarks import runner

    args = [*_run_args(tiny_world, tmp_path / "runs", weights_copy), "--methods", "lora"]
    assert _main(*args)[0] == 0
    with monkeypatch.context() as patched:
        _lora_resolving_alpha(patched, 32.0)
        code, stderr = _main(*args)
    assert code == 2 and "finished from other files or settings" in stderr, stderr[-2000:]
    assert "hyperparameter alpha 8.0 then, 32.0 now" in stderr
    with monkeypatch.context() as patched:  # what `train.amp=auto` means on another device
        patched.setattr(runner, "trained_precision", lambda amp, device: "bfloat16")
        code, stderr = _main(*args)
    assert code == 2 and "precision float32 then, bfloat16 now" in stderr, stderr[-2000:]
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 1  # the earlier result is kept
    assert _main(*args)[0] == 0  # the same code and machine: skipped as finished


def test_resume_after_the_code_resolves_the_recipe_otherwise_is_refused(tiny_world, tmp_path, weights_copy,
                                                                        monkeypatch):
    real_save = checkpoint.save_checkpoint

    def save_then_die(result_path, **kwargs):
        real_save(result_path, **kwargs)
        raise KeyboardInterrupt

    args = [*_run_args(tiny_world, tmp_path / "runs", weights_copy, "--set", "train.checkpoint_interval=1"),
            "--methods", "lora"]
    with monkeypatch.context() as patched:
        patched.setattr(checkpoint, "save_checkpoint", save_then_die)
        _lora_resolving_alpha(patched, 32.0)
        assert _main(*args)[0] == 130
    code, stderr = _main(*args)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "cannot resume" in errors[0], stderr[-2000:]
    assert "hyperparameter alpha 32.0 then, 8.0 now" in errors[0]
    assert list((tmp_path / "runs").rglob("last.pt"))


def _result(seed: int, weights_sha: str) -> dict:
    return {
        "schema": 1, "run_id": f"r{seed}", "status": "finished", "preset": "smoke", "setting": "G->CBM",
        "method": {"name": "rein"}, "backbone": "proxy_vit", "head": "light", "seed": seed, "experiment": {},
        "params": {"backbone_trainable": 1000}, "average_miou": 10.0 + seed % 2,
        "targets": {"cityscapes": {"miou": 10.0}, "bdd100k": {"miou": 10.0}, "mapillary": {"miou": 10.0}},
        "provenance": {"weights": {"sha256": weights_sha}, "data": {"cityscapes": {"sha256": "d", "pairs": 2}}},
    }


def test_the_table_marks_a_row_whose_runs_come_from_different_weights():
    from benchmarks.reports.render import render
    from benchmarks.reports.tables import main_tables

    same = render(main_tables([_result(42, "a" * 64), _result(43, "a" * 64)]))
    mixed = render(main_tables([_result(42, "a" * 64), _result(43, "b" * 64)]))
    assert "‡" not in same
    assert "rein ‡" in mixed and "different weight files or data" in mixed


def test_check_compares_inputs_before_numbers():
    from benchmarks.regression import compare, make_baseline

    baseline = make_baseline([_result(42, "a" * 64)])
    assert baseline["runs"]["rein/proxy_vit/seed42"]["inputs"]["weights_sha256"] == "a" * 64
    changed = _result(42, "b" * 64)
    changed["average_miou"] = 99.0  # would be a failing number if it were compared
    diffs = compare(baseline, [changed])
    assert [d.kind for d in diffs] == ["inputs"] and diffs[0].failing
    assert "weights aaaaaaaaaaaa… → bbbbbbbbbbbb…" in diffs[0].message
    assert compare(baseline, [_result(42, "a" * 64)]) == []


def test_the_check_compares_no_numbers_of_an_edited_method_file():
    from benchmarks.regression import compare, make_baseline

    def from_method_file(sha: str) -> dict:
        result = _result(42, "a" * 64)
        result["provenance"]["method"] = {"file": "/home/me/mine.py", "bytes": 10, "sha256": sha}
        return result

    baseline = make_baseline([from_method_file("1" * 64)])
    edited = from_method_file("2" * 64)
    edited["average_miou"] = 99.0
    diffs = compare(baseline, [edited])
    assert [d.kind for d in diffs] == ["inputs"] and "method file 111111111111… → 222222222222…" in diffs[0].message
    assert compare(baseline, [from_method_file("1" * 64)]) == []
    assert "method_sha256" not in make_baseline([_result(42, "a" * 64)])["runs"]["rein/proxy_vit/seed42"]["inputs"]


# -- no target-side selection ----------------------------------------------------------------------
def test_no_target_is_scored_before_training_ends(tiny_world, tmp_path, monkeypatch):
    """With evaluation during training switched on, only the held-out source is scored until the last
    iteration; the targets are scored once, after it, and the result says which model its numbers are."""
    from benchmarks import protocol
    from benchmarks.config import load_experiment
    from benchmarks.runner import RunSpec, execute_run

    scored: list[tuple[bool, str]] = []  # (during training, dataset family)
    training = [False]
    real_train, real_evaluate = protocol.train, protocol.evaluate

    def train(*args, **kwargs):
        training[0] = True
        try:
            return real_train(*args, **kwargs)
        finally:
            training[0] = False

    def evaluate(model, dataset, *args, **kwargs):
        scored.append((training[0], dataset.adapter.name))
        return real_evaluate(model, dataset, *args, **kwargs)

    monkeypatch.setattr(protocol, "train", train)
    monkeypatch.setattr(protocol, "evaluate", evaluate)
    exp = load_experiment("smoke", [f"data.root={str(tiny_world)!r}", "train.iters=4", "train.eval_interval=1",
                                    "data.source_holdout=1", "data.eval_limit=1"])
    result = execute_run(RunSpec("G->CBM", "proxy_vit", "freeze", 42), exp, tmp_path, progress=False)
    during = [name for in_training, name in scored if in_training]
    assert during == ["gtav"] * 3  # iterations 1-3; the fourth is the end
    assert sorted(name for in_training, name in scored if not in_training) == ["bdd100k", "cityscapes", "gtav", "mapillary"]
    assert [e["iter"] for e in result["evaluations"]] == [1, 2, 3] and "targets" not in result["evaluations"][0]
    assert result["model_selection"] == "final"


def test_evaluation_during_training_is_no_training_time(tiny_world, tmp_path, monkeypatch):
    # A run's train images/s counted the held-out evaluations run between its steps as training time.
    from benchmarks import protocol
    from benchmarks.config import load_experiment
    from benchmarks.runner import RunSpec, execute_run

    real_clock, real_evaluate, hours = protocol.time.perf_counter, protocol.evaluate, [0.0]
    monkeypatch.setattr(protocol.time, "perf_counter", lambda: real_clock() + hours[0] * 3600)

    def evaluate(*args, **kwargs):
        hours[0] += 1  # each evaluation takes an hour by this clock
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(protocol, "evaluate", evaluate)
    exp = load_experiment("smoke", [f"data.root={str(tiny_world)!r}", "train.iters=3", "train.eval_interval=1",
                                    "data.source_holdout=1", "data.eval_limit=1"])
    result = execute_run(RunSpec("G->CBM", "proxy_vit", "freeze", 42), exp, tmp_path, progress=False)
    assert len(result["evaluations"]) == 2
    assert result["profile"]["train_images_per_s"] > 3 * 2 / 3600  # 6 images in under an hour, not over two


def test_evaluation_during_training_without_a_source_holdout_is_refused():
    from benchmarks.config import load_experiment
    from benchmarks.errors import UserError

    with pytest.raises(UserError, match="never a target"):
        load_experiment("smoke", ["train.eval_interval=10", "data.source_holdout=0"])


# -- the checkout a run came from ---------------------------------------------------------------------
def _git(root: Path, *args: str) -> None:
    import subprocess

    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def test_git_state_names_the_dirty_paths_renames_once(tmp_path):
    from benchmarks.provenance import git_state

    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "old name.md").write_text("notes\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "first")
    commit, paths = git_state(tmp_path)
    assert len(commit) == 40 and paths == []

    (tmp_path / "code.py").write_text("a = 2\n")
    (tmp_path / "untracked.txt").write_text("x\n")
    _git(tmp_path, "mv", "old name.md", "new name.md")
    _, paths = git_state(tmp_path)
    assert sorted(paths) == ["code.py", "new name.md", "untracked.txt"]


def test_git_state_caps_the_list_and_says_how_many_more(tmp_path):
    from benchmarks.provenance import MAX_DIRTY_PATHS, git_state

    _git(tmp_path, "init", "-q")
    (tmp_path / "a").write_text("a\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "first")
    for i in range(MAX_DIRTY_PATHS + 3):
        (tmp_path / f"f{i:02d}").write_text("x\n")
    _, paths = git_state(tmp_path)
    assert len(paths) == MAX_DIRTY_PATHS + 1 and paths[-1] == "... and 3 more"

    # a results folder's entries sort before tools/ and tests/: the code path is kept, not capped away
    (tmp_path / "zz_edited.py").write_text("a = 1\n")
    _, paths = git_state(tmp_path)
    assert paths[0] == "zz_edited.py" and paths[-1] == "... and 4 more"


def test_git_state_outside_a_checkout_is_unknown(tmp_path, monkeypatch):
    from benchmarks.provenance import git_state

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # even if the temp dir lies in a checkout

    assert git_state(tmp_path) == (None, None)


def test_report_names_the_uncommitted_code_of_a_run_and_not_the_files_beside_it():
    # One invocation writing its results inside the checkout made each of its 18 runs a line of its own (the
    # results before it untracked, a longer list each time): the report's first screen was that list.
    from benchmarks.reports.html import render_report
    from tests.test_reports import make_result

    def run(seed: int, dirty_paths: list[str], code_digest: str | None) -> dict:
        result = make_result("lora", seed, {"cityscapes": 40.0 + seed / 100})
        result["environment"] = {**result["environment"], "git_dirty": bool(dirty_paths),
                                 "git_dirty_paths": dirty_paths, "git_dirty_sha256": code_digest}
        return result

    results = [run(42, [], None),
               run(43, ["results/r/load.log"], None), run(44, ["results/r/load.log", "results/r/lora/"], None),
               run(45, ["benchmarks/protocol.py", "docs/results.md"], "ab" * 32)]
    before_the_digest = run(46, ["benchmarks/protocol.py"], None)
    del before_the_digest["environment"]["git_dirty_sha256"]
    outside_a_checkout = run(47, [], None)
    outside_a_checkout["environment"].update(git_commit=None, git_dirty=None, git_dirty_paths=None)
    page = render_report(results + [before_the_digest, outside_a_checkout])
    assert "3 run(s): torch 2.x, device_name cpu, git_commit abc, uncommitted code none<" in page
    assert ("1 run(s): torch 2.x, device_name cpu, git_commit abc, uncommitted changes sha256 abababababab "
            "(benchmarks/protocol.py)<") in page
    assert "1 run(s): torch 2.x, device_name cpu, git_commit abc, uncommitted files (benchmarks/protocol.py)<" in page
    assert "1 run(s): torch 2.x, device_name cpu, git_commit None<" in page
    assert "load.log" not in page and "docs/results.md" not in page


def test_evaluation_during_training_leaves_the_training_unchanged(tiny_world, tmp_path):
    # The evaluation loader drew its base seed from the global RNG, which moved the head's dropout masks:
    # the same run with `train.eval_interval` on trained to other losses, yet tables group the two as one.
    from benchmarks.config import load_experiment
    from benchmarks.runner import RunSpec, execute_run

    def losses(*extra: str) -> list[float]:
        exp = load_experiment("smoke", [f"data.root={str(tiny_world)!r}", "train.iters=4", "train.log_interval=1",
                                        "data.source_holdout=1", "data.eval_limit=1", *extra])
        result = execute_run(RunSpec("G->CBM", "proxy_vit", "freeze", 42), exp, tmp_path / str(len(extra)),
                             progress=False)
        return [h["loss"] for h in result["history"]]

    assert losses("train.eval_interval=1") == losses()


def test_a_method_class_no_file_holds_has_no_source_record():
    # a class defined in an interactive session (here: exec) has no file: recorded as none, compared on nothing
    namespace: dict = {}
    exec("from benchmarks.method import Method\nclass Typed(Method):\n    name = 'typed_in'\n", namespace)
    record = provenance.source_record(namespace["Typed"], ROOT)
    assert record == {"file": None, "sha256": None}
    assert provenance.source_differences({"method_source": record}, {"method_source": record}) is None
