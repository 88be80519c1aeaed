"""The synthetic world: all 19 classes per domain style, determinism, real layouts/encodings, domain shift."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks.commands.data import run_check
from benchmarks.errors import UserError
from datasets.labels import NUM_CLASSES
from datasets.registry import get_adapter
from datasets.synthetic import (
    STYLES,
    class_frequencies,
    format_frequencies,
    generate_world,
    random_style,
    render_scene,
    save_preview,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    stats = generate_world(root, size="tiny", seed=3)
    return root, stats


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_class_appears_in_each_style(style):
    seen = np.zeros(256, bool)
    for i in range(40):
        img, lab, depth = render_scene(np.random.default_rng(i), STYLES[style], 64, 128)
        assert img.shape == (64, 128, 3) and img.dtype == np.uint8
        assert lab.shape == (64, 128) and lab.dtype == np.uint8 and depth.dtype == np.float32
        seen[np.unique(lab)] = True
    assert seen[:NUM_CLASSES].all(), np.flatnonzero(~seen[:NUM_CLASSES])
    assert not seen[NUM_CLASSES:255].any()


def test_render_is_deterministic_and_random_styles_vary():
    a = render_scene(np.random.default_rng(7), STYLES["bdd100k"], 45, 80)
    b = render_scene(np.random.default_rng(7), STYLES["bdd100k"], 45, 80)
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(x, y)
    s1, s2 = random_style(np.random.default_rng(1)), random_style(np.random.default_rng(2))
    assert s1.palette != s2.palette and s1 != s2
    img, lab, _ = render_scene(np.random.default_rng(0), s1, 48, 96)
    assert img.shape == (48, 96, 3) and lab.max() <= 255


def test_domain_shift_is_real():
    """Source and targets differ measurably in colour statistics (same scene seeds)."""
    def stats(style: str) -> np.ndarray:
        imgs = [render_scene(np.random.default_rng(i), STYLES[style], 64, 128)[0].astype(np.float32) for i in range(12)]
        x = np.stack(imgs)
        sat = (x.max(-1) - x.min(-1)).mean()
        return np.array([*x.mean((0, 1, 2)), sat])

    g = stats("gtav")
    for target in ("cityscapes", "bdd100k", "mapillary"):
        assert np.abs(stats(target) - g).max() > 8.0, target
    assert stats("gtav")[3] > stats("cityscapes")[3]  # the game look is more saturated


def test_world_layout_and_encodings(world):
    root, stats = world
    assert (root / "gta/images/00001.png").is_file()
    assert Image.open(root / "gta/labels/00001.png").mode == "P"  # palette of Cityscapes ids
    cs = sorted((root / "cityscapes/gtFine/val").rglob("*_gtFine_labelIds.png"))
    assert len(cs) == 3 and Image.open(cs[0]).mode == "L"
    assert np.asarray(Image.open(cs[0])).max() <= 33 or 255 in np.asarray(Image.open(cs[0]))
    assert len(list((root / "bdd100k/images/10k/val").glob("*.jpg"))) == 3
    assert len(list((root / "bdd100k/labels/sem_seg/masks/train").glob("*_train_id.png"))) == 2
    mv = sorted((root / "mapillary/validation/v1.2/labels").glob("*.png"))
    assert len(mv) == 3 and Image.open(mv[0]).mode == "P"
    assert np.asarray(Image.open(mv[0])).max() <= 65
    assert len(list((root / "mapillary/validation/images").glob("*.jpg"))) == 3
    assert not list(root.rglob("*.tmp"))
    rows, problems = run_check(root, full=True)
    assert problems == []
    assert {(r[0], r[1]) for r in rows} >= {("gtav", "train"), ("cityscapes", "val"), ("bdd100k", "val"), ("mapillary", "val")}
    # the Mapillary eval path (half resolution on the fly) works on the synthetic world
    ad = get_adapter("mapillary")(root, "val", half_resolution=True)
    img, lab = ad.load_pair(ad.pairs()[0])
    assert img.shape[:2] == lab.shape
    assert set(stats["frequencies"]) == {"gtav", "cityscapes", "bdd100k", "mapillary"}


def test_world_is_deterministic_and_rerun_safe(world, tmp_path):
    root, _ = world
    generate_world(tmp_path, size="tiny", seed=3)

    def digest(r):
        return {str(p.relative_to(r)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(r.rglob("*")) if p.is_file()}

    first = digest(tmp_path)
    assert first == digest(root)
    generate_world(tmp_path, size="tiny", seed=3)  # re-run skips existing pairs
    assert digest(tmp_path) == first
    # a worker terminated mid-write (Ctrl-C with --workers 2) left its temporary file; finishing removes it
    orphan = tmp_path / "gta" / "images" / ".00001.png.x1y2z3.tmp"
    orphan.write_bytes(b"half an image")
    os.utime(orphan, (time.time() - 60, time.time() - 60))
    generate_world(tmp_path, size="tiny", seed=3)
    assert not orphan.exists() and digest(tmp_path) == first


def test_frequencies_and_preview(world, tmp_path):
    root, _ = world
    freqs = class_frequencies(root)
    for _dom, table in freqs.items():
        assert len(table) == NUM_CLASSES
        assert abs(sum(table.values()) - 100.0) < 1e-6
    text = format_frequencies(freqs)
    assert "road" in text and "bicycle" in text and "mapillary" in text
    out = save_preview(root, tmp_path / "p.png", per_domain=2)
    im = Image.open(out)
    assert im.width > 200 and im.height >= 4 * 96


def test_the_presets_name_a_world_version_the_generator_draws_in_their_folder():
    # A world drawn by another version must never be picked up as the preset's: each version has its folder.
    from benchmarks.config import DataConfig, load_experiment
    from benchmarks.data import synthetic_world_version
    from datasets.synthetic import WORLD_VERSIONS

    roots = [load_experiment(preset, []).data.root for preset in ("proxy", "smoke")] + [DataConfig.root]
    assert {synthetic_world_version(root) for root in roots} <= set(WORLD_VERSIONS)


def test_the_benchmark_cameras_are_zoomed_and_the_pretraining_ones_are_not():
    from datasets.synthetic import WORLD_ZOOM, Style

    assert WORLD_ZOOM == 2.0
    assert STYLES["gtav"].focal == (0.7 * WORLD_ZOOM, 0.85 * WORLD_ZOOM)
    rng = np.random.default_rng(0)
    assert random_style(rng).focal[1] <= 1.3 < STYLES["cityscapes"].focal[0]
    assert Style(name="x").focal == (0.75, 0.9)


def _digest(value) -> str:
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def test_the_proxy_world_is_drawn_as_before_the_paper_size(world):
    """The small world a benchmark depends on keeps every pair's size, and the tiny world its labels, as the
    generator drew them before the paper size was added (pins computed from worlds written then). A change
    here is a new world: bump WORLD_VERSION (or, after a Pillow/numpy upgrade alone, re-pin)."""
    from datasets.synthetic import planned_sizes

    sizes = {key: sorted(list(s) for s in value) for key, value in planned_sizes("small", seed=0).items()}
    assert _digest(sizes) == "cc25faf41d8eb752"
    root, _ = world
    labels = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        if "labels" in path.parts or "gtFine" in path.parts:
            labels.update(str(path.relative_to(root)).encode())
            labels.update(np.asarray(Image.open(path)).tobytes())
    assert labels.hexdigest()[:16] == "ee761a596098f3d7"


def test_the_paper_world_is_planned_at_the_real_resolutions():
    """Every domain at its real dataset's size and aspect (checked on the plan: nothing is rendered)."""
    from datasets.synthetic import CAMERA_STYLES, SIZE_RESOLUTIONS, planned_sizes

    plan = planned_sizes("paper", seed=0)
    assert {k: len(v) for k, v in plan.items()} == {
        "gtav/train": 24, "cityscapes/train": 4, "cityscapes/val": 12, "bdd100k/val": 12, "bdd100k/train": 2,
        "mapillary/val": 12, "mapillary/train": 2}
    gtav = plan["gtav/train"]
    assert gtav.count((1914, 1052)) >= 0.8 * len(gtav) and len(set(gtav)) > 1  # mostly 1914×1052, some differ
    assert set(plan["cityscapes/train"] + plan["cityscapes/val"]) == {(2048, 1024)}
    assert set(plan["bdd100k/val"] + plan["bdd100k/train"]) == {(1280, 720)}
    mapillary = plan["mapillary/val"] + plan["mapillary/train"]
    assert min(min(s) for s in mapillary) >= 1080 and max(max(s) for s in mapillary) >= 4000
    assert len(set(mapillary)) >= 5  # varied
    assert {round(max(s) / min(s), 2) for s in mapillary} <= {1.33, 1.78}  # 4:3 and 16:9, some portrait
    assert any(w < h for w, h in mapillary) and any(w > h for w, h in mapillary)
    # the real resolutions carry the real cameras: no zoom standing in for missing pixels
    assert SIZE_RESOLUTIONS["paper"].styles is CAMERA_STYLES
    assert CAMERA_STYLES["gtav"].focal == (0.7, 0.85) and STYLES["gtav"].focal == (1.4, 1.7)
    tiny = planned_sizes("paper_tiny", seed=0)
    assert set(tiny) >= {"gtav/train", "cityscapes/train", "cityscapes/val", "bdd100k/val", "mapillary/val"}


