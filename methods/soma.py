"""SoMA (Yun et al., CVPR 2025): LoRA on the minor singular components, with the released recipe.

Each target weight W = U S Vᵀ (out × in) gets a rank-r LoRA whose factors hold its r *smallest*
singular triplets: with S_r divided by the LoRA scaling s = alpha / r,
B = U_r·sqrt(S_r) (out × r) and A = sqrt(S_r)·V_rᵀ (r × in); the frozen base weight becomes
W − s·B·A, so the layer computes exactly W·x at step 0 (PiSSA's construction from the other end of
the spectrum). Through peft: adapters built with `init_lora_weights=False`, then A, B and the
residual base weight set by `PeftMethod.initialise_adapter`. The decomposition runs in float64 on the
weight's device (the released code uses float32; the directions and the step-0 identity only get
more exact); a resumed run recomputes it from the same pretrained weights.

The initialisation above is the paper's. The released training decomposes the layers' random initial
weights instead (its backbone is wrapped before the pretrained file is loaded over the base weights), so it
starts from the full pretrained W plus a random matrix's minor part: docs/methods.md, "Where it differs".
The recipe below is read from the authors' released configuration (ysj9909/SoMA,
configs/sora/sora_dinov2-L_mask2former.py and rein/peft/sora.py; "SoRA" in the code):

- targets q, k, v, proj, fc1, fc2 (the attention and MLP linear layers) of blocks 8–23 of DINOv2-L
  (`start_lora_idx = 8`); blocks 0–7 stay frozen. Other depths keep the fraction:
  first adapted block = round(depth · 8/24), i.e. the first third of the blocks stays frozen
  (ViT-S/B: 4 of 12, ViT-g: 13 of 40, the proxy ViT: 2 of 6);
- rank 16, alpha 16 (scaling 1), no dropout; the biases of the adapted layers train too (the
  released `SoraConfig.bias` defaults to "all" and the config does not change it);
- the backbone side at lr × 0.5 (`paramwise_cfg` key "backbone"), declared as the groups' `lr_mult`;
- weight decay annealed with a cosine from 0.05 to 1e-5 over all 40k iterations
  (`CosineAnnealingParamScheduler` on `weight_decay`), declared as `weight_decay_schedule()`;
- an EMA of the weights from iteration 12,000 of 40,000 (`EMAHook(begin_iter=12000)` with
  mmengine's `ExponentialMovingAverage`, whose default momentum 2e-4 is a decay of 0.9998), scored
  in place of the last iteration's weights, declared as `ema()`.

timm's DINOv2 has a fused `attn.qkv` (3C × C); the released code converts it into three C × C
layers q, k, v before training (tools/convert_models/convert_dinov2_sora.py) and adapts each with
its own rank-16 LoRA from its own spectrum. Here the fused layer of each adapted block is split the
same way (`SeparateQKV`: its rows [q; k; v], outputs concatenated back in that order, so the
attention computes what it did) and peft wraps `attn.qkv.q`, `.k`, `.v`. A single rank-16 LoRA on
the fused qkv would be another method: 65,536 adapter entries per block instead of 98,304, and the
minor directions of the stacked matrix instead of each projection's. Backbones with separate
projections (EVA02: `attn.q_proj`, `k_proj`, `v_proj`; SwiGLU `mlp.fc1_g` and `mlp.fc1_x` for fc1)
are adapted in place.

Trainable backbone-side on DINOv2-L: 16 blocks × (q, k, v, proj: 4 × 16 × (1024 + 1024); fc1 and
fc2: 2 × 16 × (1024 + 4096)) = 4,718,592 adapter entries (`backbone_added`) + their layers' biases
16 × 9,216 = 147,456, i.e. 4,866,048 (`backbone_trainable`); 4,718,592 with `train_biases=false`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.config import NOT_NEGATIVE, POSITIVE, Bound
from benchmarks.errors import UserError
from benchmarks.method import (
    EMA,
    CosineWeightDecay,
    no_decay_names,
    register_method,
    scale_lr,
    split_decay_groups,
)
from benchmarks.model import SegModel
from methods.lora import PeftMethod

# Each released target name → the layers it names in a timm block, first the fused family's (after
# the split), then the separate-projection family's.
TARGET_LAYERS: dict[str, tuple[str, ...]] = {
    "q": ("attn.qkv.q", "attn.q_proj"),
    "k": ("attn.qkv.k", "attn.k_proj"),
    "v": ("attn.qkv.v", "attn.v_proj"),
    "proj": ("attn.proj",),
    "fc1": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x"),
    "fc2": ("mlp.fc2",),
}


class SeparateQKV(nn.Module):
    """A fused qkv Linear as three Linear layers `q`, `k`, `v` holding its row blocks; the output is
    their concatenation in the fused order, so the attention module that calls it is unchanged."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        if fused.out_features % 3:
            raise UserError(f"a fused qkv layer has 3·C outputs; this one has {fused.out_features}")
        width = fused.out_features // 3
        weights = fused.weight.detach().split(width)
        biases = fused.bias.detach().split(width) if fused.bias is not None else (None,) * 3
        for name, weight, bias in zip("qkv", weights, biases, strict=True):
            # Built on the meta device and given the fused tensors' values: no throw-away random init.
            layer = nn.Linear(fused.in_features, width, bias=bias is not None, device="meta")
            layer.weight = nn.Parameter(weight.clone(), requires_grad=fused.weight.requires_grad)
            if bias is not None:
                layer.bias = nn.Parameter(bias.clone(), requires_grad=fused.bias.requires_grad)
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def minor_components(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """(A [r, in], B [out, r], residual [out, in]) from the `rank` smallest singular triplets of `weight`.

    With S_r divided by `scaling`, B = U_r·sqrt(S_r) and A = sqrt(S_r)·V_rᵀ, so scaling·B·A is the
    minor part U_r·S_r·V_rᵀ and residual + scaling·B·A = weight.
    """
    exact = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)  # singular values in descending order
    root = (s[-rank:] / scaling).sqrt()
    b = u[:, -rank:] * root
    a = root[:, None] * vh[-rank:]
    residual = exact - scaling * (b @ a)
    return a.to(weight.dtype), b.to(weight.dtype), residual.to(weight.dtype)


