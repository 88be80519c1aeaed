"""The regression check: `compare` on hand-made results, the baseline file, and the `check` command."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.errors import UserError
from benchmarks.regression import (
    compare,
    format_report,
    load_baseline,
    make_baseline,
    run_key,
    write_baseline,
)

PARAMS = {"backbone_trainable": 102_145, "backbone_added": 102_145, "backbone_pretrained": 2_721_216,
          "head_total": 491_635, "head_trainable": 491_635}


def result(method: str = "rein", seed: int = 42, miou: tuple[float, float, float] = (20.0, 15.0, 18.0),
           params: dict | None = None, status: str = "finished", setting: str = "G->CBM") -> dict:
    targets = dict(zip(("cityscapes", "bdd100k", "mapillary"), miou, strict=True))
    return {
        "schema": 1, "run_id": f"smoke/{setting}/proxy_vit/{method}/seed{seed}", "status": status,
        "failure": None if status == "finished" else "loss diverged (NaN) at iteration 3",
        "preset": "smoke", "setting": setting, "method": {"name": method}, "backbone": "proxy_vit",
        "head": "light", "seed": seed, "params": dict(params or PARAMS),
        "targets": {t: {"miou": v, "per_class_iou": {}, "num_images": 6} for t, v in targets.items()} if status == "finished" else {},
        "average_miou": sum(miou) / 3 if status == "finished" else None,
        "environment": {"python": "3.11", "torch": "2.5.0", "device_name": "x86_64", "hostname": "ci-1"},
    }


@pytest.fixture
def fresh() -> list[dict]:
    return [result("rein"), result("freeze", miou=(10.0, 9.0, 8.0), params={**PARAMS, "backbone_trainable": 0, "backbone_added": 0})]


@pytest.fixture
def baseline(fresh) -> dict:
    return make_baseline(fresh, tolerance=0.5)


def test_baseline_format(baseline):
    assert baseline["preset"] == "smoke" and baseline["tolerance_miou"] == 0.5
    assert set(baseline["runs"]) == {"rein/proxy_vit/seed42", "freeze/proxy_vit/seed42"}
    entry = baseline["runs"]["rein/proxy_vit/seed42"]
    assert entry["targets"] == {"cityscapes": 20.0, "bdd100k": 15.0, "mapillary": 18.0}
    assert entry["average_miou"] == pytest.approx(53 / 3)
    assert entry["params"] == PARAMS
    assert baseline["environment"]["torch"] == "2.5.0" and "hostname" not in baseline["environment"]


def test_unchanged_results_pass(baseline, fresh):
    assert compare(baseline, fresh) == []
    assert "OK: no regression" in format_report([], baseline, compared=2)


def test_move_within_tolerance_passes_beyond_fails(baseline):
    within = [result("rein", miou=(20.4, 14.6, 18.0)), result("freeze", miou=(10.0, 9.0, 8.0),
                                                              params={**PARAMS, "backbone_trainable": 0, "backbone_added": 0})]
    assert compare(baseline, within) == []
    beyond = copy.deepcopy(within)
    beyond[0]["targets"]["bdd100k"]["miou"] = 13.9
    diffs = compare(baseline, beyond)
    assert [(d.run, d.kind, d.field, d.failing) for d in diffs] == [("rein/proxy_vit/seed42", "miou", "bdd100k", True)]
    assert "dropped 15.00 → 13.90 (-1.10" in diffs[0].message
    # a rise is a change of behaviour too: deterministic smoke runs should not move either way
    beyond[0]["targets"]["bdd100k"]["miou"] = 16.0
    beyond[0]["average_miou"] = 30.0
    kinds = {(d.field, d.failing) for d in compare(baseline, beyond)}
    assert kinds == {("bdd100k", True), ("average", True)}
    # an explicit tolerance overrides the baseline's
    assert compare(baseline, beyond, tolerance=20.0) == []


def test_any_parameter_count_change_fails(baseline, fresh):
    changed = copy.deepcopy(fresh)
    changed[0]["params"]["backbone_trainable"] += 1
    diffs = compare(baseline, changed)
    assert len(diffs) == 1 and diffs[0].kind == "params" and diffs[0].failing
    assert diffs[0].message == "rein/proxy_vit/seed42: backbone_trainable parameters 102,145 → 102,146 (+1)"
    changed[0]["params"].pop("head_total")
    assert {d.field for d in compare(baseline, changed)} == {"backbone_trainable", "head_total"}


def test_missing_failed_and_new_runs(baseline, fresh):
    diffs = {d.run: d for d in compare(baseline, [fresh[0]])}
    assert diffs["freeze/proxy_vit/seed42"].kind == "missing" and diffs["freeze/proxy_vit/seed42"].failing

    failed = [fresh[0], result("freeze", status="failed")]
    diff = compare(baseline, failed)[0]
    assert diff.kind == "failed" and diff.failing and "loss diverged" in diff.message

    added = fresh + [result("lora", miou=(21.0, 16.0, 19.0))]
    diffs = compare(baseline, added)
    assert [(d.run, d.kind, d.failing) for d in diffs] == [("lora/proxy_vit/seed42", "new", False)]
    text = format_report(diffs, baseline, compared=3)
    assert "not in the baseline" in text and "OK: no regression" in text

    lost = copy.deepcopy(fresh)
    del lost[0]["targets"]["mapillary"]
    assert [(d.kind, d.field) for d in compare(baseline, lost) if d.kind != "miou"] == [("target_missing", "mapillary")]


def test_report_names_every_failure_and_environment_drift(baseline, fresh):
    changed = copy.deepcopy(fresh)
    changed[0]["targets"]["cityscapes"]["miou"] = 10.0
    changed[1]["params"]["head_total"] = 1
    diffs = compare(baseline, changed)
    text = format_report(diffs, baseline, compared=2, environment={"torch": "2.6.0", "python": "3.11"})
    assert "REGRESSION: 2 difference(s)" in text  # cityscapes and head_total (the stored average did not move)
    assert "rein/proxy_vit/seed42: cityscapes mIoU dropped 20.00 → 10.00" in text
    assert "freeze/proxy_vit/seed42: head_total parameters 491,635 → 1" in text
    assert "torch: 2.5.0 → 2.6.0" in text
    assert "--update-baseline" in text


def test_other_settings_get_their_own_key():
    assert run_key(result()) == "rein/proxy_vit/seed42"
    assert run_key(result(setting="C->BM")) == "rein/proxy_vit/seed42/C->BM"


def test_failed_run_cannot_become_the_baseline(fresh):
    with pytest.raises(UserError, match="did not finish"):
        make_baseline(fresh + [result("vpt", status="failed")])


def test_baseline_file_round_trip_and_errors(tmp_path, baseline):
    path = tmp_path / "baselines" / "smoke.json"
    write_baseline(path, baseline)
    assert load_baseline(path) == baseline
    assert [p.name for p in path.parent.iterdir()] == ["smoke.json"]  # no temporary file left behind
    with pytest.raises(UserError, match="--update-baseline"):
        load_baseline(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_baseline(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(UserError, match="no \"runs\""):
        load_baseline(tmp_path / "empty.json")


def _detailed(run: dict, classes: dict | None = None, loss: float = 2.95, source: float = 0.6) -> dict:
    """A hand-made result with what a real one carries beyond the headline numbers."""
    from benchmarks.config import load_experiment

    run = copy.deepcopy(run)
    for target in run["targets"].values():
        target["per_class_iou"] = dict(classes or {"road": 0.7, "sky": 7.9, "bus": None})
    run["source_heldout"] = {"miou": source}
    run["history"] = [{"iter": 6, "loss": loss}]
    run["experiment"] = load_experiment("smoke").to_dict()
    return run


def test_classes_held_out_source_and_loss_are_compared_at_their_own_tolerances():
    base = make_baseline([_detailed(result())])
    assert base["tolerance_miou"] == 0.05 and base["tolerance_loss_relative"] == 1e-4
    assert compare(base, [_detailed(result(), classes={"road": 0.74, "sky": 7.9, "bus": None})]) == []
    moved = compare(base, [_detailed(result(), classes={"road": 0.76, "sky": 7.9, "bus": None})])
    assert [(d.kind, d.field) for d in moved] == [("miou", f"{t}/road") for t in ("cityscapes", "bdd100k", "mapillary")]
    assert "cityscapes road IoU rose 0.7000 → 0.7600 (+0.0600, tolerance ±0.05)" in moved[0].message
    # a class neither predicted nor labelled before, predicted now: a change, though the baseline held no number
    predicted = compare(base, [_detailed(result(), classes={"road": 0.7, "sky": 7.9, "bus": 0.0})])
    assert {d.field for d in predicted} == {"cityscapes/bus", "bdd100k/bus", "mapillary/bus"}
    assert "bus IoU absent → 0.0000" in predicted[0].message
    assert [d.field for d in compare(base, [_detailed(result(), source=0.7)])] == ["source_heldout"]
    assert compare(base, [_detailed(result(), loss=2.95 * (1 + 5e-5))]) == []
    [loss] = compare(base, [_detailed(result(), loss=2.95 * (1 + 1e-3))])
    assert loss.kind == "loss" and loss.failing and "+1.0e-03 of it" in loss.message


def test_a_run_of_another_protocol_is_not_compared_as_the_baselines():
    from benchmarks.config import load_experiment

    base = make_baseline([_detailed(result())])
    elsewhere = _detailed(result())
    elsewhere["experiment"]["data"]["root"] = "/tmp/another/world"  # the same protocol on a world elsewhere
    assert compare(base, [elsewhere]) == []
    changed = _detailed(result())
    changed["experiment"] = load_experiment("smoke", ["train.iters=3"]).to_dict()
    [diff] = compare(base, [changed])
    assert diff.kind == "protocol" and diff.failing and "numbers not compared" in diff.message


def test_a_baseline_without_runs_or_a_folder_is_refused(tmp_path, baseline):
    write_baseline(tmp_path / "empty.json", {**baseline, "runs": {}})
    with pytest.raises(UserError, match="no runs"):
        load_baseline(tmp_path / "empty.json")
    with pytest.raises(UserError, match="is a folder"):
        load_baseline(tmp_path)


# -- the command, with the runner replaced by hand-made results -----------------------------------
class FakeRunner:
    """Stands in for benchmarks.runner.run_matrix: records where it was asked to write."""

    def __init__(self, results: list[dict]):
        self.results = results
        self.calls: list[tuple[str | None, Path]] = []

    def __call__(self, exp, methods=None, results_dir=None, progress=True):
        self.calls.append((methods, Path(results_dir)))
        return copy.deepcopy(self.results)


def _check(argv: list[str]) -> int:
    from benchmarks.cli import main

    return main(["check", "--no-progress", *argv])


def _stored_and_running(tmp_path, monkeypatch, baseline: dict, results: list[dict]) -> tuple[Path, FakeRunner]:
    """A baseline file of `baseline`, and the runner replaced by one that returns `results`."""
    import benchmarks.runner

    path = tmp_path / "smoke.json"
    write_baseline(path, baseline)
    runner = FakeRunner(results)
    monkeypatch.setattr(benchmarks.runner, "run_matrix", runner)
    return path, runner


def test_check_command_update_pass_and_fail(tmp_path, monkeypatch, fresh, capsys):
    import benchmarks.runner

    baseline_path = tmp_path / "smoke.json"
    runner = FakeRunner(fresh)
    monkeypatch.setattr(benchmarks.runner, "run_matrix", runner)

    assert _check(["--baseline", str(baseline_path)]) == 2
    assert "--update-baseline" in capsys.readouterr().err
    assert runner.calls == []  # no baseline: nothing was run

    assert _check(["--baseline", str(baseline_path), "--update-baseline", "--tolerance", "0.25"]) == 0
    stored = json.loads(baseline_path.read_text())
    assert stored["tolerance_miou"] == 0.25 and len(stored["runs"]) == 2

    assert _check(["--baseline", str(baseline_path)]) == 0
    assert "OK: no regression" in capsys.readouterr().out
    # every check writes into a fresh folder, never one holding earlier runs
    scratch = [call[1] for call in runner.calls]
    assert len(set(scratch)) == len(scratch) and not any(p.exists() for p in scratch)

    runner.results[0]["targets"]["cityscapes"]["miou"] += 0.3  # beyond the stored 0.25
    assert _check(["--baseline", str(baseline_path)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "cityscapes mIoU rose" in out

    assert _check(["--baseline", str(baseline_path), "--preset", "proxy"]) == 2
    assert "was made with preset 'smoke'" in capsys.readouterr().err

    runner.results[0]["targets"]["cityscapes"]["miou"] -= 0.3
    runner.results[1]["params"]["backbone_trainable"] = 5
    assert _check(["--baseline", str(baseline_path)]) == 1
    assert "backbone_trainable parameters 0 → 5" in capsys.readouterr().out


def test_check_subset_of_methods_compares_and_updates_only_those(tmp_path, monkeypatch, fresh, capsys):
    baseline_path, runner = _stored_and_running(tmp_path, monkeypatch, make_baseline(fresh), [fresh[0]])
    assert _check(["--baseline", str(baseline_path), "--methods", "rein"]) == 0
    assert runner.calls[-1][0] == "rein"
    runner.results[0]["targets"]["bdd100k"]["miou"] = 1.0
    assert _check(["--baseline", str(baseline_path), "--methods", "rein", "--update-baseline"]) == 0
    stored = json.loads(baseline_path.read_text())["runs"]
    assert stored["rein/proxy_vit/seed42"]["targets"]["bdd100k"] == 1.0
    assert "freeze/proxy_vit/seed42" in stored  # untouched entries kept


def test_the_methods_a_check_runs_are_those_it_compares_however_they_were_chosen(tmp_path, monkeypatch, fresh, capsys):
    path, runner = _stored_and_running(tmp_path, monkeypatch, make_baseline(fresh), [fresh[0]])
    # --set run.methods=rein ran rein alone and failed on the 17 others "removed"; the printed update kept rein alone
    assert _check(["--baseline", str(path), "--set", "run.methods=rein"]) == 0
    assert _check(["--baseline", str(path), "--set", "run.methods=rein", "--update-baseline"]) == 0
    assert set(json.loads(path.read_text())["runs"]) == {"rein/proxy_vit/seed42", "freeze/proxy_vit/seed42"}
    # " all" ran every method and compared none (exit 0 whatever ran)
    runner.results = copy.deepcopy(fresh)
    runner.results[0]["targets"]["cityscapes"]["miou"] -= 5
    capsys.readouterr()
    assert _check(["--baseline", str(path), "--methods", " all"]) == 1
    assert "cityscapes mIoU dropped" in capsys.readouterr().out


def test_an_update_of_some_methods_with_another_preset_leaves_the_baseline_as_it_was(tmp_path, monkeypatch, fresh,
                                                                                      capsys, caplog):
    # it merged a proxy run into the smoke file and relabelled all its runs "proxy": every later check stopped
    path, runner = _stored_and_running(tmp_path, monkeypatch, make_baseline(fresh, preset="smoke"), [fresh[0]])
    before = path.read_bytes()
    assert _check(["--baseline", str(path), "--update-baseline", "--preset", "proxy", "--methods", "rein"]) == 2
    assert "would mix two presets" in capsys.readouterr().err
    assert path.read_bytes() == before and runner.calls == []
    # an update of every method replaces the file whole, as the plain check's refusal suggests, and says so
    with caplog.at_level("WARNING"):
        assert _check(["--baseline", str(path), "--update-baseline", "--preset", "proxy"]) == 0
    assert "replaces them whole with preset 'proxy'" in caplog.text
    stored = json.loads(path.read_text())
    assert stored["preset"] == "proxy" and set(stored["runs"]) == {"rein/proxy_vit/seed42"}


def test_a_baseline_whose_environment_is_no_object_is_refused_before_anything_runs(tmp_path, baseline):
    write_baseline(tmp_path / "b.json", {**baseline, "environment": ["torch", "2.x"]})
    with pytest.raises(UserError, match='"environment" is .*not an object'):
        load_baseline(tmp_path / "b.json")


@pytest.mark.slow
def test_check_end_to_end_on_the_smoke_preset(tmp_path, capsys):
    """Real runs of two methods through the CLI: store a baseline, pass on a re-run, fail on a
    tampered baseline. The copy of the baseline lives in tmp_path; the repository's is untouched."""
    baseline_path = tmp_path / "smoke.json"
    common = ["--baseline", str(baseline_path), "--methods", "freeze,lora"]
    assert _check([*common, "--update-baseline"]) == 0
    stored = json.loads(baseline_path.read_text())
    assert set(stored["runs"]) == {"freeze/proxy_vit/seed42", "lora/proxy_vit/seed42"}
    capsys.readouterr()
    assert _check(common) == 0, capsys.readouterr().out
    stored["runs"]["lora/proxy_vit/seed42"]["targets"]["cityscapes"] += 5.0
    stored["runs"]["freeze/proxy_vit/seed42"]["params"]["backbone_trainable"] = 1
    write_baseline(baseline_path, stored)
    capsys.readouterr()
    assert _check(common) == 1
    out = capsys.readouterr().out
    assert "lora/proxy_vit/seed42: cityscapes mIoU dropped" in out
    assert "freeze/proxy_vit/seed42: backbone_trainable parameters 1 → 0" in out


