"""SET (Yi et al., ACM MM 2024): spectral-decomposed tokens, in two registered variants.

The idea: in the frequency domain the phase of the frozen features carries content and the
amplitude carries style; refining each with its own learnable tokens and recomposing makes the
refinement stable under a style shift. After every block, on the patch tokens f [B, N, C]:

    F = FFT(f);  A = |F|,  P = angle(F)    (tiny values floored at 1e-5, each variant its own way)
    out_P = Rein's ΔF on P                (low-rank phase tokens, r = 16, shared C×C MLPs)
    out_A = ΔF on A with full-rank amplitude tokens T^a [L, m, C] and their own two C×C MLPs;
            the logits A·T^aᵀ are standardised per position across the m tokens before the softmax
    z = out_A·exp(i·out_P) / sqrt(2C);  Δf = IFFT(z);  f ← f + scale·Δf   (Rein's shared scale)

Mask2Former queries come from the phase tokens only, as in Rein. The two variants differ only in
the FFT and in how tiny spectrum values are floored (everything else, including the 1/sqrt(2C)
factor, is shared):

| | `set` (the paper's description) | `set_released` (the authors' released code) |
| --- | --- | --- |
| layout | each image's tokens as a [C, H, W] grid | all tokens as [N, B, C] |
| forward | `fft2` over the spatial axes (H, W) | `fft2` over the last two axes, (batch, channel), 'backward' norm |
| inverse | `ifft2` over (H, W), real part | `irfft2(z, s=(B, C), norm='ortho')`: reads only the first C/2+1 entries along C |
| batch | images are independent | images in a batch change each other's features |
| test (batch 1) | 2-D spatial spectrum | a 1-D FFT over channels per token |
| tiny values | magnitude < 1e-5 → coefficient 1e-5 + 0i | amplitude sqrt(q), q = Re² + Im² floored at 1e-5; phase atan2(Im, Re), Re with abs < 1e-5 → +1e-5 |

The released code is what produced the published numbers, so both are registered and the
leaderboard shows them side by side (docs/methods.md).

Defaults as in Rein (m = 100, r = 16, scale 1e-3), scaled the same way: token counts stay, widths
follow C, one token set per block. On DINOv2-L: Rein's 2,990,081 + amplitude tokens 2,457,600 +
two C×C MLPs 2,099,200 = 7,546,881.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from benchmarks.method import Method, register_method
from benchmarks.model import SegModel
from methods.rein import (
    FullRankTokens,
    ReinAdapter,
    TokenRefinement,
    attach_token_adapter,
    module_device,
    patch_side,
    token_grid,
)

TINY_MAGNITUDE = 1e-5
SPECTRA = ("spatial", "batch_channel")


def amplitude_and_phase(spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|F| and angle(F), with near-zero coefficients set to 1e-5 + 0i so atan2 and its gradient stay finite
    (the paper variant's guard: the paper gives none)."""
    tiny = spectrum.abs().detach() < TINY_MAGNITUDE
    real = torch.where(tiny, torch.full_like(spectrum.real, TINY_MAGNITUDE), spectrum.real)
    imag = torch.where(tiny, torch.zeros_like(spectrum.imag), spectrum.imag)
    return torch.sqrt(real * real + imag * imag), torch.atan2(imag, real)


