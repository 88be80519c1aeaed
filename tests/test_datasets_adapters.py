"""Adapters on tiny hand-built trees in each real format (independent of the synthetic generator).

Expected train ids are written out literally from protocol.md, not derived from datasets.labels, so a
wrong table entry fails here.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.commands.data import run_check
from benchmarks.errors import UserError
from datasets.base import SegmentationDataset
from datasets.registry import ADAPTERS, find_datasets, get_adapter
from datasets.transforms import EvalTransform

# Cityscapes id → train id, literally from protocol.md.
CS_EXPECTED = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
               26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# Mapillary v1.2 id → train id, literally from protocol.md.
MV_EXPECTED = {2: 1, 3: 4, 6: 3, 7: 0, 8: 0, 9: 1, 10: 0, 11: 1, 13: 0, 14: 0, 15: 1, 17: 2, 19: 11, 20: 12,
               21: 12, 22: 12, 23: 0, 24: 0, 27: 10, 29: 9, 30: 8, 44: 5, 45: 5, 46: 7, 47: 5, 48: 6, 49: 7,
               50: 7, 52: 18, 54: 15, 55: 13, 57: 17, 58: 16, 61: 14}
SYNTHIA_EXPECTED = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
                    18: 14, 19: 15, 20: 16, 12: 17, 11: 18}

W, H = 32, 16


def expected(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(raw.shape, 255, np.uint8)
    for src, dst in table.items():
        out[raw == src] = dst
    return out


def ids_grid(n: int, h: int = H, w: int = W) -> np.ndarray:
    """An HxW map that holds every value 0..n-1 at least once."""
    return (np.arange(h * w).reshape(h, w) % n).astype(np.uint8)


def write_rgb(path: Path, seed: int = 0, h: int = H, w: int = W, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def write_gray(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_palette(path: Path, arr: np.ndarray) -> None:
    """A palette PNG whose indices are `arr` and whose colours are deliberately NOT the indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    p = Image.fromarray(arr).convert("P")
    p.putdata(arr.ravel().tolist())
    rng = np.random.default_rng(1)
    p.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tolist())
    p.save(path)
    assert Image.open(path).mode == "P"