@pytest.mark.slow
def test_check_fails_when_a_method_changes_in_a_copy_of_the_project(tmp_path):
    """The shipped baseline against the shipped code, then against a copy whose LoRA rank went 8 → 4.

    Both runs are real `python -m benchmarks check --methods lora` processes in a copy of the project
    (it generates its own synthetic world); the repository's files are never touched.
    """
    root = Path(__file__).resolve().parent.parent
    copy_root = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("benchmarks", "methods", "datasets", "results/baselines"):
        shutil.copytree(root / folder, copy_root / folder, ignore=ignore)
    env = {**os.environ, "PYTHONPATH": str(copy_root)}

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "benchmarks", "check", "--methods", "lora", "--no-progress"],
                              cwd=copy_root, env=env, capture_output=True, text=True, timeout=900)

    unchanged = check()
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr[-2000:]

    lora = copy_root / "methods" / "lora.py"
    source = lora.read_text()
    assert source.count("    rank: int = 8  # DGSS reference") == 1
    lora.write_text(source.replace("    rank: int = 8  # DGSS reference", "    rank: int = 4  # DGSS reference"))
    changed = check()
    assert changed.returncode == 1, changed.stdout + changed.stderr[-2000:]
    assert "lora/proxy_vit/seed42: backbone_trainable parameters 36,864 → 18,432" in changed.stdout


