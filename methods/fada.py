"""FADA (Bi, Yi et al., NeurIPS 2024): frequency-adapted tokens, in two registered variants.

The idea: after a Haar wavelet transform of the frozen features, the low-frequency band (LL) keeps
the scene content and the three high-frequency bands (LH, HL, HH) carry the style; refining each
with its own learnable tokens, with the high-frequency attention instance-normalised so that a
style shift cannot move it, keeps the refinement stable on unseen domains. After every block, on
the patch tokens f [B, N, C] (prefix tokens pass untouched):

    LL, LH, HL, HH = Haar(f)
    out_L = ΔF of Rein on LL         (low-rank tokens, m = 100, r = 16, two Linear layers)
    out_H = ΔF on LH, HL, HH         (a second low-rank token set and two Linear layers; the logits
                                      f·Tᵀ standardised over the m tokens before the softmax)
    f ← f + scale·recompose(out_L, out_H)   (Rein's single learnable scale, 1e-3)

Both branches divide their logits by sqrt(C) of the backbone width, drop token 0 after the softmax
and keep the residual inside the second Linear, as Rein does. Mask2Former queries come from the
low-frequency tokens (the released code's `get_tokens`), as in Rein. No zero init anywhere (the
released config leaves `zero_mlp_delta_f` off), so at step 0 the features move by 1e-3·Δf.

The two variants differ in how the features reach the wavelet and come back (docs/methods.md has
the same as a table):

- to the grid: `fada` (the paper's description) permutes each image's tokens to [C, H, W];
  `fada_released` (JingjunYi/FADA, `reins.py`) *reshapes* the token-first [N, B, C] tensor, without
  a permute, to [B, C, h, h] with h = int(√N);
- grids: `fada` takes any H×W (an odd side is extended by repeating its last row/column and cropped
  after the inverse); `fada_released` needs a square with an even side and C divisible by 4, where
  the released reshape works (elsewhere a ValueError saying so);
- filters: fixed orthonormal Haar in `fada`; in `fada_released` four depthwise 2×2 stride-2
  convolutions initialised to Haar that end up trainable (16·C parameters);
- bands → tokens: `fada` refines each band's H/2·W/2 positions, C wide, one token set shared by the
  three high bands; `fada_released` reads LL as [N, B, C/4] and LH, HL, HH each as [B, N, C/4],
  concatenated to [B, N, 3C/4] and reshaped (not permuted) to [N, B, 3C/4], so its tokens and Linear
  layers are C/4 and 3C/4 wide;
- back: `fada` inverts the Haar transform of the four refined bands; `fada_released` has no inverse:
  it concatenates the two refined branches to [N, B, C] and adds that at those positions;
- trainable on DINOv2-L: 5,520,897 (`fada`) and 2,061,825 (`fada_released`).

What the released reshape computes: the [N, B, C] rows (one token of one image each, C wide) are
laid end to end into h×h maps. When 2h divides C every row fills an even number of map rows, so no
2×2 block straddles two rows: the wavelet runs over each token's own channels (pairing channels
c, c+1 and c, c+h) and, while the 4·C filters are alike (at initialisation), tokens and images stay
independent. That holds wherever the harness runs it by default (DINOv2-L/16 at 512: h = 32, C = 1024,
each token a 32×32 image of its channels; the proxy and smoke presets: h = 16 and 8, C = 192), so there
the released FADA is a per-token channel wavelet, not a spatial one. Which channel's filter a token's
values meet follows its flat place in [N, B, C], so once the filters differ (they train) an image's
refinement depends on its index in the batch and the batch size: training (batch 4) and the one-image
evaluation meet other filters, as in the release. Where 2h does not divide C, blocks straddle neighbouring rows, which
alternate between images: a training batch's images then mix, and evaluation runs one image at a
time, as the released slide inference runs one window at a time. The paper reports 11.65M
trainable parameters; neither reading reproduces that (docs/methods.md lists what was tried).

Defaults are the released config's (as Rein's); widths follow C and the number of token sets the
depth L, for any backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.method import Method, register_method
from benchmarks.model import SegModel
from methods.rein import (
    LowRankTokens,
    ReinAdapter,
    TokenRefinement,
    attach_token_adapter,
    module_device,
    patch_side,
    token_grid,
    token_init_bound,
)

LAYOUTS = ("grid", "token_first")
HIGH_BANDS = 3  # LH, HL, HH


# -- the Haar transform ----------------------------------------------------------------------------
def haar_filters() -> torch.Tensor:
    """[4, 2, 2]: LL, LH, HL, HH as outer products (rows ⊗ columns) of L = (1, 1)/√2 and H = (−1, 1)/√2,
    the released code's `get_wav`. Built on each call: a module-level tensor would be created on
    whatever device a `with torch.device(...)` block around the first import names."""
    low = torch.tensor([1.0, 1.0]) / math.sqrt(2.0)
    high = torch.tensor([-1.0, 1.0]) / math.sqrt(2.0)
    return torch.stack([torch.outer(low, low), torch.outer(low, high),
                        torch.outer(high, low), torch.outer(high, high)])


def haar_split(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-level orthonormal 2-D Haar transform of [B, C, H, W] → LL, LH, HL, HH, each [B, C, ⌈H/2⌉, ⌈W/2⌉].

    An odd side is extended by repeating its last row/column (PyWavelets' default symmetric
    extension reduces to that for Haar): the repeated pair has no high-frequency content, so the
    border adds no artificial edge, and `haar_merge` crops it away again.
    """
    height, width = maps.shape[-2:]
    if height % 2 or width % 2:
        maps = F.pad(maps, (0, width % 2, 0, height % 2), mode="replicate")
    a, b = maps[..., 0::2, 0::2], maps[..., 0::2, 1::2]
    c, d = maps[..., 1::2, 0::2], maps[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (b - a + d - c) / 2, (c + d - a - b) / 2, (a - b - c + d) / 2


def haar_merge(ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor,
               size: tuple[int, int]) -> torch.Tensor:
    """The inverse of `haar_split` (the transform is orthonormal: its transpose), cropped to `size`."""
    a = (ll - lh - hl + hh) / 2
    b = (ll + lh - hl - hh) / 2
    c = (ll - lh + hl - hh) / 2
    d = (ll + lh + hl + hh) / 2
    # [B, C, h, 2, w, 2]: the two rows and two columns of every 2×2 block, then laid out flat
    rows = torch.stack([torch.stack([a, b], dim=-1), torch.stack([c, d], dim=-1)], dim=-3)
    batch, channels, half_h, _, half_w, _ = rows.shape
    return rows.reshape(batch, channels, 2 * half_h, 2 * half_w)[..., : size[0], : size[1]]


class LearnableHaar(nn.Module):
    """The released code's `WavePool`: four depthwise 2×2 stride-2 convolutions without bias,
    initialised to the Haar filters. It sets them `requires_grad = False`, but the backbone's
    `train()` then unfreezes every parameter whose name contains "reins", these included, so they
    train (with the protocol's weight decay: no custom optimiser key matches them). The release
    hard-codes 1024 channels (DINOv2-L); here they follow the backbone's width."""

    def __init__(self, channels: int, device: torch.device | None = None):
        super().__init__()
        self.channels = channels
        filters = haar_filters() if device is None else haar_filters().to(device)
        self.weight = nn.Parameter(filters.repeat(channels, 1, 1, 1))  # [C, 4, 2, 2]

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # one grouped convolution: output channel 4c + k is band k of input channel c
        weight = self.weight.reshape(-1, 1, 2, 2).to(maps.dtype)
        bands = F.conv2d(maps, weight, stride=2, groups=self.channels)
        return bands.unflatten(1, (self.channels, 4)).unbind(dim=2)


# -- the refinement ----------------------------------------------------------------------------------
class WidthScaledRefinement(TokenRefinement):
    """Rein's refinement on a branch narrower than the backbone: the released code divides every
    branch's logits by sqrt(embed_dims), the full width C, not by the branch's own width."""

    def __init__(self, dim: int, logit_dim: int, standardize_logits: bool = False,
                 device: torch.device | None = None):
        super().__init__(dim, standardize_logits=standardize_logits, device=device)
        self.logit_dim = logit_dim

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = feats @ tokens.transpose(0, 1)
        if self.standardize_logits:
            logits = F.instance_norm(logits.reshape(-1, 1, logits.shape[-1])).reshape(logits.shape)
        weights = torch.softmax(logits / math.sqrt(self.logit_dim), dim=-1)[..., 1:]
        return self.delta(weights @ self.token2feat(tokens[1:]) + feats)


def band_widths(dim: int, layout: str) -> tuple[int, int]:
    """Token widths of the low- and high-frequency branches."""
    if layout == "grid":
        return dim, dim
    quarter = dim // 4  # the released `int(C/4)`
    return quarter, HIGH_BANDS * quarter


def as_tokens(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(2).transpose(1, 2)


def as_maps(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid)


class FrequencyTokenAdapter(ReinAdapter):
    """Rein's adapter (low-frequency tokens, shared scale, query transform/merge) plus the
    high-frequency branch and, in the released layout, the trainable Haar filters."""

    def __init__(self, depth: int, dim: int, patch_size: int, num_prefix_tokens: int, num_tokens: int,
                 rank: int, init_scale: float, query_dim: int | None, layout: str,
                 device: torch.device | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        low_dim, high_dim = band_widths(dim, layout)
        super().__init__(depth, low_dim, patch_size, num_prefix_tokens, num_tokens, rank, init_scale,
                         query_dim, device=device)
        self.layout = layout
        self.dim = dim
        self.patch_size = patch_size
        self.high_tokens = LowRankTokens(depth, num_tokens, rank, high_dim, patch_size, device=device)
        self.high_refinement = WidthScaledRefinement(high_dim, dim, standardize_logits=True, device=device)
        if layout == "token_first":
            self.refinement = WidthScaledRefinement(low_dim, dim, device=device)
            # the release bounds the low tokens' init with the full width C although they are C/4 wide
            bound = token_init_bound(patch_size, math.sqrt(dim * rank))
            nn.init.uniform_(self.tokens.A, -bound, bound)
            nn.init.uniform_(self.tokens.B, -bound, bound)
            self.wavelet = LearnableHaar(dim, device=device)
        self.grid: tuple[int, int] | None = None

    # -- the grid of this forward pass (paper variant) ------------------------------------------------
    def record_grid(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        """Forward hook on the patch embedding: the token grid (rows, columns) of this pass."""
        if output.ndim == 4:  # NHWC, as timm's dynamic-size ViT/EVA and SAM return it
            self.grid = (int(output.shape[1]), int(output.shape[2]))
        else:
            height, width = args[0].shape[-2:]
            self.grid = (math.ceil(height / self.patch_size), math.ceil(width / self.patch_size))

    def token_grid(self, count: int) -> tuple[int, int]:
        return token_grid(self.grid, count)

    # -- the refinement ---------------------------------------------------------------------------------
    def feature_delta(self, index: int, patch_tokens: torch.Tensor) -> torch.Tensor:
        if self.layout == "grid":
            return self.grid_delta(index, patch_tokens)
        if self.training or patch_tokens.shape[0] == 1:
            return self.token_first_delta(index, patch_tokens)
        # the released evaluation (mmseg slide inference) runs one window at a time: no window sees another
        return torch.cat([self.token_first_delta(index, one) for one in patch_tokens.split(1)])

    def grid_delta(self, index: int, patch_tokens: torch.Tensor) -> torch.Tensor:
        batch, count, channels = patch_tokens.shape
        grid = self.token_grid(count)
        low, *high = haar_split(patch_tokens.transpose(1, 2).reshape(batch, channels, *grid))
        half = (low.shape[-2], low.shape[-1])
        refined_low = self.refinement(as_tokens(low), self.tokens.layer(index))
        # the three bands' positions side by side: one token set refines every high-frequency coefficient
        refined_high = self.high_refinement(torch.cat([as_tokens(band) for band in high], dim=1),
                                            self.high_tokens.layer(index))
        high_parts = refined_high.chunk(HIGH_BANDS, dim=1)
        bands = [as_maps(refined_low, half)] + [as_maps(part, half) for part in high_parts]
        return as_tokens(haar_merge(*bands, size=grid))

    def token_first_delta(self, index: int, patch_tokens: torch.Tensor) -> torch.Tensor:
        batch, count, channels = patch_tokens.shape
        side = math.isqrt(count)
        if side * side != count or side % 2 or channels % 4:
            raise ValueError(
                f"fada_released needs a square token grid with an even side and a width divisible by 4 (the "
                f"released code lays the tokens out on int(sqrt(N))² positions, pools them 2×2 and reads the "
                f"result as C/4 channels); got N={count} tokens of width {channels}. The paper variant `fada` "
                "takes any grid."
            )
        quarter = channels // 4
        # [N, B, C] read in memory order as [B, C, h, h]: the released code's reshape, not a permute
        maps = patch_tokens.transpose(0, 1).reshape(batch, channels, side, side)
        low, *high = self.wavelet(maps)
        low = low.reshape(count, batch, quarter)
        high = torch.cat([band.reshape(batch, count, quarter) for band in high], dim=-1)
        high = high.reshape(count, batch, HIGH_BANDS * quarter)
        delta = torch.cat([self.refinement(low, self.tokens.layer(index)),
                           self.high_refinement(high, self.high_tokens.layer(index))], dim=-1)
        return delta.transpose(0, 1)  # the [N, B, C] positions added to the token-first features


@dataclass
class FADAConfig:
    num_tokens: int = 100  # FADA released config (`token_length`, as Rein): m tokens per block, both branches
    rank: int = 16  # FADA released config (`lora_dim`, as Rein): low rank of both branches' tokens
    init_scale: float = 1e-3  # FADA released code (`scale_init`, as Rein): initial value of the shared scale
    link_queries: bool = True  # FADA released config (`link_token_to_query`): low-frequency tokens → queries
    query_dim: int = 256  # Mask2Former hidden width; the head's own `hidden_dim` wins when it has one


class _FrequencyTokens(Method):
    Config = FADAConfig
    layout: ClassVar[str] = "grid"

    def attach(self, model: SegModel) -> None:
        backbone, cfg = model.backbone, self.config
        device = module_device(backbone)

        def make_adapter(query_dim: int | None) -> FrequencyTokenAdapter:
            return FrequencyTokenAdapter(backbone.depth, backbone.embed_dim, patch_side(backbone),
                                         backbone.num_prefix_tokens, cfg.num_tokens, cfg.rank, cfg.init_scale,
                                         query_dim, layout=self.layout, device=device)

        adapter = attach_token_adapter(model, make_adapter, cfg.link_queries, cfg.query_dim, "fada")
        if self.layout == "grid":
            # the patch embedding's output is the grid itself, however the backbone is called
            backbone.vit.patch_embed.register_forward_hook(adapter.record_grid)


@register_method
class FADA(_FrequencyTokens):
    """FADA as the paper describes it: a per-image Haar transform of the token grid, inverted afterwards."""

    name = "fada"
    paper = ("Bi, Yi et al., Learning Frequency-Adapted Vision Foundation Model for Domain Generalized "
             "Semantic Segmentation (NeurIPS 2024)")
    layout = "grid"


@register_method
class FADAReleased(_FrequencyTokens):
    """FADA as the authors' released code computes it: token-first reshape, trainable filters, no inverse."""

    name = "fada_released"
    paper = "Bi, Yi et al., FADA (NeurIPS 2024), as computed by the authors' released code (JingjunYi/FADA)"
    layout = "token_first"
    depends_on_batch_layout = True  # once its filters train apart (evaluation runs image by image)
