"""A linear probe of frozen features: how well a backbone's tokens alone tell the 19 classes apart.

The usual check of what a pretrained backbone knows (DINOv2 reports linear-probe segmentation), used here
to judge the proxy ViT's pretraining apart from any fine-tuning method and any decode head: a linear
classifier on the tokens of one pyramid level, each token labelled by the label pixel at its centre,
trained with class-balanced cross-entropy (so that a class of 0.1 % of the pixels weighs as much as
road) and scored per class on the held-out source pairs. Probing the raw p×p pixel patches instead gives
the floor that pretrained features should beat. `tools/linear-probe` prints the table in
docs/results.md's calibration log.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from benchmarks.metrics import confusion_metric, iou_from_confusion, miou_percent

Featurizer = Callable[[torch.Tensor], torch.Tensor]
"""Images [1,3,H,W] (H, W multiples of the patch) → features [C, H/s, W/s] at the featurizer's stride s."""


@dataclass(frozen=True)
class ProbeScore:
    miou: float
    """Mean IoU in percent over the classes scored (present in the tokens or predicted), as a run's mIoU."""
    recall: list[float]
    """Per class, percent of its tokens predicted as it (NaN where a class has no token)."""
    iou: list[float]
    """Per class IoU in percent (NaN where a class is neither in the tokens nor predicted)."""
    train_tokens: int
    test_tokens: int


def token_samples(dataset: Dataset, featurize: Featurizer, patch: int, images: int,
                  ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, C], labels [N]) of the labelled tokens of the first `images` samples (all of them if
    the dataset has fewer). Images are cropped to a multiple of `patch`; a token's label is the label pixel
    at the centre of the cell it covers, found at the label's own resolution (an evaluation transform
    resizes the image to its fit box and leaves the label as it is)."""
    features, labels = [], []
    for index in range(min(images, len(dataset))):
        sample = dataset[index]
        image, label = sample["image"], sample["label"]
        height, width = (image.shape[-2] // patch) * patch, (image.shape[-1] // patch) * patch
        with torch.no_grad():
            tokens = featurize(image[None, :, :height, :width])
        # The pyramid resizes the token grid by a power of two (×4 … ×0.5, flooring an odd side), so a
        # feature's centre is (i + ½)·stride in pixels; stride from the sizes alone is wrong on odd grids.
        stride = patch * 2.0 ** round(math.log2((height // patch) / tokens.shape[-2]))
        rows, columns = ((torch.arange(count) + 0.5) * stride for count in tokens.shape[-2:])
        rows = (rows * label.shape[-2] / image.shape[-2]).long()
        columns = (columns * label.shape[-1] / image.shape[-1]).long()
        centre = label[rows][:, columns]
        features.append(tokens.flatten(1).T)
        labels.append(centre.flatten().long())
    x, y = torch.cat(features), torch.cat(labels)
    keep = y != ignore_index
    return x[keep], y[keep]


def fit_and_score(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                  num_classes: int, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> ProbeScore:
    """A linear classifier on standardised features, full-batch Adam, class-balanced cross-entropy."""
    (x_train, y_train), (x_test, y_test) = train, test
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    counts = torch.bincount(y_train, minlength=num_classes).float()
    balance = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros(num_classes))
    generator = torch.Generator().manual_seed(seed)
    classifier = torch.nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0, 0.01, generator=generator)
        classifier.bias.zero_()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(classifier(x_train), y_train, weight=balance).backward()
        optimizer.step()
    with torch.no_grad():
        predicted = classifier(x_test).argmax(1)
    metric = confusion_metric(num_classes)  # the benchmark's own scoring: IoU and mIoU as for a run
    metric.update(predicted, y_test)
    confusion = metric.compute().double()
    iou = iou_from_confusion(confusion)
    truth = confusion.sum(1)
    recall = torch.where(truth > 0, confusion.diag() / truth.clamp(min=1), torch.full_like(truth, float("nan")))
    return ProbeScore(miou=miou_percent(iou), recall=(recall * 100).tolist(), iou=(iou * 100).tolist(),
                      train_tokens=len(y_train), test_tokens=len(y_test))


def pixel_patches(patch: int) -> Featurizer:
    """Each p×p patch's 3·p·p raw values: the floor for learned features."""

    def featurize(images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2] // patch, images.shape[-1] // patch
        return F.unfold(images, patch, stride=patch).view(-1, h, w)

    return featurize


def backbone_level(backbone: torch.nn.Module, level: int) -> Featurizer:
    """One pyramid level of a benchmark backbone (`benchmarks.backbones`), in eval mode."""
    backbone.eval()

    def featurize(images: torch.Tensor) -> torch.Tensor:
        return backbone(images)[level][0]

    return featurize