def test_the_default_baseline_is_the_projects_file_wherever_the_command_runs(tmp_path, monkeypatch):
    from benchmarks.cli import build_parser
    from benchmarks.config import PROJECT_ROOT

    monkeypatch.chdir(tmp_path)
    baseline = build_parser().parse_args(["check"]).baseline
    assert baseline == PROJECT_ROOT / "results" / "baselines" / "smoke.json" and baseline.is_file()


def test_update_says_what_moved_and_all_methods_replace_the_whole_baseline(tmp_path, monkeypatch, fresh, capsys):
    import benchmarks.runner

    path = tmp_path / "smoke.json"
    runner = FakeRunner(fresh)
    monkeypatch.setattr(benchmarks.runner, "run_matrix", runner)
    assert _check(["--baseline", str(path), "--update-baseline"]) == 0
    stale = json.loads(path.read_text())
    stale["runs"]["gone/proxy_vit/seed42"] = stale["runs"]["rein/proxy_vit/seed42"]  # a method since removed
    path.write_text(json.dumps(stale))
    capsys.readouterr()
    runner.results[0]["targets"]["cityscapes"]["miou"] += 0.001
    assert _check(["--baseline", str(path), "--update-baseline", "--methods", "all"]) == 0
    out = capsys.readouterr().out
    assert "1 stored number(s) change" in out and "rein/proxy_vit/seed42: cityscapes mIoU rose" in out
    assert "- gone/proxy_vit/seed42 (dropped: not re-run)" in out  # the update said nothing of what it dropped
    assert set(json.loads(path.read_text())["runs"]) == {"rein/proxy_vit/seed42", "freeze/proxy_vit/seed42"}
    assert _check(["--baseline", str(path), "--update-baseline"]) == 0
    assert "reproduce the previous baseline's stored values exactly" in capsys.readouterr().out


