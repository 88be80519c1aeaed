"""LoRA (Hu et al., ICLR 2022) and the peft family of weight adapters, through Hugging Face peft.

Reference setting for DGSS (Rein, CVPR 2024, Table 3): rank 8 on every block's fused qkv
projection, 786,432 trainable parameters on DINOv2-L (24 × 8 × (1024 + 3072)). The adapters are
injected into the backbone's timm model in place (`model.backbone.vit`), so they live under
`model.backbone`, the blocks stay the same hookable modules and the pretrained parameters keep their
identity (peft moves them under `<layer>.base_layer`).

Targets are matched by a regular expression over module names chosen per backbone family, never a
bare `proj` (which would also match `patch_embed.proj`): fused `blocks.<i>.attn.qkv` (ViT, DINOv2,
CLIP) or the separate `blocks.<i>.attn.{q,k,v}_proj` (EVA02). EVA models with a fused qkv and a
separate q/v bias call `F.linear` on the weight directly and would bypass an adapter: refused.

Variants, each registered as its own method name (verified to train on a timm ViT, with their
DINOv2-L counts checked in tests/test_methods_lora.py):

| name | peft | DINOv2-L trainable |
| --- | --- | --- |
| `lora` | LoRA r=8, alpha=8 | 786,432 |
| `dora` | LoRA r=8 with `use_dora` (adds a magnitude vector per output channel) | 860,160 |
| `loha` | LoHa r=8 | 1,572,864 |
| `lokr` | LoKr r=8 | 55,296 |
| `vera` | VeRA r=256 (shared frozen projections, trainable scaling vectors) | 79,872 |
| `ia3` | IA3 on qkv (one output scaling vector per layer) | 73,728 |
| `oft` | OFT, block size 32 | 380,928 |

peft's prompt/prefix tuning needs a transformers model and does not work on timm models (VPT is
the prompt method here). Scaling to other backbones: ranks and block sizes stay, widths follow C.
The LoRA scaling alpha/r = 1 is an assumption (peft's default alpha = 8 = r; the reference does not
state it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from benchmarks.errors import UserError
from benchmarks.method import Method, register_method
from benchmarks.model import SegModel

FUSED_QKV = r"blocks\.\d+\.attn\.qkv"
SEPARATE_QKV = r"blocks\.\d+\.attn\.(q_proj|k_proj|v_proj)"


def attention_target_pattern(vit: nn.Module) -> str:
    """The regex (peft full-matches it against module names) for this backbone family's q/k/v layers."""
    names = {name for name, module in vit.named_modules() if isinstance(module, nn.Linear)}
    if any(re.fullmatch(FUSED_QKV, name) for name in names):
        for name, module in vit.named_modules():
            if name.endswith("attn") and getattr(module, "q_bias", None) is not None:
                raise UserError(
                    f"{name} uses a fused qkv with separate biases that bypasses peft adapters; "
                    "use a backbone with separate q/k/v projections (EVA02) or plain qkv (DINOv2, ViT)"
                )
        return FUSED_QKV
    if any(re.fullmatch(SEPARATE_QKV, name) for name in names):
        return SEPARATE_QKV
    raise UserError("no attention projection matches blocks.<i>.attn.qkv or blocks.<i>.attn.{q,k,v}_proj; "
                    "this backbone family is not supported by the peft methods")


@dataclass
class LoRAConfig:
    rank: int = 8  # DGSS reference (Rein, CVPR 2024, Table 3): rank 8 on qkv
    alpha: float = 8.0  # assumption: alpha = rank (scaling 1; peft's default alpha is 8)
    dropout: float = 0.0  # LoRA dropout; the reference does not state one


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA (Liu et al., ICML 2024): LoRA with a learned magnitude per output channel; same rank."""


@dataclass
class LoHaConfig:
    rank: int = 8  # same rank as the LoRA reference
    alpha: float = 8.0  # alpha = rank, as for LoRA


@dataclass
class LoKrConfig:
    rank: int = 8  # same rank as the LoRA reference
    alpha: float = 8.0  # alpha = rank, as for LoRA


@dataclass
class VeRAConfig:
    rank: int = 256  # VeRA paper: the shared random projections are wide (r = 256 in its ViT experiments)


@dataclass
class IA3Config:
    """IA3 (Liu et al., NeurIPS 2022) on the attention projections: one learned output scaling per layer."""


@dataclass
class OFTConfig:
    block_size: int = 32  # peft's OFT default block size (r derived from it)
    # The paper's exact Cayley rotation R = (I + Q)(I - Q)⁻¹; False: peft's Neumann-series approximation of the
    # inverse (OFTv2, peft 0.21's default), whose RᵀR departs from I by 0.07 at entries of Q of std 0.05.
    exact_cayley: bool = True


class PeftMethod(Method):
    """One plugin for the peft tuners: a config → peft config, injected into `model.backbone.vit`.

    Two points a subclass may change: `target_pattern` (which layers; default: the attention
    projections) and `initialise_adapter`, a custom initialisation hook for what peft offers no
    `init_lora_weights` option for (SoMA's minor singular components): the subclass builds its peft
    config with `init_lora_weights=False` and sets A, B and the base weight of each wrapped layer.
    """

    Config = LoRAConfig
    family: ClassVar[str] = ""

    def peft_config(self, target: str) -> Any:
        raise NotImplementedError

    def target_pattern(self, model: SegModel) -> str:
        """The regex peft full-matches against module names of `model.backbone.vit`."""
        return attention_target_pattern(model.backbone.vit)

    def initialise_adapter(self, name: str, layer: nn.Module) -> None:
        """Called under `torch.no_grad` for every layer peft wrapped (`name` relative to the timm model),
        after injection and before anything trains. Default: keep peft's initialisation."""

    def attach(self, model: SegModel) -> None:
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        from peft.tuners.tuners_utils import BaseTunerLayer

        backbone = model.backbone
        backbone.requires_grad_(False)
        pretrained = {id(p) for p in backbone.parameters()}
        config = self.peft_config(self.target_pattern(model))
        # The tuner class injects in place (as `inject_adapter_in_model`, which refuses VeRA for its
        # shared state); only the modified model is kept, the tuner wrapper is dropped.
        PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](backbone.vit, config, "default")
        with torch.no_grad():
            for name, module in backbone.vit.named_modules():
                if isinstance(module, BaseTunerLayer):
                    self.initialise_adapter(name, module)
        for param in backbone.parameters():
            param.requires_grad_(id(param) not in pretrained)


