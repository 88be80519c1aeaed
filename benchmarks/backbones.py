"""Vision-foundation-model backbones built by name, with the protocol's feature taps.

Why this shape: every DGSS method in the benchmark refines, prompts or adapts the *blocks* of a
plain ViT, and the head needs a 4-level pyramid. So a `Backbone` is a thin wrapper over a timm model
that (1) runs the blocks in a plain Python loop, calling ``self.blocks[i](x)`` so that forward hooks
and pre-hooks registered by methods fire and see the full token sequence [B, prefix+N, C];
(2) taps four blocks at 1/3, 1/2, 2/3 and all of the depth and turns their patch tokens into maps at strides
p/4, p/2, p, 2p; (3) loads user weights in timm or the original release layouts and converts them
the way the reference converts DINOv2 (14→16 patch kernel, position grid to img_size/patch, bicubic),
for every family (docs/protocol.md names where Rein's CLIP backbone differs).

Backbones are registered as data (`BACKBONES`), like timm's pretrained configs: adding one is a
new `BackboneSpec`, not new code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer_sam import Block as _SamBlock
from torch import nn

from benchmarks import weights_io
from benchmarks.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: The protocol's patch size for the 14-patch VFMs (DINOv2, EVA02, CLIP): converted to 16.
PROTOCOL_PATCH = 16
RESAMPLE_MODES = ("bicubic", "timm")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: a timm model name plus the facts the protocol needs.

    `family` selects the forward path and the original-release converter: ``vit`` (timm
    VisionTransformer: DINOv2, CLIP, proxy), ``eva`` (timm Eva: rope passed to each block) or
    ``sam`` (timm VisionTransformerSAM: NHWC blocks, no prefix tokens).
    """

    timm_name: str
    family: str
    native_patch: int
    native_img_size: int
    embed_dim: int
    depth: int
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: Patch size the protocol uses for this backbone (16 for the 14-patch VFMs); None → native.
    protocol_patch: int | None = None
    #: Published/protocol parameter count of the backbone, where one exists (for the paper table).
    published_params: int | None = None
    #: Weights used when the caller gives none (only the project's own proxy has any).
    default_weights: Path | None = None
    #: Original-release layout understood besides timm's (documentation and error messages).
    original_format: str = ""
    note: str = ""


def _dinov2(size: str, dim: int, depth: int, reg: bool, published: int | None = None) -> BackboneSpec:
    name = f"vit_{size}_patch14_{'reg4_' if reg else ''}dinov2"
    return BackboneSpec(
        timm_name=name, family="vit", native_patch=14, native_img_size=518, embed_dim=dim, depth=depth,
        protocol_patch=PROTOCOL_PATCH, published_params=published,
        original_format="facebookresearch/dinov2 release (dinov2_vit*14[_reg4]_pretrain.pth)",
    )


def _sam(size: str, letter: str, dim: int, depth: int, global_blocks: tuple[int, ...]) -> BackboneSpec:
    return BackboneSpec(
        timm_name=f"samvit_{size}_patch16", family="sam", native_patch=16, native_img_size=1024,
        embed_dim=dim, depth=depth,
        # segment-anything builds its encoder with LayerNorm(eps=1e-6); timm's SAM ViT, given no norm layer
        # by its model functions, uses torch's default 1e-5.
        timm_kwargs={"neck_chans": None, "norm_layer": partial(nn.LayerNorm, eps=1e-6)},
        original_format=f"segment-anything release sam_vit_{letter}_*.pth (image_encoder.*, via timm's sam filter)",
        note=f"windowed attention (14) with global blocks {'/'.join(map(str, global_blocks))}; the SAM neck is "
             "not used",
    )


