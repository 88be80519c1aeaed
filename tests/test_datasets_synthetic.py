"""The synthetic world: all 19 classes per domain style, determinism, real layouts/encodings, domain shift."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from benchmarks.commands.data import run_check
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


def test_the_presets_generate_the_current_world_version_into_their_own_folder():
    # A world drawn by an older generator must never be picked up as the current one.
    from benchmarks.config import load_experiment
    from datasets.synthetic import WORLD_VERSION

    for preset in ("proxy", "smoke"):
        assert load_experiment(preset, []).data.root.endswith(f"synthetic-v{WORLD_VERSION}")


def test_the_benchmark_cameras_are_zoomed_and_the_pretraining_ones_are_not():
    from datasets.synthetic import WORLD_ZOOM, Style

    assert WORLD_ZOOM == 2.0
    assert STYLES["gtav"].focal == (0.7 * WORLD_ZOOM, 0.85 * WORLD_ZOOM)
    rng = np.random.default_rng(0)
    assert random_style(rng).focal[1] <= 1.3 < STYLES["cityscapes"].focal[0]
    assert Style(name="x").focal == (0.75, 0.9)
