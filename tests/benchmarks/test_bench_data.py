"""Data loading at the real GTAV resolution (1914×1052): PNG decode + the protocol's train transforms."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasets.base import read_image
from datasets.synthetic import STYLES, render_scene
from datasets.transforms import TrainTransform

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def gtav_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gtav")
    image, label, _ = render_scene(np.random.default_rng(0), STYLES["gtav"], 1052, 1914)
    Image.fromarray(image).save(folder / "00001.png")
    Image.fromarray(label).save(folder / "00001_label.png")
    return folder / "00001.png", folder / "00001_label.png"


def test_decode(benchmark, gtav_pair):
    image_path, _ = gtav_pair
    out = benchmark(read_image, image_path)
    assert out.shape == (1052, 1914, 3)


def test_decode_and_train_transform(benchmark, gtav_pair):
    """What a loader worker does per paper-preset sample (crop 512, short edge 256..1024)."""
    image_path, label_path = gtav_pair
    transform = TrainTransform(crop_size=512, scale_base=512, max_long_edge=2048)
    rng = np.random.default_rng(0)

    def load():
        with Image.open(label_path) as im:
            label = np.asarray(im)
        return transform(read_image(image_path), label, rng)

    image, label = benchmark(load)
    assert image.shape == (3, 512, 512) and label.shape == (512, 512)
