"""`data prepare`: from the official archives to a checked data root, never half-written.

The tiny synthetic world is packed as the official archives (official names, inner layouts) and prepared
back; each bad download (missing, cut short, damaged inside, too few pairs, a dataset folder already
there, an interrupt, a full disk) must be one `error:` line naming the archive or path, exit 2, and leave
nothing half-written under the data root. Commands run in this process through `benchmarks.cli.main`.
"""

from __future__ import annotations

import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.archives import OFFICIAL_ARCHIVES, find_downloads, plan_dataset, write_official_archives
from datasets.registry import ADAPTERS
from tests.cli_helpers import error_line as _error_line
from tests.cli_helpers import run_cli as _cli

GTAV_PARTS = [f"{i:02d}_{kind}.zip" for kind in ("images", "labels") for i in range(1, 11)]
SYNTHETIC_ARCHIVES = sorted(GTAV_PARTS + [
    "leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip",
    "bdd100k_images_10k.zip", "bdd100k_sem_seg_labels_trainval.zip",
    "mapillary-vistas-dataset_public_v1.2.zip",
])
WORLD_SPLITS = [("gtav", "train"), ("cityscapes", "train"), ("cityscapes", "val"), ("bdd100k", "train"),
                ("bdd100k", "val"), ("mapillary", "train"), ("mapillary", "val")]


def _prepare(downloads: Path, root: Path, capsys, *extra: str) -> tuple[int, str, str]:
    return _cli(["data", "prepare", "--from", str(downloads), "--to", str(root), *extra], capsys)