def test_an_unknown_size_is_refused():
    from benchmarks.errors import UserError
    from datasets.synthetic import planned_sizes

    with pytest.raises(UserError, match="unknown synthetic size 'huge'"):
        planned_sizes("huge")


def test_a_world_is_never_mixed_into_another_or_into_other_data(world, tmp_path):
    root, _ = world  # seed 3, tiny: its record is there
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(UserError, match="holds another synthetic world") as err:
        generate_world(root, size="tiny", seed=4)
    assert "'seed': 3" in str(err.value)
    (tmp_path / "real" / "cityscapes").mkdir(parents=True)  # a data root of the user's
    with pytest.raises(UserError, match="is not empty and holds no synthetic world record"):
        generate_world(tmp_path / "real", size="tiny")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert list((tmp_path / "real").iterdir()) == [tmp_path / "real" / "cityscapes"]


def test_synthetic_archives_never_replace_a_file_with_an_official_name(world, tmp_path):
    from datasets.archives import write_official_archives

    root, _ = world
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "leftImg8bit_trainvaltest.zip").write_bytes(b"the real download")
    with pytest.raises(UserError, match="leftImg8bit_trainvaltest.zip exists, perhaps the real download"):
        write_official_archives(root, downloads)
    assert (downloads / "leftImg8bit_trainvaltest.zip").read_bytes() == b"the real download"
    assert [p.name for p in downloads.iterdir()] == ["leftImg8bit_trainvaltest.zip"]


