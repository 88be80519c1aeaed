"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck adapter in parallel with every block's MLP.

The adapter reads what the MLP reads (the block's normalised tokens, LN(x′) in the paper's
eq. 1), computes up(ReLU(down(x))) with down C→64 and up 64→C (both with bias, no adapter norm),
and its output times s = 0.1 is added to the MLP branch's output. The up projection is
zero-initialised, so at init the block computes exactly what the frozen block does. On DINOv2-L:
24 × (1024·64 + 64 + 64·1024 + 1024) = 3,171,840 trainable parameters.

The adapter sits beside the whole MLP branch, as in the paper's eq. 2 (x = x′ + MLP(LN(x′)) + s·x̃)
and the official block (`residual + mlp + adapt_x`): a LayerScale (DINOv2's per-channel γ, 0.07–0.23
on the proxy) scales the MLP and not the adapter, whose contribution it would otherwise shrink by γ.
The official code's dropout 0.1 inside the adapter is not in the paper and is left out.

Scaling to other backbones: the bottleneck is 64 as in AdaptFormer for ViT-B and the DGSS
reference for ViT-L (a fixed width, not a fraction of C), capped at C for narrower models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.errors import UserError
from benchmarks.method import Method, register_method
from benchmarks.model import SegModel
from methods.rein import module_device


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, scale: float, device: torch.device | None = None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device)
        self.up = nn.Linear(bottleneck, dim, device=device)
        self.scale = scale
        # AdaptFormer: down projection Kaiming-uniform (a=√5, PyTorch's Linear default), up and biases zero
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

        self._mlp_input: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(tokens)))

    def keep_mlp_input(self, mlp: nn.Module, args: tuple[Any, ...]) -> None:
        self._mlp_input = args[0]

    def add_beside_mlp_branch(self, branch_end: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        tokens, self._mlp_input = self._mlp_input, None
        return output + self(tokens)


def mlp_branch_end(block: nn.Module) -> nn.Module:
    """The last module of a block's MLP branch: its LayerScale (timm's ViT, DINOv2 and SAM blocks; an Identity
    without one), else the MLP (EVA blocks without `gamma_2`)."""
    if isinstance(getattr(block, "ls2", None), nn.Module):
        return block.ls2
    if getattr(block, "gamma_2", None) is not None:  # EVA's LayerScale is a bare parameter, applied in forward
        raise UserError(f"adaptformer: {type(block).__name__} scales its MLP branch by a parameter (gamma_2) inside "
                        "its forward, where no hook can add the adapter beside it; use a backbone without it")
    return block.mlp


@dataclass
class AdaptFormerConfig:
    bottleneck: int = 64  # AdaptFormer paper, bottleneck width (fixed; capped at C for narrow models)
    scale: float = 0.1  # AdaptFormer paper, s


@register_method
class AdaptFormer(Method):
    name = "adaptformer"
    paper = "Chen et al., AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition (NeurIPS 2022)"
    Config = AdaptFormerConfig

    def attach(self, model: SegModel) -> None:
        backbone, cfg = model.backbone, self.config
        backbone.requires_grad_(False)
        width = min(cfg.bottleneck, backbone.embed_dim)
        device = module_device(backbone)
        adapters = nn.ModuleList(
            BottleneckAdapter(backbone.embed_dim, width, cfg.scale, device=device) for _ in range(backbone.depth)
        )
        backbone.add_module("adaptformer", adapters)
        for adapter, block in zip(adapters, backbone.blocks, strict=True):
            block.mlp.register_forward_pre_hook(adapter.keep_mlp_input, prepend=True)
            mlp_branch_end(block).register_forward_hook(adapter.add_beside_mlp_branch, prepend=True)
