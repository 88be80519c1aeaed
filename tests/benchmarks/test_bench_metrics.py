"""Confusion-matrix update of one scored image (Cityscapes label resolution 1024×2048, 19 classes)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.metrics import confusion_metric

pytestmark = pytest.mark.bench


@pytest.mark.parametrize("size", [(512, 1024), (1024, 2048)])
def test_confusion_update(benchmark, size):
    gen = torch.Generator().manual_seed(0)
    prediction = torch.randint(0, 19, size, generator=gen)
    label = torch.randint(0, 19, size, generator=gen)
    label[: size[0] // 8] = 255  # ignored pixels, as the ego-vehicle/border in real labels
    metric = confusion_metric(19)
    benchmark(metric.update, prediction, label)
    assert int(metric.compute().sum()) > 0