def write_png16_rgb(path: Path, channels: np.ndarray) -> None:
    """A 16-bit RGB PNG (as SYNTHIA ships), written by hand: PIL cannot write 48-bit PNGs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, _ = channels.shape
    raw = b"".join(b"\x00" + channels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------
# tree builders (real layouts)
# --------------------------------------------------------------------------------------------------


def build_gtav(root: Path, converted: bool = False) -> np.ndarray:
    raw = ids_grid(34)
    for i, stem in enumerate(["00001", "00002"]):
        write_rgb(root / "gta/images" / f"{stem}.png", seed=i)
        write_palette(root / "gta/labels" / f"{stem}.png", raw)
    if converted:
        write_gray(root / "gta/labels/00002_labelTrainIds.png", expected(raw, CS_EXPECTED))
    return raw


def build_cityscapes(root: Path, split: str = "val", converted: bool = False) -> np.ndarray:
    raw = ids_grid(34)
    raw[0, 0] = 255  # license plate (-1) as stored in 8-bit labelIds
    for city, stem in [("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019")]:
        write_rgb(root / "cityscapes/leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        write_gray(root / "cityscapes/gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raw)
        if converted:
            write_gray(root / "cityscapes/gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png",
                       expected(raw, CS_EXPECTED))
    return raw


def build_bdd(root: Path, split: str = "val") -> np.ndarray:
    raw = ids_grid(19)
    raw[0, :4] = 255
    write_rgb(root / f"bdd100k/images/10k/{split}/7d06fefd-f7be05a6.jpg", fmt="JPEG")
    write_rgb(root / f"bdd100k/images/10k/{split}/7d128593-0ccfea4c.jpg", fmt="JPEG")
    write_gray(root / f"bdd100k/labels/sem_seg/masks/{split}/7d06fefd-f7be05a6.png", raw)
    write_gray(root / f"bdd100k/labels/sem_seg/masks/{split}/7d128593-0ccfea4c_train_id.png", raw[::-1].copy())
    return raw


def build_mapillary(root: Path, split: str = "validation", legacy: bool = False) -> np.ndarray:
    raw = ids_grid(66, h=H, w=40)
    label_dir = root / "mapillary" / split / ("labels" if legacy else "v1.2/labels")
    for i, stem in enumerate(["-0_zsxEiBBzAd1rvPGJjmA", "0aBcD1234"]):
        write_rgb(root / "mapillary" / split / "images" / f"{stem}.jpg", seed=i, w=40, fmt="JPEG")
        write_palette(label_dir / f"{stem}.png", raw)
    return raw


def build_synthia(root: Path) -> np.ndarray:
    raw = ids_grid(23)
    ch = np.stack([raw.astype(np.uint16), np.full_like(raw, 300, dtype=np.uint16), np.zeros_like(raw, np.uint16)], -1)
    for i, stem in enumerate(["0000000", "0000001"]):
        write_rgb(root / "synthia/RGB" / f"{stem}.png", seed=i)
        write_png16_rgb(root / "synthia/GT/LABELS" / f"{stem}.png", ch)
    return raw


def build_acdc(root: Path, conditions: tuple[str, ...] = ("fog", "night", "rain", "snow"), split: str = "val") -> np.ndarray:
    raw = ids_grid(34)
    for c in conditions:
        seq = "GOPR0475"
        stem = f"{seq}_frame_000041"
        write_rgb(root / "acdc/rgb_anon" / c / split / seq / f"{stem}_rgb_anon.png")
        write_gray(root / "acdc/gt" / c / split / seq / f"{stem}_gt_labelIds.png", raw)
        stem2 = f"{seq}_frame_000042"
        write_rgb(root / "acdc/rgb_anon" / c / split / seq / f"{stem2}_rgb_anon.png")
        write_gray(root / "acdc/gt" / c / split / seq / f"{stem2}_gt_labelTrainIds.png", expected(raw, CS_EXPECTED))
    return raw


# --------------------------------------------------------------------------------------------------
# exact train ids per format
# --------------------------------------------------------------------------------------------------


def test_registry_names_and_unknown():
    assert list(ADAPTERS) == ["gtav", "cityscapes", "bdd100k", "mapillary", "synthia", "acdc"]
    with pytest.raises(UserError, match="gtav, cityscapes, bdd100k, mapillary, synthia, acdc"):
        get_adapter("kitti")


def test_gtav_palette_ids_and_converted(tmp_path):
    raw = build_gtav(tmp_path, converted=True)
    ad = get_adapter("gtav")(tmp_path, "train")
    pairs = ad.pairs()
    assert [p.name for p in pairs] == ["00001", "00002"]
    assert pairs[0].label.name == "00001.png" and pairs[1].label.name == "00002_labelTrainIds.png"
    for p in pairs:
        lab = ad.load_label(p)
        assert lab.dtype == np.uint8 and lab.shape == (H, W)
        np.testing.assert_array_equal(lab, expected(raw, CS_EXPECTED))
        img = ad.load_image(p)
        assert img.shape == (H, W, 3) and img.dtype == np.uint8
    with pytest.raises(UserError, match="unknown split"):
        get_adapter("gtav")(tmp_path, "val")


def test_cityscapes_ids_and_train_ids(tmp_path):
    raw = build_cityscapes(tmp_path, "val")
    build_cityscapes(tmp_path, "train", converted=True)
    want = expected(raw, CS_EXPECTED)
    assert want[0, 0] == 255
    for split in ("val", "train"):
        ad = get_adapter("cityscapes")(tmp_path, split)
        pairs = ad.pairs()
        assert [p.name for p in pairs] == ["aachen_000000_000019", "bonn_000001_000019"]
        assert all(p.encoding == ("cityscapes_ids" if split == "val" else "train_ids") for p in pairs)
        for p in pairs:
            np.testing.assert_array_equal(ad.load_label(p), want)


def test_bdd_both_mask_names(tmp_path):
    raw = build_bdd(tmp_path)
    ad = get_adapter("bdd100k")(tmp_path, "val")
    pairs = ad.pairs()
    assert [p.name for p in pairs] == ["7d06fefd-f7be05a6", "7d128593-0ccfea4c"]
    assert pairs[1].label.name.endswith("_train_id.png")
    np.testing.assert_array_equal(ad.load_label(pairs[0]), raw)
    np.testing.assert_array_equal(ad.load_label(pairs[1]), raw[::-1])
    assert ad.load_image(pairs[0]).shape == (H, W, 3)


def test_bdd_legacy_seg_layout(tmp_path):
    raw = ids_grid(19)
    write_rgb(tmp_path / "bdd100k/seg/images/val/abc.jpg", fmt="JPEG")
    write_gray(tmp_path / "bdd100k/seg/labels/val/abc_train_id.png", raw)
    ad = get_adapter("bdd100k")(tmp_path, "val")
    np.testing.assert_array_equal(ad.load_label(ad.pairs()[0]), raw)


@pytest.mark.parametrize("legacy", [False, True])
def test_mapillary_every_class(tmp_path, legacy):
    raw = build_mapillary(tmp_path, legacy=legacy)
    ad = get_adapter("mapillary")(tmp_path, "val")
    pairs = ad.pairs()
    assert len(pairs) == 2 and pairs[0].encoding == "mapillary_v12"
    lab = ad.load_label(pairs[0])
    want = expected(raw, MV_EXPECTED)
    np.testing.assert_array_equal(lab, want)
    # every one of the 66 ids checked: listed ones land on their train id, the rest on 255
    for cid in range(66):
        assert set(np.unique(lab[raw == cid])) == {MV_EXPECTED.get(cid, 255)}, cid
    # all 19 train classes are reachable from Mapillary
    assert set(np.unique(want)) == set(range(19)) | {255}


def test_mapillary_half_resolution_on_the_fly_and_prepared(tmp_path):
    from datasets.convert import mapillary_half_resolution

    build_mapillary(tmp_path)
    full = get_adapter("mapillary")(tmp_path, "val")
    half = get_adapter("mapillary")(tmp_path, "val", half_resolution=True)
    assert not half.uses_prepared
    p = half.pairs()[0]
    img, lab = half.load_pair(p)
    assert img.shape == (H // 2, 20, 3) and lab.shape == (H // 2, 20)
    np.testing.assert_array_equal(lab, np.asarray(Image.fromarray(full.load_label(full.pairs()[0])).resize((20, 8), Image.NEAREST)))
    stats = mapillary_half_resolution(tmp_path)
    assert stats["written"] == 2
    assert mapillary_half_resolution(tmp_path) == {"written": 0, "skipped": 2}  # idempotent
    prepared = get_adapter("mapillary")(tmp_path, "val", half_resolution=True)
    assert prepared.uses_prepared
    pp = prepared.pairs()[0]
    assert "half" in pp.label.parts and pp.encoding == "train_ids"
    img2, lab2 = prepared.load_pair(pp)
    np.testing.assert_array_equal(lab2, lab)
    assert img2.shape == img.shape


def test_synthia_16bit_first_channel(tmp_path):
    raw = build_synthia(tmp_path)
    ad = get_adapter("synthia")(tmp_path, "train")
    pairs = ad.pairs()
    assert len(pairs) == 2
    np.testing.assert_array_equal(ad.load_label(pairs[0]), expected(raw, SYNTHIA_EXPECTED))


def test_acdc_conditions_and_encodings(tmp_path):
    raw = build_acdc(tmp_path)
    ad = get_adapter("acdc")(tmp_path, "val")
    pairs = ad.pairs()
    assert len(pairs) == 8 and pairs[0].name.startswith("fog/")
    for p in pairs:
        np.testing.assert_array_equal(ad.load_label(p), expected(raw, CS_EXPECTED))
    night = get_adapter("acdc")(tmp_path, "val", conditions=("night",))
    assert {p.name.split("/")[0] for p in night.pairs()} == {"night"}
    with pytest.raises(UserError, match="unknown condition"):
        get_adapter("acdc")(tmp_path, "val", conditions=("sandstorm",))


def test_find_datasets(tmp_path):
    build_gtav(tmp_path)
    build_bdd(tmp_path)
    assert find_datasets(tmp_path) == ["gtav", "bdd100k"]


def test_segmentation_dataset_eval(tmp_path):
    raw = build_cityscapes(tmp_path)
    ad = get_adapter("cityscapes")(tmp_path, "val")
    ds = SegmentationDataset(ad, EvalTransform((16, 8)), limit=1)
    assert len(ds) == 1
    item = ds[0]
    assert item["image"].shape == (3, 8, 16)  # fitted to the box
    assert item["label"].shape == (H, W)  # scored at its own resolution
    assert item["name"] == "aachen_000000_000019"
    np.testing.assert_array_equal(item["label"].numpy(), expected(raw, CS_EXPECTED))


# --------------------------------------------------------------------------------------------------
# converters
# --------------------------------------------------------------------------------------------------


def test_convert_on_a_full_disk_is_one_line_and_goes_on_when_run_again(tmp_path, monkeypatch, capsys):
    import errno

    from benchmarks.cli import main

    build_gtav(tmp_path)
    saving = Image.Image.save
    saved: list = []

    def full_after_one(self, fp, *args, **kwargs):
        if saved:
            fp.write(b"part of a PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(fp)
        return saving(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_after_one)
    assert main(["data", "convert", "gtav", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: no space left on /") and "labelTrainIds.png" in err and "run the same command again" in err
    written = sorted(tmp_path.rglob("*_labelTrainIds.png"))
    assert len(written) == 1 and not list(tmp_path.rglob("*.tmp"))  # the one written kept, no half-written file
    monkeypatch.setattr(Image.Image, "save", saving)
    assert main(["data", "convert", "gtav", "--root", str(tmp_path)]) == 0
    assert "written 1," in capsys.readouterr().out and len(list(tmp_path.rglob("*_labelTrainIds.png"))) == 2


def test_convert_gtav_and_cityscapes_idempotent(tmp_path):
    from datasets.convert import cityscapes_to_train_ids, gtav_to_train_ids

    raw = build_gtav(tmp_path)
    assert gtav_to_train_ids(tmp_path)["written"] == 2
    assert gtav_to_train_ids(tmp_path)["written"] == 0
    out = np.asarray(Image.open(tmp_path / "gta/labels/00001_labelTrainIds.png"))
    np.testing.assert_array_equal(out, expected(raw, CS_EXPECTED))
    assert all(p.encoding == "train_ids" for p in get_adapter("gtav")(tmp_path, "train").pairs())

    raw = build_cityscapes(tmp_path, "val")
    assert cityscapes_to_train_ids(tmp_path) == {"written": 2, "skipped": 0}
    assert cityscapes_to_train_ids(tmp_path) == {"written": 0, "skipped": 2}
    ad = get_adapter("cityscapes")(tmp_path, "val")
    assert all(p.encoding == "train_ids" for p in ad.pairs())
    np.testing.assert_array_equal(ad.load_label(ad.pairs()[0]), expected(raw, CS_EXPECTED))
    assert not list(tmp_path.rglob("*.tmp"))



def test_convert_ignores_a_stray_label_value_as_the_reference_converters_and_a_run_do(tmp_path, caplog):
    # A value outside the encoding stopped `data convert gtav` at that file (the files before it written), telling
    # the user to run `data convert`; the reference converters and a run map it to 255 and go on.
    from datasets.convert import gtav_to_train_ids

    raw = build_gtav(tmp_path)
    stray = raw.copy()
    stray[:2, :3] = 200
    write_palette(tmp_path / "gta/labels/00001.png", stray)
    with caplog.at_level("WARNING"):
        stats = gtav_to_train_ids(tmp_path)
    assert stats["written"] == 2 and stats["ignored_label_pixels"] == 6
    assert "00001.png" in caplog.text and "are ignored (255)" in caplog.text
    out = np.asarray(Image.open(tmp_path / "gta/labels/00001_labelTrainIds.png"))
    want = expected(raw, CS_EXPECTED)
    want[:2, :3] = 255
    np.testing.assert_array_equal(out, want)
    assert "ignored_label_pixels" not in gtav_to_train_ids(tmp_path)  # nothing converted the second time

def test_convert_synthia(tmp_path):
    from datasets.convert import synthia_to_train_ids

    raw = build_synthia(tmp_path)
    assert synthia_to_train_ids(tmp_path)["written"] == 2
    ad = get_adapter("synthia")(tmp_path, "train")
    assert all(p.encoding == "train_ids" for p in ad.pairs())
    np.testing.assert_array_equal(ad.load_label(ad.pairs()[1]), expected(raw, SYNTHIA_EXPECTED))


# -- what a copy of a dataset can hold: linked folders, duplicate names, files that appear meanwhile ------
def test_a_linked_city_folder_holds_pairs_too(tmp_path):
    build_cityscapes(tmp_path / "elsewhere")
    root = tmp_path / "data"
    for side in ("leftImg8bit", "gtFine"):
        (root / "cityscapes" / side / "val").mkdir(parents=True)
        for city in ("aachen", "bonn"):
            (root / "cityscapes" / side / "val" / city).symlink_to(tmp_path / "elsewhere/cityscapes" / side / "val" / city)
    (root / "cityscapes/gtFine/val/bonn/loop").symlink_to(root / "cityscapes/gtFine/val")  # read once, no loop
    names = [p.name for p in get_adapter("cityscapes")(root, "val").pairs()]
    assert names == ["aachen_000000_000019", "bonn_000001_000019"]
    # `data convert cityscapes` reads the same folders (its own rglob found no label behind a link)
    from datasets.convert import cityscapes_to_train_ids

    assert cityscapes_to_train_ids(root) == {"written": 2, "skipped": 0}
    assert all(p.encoding == "train_ids" for p in get_adapter("cityscapes")(root, "val").pairs())


@pytest.mark.parametrize(("family", "build", "copy"), [
    ("cityscapes", build_cityscapes, ("cityscapes/leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png",
                                      "cityscapes/leftImg8bit/val/copy/aachen_000000_000019_leftImg8bit.png")),
    ("gtav", build_gtav, ("gta/images/00001.png", "gta/images/00001.jpg")),
    ("cityscapes", build_cityscapes, ("cityscapes/gtFine/val/bonn/bonn_000001_000019_gtFine_labelIds.png",
                                      "cityscapes/gtFine/val/zz/bonn_000001_000019_gtFine_labelIds.png")),
])
def test_two_files_of_one_pair_name_are_an_error_not_a_choice_of_the_file_systems_order(tmp_path, family, build, copy):
    build(tmp_path)
    original, duplicate = tmp_path / copy[0], tmp_path / copy[1]
    duplicate.parent.mkdir(parents=True, exist_ok=True)
    duplicate.write_bytes(original.read_bytes())
    with pytest.raises(UserError, match="gives the same pair name") as err:
        get_adapter(family)(tmp_path, "val" if family == "cityscapes" else "train").pairs()
    assert str(min(original, duplicate)) in str(err.value) and str(max(original, duplicate)) in str(err.value)


def test_a_converted_label_beside_the_raw_one_is_a_choice_not_a_duplicate(tmp_path):
    build_gtav(tmp_path, converted=True)
    pairs = {p.name: p for p in get_adapter("gtav")(tmp_path, "train").pairs()}
    assert pairs["00002"].encoding == "train_ids" and pairs["00001"].encoding == "cityscapes_ids"


def test_a_prepared_mapillary_copy_appearing_meanwhile_leaves_the_pairs_found_before_as_they_were(tmp_path):
    build_mapillary(tmp_path)
    half = get_adapter("mapillary")(tmp_path, "val", half_resolution=True)
    pair = half.pairs()[0]
    before = [a.shape for a in half.load_pair(pair)]
    (tmp_path / "mapillary/half/validation/images").mkdir(parents=True)  # a convert starting beside the run
    (tmp_path / "mapillary/half/validation/labels").mkdir(parents=True)
    assert [a.shape for a in half.load_pair(pair)] == before == [(H // 2, 20, 3), (H // 2, 20)]


def test_an_unreadable_synthia_label_is_one_line_naming_it(tmp_path):
    build_synthia(tmp_path)
    broken = tmp_path / "synthia/GT/LABELS/0000001.png"
    broken.write_bytes(b"")
    adapter = get_adapter("synthia")(tmp_path, "train")
    with pytest.raises(UserError, match="cannot decode the SYNTHIA label") as err:
        adapter.load_pair(adapter.pairs()[1])
    assert str(broken) in str(err.value)


def test_check_names_the_label_it_cannot_read(tmp_path):
    build_gtav(tmp_path)
    (tmp_path / "gta/labels/00002.png").write_bytes(b"")
    adapter = get_adapter("gtav")(tmp_path, "train")
    problems = adapter.check(sample=1, pairs=adapter.pairs())  # pair 0 decoded, pair 1 read by its headers only
    assert problems == [p for p in problems if p.startswith(f"{tmp_path / 'gta/labels/00002.png'}: cannot read")]
    assert problems


def test_an_interrupted_half_resolution_copy_is_refused_not_scored_as_the_whole_split(tmp_path):
    """`convert mapillary-half` stopped after one of the two val pairs: a run would score Mapillary on that
    one. The copy is compared with the originals it was made from; re-running the convert completes it."""
    from datasets.convert import mapillary_half_resolution

    build_mapillary(tmp_path)
    mapillary_half_resolution(tmp_path, splits=("val",))
    dropped = sorted((tmp_path / "mapillary/half/validation/images").iterdir())[-1]
    (tmp_path / "mapillary/half/validation/labels" / dropped.name).unlink()
    dropped.unlink()
    with pytest.raises(UserError, match=r"holds 1 of the 2 pairs") as err:
        get_adapter("mapillary")(tmp_path, "val", half_resolution=True).pairs()
    assert "data convert mapillary-half" in str(err.value)
    rows, problems = run_check(tmp_path)
    row = next(r for r in rows if r[:2] == ("mapillary", "val"))
    assert row[2] == "-" and "holds 1 of the 2 pairs" in row[3] and len(problems) == 1
    mapillary_half_resolution(tmp_path, splits=("val",))
    assert len(get_adapter("mapillary")(tmp_path, "val", half_resolution=True).pairs()) == 2
    assert run_check(tmp_path)[1] == []


def test_a_half_resolution_copy_without_its_originals_is_used_as_it_is(tmp_path):
    """The originals deleted to save disk after the convert: nothing to compare with, the copy is the split."""
    import shutil

    from datasets.convert import mapillary_half_resolution

    build_mapillary(tmp_path)
    mapillary_half_resolution(tmp_path, splits=("val",))
    shutil.rmtree(tmp_path / "mapillary/validation")
    assert len(get_adapter("mapillary")(tmp_path, "val", half_resolution=True).pairs()) == 2


def test_convert_mapillary_half_halves_val_only_by_default(tmp_path):
    """docs/datasets.md: val only (train is in no setting); prepare does the same."""
    import shutil

    from datasets.convert import mapillary_half_resolution

    build_mapillary(tmp_path)
    shutil.copytree(tmp_path / "mapillary/validation", tmp_path / "mapillary/training")
    assert mapillary_half_resolution(tmp_path)["written"] == 2
    assert sorted(p.name for p in (tmp_path / "mapillary/half").iterdir()) == ["validation"]
    shutil.rmtree(tmp_path / "mapillary/validation")
    with pytest.raises(UserError, match="no Mapillary validation/ folder found"):
        mapillary_half_resolution(tmp_path)


def test_c_to_acdc_scores_each_condition_apart_at_the_reference_box(tmp_path):
    """The protocol scores ACDC val per condition (Rein's mean_mIoU is the mean of the four), and Rein's
    ACDC test pipeline fits 960×540 where Cityscapes fits 1024×512."""
    from benchmarks.config import SETTINGS, load_experiment
    from benchmarks.data import target_dataset
    from datasets.transforms import eval_transform_for

    build_acdc(tmp_path)
    exp = load_experiment("paper")
    source, targets = SETTINGS["C->ACDC"]
    assert source == "cityscapes" and targets == ("acdc_fog", "acdc_night", "acdc_rain", "acdc_snow")
    for target in targets:
        dataset = target_dataset(exp, target, tmp_path)
        condition = target.removeprefix("acdc_")
        assert {pair.name.split("/")[0] for pair in dataset.pairs} == {condition}
        assert len(dataset.pairs) == 2
        image, label = dataset.transform(np.zeros((1080, 1920, 3), np.uint8), np.zeros((1080, 1920), np.uint8))
        assert tuple(image.shape[1:]) == (540, 960) and tuple(label.shape) == (1080, 1920)
    assert eval_transform_for(get_adapter("cityscapes")(tmp_path, "val"), tuple(exp.eval.fit_size)).fit_size == (1024, 512)
    with pytest.raises(UserError, match="unknown target 'acdc_sandstorm'"):
        target_dataset(exp, "acdc_sandstorm", tmp_path)