def released_amplitude_and_phase(spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's floors, each on its own quantity: amplitude sqrt(q) with q = Re² + Im² set to
    1e-5 where |q| < 1e-5; phase atan2(Im, r) with r = Re set to +1e-5 where |Re| < 1e-5 (the sign of
    a tiny negative real part is dropped, so such a phase lands near ±π/2 rather than near ±π)."""
    real, imag = spectrum.real, spectrum.imag
    power = real * real + imag * imag
    power = torch.where(power.detach().abs() < TINY_MAGNITUDE, torch.full_like(power, TINY_MAGNITUDE), power)
    real = torch.where(real.detach().abs() < TINY_MAGNITUDE, torch.full_like(real, TINY_MAGNITUDE), real)
    return torch.sqrt(power), torch.atan2(imag, real)


FLOORS = {"paper": amplitude_and_phase, "released": released_amplitude_and_phase}


def at_least_fp32(values: torch.Tensor) -> torch.Tensor:
    """The spectral part runs in fp32 (or fp64) under any autocast: the refinements' linear layers
    return bf16 there, and neither `torch.complex` nor cuFFT take bf16 (cuFFT's fp16 only for
    power-of-two sizes)."""
    return values.float() if values.dtype in (torch.bfloat16, torch.float16) else values


def recompose(amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """amplitude·exp(i·phase); the amplitude may be negative once refined, so not `torch.polar`."""
    amplitude, phase = at_least_fp32(amplitude), at_least_fp32(phase)
    return torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))


def spatial_spectrum(patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, C] → per-image 2-D FFT over the token grid, laid out [B, H·W, C] (frequency positions as tokens)."""
    batch, count, channels = patch_tokens.shape
    height, width = grid
    maps = at_least_fp32(patch_tokens).transpose(1, 2).reshape(batch, channels, height, width)
    return torch.fft.fft2(maps).flatten(2).transpose(1, 2)


def inverse_spatial_spectrum(spectrum: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    batch, count, channels = spectrum.shape
    maps = spectrum.transpose(1, 2).reshape(batch, channels, *grid)
    return torch.fft.ifft2(maps).real.flatten(2).transpose(1, 2)


def batch_channel_spectrum(patch_tokens: torch.Tensor) -> torch.Tensor:
    """The released code: [B, N, C] viewed as [N, B, C], `fft2` over (B, C); returned as [B, N, C]."""
    return torch.fft.fft2(at_least_fp32(patch_tokens).transpose(0, 1), norm="backward").transpose(0, 1)


def inverse_batch_channel_spectrum(spectrum: torch.Tensor) -> torch.Tensor:
    batch, _, channels = spectrum.shape
    return torch.fft.irfft2(spectrum.transpose(0, 1), s=(batch, channels), norm="ortho").transpose(0, 1)


class SpectralTokenAdapter(ReinAdapter):
    """Rein's adapter (phase tokens, shared scale, query transform/merge) plus the amplitude branch."""

    def __init__(self, *args: Any, spectrum: str, amplitude_num_tokens: int, patch_size: int, floor: str = "paper",
                 **kwargs: Any):
        super().__init__(*args, patch_size=patch_size, **kwargs)
        if spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
        if floor not in FLOORS:
            raise ValueError(f"floor must be one of {tuple(FLOORS)}, got {floor!r}")
        self.spectrum = spectrum
        self.floor = floor
        depth, dim = self.tokens.A.shape[0], self.tokens.B.shape[-1]
        device = self.scale.device
        self.amplitude_tokens = FullRankTokens(depth, amplitude_num_tokens, dim, patch_size, device=device)
        self.amplitude_refinement = TokenRefinement(dim, standardize_logits=True, device=device)
        self.grid: tuple[int, int] | None = None

    def record_grid(self, backbone: nn.Module, args: tuple[Any, ...]) -> None:
        """Pre-hook on the backbone: the token grid of this forward pass, for the spatial FFT."""
        height, width = args[0].shape[-2:]
        patch = patch_side(backbone)
        self.grid = (math.ceil(height / patch), math.ceil(width / patch))

    def token_grid(self, count: int) -> tuple[int, int]:
        return token_grid(self.grid, count)

    def feature_delta(self, index: int, patch_tokens: torch.Tensor) -> torch.Tensor:
        if self.spectrum == "spatial":
            grid = self.token_grid(patch_tokens.shape[1])
            spectrum = spatial_spectrum(patch_tokens, grid)
        else:
            spectrum = batch_channel_spectrum(patch_tokens)
        amplitude, phase = FLOORS[self.floor](spectrum)
        refined_phase = self.refinement(phase, self.tokens.layer(index))
        refined_amplitude = self.amplitude_refinement(amplitude, self.amplitude_tokens.layer(index))
        combined = recompose(refined_amplitude, refined_phase) / math.sqrt(2 * patch_tokens.shape[-1])
        if self.spectrum == "spatial":
            return inverse_spatial_spectrum(combined, grid)
        return inverse_batch_channel_spectrum(combined)


@dataclass
class SETConfig:
    num_tokens: int = 100  # SET paper (as Rein), m: phase tokens per block; kept for every backbone
    rank: int = 16  # SET paper (as Rein), r: low rank of the phase tokens; kept for every backbone
    amplitude_num_tokens: int = 100  # SET paper, m for the full-rank amplitude tokens
    init_scale: float = 1e-3  # as Rein, initial value of the shared learnable scale
    link_queries: bool = True  # as Rein: phase tokens → Mask2Former queries when the head has queries
    query_dim: int = 256  # Mask2Former hidden width; the head's own `hidden_dim` wins when it has one


class _SpectralTokens(Method):
    Config = SETConfig
    spectrum: ClassVar[str] = "spatial"
    floor: ClassVar[str] = "paper"

    def attach(self, model: SegModel) -> None:
        backbone, cfg = model.backbone, self.config
        device = module_device(backbone)

        def make_adapter(query_dim: int | None) -> SpectralTokenAdapter:
            return SpectralTokenAdapter(
                backbone.depth, backbone.embed_dim, num_prefix_tokens=backbone.num_prefix_tokens,
                num_tokens=cfg.num_tokens, rank=cfg.rank, init_scale=cfg.init_scale, query_dim=query_dim,
                device=device, spectrum=self.spectrum, amplitude_num_tokens=cfg.amplitude_num_tokens,
                patch_size=patch_side(backbone), floor=self.floor,
            )

        adapter = attach_token_adapter(model, make_adapter, cfg.link_queries, cfg.query_dim, "set_tokens")
        if self.spectrum == "spatial":
            backbone.register_forward_pre_hook(adapter.record_grid)


@register_method
class SET(_SpectralTokens):
    """SET as the paper describes it: per-image 2-D FFT over the spatial token grid."""

    name = "set"
    paper = "Yi et al., Learning Spectral-Decomposed Tokens for Domain Generalized Semantic Segmentation (ACM MM 2024)"
    spectrum = "spatial"


@register_method
class SETReleased(_SpectralTokens):
    """SET as the authors' released code computes it: FFT over (batch, channel); couples a batch's images."""

    name = "set_released"
    paper = "Yi et al., SET (ACM MM 2024), as computed by the authors' released code (FFT over batch and channel)"
    spectrum = "batch_channel"
    floor = "released"
    couples_batch = True  # scored one window at a time, as the released code's test-time batch of 1
