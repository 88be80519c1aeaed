"""What a profile feeds the model instead of a dataset: a few rendered scenes at the crop size, and the
size of a target image as evaluated; no data folder and no weight file is needed."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from benchmarks.config import Experiment


class SyntheticSource(Dataset):
    """A few rendered street scenes at the crop size, served for any (index, seed) the stream asks.

    Rendered once (the synthetic world's generator, so labels have real structure for the
    Mask2Former matcher) and returned as tensors: the profile times the step, not data loading.
    """

    def __init__(self, crop_size: int, count: int, seed: int = 0):
        from datasets.synthetic import STYLES, render_scene
        from datasets.transforms import MEAN, STD, label_tensor, to_tensor

        rng = np.random.default_rng(seed)
        self.samples = []
        for _ in range(max(count, 1)):
            image, label, _ = render_scene(rng, STYLES["gtav"], crop_size, crop_size)
            self.samples.append({"image": to_tensor(image, MEAN, STD), "label": label_tensor(label)})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index = item[0] if isinstance(item, tuple) else item
        return self.samples[index % len(self.samples)]


def without_weight_files(exp: Experiment) -> Experiment:
    return dataclasses.replace(exp, model=dataclasses.replace(exp.model, weights=()))


def window_count(height: int, width: int, crop: int, stride: int) -> int:
    from benchmarks.protocol import window_origins

    return len(window_origins(height, crop, stride)) * len(window_origins(width, crop, stride))


def eval_image_size(exp: Experiment) -> tuple[int, int]:
    """(H, W) of a target image as evaluated: the fit box (long, short) of Cityscapes/Mapillary."""
    long_edge, short_edge = exp.eval.fit_size
    return int(short_edge), int(long_edge)
