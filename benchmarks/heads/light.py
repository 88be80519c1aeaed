"""A small FPN decode head for fast runs and ablations (the `proxy` and `smoke` presets), and what
every per-pixel head shares (`PerPixelHead`: logits at a size, a cross-entropy over the non-ignored
pixels, optionally class-balanced).

Why an own FPN beside smp's UPerNet (`benchmarks/heads/upernet.py`): a lateral 1×1 + top-down sum +
3×3 smoothing + Panoptic-FPN-style merge over a ViT pyramid whose levels share one width is a dozen
lines and keeps the head small (64 channels, a tenth of UPerNet's parameters) and fast on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255


def group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm: independent of batch size (CPU runs use small batches).
    return nn.GroupNorm(min(8, channels), channels)


FINEST_LEVEL_HELP = (
    "finest pyramid level a head decodes at: 0 = stride p/4 (the protocol's 4 px at patch 16), "
    "1 = p/2 (4 px at the proxy's patch 8; a quarter of the p/4 cost)"
)


def pyramid_channels(in_channels: int | list[int], head: str) -> list[int]:
    ins = [in_channels] * 4 if isinstance(in_channels, int) else list(in_channels)
    if len(ins) != 4:
        raise ValueError(f"{head} expects 4 feature levels, got {len(ins)} channel entries")
    return ins


def finest_level_checked(level: int) -> int:
    if level not in (0, 1):
        raise ValueError(f"finest_level must be 0 or 1 ({FINEST_LEVEL_HELP}), got {level!r}")
    return level


CLASS_BALANCES = ("none", "median_frequency")
CLASS_BALANCE_HELP = (
    "weighting of the cross-entropy's classes: none (mmseg's, every pixel alike) or median_frequency "
    "(each class of a batch weighted by the median of the present classes' pixel frequencies over its own)"
)


def median_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class cross-entropy weights from one batch: median(freq of the present classes) / freq(class).

    Median frequency balancing (Eigen & Fergus, ICCV 2015; SegNet), with the frequencies counted over
    the batch's labelled pixels rather than over the dataset, so it needs no pass over the data and no
    statistics of it. A class with 1/50 of road's pixels gets 50 times road's weight: each class present
    in the batch counts about as much as any other, as each class's mask does in Mask2Former's loss.
    Classes absent from the batch get weight 0 (they have no pixel to weigh).
    """
    labelled = labels[labels != IGNORE_INDEX].long()
    counts = torch.bincount(labelled, minlength=num_classes)[:num_classes].float()
    weights = torch.zeros(num_classes, device=labels.device)
    present = counts > 0
    if present.any():
        frequency = counts[present] / counts.sum()
        weights[present] = frequency.median() / frequency
    return weights


def class_balance_checked(balance: str) -> str:
    if balance not in CLASS_BALANCES:
        raise ValueError(f"class_balance must be one of {', '.join(CLASS_BALANCES)} ({CLASS_BALANCE_HELP}), got {balance!r}")
    return balance


class PerPixelHead(nn.Module):
    """What every per-pixel classifier head shares: logits upsampled to a size, and a cross-entropy over the
    non-ignored pixels (with median-frequency class weights when `class_balance` says so)."""

    supports_queries = False

    def __init__(self, in_channels: int | list[int], num_classes: int, finest_level: int = 0, class_balance: str = "none"):
        """Checks the settings every per-pixel head has; `level_channels` are the channels of the pyramid
        levels the head decodes (from `finest_level` on)."""
        super().__init__()
        self.level_channels = pyramid_channels(in_channels, type(self).__name__)[finest_level_checked(finest_level) :]
        self.finest_level = finest_level
        self.num_classes = num_classes
        self.class_balance = class_balance_checked(class_balance)

    def semantic_logits(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(outputs, size=tuple(size), mode="bilinear", align_corners=False)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # Logits resized to the label size, as mmseg does, then CE averaged over the non-ignored pixels
        # (weighted by their classes' weights when balanced: the mean divides by the sum of the pixels'
        # weights). That is mmseg's `avg_non_ignore=True`; its default divides by every pixel, ignored ones
        # included, a per-batch scale of the loss that AdamW's normalisation mostly absorbs.
        logits = self.semantic_logits(outputs, labels.shape[-2:])
        if not (labels != IGNORE_INDEX).any():  # an all-ignore batch: zero loss that still touches the graph
            ce = logits.sum() * 0.0
        elif self.class_balance == "median_frequency":
            weights = median_frequency_weights(labels, logits.shape[1])
            ce = F.cross_entropy(logits.float(), labels.long(), weight=weights, ignore_index=IGNORE_INDEX)
        else:
            ce = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
        return {"loss": ce, "loss_ce": ce.detach()}


class LightHead(PerPixelHead):
    """FPN over the pyramid from `finest_level` on; logits at that level, cross-entropy with ignore 255."""

    def __init__(self, in_channels: int | list[int], num_classes: int, channels: int = 64, dropout: float = 0.1,
                 finest_level: int = 0, class_balance: str = "none"):
        super().__init__(in_channels, num_classes, finest_level, class_balance)
        ins = self.level_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in ins)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), group_norm(channels), nn.ReLU(inplace=True))
            for _ in ins
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), group_norm(channels), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, features[self.finest_level :], strict=True)]
        for i in range(len(lat) - 2, -1, -1):  # top-down pathway
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="bilinear", align_corners=False)
        size = lat[0].shape[-2:]
        merged = sum(
            F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) if i else s(x)
            for i, (s, x) in enumerate(zip(self.smooth, lat, strict=True))
        )
        return self.classifier(self.dropout(self.fuse(merged)))
