"""Rein (Wei et al., CVPR 2024): learnable tokens refine the frozen features after every block.

Per block i a token set T_i ∈ R^{m×C} (low rank: T_i = A_i·B_i, r = 16) and, shared by all
blocks, two C×C layers `token2feat` and `delta` and a learnable scalar `scale` (1e-3). After every
block, on the patch tokens f [B, N, C] (prefix tokens — cls, registers — pass untouched):

1. S = softmax(f·T_iᵀ / sqrt(C)) over all m tokens;
2. ΔF̄ = S[..., 1:] · token2feat(T_i[1:])   (token 0 takes part in the softmax, then is dropped);
3. ΔF = delta(ΔF̄ + f)                        (the residual is inside `delta`);
4. f ← f + scale·ΔF.

The refined output is what the next block and the feature taps see (the hook runs before any
other hook on the block). With a head that has queries (Mask2Former) the tokens also become its
queries: transform(T) → [L, m, 256]; per token and channel the max over layers, the mean over
layers and the last layer's value, interleaved (c0max, c0avg, c0last, c1max, ...) → [m, 768];
merge → [m, 256] replaces the learned query positional embedding, and a head-side
Linear(256, 256) of it is the initial query content.

Scaling to other backbones: m = 100 tokens per block and r = 16 stay; token and MLP widths follow
C; the number of token sets follows the depth L; the query width follows the head's hidden width.
This reproduces the paper's counts (ViT-S 0.68M, ViT-B 1.74M, ViT-L 2,990,081, SAM-H 4,510,721).

The building blocks (`LowRankTokens`, `FullRankTokens`, `TokenRefinement`, `ReinAdapter`) are
reused by SET (methods/set_tokens.py), whose phase branch is this refinement.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.method import Method, register_method
from benchmarks.model import SegModel

QUERY_CHANNELS_PER_STATISTIC = 3  # max, mean and last over layers


def module_device(module: nn.Module) -> torch.device:
    """Where a method's new parameters go: beside the backbone's (the meta device included)."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def patch_side(backbone: nn.Module) -> int:
    patch = backbone.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def token_init_bound(patch_size: int, token_fan: float) -> float:
    """VPT's uniform bound sqrt(6 / (3·p² + fan)), used by VPT and by Rein for its tokens."""
    return math.sqrt(6.0 / (3.0 * patch_size**2 + token_fan))


class LowRankTokens(nn.Module):
    """L token sets of m tokens, each factorised T_i = A_i·B_i (A: [L,m,r], B: [L,r,C])."""

    def __init__(self, depth: int, num_tokens: int, rank: int, dim: int, patch_size: int,
                 device: torch.device | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(depth, num_tokens, rank, device=device))
        self.B = nn.Parameter(torch.empty(depth, rank, dim, device=device))
        bound = token_init_bound(patch_size, math.sqrt(dim * rank))  # Rein: fan = sqrt(C·r)
        nn.init.uniform_(self.A, -bound, bound)
        nn.init.uniform_(self.B, -bound, bound)

    def layer(self, index: int) -> torch.Tensor:
        return self.A[index] @ self.B[index]

    def all_layers(self) -> torch.Tensor:
        return self.A @ self.B

    def no_weight_decay(self) -> set[str]:
        return {"A", "B"}


class FullRankTokens(nn.Module):
    """L token sets of m full-width tokens (SET's amplitude branch), VPT-style uniform init."""

    def __init__(self, depth: int, num_tokens: int, dim: int, patch_size: int, device: torch.device | None = None):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(depth, num_tokens, dim, device=device))
        bound = token_init_bound(patch_size, dim)
        nn.init.uniform_(self.tokens, -bound, bound)

    def layer(self, index: int) -> torch.Tensor:
        return self.tokens[index]

    def all_layers(self) -> torch.Tensor:
        return self.tokens

    def no_weight_decay(self) -> set[str]:
        return {"tokens"}


class TokenRefinement(nn.Module):
    """Rein's equations 1–3 for one token set: returns ΔF = delta(S[...,1:]·token2feat(T[1:]) + f).

    `standardize_logits` (SET's amplitude branch) standardises the logits f·Tᵀ per position across
    the m tokens (instance norm over the token axis) before the softmax; Rein itself does not.
    The two Linear layers keep PyTorch's default init, as the reference does.
    """

    def __init__(self, dim: int, standardize_logits: bool = False, device: torch.device | None = None):
        super().__init__()
        self.dim = dim
        self.standardize_logits = standardize_logits
        self.token2feat = nn.Linear(dim, dim, device=device)
        self.delta = nn.Linear(dim, dim, device=device)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = feats @ tokens.transpose(0, 1)
        if self.standardize_logits:
            logits = nn.functional.instance_norm(logits.reshape(-1, 1, logits.shape[-1])).reshape(logits.shape)
        weights = torch.softmax(logits / math.sqrt(self.dim), dim=-1)[..., 1:]
        return self.delta(weights @ self.token2feat(tokens[1:]) + feats)


