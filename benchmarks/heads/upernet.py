"""UPerNet (Xiao et al., ECCV 2018), the other decode head the DGSS literature reports, from
segmentation-models-pytorch's maintained decoder.

smp's `UPerNetDecoder` takes an encoder's feature list from stride 1 upward and uses the levels from
stride 4 on; a ViT pyramid has exactly those four levels (p/4, p/2, p, 2p), so they are passed in the
slots smp reads and the two slots it skips stay empty. The decoder's PSP pooling on the coarsest level,
FPN laterals and fusion are smp's own, initialised as smp's own UPerNet model initialises them; this file
adds the classifier (initialised as mmseg's decode heads' `conv_seg`: normal, std 0.01) and the per-pixel
heads' loss (`PerPixelHead`).

Against mmseg's UPerNet for ViTs (`upernet_vit-b16_mln`), the reference of the papers that report one:
128 channels by default where mmseg has 512 (`head_options='{"channels": 512, "norm": "batchnorm"}'` gives
its width and norm), no auxiliary FCN head (mmseg's weighs 0.4), and smp's learnable norm on each input
level, which mmseg's head has not (its MultiLevelNeck sits before it instead).
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.heads.light import PerPixelHead, group_norm

# smp reads encoder levels from index 2 on (stride 4); the pyramid fills those slots.
_SKIPPED_LEVELS = 2
NORMS = ("groupnorm", "batchnorm")


def _batchnorm_to_groupnorm(module: nn.Module) -> None:
    """Every BatchNorm2d below `module` replaced by the light head's GroupNorm over the same channels."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, group_norm(child.num_features))
        else:
            _batchnorm_to_groupnorm(child)


class UPerNetHead(PerPixelHead):
    """smp's UPerNet decoder over the pyramid from `finest_level` on; logits at that level."""

    def __init__(self, in_channels: int | list[int], num_classes: int, channels: int = 128, dropout: float = 0.1,
                 norm: str = "groupnorm", finest_level: int = 0, class_balance: str = "none"):
        """`norm`: "groupnorm" (default) or "batchnorm" (UPerNet's own). GroupNorm because the 1×1-pooled
        PSP branch cannot be batch-normalised at a micro-batch of one, which CPU runs and per-GPU batches
        of data-parallel runs reach (and smp's "layernorm" normalises the wrong axis of a conv map)."""
        from segmentation_models_pytorch.base.initialization import initialize_decoder
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        super().__init__(in_channels, num_classes, finest_level, class_balance)
        ins = self.level_channels
        if norm not in NORMS:
            raise ValueError(f"UPerNetHead norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.decoder = UPerNetDecoder(
            encoder_channels=[ins[0]] * _SKIPPED_LEVELS + ins, encoder_depth=len(ins) + 1,
            decoder_channels=channels, use_norm="batchnorm",
        )
        if norm == "groupnorm":
            _batchnorm_to_groupnorm(self.decoder)
        initialize_decoder(self.decoder)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != 4:
            raise ValueError(f"UPerNetHead expects 4 feature maps, got {len(features)}")
        fused = self.decoder([None] * _SKIPPED_LEVELS + list(features[self.finest_level :]))
        return self.classifier(self.dropout(fused))
