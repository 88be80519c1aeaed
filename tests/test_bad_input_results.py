"""Bad input around results and baselines (issue 18, items 5, 6, 16, 17, 18), through `benchmarks.cli.main`.

A usage error is one `error:` line on stderr and exit code 2, before anything runs or is written; a
broken result file is skipped with one warning naming it and what is wrong, never a traceback and
never the end of a matrix. Training is never reached: `check` runs a stand-in for the runner, `run`
a stand-in for one run's execution.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from benchmarks.cli import main
from benchmarks.results import SCHEMA_VERSION, write_result

TARGETS = ("cityscapes", "bdd100k", "mapillary")
PARAMS = {"backbone_trainable": 102_145, "backbone_added": 102_145, "backbone_pretrained": 2_721_216,
          "head_total": 491_635, "head_trainable": 491_635}


def finished_result(method: str = "rein", seed: int = 42, miou: float = 20.0, preset: str = "smoke",
                    backbone: str = "proxy_vit") -> dict:
    return {
        "schema": SCHEMA_VERSION, "run_id": f"{preset}/G->CBM/{backbone}/{method}/seed{seed}", "status": "finished",
        "failure": None, "preset": preset, "setting": "G->CBM", "source": "gtav",
        "method": {"name": method, "paper": "", "hyperparameters": {}},
        "backbone": backbone, "head": "light", "seed": seed, "params": dict(PARAMS),
        "targets": {t: {"miou": miou, "per_class_iou": {"road": miou}, "num_images": 4} for t in TARGETS},
        "average_miou": miou,
        "environment": {"python": "3.11", "torch": "2.5.0", "device_name": "x86_64"},
        "timings": {"started": "2025-01-01T00:00:00", "finished": "2025-01-01T00:01:00"},
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def warnings_about(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


# -- item 5: `list methods` with an unknown backbone or head -------------------------------------------
@pytest.mark.parametrize(("option", "expected"), [
    ("--backbone", "unknown backbone 'no_such_vit'; valid: "),
    ("--head", "unknown head 'no_such_vit'; valid: "),
])
def test_list_methods_with_unknown_model_part_exits_2_naming_the_valid_ones(capsys, option, expected):
    assert main(["list", "methods", option, "no_such_vit"]) == 2
    out, err = capsys.readouterr()
    (line,) = error_lines(err)
    assert expected in line
    assert ("proxy_vit" if option == "--backbone" else "mask2former") in line  # the known ones are listed
    assert "Traceback" not in err and out == ""  # no half-printed listing


@pytest.mark.parametrize("size", ["0", "-5", "13"])
def test_list_methods_at_an_image_size_no_method_can_take_exits_2(capsys, size):
    assert main(["list", "methods", "--backbone", "proxy_vit", "--head", "light", "--img-size", size]) == 2
    out, err = capsys.readouterr()
    (line,) = error_lines(err)
    assert f"--img-size {size}" in line and out == ""  # not a table of n/a


# -- item 6: broken result files next to good ones -------------------------------------------------
BROKEN_RESULTS = {
    "truncated": (b'{"schema": 1, "run_id": "smoke/G->CBM/proxy_vit/lora/seed42", "sta', "not valid JSON"),
    "not_utf8": (json.dumps(finished_result("lora")).replace("lora", "lo\udcffra").encode("utf-8", "surrogateescape"),
                 "not UTF-8"),
    "missing_fields": (json.dumps({k: v for k, v in finished_result("lora").items()
                                   if k not in ("preset", "setting", "backbone")}).encode(),
                       "missing fields backbone, preset, setting"),
}


def _runs_with_one_broken(folder: Path, kind: str) -> Path:
    write_result(folder / "smoke" / "rein.json", finished_result("rein", miou=33.0))
    broken = folder / "smoke" / "lora.json"
    broken.write_bytes(BROKEN_RESULTS[kind][0])
    return broken


@pytest.mark.parametrize("kind", sorted(BROKEN_RESULTS))
def test_table_skips_a_broken_result_with_one_warning_and_shows_the_rest(tmp_path, capsys, caplog, kind):
    broken = _runs_with_one_broken(tmp_path / "runs", kind)
    assert main(["table", "--runs", str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "G->CBM · proxy_vit · light head · preset smoke" in out and "rein" in out and "33.0" in out
    assert "?" not in out and "lora" not in out
    (warning,) = warnings_about(caplog, broken)
    assert BROKEN_RESULTS[kind][1] in warning


def test_report_skips_a_non_utf8_result_with_one_warning(tmp_path, capsys, caplog):
    broken = _runs_with_one_broken(tmp_path / "runs", "not_utf8")
    assert main(["report", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "rein" in page and "lo\udcffra" not in page
    (warning,) = warnings_about(caplog, broken)
    assert "not UTF-8" in warning


def test_foreign_json_without_a_schema_is_skipped_silently(tmp_path, capsys, caplog):
    """Guard: a profile or other non-result JSON in the folder is not one of ours, so it is no warning."""
    write_result(tmp_path / "runs" / "rein.json", finished_result("rein"))
    (tmp_path / "runs" / "profile.json").write_text('{"preset": "proxy", "rows": []}')
    assert main(["table", "--runs", str(tmp_path / "runs")]) == 0
    assert warnings_about(caplog, tmp_path / "runs" / "profile.json") == []


def test_run_goes_on_past_a_broken_earlier_result_and_keeps_it(tmp_path, monkeypatch, capsys, caplog):
    """A non-UTF-8 result at one run's own path: one warning, the file set aside (not overwritten),
    the run done again, the next run done too, and the leaderboard printed at the end."""
    import benchmarks.runner
    from benchmarks.config import load_experiment
    from benchmarks.runner import RunSpec, experiment_for

    runs = tmp_path / "runs"
    exp = load_experiment("smoke", [f"run.results_dir={json.dumps(str(runs))}"])
    executed = []

    def fake_execute(spec, exp, results_dir, progress=True):
        executed.append(spec.method)
        result = finished_result(spec.method, seed=spec.seed, miou=10.0 + len(executed))
        write_result(spec.path(experiment_for(exp, spec), results_dir), result)
        return result

    monkeypatch.setattr(benchmarks.runner, "execute_run", fake_execute)
    own = RunSpec("G->CBM", "proxy_vit", "freeze", 42).path(experiment_for(exp, RunSpec("G->CBM", "proxy_vit", "freeze", 42)), runs)
    own.parent.mkdir(parents=True)
    damaged = BROKEN_RESULTS["not_utf8"][0]
    own.write_bytes(damaged)
    (runs / "smoke" / "neighbour.json").write_bytes(b"\xff\xfe{")

    code = main(["run", "--preset", "smoke", "--methods", "freeze,lora", "--results-dir", str(runs), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert executed == ["freeze", "lora"]
    assert "freeze" in out and "lora" in out  # the leaderboard at the end
    (warning,) = warnings_about(caplog, own)
    assert "not UTF-8" in warning
    kept = own.with_name(own.name + ".broken")
    assert kept.read_bytes() == damaged  # what the user had is kept beside the new result
    assert json.loads(own.read_text())["status"] == "finished"


def test_a_lock_file_that_is_not_utf8_counts_as_held_not_as_a_crash(tmp_path):
    from benchmarks.locking import RunLock, lock_path

    result = tmp_path / "run.json"
    lock_path(result).write_bytes(b"\xff\xfe garbage")
    lock = RunLock(result)
    assert not lock.acquire()
    assert lock.describe_owner() == "another runner"


# -- items 16, 17, 18: the regression baseline and `check` -----------------------------------------
class FakeRunner:
    """Stands in for benchmarks.runner.run_matrix, so `check` never trains; records each call."""

    def __init__(self, results: list[dict]):
        self.results = results
        self.calls: list[str | None] = []

    def __call__(self, exp, methods=None, results_dir=None, progress=True):
        self.calls.append(methods)
        return copy.deepcopy(self.results)


@pytest.fixture
def runner(monkeypatch) -> FakeRunner:
    import benchmarks.runner

    fake = FakeRunner([finished_result("rein"), finished_result("freeze", miou=10.0)])
    monkeypatch.setattr(benchmarks.runner, "run_matrix", fake)
    return fake


@pytest.fixture
def baseline_path(tmp_path) -> Path:
    from benchmarks.regression import make_baseline, write_baseline

    path = tmp_path / "baselines" / "smoke.json"
    write_baseline(path, make_baseline([finished_result("rein"), finished_result("freeze", miou=10.0)]))
    return path


def check(*argv: str) -> int:
    return main(["check", "--no-progress", *argv])


def _edit(path: Path, change) -> None:
    baseline = json.loads(path.read_text())
    change(baseline)
    path.write_text(json.dumps(baseline))


def test_check_with_a_non_utf8_baseline_exits_2_before_running(tmp_path, runner, capsys):
    path = tmp_path / "smoke.json"
    path.write_bytes(b'{"preset": "sm\xffoke", "runs": {}}')
    assert check("--baseline", str(path)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(path) in line and "not UTF-8" in line and "--update-baseline" in line
    assert runner.calls == []


BAD_ENTRIES = {
    "entry_not_object": (lambda b: b["runs"].__setitem__("rein/proxy_vit/seed42", [20.0]),
                         'run "rein/proxy_vit/seed42" is [20.0], not an object'),
    "target_not_number": (lambda b: b["runs"]["rein/proxy_vit/seed42"]["targets"].__setitem__("bdd100k", "20"),
                          'run "rein/proxy_vit/seed42": targets.bdd100k is \'20\', not a number'),
    "targets_missing": (lambda b: b["runs"]["freeze/proxy_vit/seed42"].pop("targets"),
                        'run "freeze/proxy_vit/seed42" has no "targets" object'),
    "params_not_integer": (lambda b: b["runs"]["freeze/proxy_vit/seed42"]["params"].__setitem__("head_total", 1.5),
                           'run "freeze/proxy_vit/seed42": params.head_total is 1.5, not a whole number'),
    "tolerance_not_number": (lambda b: b.__setitem__("tolerance_miou", "half"),
                             '"tolerance_miou" is \'half\', not a finite number ≥ 0'),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_check_with_a_bad_baseline_entry_exits_2_before_running(baseline_path, runner, capsys, case):
    change, expected = BAD_ENTRIES[case]
    _edit(baseline_path, change)
    assert check("--baseline", str(baseline_path)) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert str(baseline_path) in line and expected in line, line
    assert "Traceback" not in err
    assert runner.calls == []  # validated before the matrix, not after it


MALFORMED_BASELINES = {
    "bad_json": b'{"runs": {',
    "not_utf8": b'{"runs": {}, "preset": "\xff"}',
    "bad_entry": b'{"preset": "smoke", "runs": {"rein/proxy_vit/seed42": "20"}}',
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BASELINES))
def test_update_baseline_replaces_a_malformed_baseline(tmp_path, runner, capsys, case):
    from benchmarks.regression import load_baseline

    path = tmp_path / "smoke.json"
    path.write_bytes(MALFORMED_BASELINES[case])
    assert check("--baseline", str(path), "--update-baseline") == 0, capsys.readouterr().err
    replaced = load_baseline(path)
    assert sorted(replaced["runs"]) == ["freeze/proxy_vit/seed42", "rein/proxy_vit/seed42"]
    assert [p.name for p in tmp_path.iterdir()] == ["smoke.json"]  # written atomically: no temporary left
    assert len(runner.calls) == 1


def test_partial_update_of_a_malformed_baseline_exits_2_and_keeps_the_file(tmp_path, runner, capsys):
    """--methods keeps the baseline's other entries, which cannot be read: refuse, lose nothing."""
    path = tmp_path / "smoke.json"
    path.write_bytes(MALFORMED_BASELINES["bad_json"])
    assert check("--baseline", str(path), "--update-baseline", "--methods", "rein") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(path) in line and "--methods all" in line
    assert path.read_bytes() == MALFORMED_BASELINES["bad_json"]
    assert runner.calls == []