def test_a_world_generation_interrupted_on_first_use_leaves_no_partial_folder(tmp_path, monkeypatch):
    """The next run generates afresh under its own pid: a kept `.synthetic-v2.partial-<pid>` was never used again."""
    import datasets.synthetic as synthetic
    from benchmarks.config import load_experiment
    from benchmarks.data import ensure_data_root

    def interrupted(out, **kwargs):
        (tmp_path / "data" / out.name / "gta").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_world", interrupted)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        ensure_data_root(load_experiment("smoke", []))
    assert [p.name for p in (tmp_path / "data").iterdir()] == []



# -- world versions ---------------------------------------------------------------------------------------------
_RENDER_AT_THIS_SIMD_LEVEL = """
import dataclasses, hashlib, json
import numpy as np
from datasets.synthetic import STYLES, render_scene

def digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]

styles = dict(STYLES, night=dataclasses.replace(STYLES["bdd100k"], night_prob=1.0, haze=(0.3, 0.6)))
images = {version: [digest(render_scene(np.random.default_rng([5, index]), style, 128, 256, version=version)[0])
                    for style in styles.values() for index in range(4)] for version in (2, 3)}
probe = digest(np.exp(-np.linspace(0, 30, 100_003, dtype=np.float32)))  # numpy's float32 kernel itself
print(json.dumps({"images": images, "exp_float32": probe}))
"""


def _render_in_a_process(env_extra: dict[str, str]) -> dict:
    import json
    import subprocess
    import sys

    env = {**os.environ, **env_extra}
    done = subprocess.run([sys.executable, "-c", _RENDER_AT_THIS_SIMD_LEVEL], env=env, capture_output=True, text=True,
                          check=True, timeout=300)
    return json.loads(done.stdout)


