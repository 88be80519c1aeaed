"""VPT-deep (Jia et al., ECCV 2022): learnable prompt tokens at the input of every block.

Per block i, n = 150 prompts P_i ∈ R^{n×C} are inserted after the prefix tokens (cls, registers)
at the block's input and removed from its output, so the next block gets fresh prompts and the
feature taps and the head see the usual token grid. Init uniform ±sqrt(6/(3·p²+C)) for patch size
p, as in VPT. On DINOv2-L: 24 × 150 × 1024 = 3,686,400 trainable parameters.

Scaling to other backbones: the prompt count per block stays 150, the width follows C and one set
per block follows the depth.

Backbones with rotary position embeddings (EVA02) rotate only the tokens after the attention's
prefix: the prompts count as prefix there (they have no grid position), so the attention's prefix
count is raised by n when prompts are attached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.errors import UserError
from benchmarks.method import Method, register_method
from benchmarks.model import SegModel
from methods.rein import module_device, patch_side, token_init_bound


class DeepPrompts(nn.Module):
    """L × n prompt tokens and the two hooks that put them in and take them out of each block."""

    def __init__(self, depth: int, num_prompts: int, dim: int, patch_size: int, num_prefix_tokens: int,
                 device: torch.device | None = None):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.prompts = nn.Parameter(torch.empty(depth, num_prompts, dim, device=device))
        bound = token_init_bound(patch_size, dim)
        nn.init.uniform_(self.prompts, -bound, bound)

    def no_weight_decay(self) -> set[str]:
        return {"prompts"}

    def insert(self, index: int, block: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        tokens, rest = args[0], args[1:]
        prefix = self.num_prefix_tokens
        prompts = self.prompts[index].unsqueeze(0).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return (torch.cat([tokens[:, :prefix], prompts, tokens[:, prefix:]], dim=1), *rest)

    def remove(self, index: int, block: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        prefix, count = self.num_prefix_tokens, self.prompts.shape[1]
        return torch.cat([output[:, :prefix], output[:, prefix + count:]], dim=1)


@dataclass
class VPTConfig:
    num_prompts: int = 150  # DGSS reference setting for VPT-deep (Rein, CVPR 2024, Table 3), per block


@register_method
class VPT(Method):
    name = "vpt"
    paper = "Jia et al., Visual Prompt Tuning (ECCV 2022), deep variant"
    Config = VPTConfig

    def attach(self, model: SegModel) -> None:
        backbone, count = model.backbone, self.config.num_prompts
        if getattr(backbone, "family", "") == "sam":
            raise UserError(f"vpt cannot prompt {backbone.name}: its windowed blocks need the exact token grid; "
                            "use a ViT/DINOv2/EVA02 backbone")
        backbone.requires_grad_(False)
        prompts = DeepPrompts(backbone.depth, count, backbone.embed_dim, patch_side(backbone),
                              backbone.num_prefix_tokens, device=module_device(backbone))
        backbone.add_module("vpt", prompts)
        for index, block in enumerate(backbone.blocks):
            block.register_forward_pre_hook(functools.partial(prompts.insert, index), prepend=True)
            block.register_forward_hook(functools.partial(prompts.remove, index), prepend=True)
            attention = getattr(block, "attn", None)
            if isinstance(getattr(attention, "num_prefix_tokens", None), int):
                attention.num_prefix_tokens += count  # rotary embeddings skip prefix tokens; prompts have no position