def test_an_update_merges_into_what_another_update_wrote_while_its_runs_ran(tmp_path, monkeypatch, fresh, capsys):
    # `--update-baseline --methods freeze` and `--methods rein` started together: each merged into its copy of
    # the file from before its runs and wrote it back, so one update was silently undone.
    import benchmarks.runner

    path = tmp_path / "smoke.json"
    monkeypatch.setattr(benchmarks.runner, "run_matrix", FakeRunner(fresh))
    assert _check(["--baseline", str(path), "--update-baseline"]) == 0

    class AnotherUpdateMeanwhile(FakeRunner):
        def __call__(self, *args, **kwargs):
            meanwhile = json.loads(path.read_text())
            meanwhile["runs"]["freeze/proxy_vit/seed42"]["targets"]["cityscapes"] = 99.0
            path.write_text(json.dumps(meanwhile))
            return [r for r in super().__call__(*args, **kwargs) if r["method"]["name"] == "rein"]

    monkeypatch.setattr(benchmarks.runner, "run_matrix", AnotherUpdateMeanwhile(fresh))
    assert _check(["--baseline", str(path), "--update-baseline", "--methods", "rein"]) == 0
    assert json.loads(path.read_text())["runs"]["freeze/proxy_vit/seed42"]["targets"]["cityscapes"] == 99.0


