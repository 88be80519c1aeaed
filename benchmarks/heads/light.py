"""A small FPN decode head for fast runs and ablations (the `proxy` and `smoke` presets), and what
every per-pixel head shares (`PerPixelHead`: logits at a size, mmseg's cross-entropy).

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


class PerPixelHead(nn.Module):
    """What every per-pixel classifier head shares: logits upsampled to a size, and mmseg's loss."""

    supports_queries = False

    def semantic_logits(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(outputs, size=tuple(size), mode="bilinear", align_corners=False)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # As mmseg: logits resized to the label size, then CE averaged over non-ignored pixels.
        logits = self.semantic_logits(outputs, labels.shape[-2:])
        if (labels != IGNORE_INDEX).any():
            ce = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
        else:  # an all-ignore batch: zero loss that still touches the graph
            ce = logits.sum() * 0.0
        return {"loss": ce, "loss_ce": ce.detach()}


class LightHead(PerPixelHead):
    """FPN over the pyramid from `finest_level` on; logits at that level, cross-entropy with ignore 255."""

    def __init__(self, in_channels: int | list[int], num_classes: int, channels: int = 64, dropout: float = 0.1,
                 finest_level: int = 0):
        super().__init__()
        ins = pyramid_channels(in_channels, "LightHead")[finest_level_checked(finest_level) :]
        self.finest_level = finest_level
        self.num_classes = num_classes
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
