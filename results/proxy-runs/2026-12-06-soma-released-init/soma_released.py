"""A probe, not a registered method: SoMA started as the authors' released training starts it (ysj9909/SoMA
7ea8c0e; docs/methods.md, SoMA, "Where it differs"). The released code decomposes each layer's weights before the
pretrained file is loaded over the base weights, so A and B hold the minor singular part of the layer's random
initial weights (nn.Linear's default draw) and the base weight stays the pretrained W whole. Everything else is
the harness's `soma`: `python -m benchmarks run --methods soma_released --method-file <this file>`."""

from __future__ import annotations

import math

import torch
from torch import nn

from benchmarks.method import register_method
from methods.soma import SoMA, minor_components


@register_method
class SoMAReleasedInit(SoMA):
    name = "soma_released"
    paper = "Yun et al., SoMA (CVPR 2025), initialised as the authors' released training initialises it"

    def initialise_adapter(self, name: str, layer: nn.Module) -> None:
        base = layer.get_base_layer()
        stand_in = torch.empty_like(base.weight)
        nn.init.kaiming_uniform_(stand_in, a=math.sqrt(5))  # nn.Linear's own draw, before the pretrained load
        a, b, _ = minor_components(stand_in, self.config.rank, layer.scaling["default"])
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)  # the base weight is left as loaded: W, not W − s·B·A
