"""Result files: atomic writes and tolerant reading."""

import json
import os

import pytest

from benchmarks.config import PROJECT_ROOT
from benchmarks.results import (
    SCHEMA_VERSION,
    atomic_write_text,
    iter_results,
    load_result,
    read_result,
    write_result,
)

# The fields every reader relies on (benchmarks.results.REQUIRED_FIELDS), for a run still going.
RUNNING = {"schema": SCHEMA_VERSION, "status": "running", "method": {"name": "m"}, "preset": "smoke",
           "setting": "G->CBM", "backbone": "proxy_vit", "head": "light", "seed": 42}


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"  # what the user had is not lost
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary left behind


def test_write_then_read_round_trip(tmp_path):
    result = {**RUNNING, "run_id": "x", "status": "finished", "targets": {"cityscapes": {"miou": 1.0}}}
    path = tmp_path / "a" / "b.json"
    write_result(path, result)
    assert json.loads(path.read_text())["run_id"] == "x"
    assert read_result(path)["status"] == "finished"


def test_foreign_and_broken_files_are_ignored(tmp_path):
    (tmp_path / "foreign.json").write_text('{"hello": 1}')
    (tmp_path / "broken.json").write_text('{"schema": 1, ')
    write_result(tmp_path / "ok.json", {**RUNNING, "run_id": "ok"})
    assert [r["run_id"] for r in iter_results([tmp_path])] == ["ok"]


def test_results_in_a_linked_folder_are_read_too(tmp_path):
    # `table --runs DIR` left out a linked seed folder's results (rglob skips links before Python 3.13)
    write_result(tmp_path / "elsewhere" / "seed43" / "r.json", {**RUNNING, "run_id": "linked"})
    write_result(tmp_path / "runs" / "seed42" / "r.json", {**RUNNING, "run_id": "here"})
    (tmp_path / "runs" / "seed43").symlink_to(tmp_path / "elsewhere" / "seed43")
    (tmp_path / "runs" / "seed42" / "loop").symlink_to(tmp_path / "runs")  # read once, no loop
    assert sorted(r["run_id"] for r in iter_results([tmp_path / "runs"])) == ["here", "linked"]


def test_the_run_files_kept_in_the_repository_stay_readable():
    """docs/results.md cites the runs under results/proxy-runs; `table --runs` must keep reading them
    as the schema moves, each one finished and naming the weight file it ran by checksum."""
    kept = sorted((PROJECT_ROOT / "results" / "proxy-runs").rglob("*.json"))
    assert kept, "results/proxy-runs holds no run files"
    for path in kept:
        result = load_result(path)  # raises on a file the current schema cannot read
        assert result is not None and result["status"] == "finished", path
        assert len(result["provenance"]["weights"]["sha256"]) == 64, path