BACKBONES: dict[str, BackboneSpec] = {
    "dinov2_vits14": _dinov2("small", 384, 12, False),
    "dinov2_vitb14": _dinov2("base", 768, 12, False),
    # 304.2M: the protocol's "Full" count (backbone at 512/16, no mask token, no final norm).
    "dinov2_vitl14": _dinov2("large", 1024, 24, False, published=304_200_000),
    "dinov2_vitg14": _dinov2("giant", 1536, 40, False),
    "dinov2_vits14_reg": _dinov2("small", 384, 12, True),
    "dinov2_vitb14_reg": _dinov2("base", 768, 12, True),
    "dinov2_vitl14_reg": _dinov2("large", 1024, 24, True),
    "dinov2_vitg14_reg": _dinov2("giant", 1536, 40, True),
    "eva02_large_patch14": BackboneSpec(
        timm_name="eva02_large_patch14_224", family="eva", native_patch=14, native_img_size=224,
        embed_dim=1024, depth=24, protocol_patch=PROTOCOL_PATCH,
        original_format="BAAI's EVA-02 MIM or fine-tuned release (converted by timm's eva checkpoint_filter_fn; "
                        "not EVA-02-CLIP, whose attention has a norm this model lacks)",
    ),
    "clip_vitl14": BackboneSpec(
        timm_name="vit_large_patch14_clip_quickgelu_224", family="vit", native_patch=14, native_img_size=224,
        embed_dim=1024, depth=24, protocol_patch=PROTOCOL_PATCH,
        original_format="OpenAI CLIP's ViT-L/14, as a state dict of the whole model or of its image tower "
                        "(`model.visual`; OpenAI's own file is TorchScript: save torch.jit.load(f).state_dict()) or "
                        "OpenCLIP's `openai` weights (converted by timm's vision_transformer checkpoint_filter_fn)",
        note="OpenAI ViT-L/14 uses QuickGELU, and so does this model: OpenCLIP's LAION-trained ViT-L-14 uses GELU "
             "and would load with no error into the wrong activation; pre-norm before the blocks is kept",
    ),
    "sam_vitb16": _sam("base", "b", 768, 12, (2, 5, 8, 11)),
    "sam_vitl16": _sam("large", "l", 1024, 24, (5, 11, 17, 23)),
    "sam_vith16": _sam("huge", "h", 1280, 32, (7, 15, 23, 31)),
    "proxy_vit": BackboneSpec(
        timm_name="vit_tiny_patch16_224", family="vit", native_patch=8, native_img_size=128,
        embed_dim=192, depth=6,
        timm_kwargs={"patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0,
                     "init_values": 1e-5, "class_token": True, "reg_tokens": 0, "qkv_bias": True},
        default_weights=WEIGHTS_DIR / "proxy_vit.safetensors",
        note="the project's small pretrained ViT (DINOv2-like LayerScale) for CPU runs",
    ),
}


def available_backbones() -> dict[str, BackboneSpec]:
    return dict(sorted(BACKBONES.items()))


def get_spec(name: str) -> BackboneSpec:
    spec = BACKBONES.get(name)
    if spec is None:
        raise UserError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}")
    return spec


