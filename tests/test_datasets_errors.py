"""Every bad-input case gives a one-line UserError naming the path, the expectation and the fix;
`python -m benchmarks data check` turns them into exit code 2 (once as a subprocess, through the real entry
point; the other command-line cases in-process, as the user sees them: exit code, output, the one error line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.errors import UserError
from datasets.registry import get_adapter
from tests.cli_helpers import error_line
from tests.cli_helpers import run_cli as in_process
from tests.test_datasets_adapters import (
    build_bdd,
    build_cityscapes,
    build_gtav,
    build_mapillary,
    write_gray,
    write_rgb,
)

REPO = Path(__file__).resolve().parents[1]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_root(tmp_path):
    with pytest.raises(UserError) as exc:
        get_adapter("cityscapes")(tmp_path / "nope", "val").pairs()
    msg = one_line(exc)
    assert str(tmp_path / "nope") in msg and "data root not found" in msg and "data synth" in msg


def test_missing_family_and_split_folder(tmp_path):
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(UserError, match="cityscapes folder not found"):
        get_adapter("cityscapes")(tmp_path, "val").pairs()
    build_cityscapes(tmp_path, "val")
    with pytest.raises(UserError) as exc:
        get_adapter("cityscapes")(tmp_path, "train").pairs()
    msg = one_line(exc)
    assert str(tmp_path / "cityscapes/leftImg8bit/train") in msg and "leftImg8bit_trainvaltest.zip" in msg


def test_an_empty_split_or_missing_family_points_to_the_page_with_the_layouts(tmp_path):
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(UserError) as exc:
        get_adapter("cityscapes")(tmp_path, "val").pairs()
    assert "docs/datasets.md" in one_line(exc)
    build_cityscapes(tmp_path, "val")
    for png in (tmp_path / "cityscapes").rglob("*.png"):
        png.unlink()
    with pytest.raises(UserError) as exc:
        get_adapter("cityscapes")(tmp_path, "val").pairs()
    assert "no cityscapes image/label pairs found for split 'val'" in one_line(exc)
    assert "docs/datasets.md" in one_line(exc)
    layouts = (REPO / "docs/datasets.md").read_text()
    assert "ROOT/cityscapes/{leftImg8bit,gtFine}/{train,val}" in layouts and "ROOT/gta/{images,labels}" in layouts


@pytest.mark.parametrize("family", ["cityscapes", "bdd100k"])
def test_a_file_cut_short_is_found_by_the_header_check(tmp_path, family):
    # An interrupted copy: its header reads, so the default pre-flight passed it and the run failed in scoring,
    # after the whole training (a review's repro, 2026-12-07).
    (build_cityscapes if family == "cityscapes" else build_bdd)(tmp_path)
    adapter = get_adapter(family)(tmp_path, "val")
    assert adapter.check(sample=0) == []
    cut = adapter.pairs()[1].image
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (problem,) = get_adapter(family)(tmp_path, "val").check(sample=0)  # no pair decoded but the one cut short
    assert problem.startswith(f"{cut}: cannot read") and "truncated" in problem.lower() and "re-download" in problem


def test_a_jpeg_with_data_after_its_end_is_not_taken_for_a_truncated_one(tmp_path):
    build_bdd(tmp_path)
    adapter = get_adapter("bdd100k")(tmp_path, "val")
    image = adapter.pairs()[0].image
    image.write_bytes(image.read_bytes() + bytes(100_000))  # what some cameras append after the image
    assert get_adapter("bdd100k")(tmp_path, "val").check(sample=0) == []


def test_image_without_label(tmp_path):
    build_cityscapes(tmp_path)
    write_rgb(tmp_path / "cityscapes/leftImg8bit/val/bonn/bonn_000099_000019_leftImg8bit.png")
    with pytest.raises(UserError) as exc:
        get_adapter("cityscapes")(tmp_path, "val").pairs()
    msg = one_line(exc)
    assert "bonn_000099_000019_leftImg8bit.png" in msg and "1 image(s) have no label" in msg
    assert "_gtFine_labelIds.png" in msg and "gtFine_trainvaltest.zip" in msg


def test_label_without_image(tmp_path):
    build_bdd(tmp_path)
    write_gray(tmp_path / "bdd100k/labels/sem_seg/masks/val/stray.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(UserError) as exc:
        get_adapter("bdd100k")(tmp_path, "val").pairs()
    msg = one_line(exc)
    assert "stray.png" in msg and "no image" in msg and "remove the stray labels" in msg


@pytest.mark.parametrize(
    "family,builder,label_glob,bad_value,expect",
    [
        ("bdd100k", build_bdd, "bdd100k/labels/sem_seg/masks/val/7d06fefd-f7be05a6.png", 40, "train ids 0..18"),
        ("cityscapes", build_cityscapes, "cityscapes/gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", 34,
         "Cityscapes label ids"),
        ("mapillary", build_mapillary, "mapillary/validation/v1.2/labels/0aBcD1234.png", 66, "v1.2 class ids 0..65"),
    ],
)
def test_label_values_outside_encoding(tmp_path, family, builder, label_glob, bad_value, expect):
    builder(tmp_path)
    path = tmp_path / label_glob
    arr = np.asarray(Image.open(path)).copy()
    arr[0, 0] = bad_value
    write_gray(path, arr)
    ad = get_adapter(family)(tmp_path, "val")
    pair = next(p for p in ad.pairs() if p.label == path)
    with pytest.raises(UserError) as exc:
        ad.load_label(pair)
    msg = one_line(exc)
    assert str(path) in msg and f"{{{bad_value}}}" in msg and expect in msg and "data convert" in msg


def test_rgb_colour_label_refused(tmp_path):
    build_gtav(tmp_path)
    write_rgb(tmp_path / "gta/labels/00001.png")
    ad = get_adapter("gtav")(tmp_path, "train")
    with pytest.raises(UserError) as exc:
        ad.load_label(ad.pairs()[0])
    msg = one_line(exc)
    assert "00001.png" in msg and "mode RGB" in msg and "palette" in msg


def test_unreadable_image(tmp_path):
    build_gtav(tmp_path)
    (tmp_path / "gta/images/00002.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    ad = get_adapter("gtav")(tmp_path, "train")
    with pytest.raises(UserError) as exc:
        ad.load_image(ad.pairs()[1])
    msg = one_line(exc)
    assert "00002.png" in msg and "cannot decode" in msg and "re-download" in msg


def test_size_mismatch_is_an_error_except_gtav(tmp_path):
    build_cityscapes(tmp_path)
    write_rgb(tmp_path / "cityscapes/leftImg8bit/val/bonn/bonn_000001_000019_leftImg8bit.png", w=20)
    ad = get_adapter("cityscapes")(tmp_path, "val")
    with pytest.raises(UserError, match="differs from image"):
        ad.load_pair(ad.pairs()[1])
    build_gtav(tmp_path)
    write_rgb(tmp_path / "gta/images/00001.png", w=20)
    g = get_adapter("gtav")(tmp_path, "train")
    img, lab = g.load_pair(g.pairs()[0])
    assert lab.shape == img.shape[:2] == (16, 20)


# --------------------------------------------------------------------------------------------------
# the CLI, as a subprocess
# --------------------------------------------------------------------------------------------------

RUNNER = (
    "import argparse, sys\n"
    "from benchmarks.errors import UserError\n"
    "from benchmarks.commands import data\n"
    "p = argparse.ArgumentParser(); s = p.add_subparsers(dest='command', required=True); data.add_parser(s)\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "try:\n    sys.exit(data.run(a))\n"
    "except UserError as e:\n    print(f'error: {e}', file=sys.stderr); sys.exit(2)\n"
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    if (REPO / "benchmarks/__main__.py").exists() and (REPO / "benchmarks/cli.py").exists():
        cmd = [sys.executable, "-m", "benchmarks", *args]
    else:  # before the CLI is wired in: the same parser in a tiny runner
        cmd = [sys.executable, "-c", RUNNER, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_check_ok(tmp_path, capsys):
    build_gtav(tmp_path)
    build_cityscapes(tmp_path, "train")
    build_cityscapes(tmp_path, "val")
    build_bdd(tmp_path)
    build_mapillary(tmp_path)
    code, out, err = in_process(["data", "check", "--root", str(tmp_path)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    # A root of real datasets (no synthetic world record) with fewer pairs than the releases: ok, and said.
    assert any(ln.split()[:4] == ["gtav", "train", "2", "ok,"] and "2 of the official release's 24,966 pairs" in ln
               for ln in lines), out
    assert any(ln.split()[:4] == ["mapillary", "val", "2", "ok,"] and "of the official release's 2,000" in ln
               for ln in lines), out
    assert any(ln.split()[:4] == ["bdd100k", "val", "2", "ok,"] and "of the official release's 1,000" in ln
               for ln in lines), out
    assert any(ln.split()[:4] == ["cityscapes", "val", "2", "ok,"] and "of the official release's 500" in ln
               for ln in lines), out
    # The synthetic world is as large as it is meant to be.
    from datasets.synthetic import WORLD_RECORD

    (tmp_path / WORLD_RECORD).write_text("{}")
    code, out, err = in_process(["data", "check", "--root", str(tmp_path)], capsys)
    assert code == 0 and "partial" not in out, out
    assert any(ln.split()[:4] == ["gtav", "train", "2", "ok"] for ln in out.splitlines()), out


def test_cli_check_missing_root_exit_2(tmp_path, capsys):
    code, _, err = in_process(["data", "check", "--root", str(tmp_path / "missing")], capsys)
    assert code == 2 and str(tmp_path / "missing") in error_line(err)


def test_cli_check_reports_problem_exit_2(tmp_path):
    """The one test of these through `python -m benchmarks` in a process of its own: the real entry point."""
    build_gtav(tmp_path)
    build_cityscapes(tmp_path, "val")  # train split missing
    (tmp_path / "gta/images/00002.png").write_bytes(b"garbage")
    res = run_cli("data", "check", "--root", str(tmp_path))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "00002.png" in res.stdout and "cannot" in res.stdout
    assert "leftImg8bit/train" in res.stdout
    assert res.stderr.startswith("error: 2 problem(s)")


def test_cli_convert_then_check(tmp_path, capsys):
    build_cityscapes(tmp_path, "val")
    code, out, err = in_process(["data", "convert", "cityscapes", "--root", str(tmp_path)], capsys)
    assert code == 0, err
    assert "written 2" in out
    assert len(list(tmp_path.rglob("*_gtFine_labelTrainIds.png"))) == 2


@pytest.mark.parametrize("what", ["gtav", "synthia", "mapillary-half"])
def test_cli_convert_into_a_missing_root_names_its_own_option(tmp_path, what, capsys):
    """The adapters' message names `run`'s --data-root; `data convert` takes --root."""
    code, _, err = in_process(["data", "convert", what, "--root", str(tmp_path / "nope")], capsys)
    line = error_line(err)
    assert code == 2 and line.startswith(f"error: --root {tmp_path / 'nope'}: data root not found"), line
    assert "--data-root" not in line and not (tmp_path / "nope").exists()
