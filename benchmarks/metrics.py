"""mIoU as the DGSS papers compute it: one confusion matrix per target, IoU per class, nan-mean.

The confusion matrix is accumulated with torchmetrics (update per image, compute once; under DDP
torchmetrics reduces it across ranks), so a target is scored exactly once over the whole set.
"""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix


def confusion_metric(num_classes: int, ignore_index: int = 255) -> MulticlassConfusionMatrix:
    # validate_args=False: the labels come from our adapters; validation would sync per image.
    return MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU (fraction); nan where a class is absent from both prediction and ground truth.

    Rows are ground truth, columns predictions (torchmetrics' convention).
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = true_positive / union
    return torch.where(union > 0, iou, torch.full_like(iou, float("nan")))


def miou_percent(iou: torch.Tensor) -> float:
    """Mean over the classes that the labels or the predictions hold (mmseg's nanmean: a class absent from both
    is NaN and left out; one predicted but absent from the labels counts with IoU 0), in percent."""
    return float(torch.nanmean(iou).item() * 100.0)