@pytest.mark.parametrize("tolerance", ["-1", "nan", "inf", "-inf"])
@pytest.mark.parametrize("update", [False, True])
def test_negative_or_non_finite_tolerance_exits_2_before_anything(baseline_path, runner, capsys, tolerance, update):
    before = baseline_path.read_bytes()
    argv = ["--baseline", str(baseline_path), f"--tolerance={tolerance}"] + (["--update-baseline"] if update else [])
    assert check(*argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"error: --tolerance must be a finite number of mIoU points ≥ 0, got {tolerance}"
    assert runner.calls == [] and baseline_path.read_bytes() == before


@pytest.mark.parametrize(("field", "value", "said"), [
    ("targets.cityscapes.miou", "abc", "cityscapes: miou is not a number"),
    ("experiment", [1], 'field "experiment" is not an object'),
    ("timings", "x", 'field "timings" is not an object'),
    ("seed", "42", "seed '42' is not a whole number"),
    ("average_miou", "20", "average_miou is not a number"),
    ("targets.cityscapes.per_class_iou", [1, 2], "cityscapes: per_class_iou is not an object of numbers"),
    ("targets.cityscapes.per_class_iou.road", "x", "cityscapes: per_class_iou is not an object of numbers"),
    ("source_heldout", "x", 'field "source_heldout" is not an object'),
    ("source_heldout", {"miou": "x"}, "source_heldout: miou is not a number"),
    ("targets.cityscapes.miou", float("inf"), "cityscapes: miou is not a number"),  # was printed bold, the best
    ("params.backbone_trainable", "102145", 'field "params" holds a count that is not a number'),
    ("provenance", {"weights": "abc"}, 'field "provenance.weights" is not an object'),
    ("provenance", {"data": ["x"]}, 'field "provenance.data" is not an object of objects'),
    ("profile", ["x"], 'field "profile" is not an object'),
    ("history", [{"iter": 1, "loss": "x"}], 'field "history" holds a record whose iter, loss or targets'),
    ("evaluations", {"a": 1}, 'field "evaluations" is not a list of objects'),
    ("evaluations", [{"iter": 2, "targets": {"cityscapes": "x"}}], 'field "evaluations" holds a record whose'),
])
def test_a_result_with_a_field_of_the_wrong_type_is_skipped_and_the_table_still_printed(field, value, said, tmp_path,
                                                                                        capsys, caplog):
    # Each of these stopped `table` with a traceback (pandas, the grouping), hiding every other result.
    good = finished_result("rein", seed=43)
    write_result(tmp_path / "good.json", good)
    bad = finished_result("rein", seed=42)
    *parents, last = field.split(".")
    holder = bad
    for key in parents:
        holder = holder[key]
    holder[last] = value
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with caplog.at_level(logging.WARNING):
        assert main(["table", "--runs", str(tmp_path)]) == 0
        out, err = capsys.readouterr()
        assert main(["table", "--per-class", "--runs", str(tmp_path)]) == 0
    assert "Traceback" not in err + capsys.readouterr().err
    assert out.count("| rein |") == 1 and "Seeds" not in out  # one run tabled: the good one
    warned = warnings_about(caplog, tmp_path / "bad.json")
    assert len(warned) == 2 and said in warned[0], warned  # once for each table


def test_list_backbones_names_the_patch_inputs_must_fit_and_presets_their_whole_comment(capsys):
    # The listing said only the native patch (14), while `--img-size` must be a multiple of the protocol's (16);
    # a preset's description stopped at its file's first line, mid-sentence.
    assert main(["list", "backbones"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dinov2_vitl14 "))
    assert row.split()[2:4] == ["14", "16"]
    assert main(["list", "presets"]) == 0
    smoke = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("smoke "))
    assert smoke.rstrip().endswith("a few iterations.")