def test_world_v3_draws_the_same_pixels_at_every_simd_level():
    """What made the world CPU-dependent (numpy's float32 exp and power, whose last bit follows the SIMD level)
    no longer reaches v3's pixels: the same scenes drawn with numpy's dispatched kernels and with its baseline
    ones (and libjpeg-turbo's SIMD off) are the same bytes. (On the AVX2 box of 2026-12-07, 3 of these 20 v2
    images differ.)"""
    from numpy._core import _multiarray_umath as umath

    above_baseline = [name for name in umath.__cpu_dispatch__ if umath.__cpu_features__.get(name)]
    if not above_baseline:
        pytest.skip("this CPU has no SIMD level above numpy's baseline to compare with")
    here = _render_in_a_process({})
    baseline = _render_in_a_process({"NPY_DISABLE_CPU_FEATURES": ",".join(above_baseline), "JSIMD_FORCENONE": "1"})
    if here["exp_float32"] == baseline["exp_float32"]:
        pytest.skip(f"numpy's float32 exp rounds alike with and without {above_baseline} here: nothing to compare")
    assert here["images"]["3"] == baseline["images"]["3"]


def _last_bits_up(kernel):
    """`kernel` rounded worse than any CPU's: every result 64 units in the last place of its type higher."""
    def rounded_otherwise(*args, **kwargs):
        result = np.asarray(kernel(*args, **kwargs))
        return result + 64 * np.spacing(result)
    return rounded_otherwise


def test_world_v3_pixels_do_not_follow_the_last_bits_of_exp_and_power(monkeypatch):
    """The same property on any CPU: every exp and power result moved by 64 units in its last place (two
    CPUs' kernels differ by one or two) leaves v3's images alone, where v2's follow it (the check reaches the
    pixels)."""
    hazy = {name: dataclasses.replace(STYLES[name], haze=(0.3, 0.6)) for name in ("gtav", "cityscapes")}
    styles = [*hazy.values(), dataclasses.replace(STYLES["bdd100k"], night_prob=1.0)]

    def images(version):
        return [render_scene(np.random.default_rng(index), style, 64, 128, version=version)[0].tobytes()
                for style in styles for index in range(2)]

    before = {version: images(version) for version in (2, 3)}
    monkeypatch.setattr(np, "exp", _last_bits_up(np.exp))
    monkeypatch.setattr(np, "power", _last_bits_up(np.power))
    assert images(3) == before[3]
    assert images(2) != before[2]


def test_world_v3_draws_v2s_scenes_with_another_image():
    """Same draws, so same labels and depth: v3 changes how an image is drawn, not what is in it."""
    night = dataclasses.replace(STYLES["bdd100k"], night_prob=1.0)
    changed = 0
    for index in range(6):
        old = render_scene(np.random.default_rng(index), night, 64, 128, version=2)
        new = render_scene(np.random.default_rng(index), night, 64, 128, version=3)
        np.testing.assert_array_equal(old[1], new[1])
        np.testing.assert_array_equal(old[2], new[2])
        changed += not np.array_equal(old[0], new[0])
    assert changed >= 3


@pytest.mark.parametrize("version", [2, 3])
def test_what_stands_in_front_of_a_light_covers_its_glow_from_v3(version):
    from datasets.synthetic import _Canvas

    canvas = _Canvas(40, 40, 40.0, 20.0, 1.5, 0.0, version)
    canvas.glow((10, 10, 20, 20))  # a lamp far off
    canvas.poly([(5, 5), (25, 5), (25, 25), (5, 25)], "wall", (90, 90, 90), 5.0)  # a wall in front of it
    lit_behind_the_wall = np.asarray(canvas.emit)[12:18, 12:18]
    assert (lit_behind_the_wall == 0).all() if version >= 3 else (lit_behind_the_wall == 255).all()
    canvas.glow((10, 10, 20, 20))  # a lamp on the wall, drawn after it, still shines
    assert (np.asarray(canvas.emit)[12:18, 12:18] == 255).all()