def test_an_update_keeps_the_baselines_tolerances_and_compares_numbers_across_a_protocol_change(tmp_path, monkeypatch,
                                                                                                capsys):
    import benchmarks.runner
    from benchmarks.config import load_experiment

    path = tmp_path / "smoke.json"
    first = _detailed(result())
    monkeypatch.setattr(benchmarks.runner, "run_matrix", FakeRunner([first]))
    assert _check(["--baseline", str(path), "--update-baseline", "--tolerance", "0.2"]) == 0
    stored = json.loads(path.read_text())
    stored["tolerance_loss_relative"] = 1e-2
    path.write_text(json.dumps(stored))
    rerun = copy.deepcopy(first)
    rerun["experiment"] = load_experiment("smoke", ["train.lr=2e-4"]).to_dict()  # another protocol, same numbers
    monkeypatch.setattr(benchmarks.runner, "run_matrix", FakeRunner([rerun]))
    capsys.readouterr()
    assert _check(["--baseline", str(path), "--update-baseline"]) == 0
    out = capsys.readouterr().out
    assert "every stored number of the re-run runs is the same" in out and "rein/proxy_vit/seed42: protocol" in out
    assert "regenerate" not in out  # said during the very update that regenerates it
    stored = json.loads(path.read_text())
    assert (stored["tolerance_miou"], stored["tolerance_loss_relative"]) == (0.2, 1e-2)
    # a new tolerance is a change the update names (it said "exactly")
    assert _check(["--baseline", str(path), "--update-baseline", "--tolerance", "0.5"]) == 0
    assert "tolerance_miou ±0.2 → ±0.5 IoU points" in capsys.readouterr().out


def test_a_regressions_update_command_is_the_users_own_check(tmp_path, monkeypatch, fresh, capsys):
    # The bare `check --update-baseline` it printed, pasted, reran every method and rewrote the project's baseline.
    import benchmarks.runner

    path = tmp_path / "mine.json"
    runner = FakeRunner(fresh)
    monkeypatch.setattr(benchmarks.runner, "run_matrix", runner)
    assert _check(["--baseline", str(path), "--update-baseline"]) == 0
    runner.results[0]["targets"]["cityscapes"]["miou"] += 5
    assert _check(["--baseline", str(path), "--methods", "rein", "--set", "train.iters=7"]) == 1
    out = capsys.readouterr().out
    assert (f"python -m benchmarks check --update-baseline --baseline {path} --methods rein --set train.iters=7"
            in out), out
