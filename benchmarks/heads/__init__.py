"""Decode heads: a 4-level pyramid → outputs, training loss and per-class scores.

Every head implements the contract `benchmarks.model.SegModel` relies on:

- ``forward(features: list[Tensor]) -> outputs`` (features at strides p/4, p/2, p, 2p);
- ``loss(outputs, labels [B,H,W] long, 255 = ignore) -> dict`` with ``"loss"`` (what is minimised)
  and its parts (logged);
- ``semantic_logits(outputs, size) -> [B, K, H, W]`` scores whose argmax is the class;
- ``supports_queries``: whether a method may replace the queries (`set_query_provider`);
- ``no_weight_decay()`` (timm convention) on modules holding embeddings the protocol exempts.

Heads are registered by name in `HEADS`; `build_head` validates the name and keyword arguments.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from benchmarks.errors import UserError
from benchmarks.heads.light import LightHead
from benchmarks.heads.mask2former import Mask2FormerHead
from benchmarks.heads.upernet import UPerNetHead

HEADS: dict[str, type[nn.Module]] = {
    "light": LightHead,
    "mask2former": Mask2FormerHead,
    "upernet": UPerNetHead,
}


def available_heads() -> dict[str, type[nn.Module]]:
    return dict(sorted(HEADS.items()))


def build_head(name: str, in_channels: int | list[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build head `name` over features with `in_channels` (one int for all levels, or four)."""
    cls = HEADS.get(name)
    if cls is None:
        raise UserError(f"unknown head {name!r}; valid: {', '.join(sorted(HEADS))}")
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "in_channels", "num_classes")]
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise UserError(f"head {name!r} has no setting {', '.join(bad)} (valid: {', '.join(valid)}); set "
                        f"model.head_options to this head's, e.g. --set model.head_options={{}} for its defaults")
    try:
        return cls(in_channels, num_classes, **kwargs)
    except ValueError as err:  # a head's constructor names the setting and its valid values
        raise UserError(f"head {name!r}: {err} (model.head_options)") from None


__all__ = ["HEADS", "LightHead", "Mask2FormerHead", "UPerNetHead", "available_heads", "build_head"]