def tap_indices(depth: int) -> tuple[int, int, int, int]:
    """0-based blocks tapped for the pyramid: at 1/3, 1/2, 2/3 and 1 of the depth (7,11,15,23 at 24), as Rein's."""
    if depth < 4:
        raise ValueError(f"a backbone needs at least 4 blocks for 4 taps, got depth {depth}")
    taps = (round(depth / 3) - 1, depth // 2 - 1, round(2 * depth / 3) - 1, depth - 1)
    if len(set(taps)) < 4:  # depth 5 only: the rule taps block 1 twice (and the pyramid would lose a level)
        taps = tuple(range(depth - 4, depth))
    return taps


# -- block containers -----------------------------------------------------------------------------------
class BlockList(nn.ModuleList):
    """The blocks as an `nn.ModuleList` (what methods index and hook) that can still be called like
    timm's `nn.Sequential`, so the timm model's own forward keeps working for other users."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - sequential application
        for block in self:
            x = block(x)
        return x


class TokenSequenceSamBlock(_SamBlock):
    """A SAM block that also accepts the token sequence [B, N, C] (grid set by the Backbone).

    SAM blocks work on NHWC grids for windowed attention; methods expect every block to map
    [B, prefix+N, C] → [B, prefix+N, C]. Swapping the instance's class keeps parameter names,
    submodules (`attn`, `mlp`) and hooks exactly where methods look for them; a 4-D input still
    takes SAM's own path, so timm's forward keeps working.
    """

    grid_hw: tuple[int, int] = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return super().forward(x)
        b, n, c = x.shape
        h, w = self.grid_hw
        return super().forward(x.reshape(b, h, w, c)).reshape(b, n, c)


# -- the backbone -------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """A timm ViT with the protocol's 4-level feature taps.

    Attributes methods rely on: ``vit`` (the timm model), ``blocks`` (nn.ModuleList; a block maps
    [B, prefix+N, C] → same), ``num_prefix_tokens`` (cls + registers, passed through untouched by
    refinement methods), ``embed_dim``, ``depth``, ``patch_size``, ``tap_indices``.
    """

    def __init__(self, vit: nn.Module, spec: BackboneSpec, name: str, img_size: int, patch_size: int):
        super().__init__()
        self.vit = vit
        self.spec = spec
        self.name = name
        self.family = spec.family
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = int(getattr(vit, "embed_dim", spec.embed_dim))
        self.depth = len(vit.blocks)
        self.num_prefix_tokens = 0 if spec.family == "sam" else int(vit.num_prefix_tokens)
        self.tap_indices = tap_indices(self.depth)
        self.scales = (4.0, 2.0, 1.0, 0.5)
        self.strides = tuple(patch_size / s for s in self.scales)

    @property
    def blocks(self) -> nn.ModuleList:
        # A property (not a second registration) so the state dict has one name per tensor.
        return self.vit.blocks

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any, tuple[int, int]]:
        """Patch embedding + position embedding (+ prefix tokens): [B, prefix+N, C], rope, grid."""
        vit = self.vit
        x = vit.patch_embed(images)  # NHWC for dynamic-size ViT/Eva and for SAM
        gh, gw = x.shape[1], x.shape[2]
        rope = None
        if self.family == "vit":
            x = vit._pos_embed(x)
            x = vit.patch_drop(x)
            x = vit.norm_pre(x)
        elif self.family == "eva":
            x, rope = vit._pos_embed(x)
            x = vit.norm_pre(x)
        else:  # sam
            from timm.layers import resample_abs_pos_embed_nhwc

            if vit.pos_embed is not None:
                x = x + resample_abs_pos_embed_nhwc(vit.pos_embed, [gh, gw])
            x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
            x = x.reshape(x.shape[0], gh * gw, x.shape[-1])
            for block in self.blocks:
                block.grid_hw = (gh, gw)
        return x, rope, (gh, gw)

    def tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped blocks' full outputs [B, prefix+N, C] (what the hooks see)."""
        self._check_size(images)
        x, rope, _ = self._embed(images)
        return self._run_blocks(x, rope)

    def _run_blocks(self, x: torch.Tensor, rope: Any) -> list[torch.Tensor]:
        taps, last = set(self.tap_indices), self.tap_indices[-1]
        outs = []
        for i in range(last + 1):
            x = self.blocks[i](x) if rope is None else self.blocks[i](x, rope=rope)
            if i in taps:
                outs.append(x)
        return outs

    def _check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise UserError(
                f"input size {h}x{w} is not divisible by the patch size {self.patch_size} of {self.name}; "
                "pad or crop the images to a multiple of the patch size"
            )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images [B,3,H,W] → 4 maps [B, C, H/s, W/s] at strides p/4, p/2, p, 2p (no final norm)."""
        self._check_size(images)
        x, rope, (gh, gw) = self._embed(images)
        feats = []
        for tokens, scale in zip(self._run_blocks(x, rope), self.scales, strict=True):
            patches = tokens[:, self.num_prefix_tokens:]
            fmap = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[-1], gh, gw)
            if scale != 1.0:
                fmap = F.interpolate(fmap, scale_factor=scale, mode="bilinear", align_corners=False)
            feats.append(fmap)
        return feats

    def extra_repr(self) -> str:
        return f"name={self.name}, patch={self.patch_size}, img={self.img_size}, taps={self.tap_indices}"


# -- building -------------------------------------------------------------------------------------------
def _timm_kwargs(spec: BackboneSpec, img_size: int, patch_size: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "drop_path_rate": 0.0}
    kwargs.update(spec.timm_kwargs)
    kwargs.update(img_size=img_size, patch_size=patch_size)
    if spec.family in ("vit", "eva"):
        kwargs["dynamic_img_size"] = True
    if spec.family == "vit" and torch.get_default_device().type == "meta":
        kwargs["weight_init"] = "skip"  # shapes only: drawing a meta tensor's init costs half of a meta build
    return kwargs


def _create_timm(spec: BackboneSpec, img_size: int, patch_size: int) -> nn.Module:
    import timm

    vit = timm.create_model(spec.timm_name, **_timm_kwargs(spec, img_size, patch_size))
    # The protocol feeds tapped block outputs to the head: the final norm, pooling norm, classifier
    # and SAM's neck are never used, and an unused trainable parameter breaks DDP. Remove them.
    for attr in ("norm", "fc_norm", "head", "neck"):
        if isinstance(getattr(vit, attr, None), nn.Module):
            setattr(vit, attr, nn.Identity())
    if not isinstance(vit.blocks, nn.ModuleList) or type(vit.blocks) is nn.Sequential:
        vit.blocks = BlockList(list(vit.blocks))
    if spec.family == "sam":
        for block in vit.blocks:
            block.__class__ = TokenSequenceSamBlock
    for module in vit.modules():  # PyTorch's fused scaled_dot_product_attention where timm has it
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return vit


def _ignorable(key: str) -> bool:
    """Checkpoint entries accepted but not loaded: parts the segmentation backbone does not use."""
    head = key.split(".")[0]
    return key == "mask_token" or head in {"norm", "fc_norm", "head", "neck", "head_drop"} or key.endswith(
        ("freqs_cos", "freqs_sin", "rope.periods")
    )


def _is_target_layout(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> bool:
    keys = {k for k in sd if not _ignorable(k)}
    return keys == set(target)


def _convert_original(sd: weights_io.StateDict, spec: BackboneSpec, vit: nn.Module, path: Path) -> weights_io.StateDict:
    """Original-release layouts → timm keys at the release's native shapes."""
    # transformers' layout, bare (embeddings.*, encoder.layer.*) or under a model's prefix (vision_model.*, dinov2.*)
    unprefixed = {key.split(".", 1)[1] if key.split(".", 1)[0] in ("vision_model", "dinov2") else key for key in sd}
    if any(key.startswith("embeddings.") for key in unprefixed) and any(key.startswith("encoder.layer") for key in unprefixed):
        release = spec.original_format or "the authors' file"
        raise UserError(
            f"weights file {path} is in the Hugging Face transformers layout (embeddings.*, encoder.layer.*), which "
            f"is not read here; pass the original release ({release}) or a timm state dict of it"
        )
    # EVA-02-CLIP's inner attention norm: `attn.norm` in timm's and OpenCLIP's names, `inner_attn_ln` in BAAI's own
    if spec.family == "eva" and any(".attn.norm." in key or ".inner_attn_ln." in key for key in sd):
        release = (spec.original_format or "the authors' file").split(" (")[0]
        raise UserError(f"weights file {path} is an EVA-02-CLIP image tower (its attention has an inner norm), not "
                        f"{spec.timm_name}; pass {release}")
    if "class_embedding" in sd and "conv1.weight" in sd:
        sd = {f"visual.{key}": value for key, value in sd.items()}  # CLIP's image tower alone (`model.visual`)
    if spec.timm_name.endswith("dinov2") and weights_io.is_dinov2_original(sd):
        return weights_io.convert_dinov2_original(sd, model_has_reg_tokens=getattr(vit, "reg_token", None) is not None)
    if spec.timm_name.endswith("dinov2"):
        return sd  # already timm-like; names/shapes are checked later
    # Other families: timm's own converters, run against a model at the checkpoint's own patch and grid
    # (built on the meta device: no memory). timm's converters also resize a kernel or grid that differs
    # from the model's (the kernel by FlexiViT's magnitude-preserving pseudo-inverse), so the model takes the
    # checkpoint's shapes and they only rename; resizing stays ours (`weights_io.adapt_to_model`).
    if spec.family == "eva":
        from timm.models.eva import checkpoint_filter_fn
    elif spec.family == "sam":
        from timm.models.vision_transformer_sam import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    patch, grid = checkpoint_patch_and_grid(sd) or (spec.native_patch, spec.native_img_size // spec.native_patch)
    with torch.device("meta"):
        native = _create_timm(spec, patch * grid, patch)
    try:
        return dict(checkpoint_filter_fn(sd, native))
    except Exception as exc:  # a layout none of timm's converters knows
        raise UserError(
            f"weights file {path}: layout not recognised for {spec.timm_name} ({type(exc).__name__}: {exc}); "
            f"supported: timm state dicts and {spec.original_format or 'timm format only'}"
        ) from exc


def checkpoint_patch_and_grid(sd: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(patch size, position grid side) a checkpoint was saved at, read off its patch kernel ([C, 3, p, p]:
    timm's, EVA's and SAM's `patch_embed.proj.weight`, CLIP's `conv1.weight`) and its position embedding
    ([T, C] or [1, T, C] with T = side² or side² + 1; SAM's [1, side, side, C]); None where either is not
    found or the token count is no square."""
    kernels = [(k, v) for k, v in sd.items() for suffix in ("patch_embed.proj.weight", "conv1.weight")
               if k.endswith(suffix) and v.ndim == 4 and v.shape[-1] == v.shape[-2]]
    if len(kernels) != 1:
        return None
    kernel_key, kernel = kernels[0]
    owner = kernel_key[: kernel_key.rindex("patch_embed.") if "patch_embed." in kernel_key else kernel_key.rindex("conv1.")]
    # The image tower's own (a whole CLIP file also holds the text tower's `positional_embedding`).
    positions = [sd[owner + name] for name in ("pos_embed", "positional_embedding") if owner + name in sd]
    if len(positions) != 1:
        return None
    patch, position = int(kernel.shape[-1]), positions[0]
    if position.ndim == 4:
        return (patch, int(position.shape[1])) if position.shape[1] == position.shape[2] else None
    tokens = int(position.shape[-2])
    for prefix in (0, 1):
        side = math.isqrt(tokens - prefix)
        if side * side == tokens - prefix:
            return patch, side
    return None


def check_weights_file(backbone: Backbone, path: str | Path, resample: str = "bicubic") -> None:
    """What `load_weights` refuses in a file, found without loading it into `backbone` (which may be on the
    meta device): unreadable, unsafe, of another layout, family or size. A run checks this before it reads or
    generates any data."""
    _adapted_state_dict(backbone, Path(path), resample)


def _adapted_state_dict(backbone: Backbone, path: Path, resample: str) -> weights_io.StateDict:
    """The file's state dict as `backbone` takes it: timm's names, resized to its patch and grid, its dtype;
    only the backbone's shapes are read (it may be on the meta device)."""
    if resample not in RESAMPLE_MODES:
        raise UserError(f"unknown resample mode {resample!r}; valid: {', '.join(RESAMPLE_MODES)}")
    vit, spec = backbone.vit, backbone.spec
    target = vit.state_dict()
    sd = _read_in_timm_names(backbone, path)
    num_prefix_in_pos = 0 if getattr(vit, "no_embed_class", False) or spec.family == "sam" else backbone.num_prefix_tokens
    sd = weights_io.adapt_to_model(sd, target, num_prefix_in_pos=num_prefix_in_pos, resample=resample)
    return weights_io.check_shapes_and_cast(sd, target, path)


def _read_in_timm_names(backbone: Backbone, path: Path) -> weights_io.StateDict:
    """The file's state dict under the timm model's names, at the release's own shapes; every name checked
    (another family's file is named here, before anything is resized)."""
    target = backbone.vit.state_dict()
    sd = weights_io.read_state_dict(path)
    if not _is_target_layout(sd, target):
        sd = _convert_original(sd, backbone.spec, backbone.vit, path)
    weights_io.check_names(sd, target, path, ignorable=_ignorable)
    return sd


def load_weights(backbone: Backbone, path: str | Path, resample: str = "bicubic") -> None:
    """Load `path` (timm or original layout) into `backbone`, converting as the protocol says."""
    path = Path(path)
    vit = backbone.vit
    vit.load_state_dict(_adapted_state_dict(backbone, path, resample), strict=True)
    log.info("loaded %s weights from %s (patch %d, grid %s, resample=%s)", backbone.name, path,
             backbone.patch_size, getattr(vit.patch_embed, "grid_size", None), resample)


def build_backbone(
    name: str | BackboneSpec,
    img_size: int,
    weights: str | Path | None = None,
    patch_size: int | None = None,
    resample: str = "bicubic",
) -> Backbone:
    """Build a backbone by registry name (or an explicit spec, e.g. a tiny one in tests).

    `weights`: a checkpoint path (timm or original layout); None → the spec's default weights if
    the file exists (only `proxy_vit` has one), otherwise random init with a warning; the string
    ``"random"`` forces random init. `patch_size` None → the protocol's (16 for 14-patch VFMs).
    `resample`: ``"bicubic"`` (reference) or ``"timm"`` for the patch kernel and position grid.
    """
    if isinstance(name, BackboneSpec):
        spec, label = name, name.timm_name
    else:
        spec, label = get_spec(name), name
    if resample not in RESAMPLE_MODES:
        raise UserError(f"unknown resample mode {resample!r}; valid: {', '.join(RESAMPLE_MODES)}")
    patch = int(patch_size or spec.protocol_patch or spec.native_patch)
    if img_size % patch:
        raise UserError(f"img_size {img_size} is not divisible by patch size {patch} for backbone {label}")
    vit = _create_timm(spec, img_size, patch)
    backbone = Backbone(vit, spec, label, img_size, patch)
    if next(vit.parameters()).is_meta:
        return backbone  # built for shapes only (counting, FLOPs on fake tensors): nothing to load
    if weights is None and spec.default_weights is not None and Path(spec.default_weights).is_file():
        weights = spec.default_weights
    if weights is None or str(weights) == "random":
        if weights is None:
            log.warning("backbone %s: no weights given%s — random initialisation (pass --weights %s=PATH)", label,
                        f" and {spec.default_weights} is missing" if spec.default_weights else "", label)
    else:
        load_weights(backbone, weights, resample)
    return backbone


# -- parameter accounting ---------------------------------------------------------------------------------
def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def describe_parameters(
    backbone_name: str,
    img_size: int,
    head_name: str | None = None,
    num_classes: int = 19,
    patch_size: int | None = None,
    **head_kwargs: Any,
) -> dict[str, Any]:
    """Parameter counts of backbone (and head) built on the meta device: instant, no memory.

    Used by ``run --preset paper --dry-run`` to show DINOv2-L/16@512 + Mask2Former without weights.
    """
    spec = get_spec(backbone_name)
    with torch.device("meta"):
        backbone = build_backbone(backbone_name, img_size, weights="random", patch_size=patch_size)
        info: dict[str, Any] = {
            "backbone": backbone_name,
            "img_size": img_size,
            "patch_size": backbone.patch_size,
            "grid": img_size // backbone.patch_size,
            "backbone_params": count_parameters(backbone),
            "published_backbone_params": spec.published_params,
            "tap_indices": backbone.tap_indices,
        }
        if head_name is not None:
            from benchmarks.heads import build_head

            head = build_head(head_name, backbone.embed_dim, num_classes, **head_kwargs)
            info["head"] = head_name
            info["head_params"] = count_parameters(head)
            info["total_params"] = info["backbone_params"] + info["head_params"]
    return info