class ReinAdapter(nn.Module):
    """Everything Rein adds under the backbone: tokens, shared MLPs, scale, query transform/merge."""

    def __init__(self, depth: int, dim: int, patch_size: int, num_prefix_tokens: int, num_tokens: int, rank: int,
                 init_scale: float, query_dim: int | None, device: torch.device | None = None):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.tokens = LowRankTokens(depth, num_tokens, rank, dim, patch_size, device=device)
        self.refinement = TokenRefinement(dim, device=device)
        self.scale = nn.Parameter(torch.tensor(float(init_scale), device=device))
        if query_dim is not None:
            self.transform = nn.Linear(dim, query_dim, device=device)
            self.merge = nn.Linear(QUERY_CHANNELS_PER_STATISTIC * query_dim, query_dim, device=device)
        else:
            self.transform = self.merge = None

    def no_weight_decay(self) -> set[str]:
        return {"scale"}

    def feature_delta(self, index: int, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.refinement(patch_tokens, self.tokens.layer(index))

    def refine(self, index: int, patch_tokens: torch.Tensor) -> torch.Tensor:
        return patch_tokens + self.scale * self.feature_delta(index, patch_tokens)

    def after_block(self, index: int, block: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        prefix = self.num_prefix_tokens
        return torch.cat([output[:, :prefix], self.refine(index, output[:, prefix:])], dim=1)

    def query_embeddings(self) -> torch.Tensor:
        """[m, query_dim] image-independent query embeddings from the tokens of all layers."""
        if self.transform is None:
            raise RuntimeError("query embeddings need the head link (query_dim) at construction")
        per_layer = self.transform(self.tokens.all_layers())  # [L, m, D]
        stats = torch.stack([per_layer.max(dim=0).values, per_layer.mean(dim=0), per_layer[-1]], dim=-1)
        return self.merge(stats.flatten(-2))  # [m, D, 3] → [m, 3D], interleaved per channel


def queries_from_tokens(adapter: ReinAdapter, content: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The query provider handed to the head: (query positional embedding, initial query content)."""
    position = adapter.query_embeddings()
    return position, content(position)


def head_query_dim(head: nn.Module, default: int) -> int:
    """The head's query width: `hidden_dim` on the head or on its config (Mask2Former), else `default`."""
    for owner in (head, getattr(head, "config", None)):
        value = getattr(owner, "hidden_dim", None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def attach_token_adapter(model: SegModel, make_adapter: Any, link_queries: bool, default_query_dim: int,
                         attribute: str) -> ReinAdapter:
    """Freeze the backbone, add the adapter under it, hook every block, link head queries if any.

    `make_adapter(query_dim)` builds the adapter (Rein's or SET's); `query_dim` is None when the
    link is off (light head, or switched off), so no unused transform/merge layers are counted.
    """
    backbone, head = model.backbone, model.head
    backbone.requires_grad_(False)
    linked = link_queries and bool(getattr(head, "supports_queries", False))
    query_dim = head_query_dim(head, default_query_dim) if linked else None
    adapter = make_adapter(query_dim)
    backbone.add_module(attribute, adapter)
    for index, block in enumerate(backbone.blocks):
        # prepend: feature taps registered by the backbone must see the refined output
        block.register_forward_hook(functools.partial(adapter.after_block, index), prepend=True)
    if linked:
        content = nn.Linear(query_dim, query_dim, device=module_device(head))
        head.add_module("query_content_from_tokens", content)  # head-side, counted with the head
        head.set_query_provider(functools.partial(queries_from_tokens, adapter, content))
    return adapter


@dataclass
class ReinConfig:
    num_tokens: int = 100  # Rein paper, m (tokens per block; kept for every backbone)
    rank: int = 16  # Rein paper, r (low-rank factorisation of the tokens; kept for every backbone)
    init_scale: float = 1e-3  # Rein reference, initial value of the learnable scale
    link_queries: bool = True  # Rein paper: tokens → Mask2Former queries when the head has queries
    query_dim: int = 256  # Mask2Former hidden width; the head's own `hidden_dim` wins when it has one

def token_grid(recorded: tuple[int, int] | None, count: int) -> tuple[int, int]:
    """The (rows, columns) `count` patch tokens lie on: the grid the patch embedding recorded for this
    pass when it holds that many tokens, else a square one (a refused token count names the fix)."""
    if recorded is not None and recorded[0] * recorded[1] == count:
        return recorded
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"cannot lay {count} patch tokens out on a grid; run the backbone on images")
    return side, side


@register_method
class Rein(Method):
    name = "rein"
    paper = "Wei et al., Stronger, Fewer, & Superior: Harnessing Vision Foundation Models for DGSS (CVPR 2024)"
    Config = ReinConfig

    def attach(self, model: SegModel) -> None:
        backbone, cfg = model.backbone, self.config
        device = module_device(backbone)

        def make_adapter(query_dim: int | None) -> ReinAdapter:
            return ReinAdapter(backbone.depth, backbone.embed_dim, patch_side(backbone), backbone.num_prefix_tokens,
                               cfg.num_tokens, cfg.rank, cfg.init_scale, query_dim, device=device)

        attach_token_adapter(model, make_adapter, cfg.link_queries, cfg.query_dim, "rein")
