"""Frozen backbone: only the decode head trains.

With no backbone parameter requiring gradients, the model keeps the backbone in eval mode and
computes its features without autograd (see `SegModel.features`), as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.method import FROZEN_BACKBONE, Method, register_method
from benchmarks.model import SegModel


@dataclass
class FreezeConfig:
    """Freezing has no hyperparameters of its own."""


@register_method
class Freeze(Method):
    name = "freeze"
    paper = "Frozen-backbone baseline (as reported in Rein, CVPR 2024, Table 3)"
    Config = FreezeConfig
    role = FROZEN_BACKBONE

    def attach(self, model: SegModel) -> None:
        model.backbone.requires_grad_(False)