@pytest.mark.parametrize("version", [2, 3])
def test_a_fences_bars_stay_on_the_fence_from_v3(version):
    from datasets.synthetic import WC, _Canvas

    canvas = _Canvas(40, 40, 40.0, 20.0, 1.5, 0.0, version)
    canvas.poly([(10, 10), (30, 10), (30, 30), (10, 30)], "fence", (120, 105, 85), 5.0)
    canvas.detail_lines([[(x + 0.5, 4.0), (x + 0.5, 36.0)] for x in (12, 20, 28)], (1, 2, 3), "fence")
    bar = (np.asarray(canvas.colour) == (1, 2, 3)).all(axis=-1)
    fence = np.asarray(canvas.label) == WC["fence"]
    assert (bar & fence).sum() >= 3 * 18  # the three bars across the fence's 20 rows
    assert (bar & ~fence).any() == (version < 3)  # v2 drew them past the fence, here to rows 4-36
    before = np.asarray(canvas.colour).copy()
    canvas.detail_lines([], (1, 2, 3), "fence")  # a fence too short for a bar
    assert np.array_equal(np.asarray(canvas.colour), before)


def test_data_synth_writes_the_version_its_folder_is_named_for(tmp_path, capsys):
    import json

    from benchmarks.cli import main
    from datasets.synthetic import WORLD_RECORD

    assert main(["data", "synth", "--out", str(tmp_path / "synthetic-v2"), "--size", "paper_tiny"]) == 0
    assert json.loads((tmp_path / "synthetic-v2" / WORLD_RECORD).read_text())["world_version"] == 2
    assert "version 2" in capsys.readouterr().out


def test_a_preset_world_folder_of_either_version_is_generated_on_first_use_as_that_version(tmp_path, monkeypatch):
    import datasets.synthetic as synthetic
    from benchmarks.config import load_experiment
    from benchmarks.data import ensure_data_root, synthetic_world_version

    asked = []

    def record(out, **kwargs):
        asked.append(kwargs["version"])
        out.mkdir(parents=True)

    monkeypatch.setattr(synthetic, "generate_world", record)
    monkeypatch.chdir(tmp_path)
    for version in (2, 3):
        ensure_data_root(load_experiment("smoke", [f"data.root=data/synthetic-v{version}"]))
    assert asked == [2, 3] and synthetic_world_version("./data/synthetic-v3/") == 3
    assert synthetic_world_version("data/synthetic-v1") is None and synthetic_world_version("elsewhere/synthetic-v3") is None


@pytest.mark.parametrize(("record", "expected"), [
    ('{"size": "small", "seed": 0, "world_version": 2}\n', "is named for synthetic world version 3 but holds version 2; "
                                                           "rename it synthetic-v2"),
    ("{not json", "is named for synthetic world version 3 but its .synthetic-world.json is unreadable"),
])
def test_a_world_folder_holding_another_version_than_its_name_is_refused(tmp_path, monkeypatch, record, expected):
    # `data synth --out data/synthetic-v3` before the generator drew v3 wrote v2 there, with v2's record
    from benchmarks.config import load_experiment
    from benchmarks.data import ensure_data_root

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "synthetic-v3"
    folder.mkdir(parents=True)
    (folder / ".synthetic-world.json").write_text(record)
    for root in ("data/synthetic-v3", str(folder)):  # as the presets name it, or wherever it lies
        with pytest.raises(UserError, match=expected):
            ensure_data_root(load_experiment("smoke", [f"data.root={root}"]))
    (folder / ".synthetic-world.json").write_text(record.replace('"world_version": 2', '"world_version": 3'))
    if "world_version" in record:
        assert ensure_data_root(load_experiment("smoke", [f"data.root={folder}"])) == folder


def test_a_facades_lit_windows_keep_their_light_in_v3():
    """Far down the street a façade's windows are less than a pixel apart: v3's shapes clear the light behind
    them, so its lit windows are drawn after the façade's own shapes (which stand beside them, not in front)."""
    from datasets.synthetic import _Canvas, _StreetScene

    light = {}
    for version in (2, 3):
        canvas = _Canvas(90, 160, 224.0, 40.0, 1.5, 0.0, version)
        _StreetScene(canvas, np.random.default_rng(0), STYLES["bdd100k"]).building(-6.0, -1, 40.0, 140.0, 20.0)
        light[version] = np.asarray(canvas.emit)
    assert light[2].any() and np.array_equal(light[3], light[2])