@dataclass
class SoMAConfig:
    rank: int = 16  # released config (configs/sora/sora_dinov2-L_mask2former.py): r = 16
    alpha: float = 16.0  # released config: lora_alpha = rank (scaling 1)
    dropout: float = 0.0  # released config: lora_dropout = 0
    targets: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")  # released config: target_modules
    frozen_fraction: float = 8 / 24  # released config: start_lora_idx = 8 of DINOv2-L's 24 blocks
    train_biases: bool = True  # released code: SoraConfig.bias = "all", not overridden by the config
    backbone_lr_mult: float = 0.5  # released config: paramwise_cfg custom key "backbone", lr_mult 0.5
    weight_decay_end: float = 1e-5  # released config: cosine on weight_decay to eta_min 1e-5 over 40k its
    use_ema: bool = True  # released config: EMAHook in custom_hooks; the EMA weights are evaluated
    ema_decay: float = 0.9998  # released config: mmengine ExponentialMovingAverage default momentum 2e-4
    ema_start_fraction: float = 0.3  # released config: EMAHook begin_iter 12,000 of max_iters 40,000
    ema_reference_iters: int = 40_000  # the released schedule's length ema_decay belongs to (0: keep it)


@register_method
class SoMA(PeftMethod):
    name = "soma"
    paper = ("Yun et al., SoMA: Singular Value Decomposed Minor Components Adaptation for Domain "
             "Generalizable Representation Learning (CVPR 2025)")
    Config = SoMAConfig

    hyperparameter_ranges = {
        "frozen_fraction": Bound(0, 1, high_open=True), "backbone_lr_mult": POSITIVE, "weight_decay_end": NOT_NEGATIVE,
        "ema_decay": Bound(0, 1, low_open=True, high_open=True), "ema_start_fraction": Bound(0, 1),
        "ema_reference_iters": NOT_NEGATIVE,
    }

    def __init__(self, config: Any | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        targets = self.config.targets
        if not targets or not set(targets) <= set(TARGET_LAYERS):
            raise UserError(f"methods.soma.targets={targets!r} is out of range: it must be a non-empty list of "
                            f"{', '.join(TARGET_LAYERS)}")
        self._adapted: list[str] = []

    # -- building ---------------------------------------------------------------------------------
    def adapted_blocks(self, depth: int) -> range:
        return range(round(depth * self.config.frozen_fraction), depth)

    def attach(self, model: SegModel) -> None:
        vit = model.backbone.vit
        blocks = self.adapted_blocks(len(vit.blocks))
        if not len(blocks):
            raise UserError(f"methods.soma.frozen_fraction={self.config.frozen_fraction} leaves no block of "
                            f"{len(vit.blocks)} to adapt")
        for index in blocks:
            attn = vit.blocks[index].attn
            fused = getattr(attn, "qkv", None)
            if isinstance(fused, nn.Linear) and {"q", "k", "v"} & set(self.config.targets):
                if getattr(attn, "q_bias", None) is not None:
                    raise UserError(f"blocks.{index}.attn uses a fused qkv with separate biases (F.linear on the "
                                    "weight), which a split cannot follow; use a backbone with plain or separate qkv")
                split = SeparateQKV(fused)
                attn.qkv = split
                model.replace_pretrained(list(fused.parameters()), list(split.parameters()))
        self._adapted = self._target_names(vit, blocks)
        super().attach(model)
        if self.config.train_biases:
            for name in self._adapted:
                bias = vit.get_submodule(name).get_base_layer().bias
                if bias is not None:
                    bias.requires_grad_(True)

    def _target_names(self, vit: nn.Module, blocks: range) -> list[str]:
        linear = {name for name, module in vit.named_modules() if isinstance(module, nn.Linear)}
        names = []
        for index in blocks:
            for target in self.config.targets:
                found = [f"blocks.{index}.{local}" for local in TARGET_LAYERS[target] if f"blocks.{index}.{local}" in linear]
                if not found:
                    raise UserError(f"SoMA target {target!r} matches no linear layer of blocks.{index} in this backbone "
                                    f"(looked for {', '.join(TARGET_LAYERS[target])})")
                names.extend(found)
        for name in names:
            layer = vit.get_submodule(name)
            if self.config.rank > min(layer.in_features, layer.out_features):
                raise UserError(f"methods.soma.rank={self.config.rank} exceeds the size of {name} "
                                f"({layer.out_features} × {layer.in_features})")
        return names

    def target_pattern(self, model: SegModel) -> str:
        return "(" + "|".join(re.escape(name) for name in self._adapted) + ")"

    def peft_config(self, target: str) -> Any:
        from peft import LoraConfig

        cfg = self.config
        # init_lora_weights=False: peft's own init is skipped; initialise_adapter sets the factors.
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
                          init_lora_weights=False)

    def initialise_adapter(self, name: str, layer: nn.Module) -> None:
        base = layer.get_base_layer()
        a, b, residual = minor_components(base.weight, self.config.rank, layer.scaling["default"])
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        base.weight.copy_(residual)

    # -- the recipe the protocol applies ----------------------------------------------------------
    def param_groups(self, model: SegModel, weight_decay: float) -> list[dict[str, Any]]:
        backbone = {id(p) for p in model.backbone.parameters()}
        # SoMA's config adds mmdet's `query_feat` (Mask2Former's query content) to the protocol's
        # no-decay keys; other heads have no such parameter.
        exempt = no_decay_names(model) | {name for name, _ in model.named_parameters()
                                          if name.endswith("transformer.queries_features.weight")}
        groups = split_decay_groups(model.named_parameters(), weight_decay, exempt)
        return scale_lr(groups, backbone, self.config.backbone_lr_mult)

    def weight_decay_schedule(self) -> CosineWeightDecay:
        return CosineWeightDecay(end=self.config.weight_decay_end)

    def ema(self) -> EMA | None:
        cfg = self.config
        if not cfg.use_ema:
            return None
        return EMA(decay=cfg.ema_decay, start_fraction=cfg.ema_start_fraction, reference_iters=cfg.ema_reference_iters)

    def diagnostics(self) -> dict[str, Any]:
        return {"adapted_layers": len(self._adapted)}