@register_method
class LoRA(PeftMethod):
    name = "lora"
    paper = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models (ICLR 2022), via peft"
    Config = LoRAConfig

    def peft_config(self, target: str) -> Any:
        from peft import LoraConfig

        cfg = self.config
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                          use_dora=isinstance(cfg, DoRAConfig))


@register_method
class DoRA(LoRA):
    name = "dora"
    paper = "Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation (ICML 2024), via peft"
    Config = DoRAConfig


@register_method
class LoHa(PeftMethod):
    name = "loha"
    paper = "Hyeon-Woo et al., FedPara / LoHa: low-rank Hadamard product adaptation (ICLR 2022), via peft"
    Config = LoHaConfig

    def peft_config(self, target: str) -> Any:
        from peft import LoHaConfig as PeftLoHaConfig

        return PeftLoHaConfig(r=self.config.rank, alpha=self.config.alpha, target_modules=target)


@register_method
class LoKr(PeftMethod):
    name = "lokr"
    paper = "Yeh et al., LyCORIS / LoKr: low-rank Kronecker product adaptation (ICLR 2024), via peft"
    Config = LoKrConfig

    def peft_config(self, target: str) -> Any:
        from peft import LoKrConfig as PeftLoKrConfig

        return PeftLoKrConfig(r=self.config.rank, alpha=self.config.alpha, target_modules=target)


@register_method
class VeRA(PeftMethod):
    name = "vera"
    paper = "Kopiczko et al., VeRA: Vector-based Random Matrix Adaptation (ICLR 2024), via peft"
    Config = VeRAConfig

    def peft_config(self, target: str) -> Any:
        from peft import VeraConfig

        return VeraConfig(r=self.config.rank, target_modules=target)


@register_method
class IA3(PeftMethod):
    name = "ia3"
    paper = "Liu et al., Few-Shot PEFT is Better and Cheaper than In-Context Learning / IA3 (NeurIPS 2022), via peft"
    Config = IA3Config

    def peft_config(self, target: str) -> Any:
        from peft import IA3Config as PeftIA3Config

        return PeftIA3Config(target_modules=target, feedforward_modules=[])


@register_method
class OFT(PeftMethod):
    name = "oft"
    paper = "Qiu et al., Controlling Text-to-Image Diffusion by Orthogonal Finetuning / OFT (NeurIPS 2023), via peft"
    Config = OFTConfig

    def peft_config(self, target: str) -> Any:
        from peft import OFTConfig as PeftOFTConfig

        if "use_cayley_neumann" in PeftOFTConfig.__dataclass_fields__:
            rotation = {"use_cayley_neumann": not self.config.exact_cayley}
        elif not self.config.exact_cayley:  # a peft before OFTv2 rotates exactly, with no other choice
            raise UserError("oft: exact_cayley=false needs a peft with OFTv2's Neumann approximation "
                            "(use_cayley_neumann); upgrade peft or leave methods.oft.exact_cayley at true")
        else:
            rotation = {}
        return PeftOFTConfig(r=0, oft_block_size=self.config.block_size, target_modules=target, **rotation)

    def attach(self, model: SegModel) -> None:
        # peft would change a block size that does not divide the layers' input width with a warning,
        # and the result would record the size asked for, not the one trained.
        width, block = model.backbone.embed_dim, self.config.block_size
        if width % block:
            divisors = [d for d in range(1, width + 1) if width % d == 0]
            nearest = min(divisors, key=lambda d: (abs(d - block), d))
            raise UserError(f"oft: block_size={block} does not divide the backbone's width {width}; pass one "
                            f"that does, e.g. --set methods.oft.block_size={nearest}")
        super().attach(model)