def _nothing_under(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


@pytest.fixture(scope="module")
def official_archives(tiny_world, tmp_path_factory) -> Path:
    """The tiny world packed once as the official archives."""
    out = tmp_path_factory.mktemp("downloads")
    write_official_archives(tiny_world, out)
    return out


@pytest.fixture
def downloads(official_archives, tmp_path) -> Path:
    """A private copy of the archives, free to damage."""
    copy = tmp_path / "downloads"
    shutil.copytree(official_archives, copy)
    return copy


def _member_data_offset(archive: Path, member: str) -> tuple[int, int]:
    """Where a member's (compressed) bytes start in the archive, and how many there are."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    with open(archive, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.compress_size


def _damage_member(archive: Path, member: str) -> None:
    start, size = _member_data_offset(archive, member)
    data = bytearray(archive.read_bytes())
    for offset in range(start + size // 3, start + size // 3 + 16):
        data[offset] ^= 0xFF
    archive.write_bytes(bytes(data))


# -- the archives ------------------------------------------------------------------------------------
def test_the_synthetic_world_packs_itself_as_the_official_archives(official_archives):
    assert sorted(p.name for p in official_archives.iterdir()) == SYNTHETIC_ARCHIVES
    with zipfile.ZipFile(official_archives / "bdd100k_images_10k.zip") as zf:
        images = [n for n in zf.namelist() if n.endswith(".jpg")]
    assert images and all(n.startswith(("bdd100k/images/10k/train/", "bdd100k/images/10k/val/")) for n in images)
    with zipfile.ZipFile(official_archives / "mapillary-vistas-dataset_public_v1.2.zip") as zf:
        names = zf.namelist()
    # the v1.2 archive keeps its labels in {split}/labels/, not the v2.0 archive's {split}/v1.2/labels/
    assert any(n.startswith("validation/labels/") for n in names)
    assert not any("/v1.2/" in n for n in names)
    with zipfile.ZipFile(official_archives / "gtFine_trainvaltest.zip") as zf:
        labels = [n for n in zf.namelist() if n != "README"]
    assert labels and all(n.startswith("gtFine/") and n.endswith("_gtFine_labelIds.png") for n in labels)
    with zipfile.ZipFile(official_archives / "01_images.zip") as zf:
        assert [n for n in zf.namelist() if n != "README"] == ["images/00001.png"]


# -- the whole way ------------------------------------------------------------------------------------
def test_archives_prepare_into_a_root_that_passes_data_check(downloads, tmp_path, tiny_world, capsys):
    root = tmp_path / "data"
    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing")
    assert code == 0, err
    assert "data check" in out and "error" not in out
    for dataset in ("gtav", "cityscapes", "bdd100k", "mapillary"):
        assert f"{dataset}: ready at {root / OFFICIAL_ARCHIVES[dataset].folder}" in out
    assert "synthia     absent" in out and "acdc        absent" in out
    for dataset, split in WORLD_SPLITS:
        world = ADAPTERS[dataset](tiny_world, split).pairs()
        prepared = ADAPTERS[dataset](root, split).pairs()
        assert [p.name for p in prepared] == [p.name for p in world], (dataset, split)
        assert prepared[0].image.read_bytes() == world[0].image.read_bytes()
        assert prepared[-1].label.read_bytes() == world[-1].label.read_bytes()
    # the conversion the protocol needs: Mapillary val halved once
    halved = ADAPTERS["mapillary"](root, "val", half_resolution=True)
    assert halved.uses_prepared and len(halved.pairs()) == len(ADAPTERS["mapillary"](tiny_world, "val").pairs())
    assert sorted(p.name for p in root.iterdir()) == ["bdd100k", "cityscapes", "gta", "mapillary"]
    assert not list(root.rglob("README"))  # members no adapter reads stay in the archive
    assert _cli(["data", "check", "--root", str(root)], capsys)[0] == 0


def test_official_counts_refuse_the_small_synthetic_archives(downloads, tmp_path, capsys):
    root = tmp_path / "data"
    code, _, err = _prepare(downloads, root, capsys)
    line = _error_line(err)
    assert code == 2 and "gtav" in line and "24,966" in line and "--expect listing" in line, line
    assert not root.exists()


def test_restricting_datasets_prepares_only_those(downloads, tmp_path, capsys):
    root = tmp_path / "data"
    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing", "--datasets", "bdd100k,gtav")
    assert code == 0, err
    assert sorted(p.name for p in root.iterdir()) == ["bdd100k", "gta"]


# -- missing, cut short, damaged ----------------------------------------------------------------------
def test_a_missing_archive_is_one_line_and_nothing_is_written(downloads, tmp_path, capsys):
    (downloads / "gtFine_trainvaltest.zip").unlink()
    root = tmp_path / "data"
    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing")
    line = _error_line(err)
    assert code == 2 and "gtFine_trainvaltest.zip" in line and "cityscapes" in line, line
    assert "--datasets gtav,bdd100k,mapillary" in line, line  # the fix: prepare the complete ones
    assert "cityscapes  partial   missing gtFine_trainvaltest.zip" in out
    assert not root.exists()


def test_a_missing_gtav_part_names_it(downloads, tmp_path, capsys):
    (downloads / "07_labels.zip").unlink()
    root = tmp_path / "data"
    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing", "--datasets", "gtav")
    line = _error_line(err)
    assert code == 2 and "07_labels.zip" in line and "gtav" in line and "--datasets" in line, line
    assert not root.exists()


@pytest.mark.parametrize("archive", ["bdd100k_sem_seg_labels_trainval.zip", "01_images.zip",
                                     "mapillary-vistas-dataset_public_v1.2.zip"])
def test_a_truncated_archive_is_named_and_nothing_is_written(downloads, tmp_path, capsys, archive):
    path = downloads / archive
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    root = tmp_path / "data"
    root.mkdir()
    code, _, err = _prepare(downloads, root, capsys, "--expect", "listing")
    line = _error_line(err)
    assert code == 2 and str(path) in line and "not a complete zip" in line and "download" in line, line
    assert _nothing_under(root)


def _largest_member(archive: Path, prefix: str) -> str:
    with zipfile.ZipFile(archive) as zf:
        return max((i for i in zf.infolist() if i.filename.startswith(prefix)), key=lambda i: i.compress_size).filename


def test_a_damaged_member_fails_its_dataset_during_extraction_and_leaves_the_others_whole(downloads, tmp_path,
                                                                                          capsys):
    """By default the CRC is checked as members are extracted: the damaged dataset leaves nothing."""
    archive = downloads / "mapillary-vistas-dataset_public_v1.2.zip"
    member = _largest_member(archive, "validation/images/")
    _damage_member(archive, member)
    root = tmp_path / "data"
    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing")
    line = _error_line(err)
    assert code == 2 and str(archive) in line and member in line and "damaged" in line, line
    assert "nothing of mapillary was written" in line and "gtav, cityscapes, bdd100k" in line, line
    # the datasets before it are complete and in place; no staging folder is left
    assert sorted(p.name for p in root.iterdir()) == ["bdd100k", "cityscapes", "gta"]
    assert _cli(["data", "check", "--root", str(root)], capsys)[0] == 0


def test_the_crc_option_finds_a_damaged_member_before_anything_is_written(downloads, tmp_path, capsys):
    archive = downloads / "mapillary-vistas-dataset_public_v1.2.zip"
    member = _largest_member(archive, "validation/images/")
    _damage_member(archive, member)
    root = tmp_path / "data"
    code, _, err = _prepare(downloads, root, capsys, "--expect", "listing", "--crc")
    line = _error_line(err)
    assert code == 2 and str(archive) in line and member in line and "damaged" in line, line
    assert not root.exists()


def test_an_image_without_its_label_in_the_archives_is_refused(downloads, tmp_path, capsys):
    labels = downloads / "bdd100k_sem_seg_labels_trainval.zip"
    with zipfile.ZipFile(labels) as zf:
        kept = [(info, zf.read(info)) for info in zf.infolist()]
    dropped = next(info.filename for info, _ in kept if "/masks/val/" in info.filename)
    with zipfile.ZipFile(labels, "w") as zf:
        for info, data in kept:
            if info.filename != dropped:
                zf.writestr(info, data)
    root = tmp_path / "data"
    code, _, err = _prepare(downloads, root, capsys, "--expect", "listing")
    line = _error_line(err)
    assert code == 2 and "bdd100k_images_10k.zip" in line and "have no label" in line and "split 'val'" in line, line
    assert not root.exists()


# -- what is already there, interrupts, space -----------------------------------------------------------
def test_an_existing_dataset_folder_is_skipped_and_kept_unless_overwrite(downloads, tmp_path, tiny_world, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_world / "gta", root / "gta")
    (root / "gta" / "images" / "00001.png").unlink()
    (root / "gta" / "labels" / "00001.png").unlink()
    (root / "gta" / "mine.txt").write_text("the user's own file")
    before = sorted(str(p.relative_to(root)) for p in (root / "gta").rglob("*"))
    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing")
    assert code == 0, err
    assert f"gtav: skipped, {root / 'gta'} already exists" in out
    assert sorted(str(p.relative_to(root)) for p in (root / "gta").rglob("*")) == before
    assert (root / "gta" / "mine.txt").read_text() == "the user's own file"
    assert (root / "cityscapes").is_dir()

    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing", "--overwrite", "--datasets", "gtav")
    assert code == 0, err
    assert "(replaced)" in out and not (root / "gta" / "mine.txt").exists()
    assert (root / "gta" / "images" / "00001.png").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_an_interrupt_leaves_nothing_half_written(downloads, tmp_path, capsys, monkeypatch):
    import datasets.prepare as prepare

    def interrupted(staging_root):
        assert (staging_root / "mapillary" / "validation" / "images").is_dir()  # extracted, not yet in place
        raise KeyboardInterrupt

    monkeypatch.setitem(prepare.CONVERSIONS, "mapillary", ("mapillary-half (val)", interrupted))
    root = tmp_path / "data"
    code, _, err = _prepare(downloads, root, capsys, "--expect", "listing", "--datasets", "mapillary")
    assert code == 130 and "interrupted" in err
    assert not root.exists()  # created by the command, so removed with the staging folder


def test_too_little_space_is_refused_before_writing(downloads, tmp_path, capsys, monkeypatch):
    import datasets.prepare as prepare

    monkeypatch.setattr(prepare, "free_bytes", lambda path: 1000)
    root = tmp_path / "data"
    code, _, err = _prepare(downloads, root, capsys, "--expect", "listing")
    line = _error_line(err)
    assert code == 2 and str(root) in line and "needs about" in line and "--datasets" in line, line
    assert not root.exists()


# -- names ---------------------------------------------------------------------------------------------
def test_synthia_rar_is_recognised_and_explained(downloads, tmp_path, capsys):
    (downloads / "SYNTHIA_RAND_CITYSCAPES.rar").write_bytes(b"Rar!\x1a\x07\x00")
    root = tmp_path / "data"
    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing", "--datasets", "synthia")
    line = _error_line(err)
    assert code == 2 and "SYNTHIA_RAND_CITYSCAPES.rar" in line and "unrar x" in line, line
    assert "synthia     manual" in out
    assert not root.exists()


@pytest.mark.parametrize("argv, expected", [
    (["--datasets", "gta"], "unknown dataset gta"),
    (["--datasets", "acdc"], "none of the acdc archives"),
])
def test_bad_dataset_choices_are_one_line(downloads, tmp_path, capsys, argv, expected):
    code, _, err = _prepare(downloads, tmp_path / "data", capsys, "--expect", "listing", *argv)
    line = _error_line(err)
    assert code == 2 and expected in line, line
    assert not (tmp_path / "data").exists()


def test_a_folder_without_official_archives_is_one_line(tmp_path, capsys):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "gtFine_trainvaltest (1).zip").write_bytes(b"")
    code, _, err = _prepare(downloads, tmp_path / "data", capsys)
    line = _error_line(err)
    assert code == 2 and str(downloads) in line and "no dataset's official archives" in line, line


def _png(path: Path, values: np.ndarray) -> bytes:
    Image.fromarray(values.astype(np.uint8)).save(path)
    return path.read_bytes()


def test_acdc_archives_prepare_only_the_adverse_train_and_val_pairs(tmp_path, capsys):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    rgb = _png(tmp_path / "rgb.png", np.full((8, 12, 3), 90))
    label = _png(tmp_path / "label.png", np.arange(96).reshape(8, 12) % 19)
    with zipfile.ZipFile(downloads / "rgb_anon_trainvaltest.zip", "w") as images, \
            zipfile.ZipFile(downloads / "gt_trainval.zip", "w") as labels:
        for cond in ("fog", "night", "rain", "snow"):
            for split in ("train", "val"):
                stem = f"GOPR0{len(cond)}_frame_000{len(split)}"
                images.writestr(f"rgb_anon/{cond}/{split}/GOPR0{len(cond)}/{stem}_rgb_anon.png", rgb)
                images.writestr(f"rgb_anon/{cond}/{split}_ref/GOPR0{len(cond)}/{stem}_ref_rgb_anon.png", rgb)
                labels.writestr(f"gt/{cond}/{split}/GOPR0{len(cond)}/{stem}_gt_labelTrainIds.png", label)
                labels.writestr(f"gt/{cond}/{split}/GOPR0{len(cond)}/{stem}_gt_labelColor.png", rgb)
            images.writestr(f"rgb_anon/{cond}/test/GOPR09/GOPR09_frame_000001_rgb_anon.png", rgb)
    root = tmp_path / "data"
    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing")
    assert code == 0, err
    assert "acdc: archives hold train 4, val 4 pairs" in out
    assert len(ADAPTERS["acdc"](root, "val").pairs()) == 4
    names = [p.name for p in (root / "acdc").rglob("*.png")]
    assert len(names) == 16 and not [n for n in names if "_ref_" in n or "Color" in n]
    assert not (root / "acdc" / "rgb_anon" / "fog" / "test").exists()


def test_the_v2_archive_gives_only_its_v12_labels(tiny_world, tmp_path):
    """Vistas v2.0 holds the v1.2 labels under {split}/v1.2/labels and another class set under v2.0/."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    base = tiny_world / "mapillary"
    with zipfile.ZipFile(downloads / "mapillary-vistas-dataset_public_v2.0.zip", "w") as zf:
        zf.writestr("config_v2.0.json", "{}")
        for path in sorted(base.rglob("*")):
            if path.is_file():
                rel = path.relative_to(base).as_posix()
                zf.write(path, rel)
                if "/v1.2/labels/" in rel:
                    zf.write(path, rel.replace("/v1.2/", "/v2.0/"))
    found, _ = find_downloads(downloads)
    assert found["mapillary"].state == "complete"
    plan = plan_dataset(found["mapillary"], "listing")
    targets = [f.target for f in plan.files]
    assert plan.pairs == {"train": 2, "val": 3}
    assert not [t for t in targets if "v2.0" in t] and len([t for t in targets if "/v1.2/labels/" in t]) == 5


def test_data_synth_can_write_the_archives(tiny_world, tmp_path, capsys, monkeypatch):
    import datasets.synthetic as synthetic

    def copy_world(out, size, seed, workers, version):
        shutil.copytree(tiny_world, out, dirs_exist_ok=True)
        return {"pairs": {}, "frequencies": {}}

    monkeypatch.setattr(synthetic, "generate_world", copy_world)
    monkeypatch.setattr(synthetic, "format_frequencies", lambda frequencies: "")
    archives = tmp_path / "archives"
    code, out, err = _cli(["data", "synth", "--out", str(tmp_path / "world"), "--archives", str(archives)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in archives.iterdir()) == SYNTHETIC_ARCHIVES
    assert "--expect listing" in out


def _replace_member(archive: Path, member: str, data: bytes) -> None:
    """The archive rewritten with `member` holding `data` (its CRC right: the bytes are whole, just unusable)."""
    with zipfile.ZipFile(archive) as zf:
        kept = [(info, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(archive, "w") as zf:
        for info, content in kept:
            zf.writestr(info, data if info.filename == member else content)


def test_a_member_the_dataset_cannot_read_is_named_by_its_archive(downloads, tmp_path, capsys):
    """Found after extraction (by the halving): the line names the archive and member, not the staged file
    (gone by then), and says to download the archive again rather than to re-extract or delete a pair."""
    archive = downloads / "mapillary-vistas-dataset_public_v1.2.zip"
    with zipfile.ZipFile(archive) as zf:
        member = next(n for n in zf.namelist() if "validation/images/" in n)
    _replace_member(archive, member, b"<html>not an image</html>")
    root = tmp_path / "data"
    code, _, err = _prepare(downloads, root, capsys, "--expect", "listing", "--datasets", "mapillary")
    line = _error_line(err)
    assert code == 2 and line.startswith(f"error: {archive}: member {member}: cannot decode the image"), line
    assert f"download {archive.name} again" in line and ".prepare-" not in line and "delete the pair" not in line
    assert not root.exists()



def test_a_dataset_whose_files_cannot_be_decoded_is_not_put_in_place(downloads, tmp_path, capsys):
    # GTAV has no conversion that decodes its images: a bad image member was put in place, the line said
    # "gtav: ready", and only the check of the whole root after it failed, naming the extracted file.
    archive = downloads / "01_images.zip"
    with zipfile.ZipFile(archive) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".png"))
    _replace_member(archive, member, b"<html>not an image</html>")
    root = tmp_path / "data"
    code, out, err = _prepare(downloads, root, capsys, "--expect", "listing", "--datasets", "gtav")
    line = _error_line(err)
    assert code == 2 and line.startswith(f"error: {archive}: member {member}: "), line
    assert "nothing of gtav was written" in line and "gtav: ready" not in out
    assert not root.exists()

def test_an_interrupt_between_the_renames_of_overwrite_puts_the_old_folder_back(downloads, tmp_path, capsys,
                                                                                 monkeypatch):
    import datasets.prepare as prepare

    root = tmp_path / "data"
    assert _prepare(downloads, root, capsys, "--expect", "listing", "--datasets", "gtav")[0] == 0
    (root / "gta" / "mine.txt").write_text("the user's own file")
    real_rename = os.rename

    def interrupted_after_setting_aside(source, target):
        real_rename(source, target)
        if Path(target).name.startswith(prepare.REPLACED_PREFIX):
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare.os, "rename", interrupted_after_setting_aside)
    code, _, err = _prepare(downloads, root, capsys, "--expect", "listing", "--datasets", "gtav", "--overwrite")
    assert code == 130 and "interrupted" in err
    assert (root / "gta" / "mine.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in root.iterdir()) == ["gta"]


def test_a_failed_prepare_removes_the_parent_folders_it_made(downloads, tmp_path, capsys):
    _damage_member(downloads / "gtFine_trainvaltest.zip", _largest_member(downloads / "gtFine_trainvaltest.zip", "gtFine/"))
    root = tmp_path / "made" / "for" / "data"
    code, _, _ = _prepare(downloads, root, capsys, "--expect", "listing", "--datasets", "cityscapes")
    assert code == 2 and not (tmp_path / "made").exists()
