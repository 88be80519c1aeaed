"""The segmentation model every method plugs into: backbone → 4-level pyramid → decode head.

The contract between the parts:
- a backbone (`benchmarks.backbones.Backbone`) maps images [B,3,H,W] to four feature maps at
  strides (p/4, p/2, p, 2p) for patch size p, and exposes `blocks`, `num_prefix_tokens`,
  `embed_dim`, `depth` and `patch_size` for methods that refine or prompt its blocks;
- a head maps the pyramid to outputs, computes the training loss from them, and turns them into
  per-class scores at a requested size (`loss`, `semantic_logits`); a head with queries accepts a
  query provider from a method (Rein links its tokens to Mask2Former's queries).

When no backbone parameter requires gradients the backbone runs in eval mode and without autograd,
whatever method set that up: the protocol never asks which method it runs.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from benchmarks.errors import UserError

if TYPE_CHECKING:
    from benchmarks.config import Experiment
    from benchmarks.method import Method

NUM_CLASSES = 19


class SegModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Parameters the backbone was built with; anything a method adds under it is "added".
        self._pretrained_ids = {id(p) for p in backbone.parameters()}

    # -- state --------------------------------------------------------------------------------
    def backbone_trainable(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> SegModel:
        super().train(mode)
        if mode and not self.backbone_trainable():
            self.backbone.eval()
        return self

    def replace_pretrained(self, old: list[nn.Parameter], new: list[nn.Parameter]) -> None:
        """`new` holds the pretrained values of `old` in another layout (SoMA splits a fused qkv into q, k
        and v): counted as pretrained, not added, and left out of checkpoints like the tensors they replace
        (a run rebuilds them). Call it while `old` is still referenced, before its ids can be reused."""
        self._pretrained_ids.difference_update(id(p) for p in old)
        self._pretrained_ids.update(id(p) for p in new)

    def parameter_counts(self) -> dict[str, int]:
        """Counts as the papers report them: trainable and added are backbone-side (head excluded)."""
        backbone = list(self.backbone.parameters())
        return {
            "backbone_trainable": sum(p.numel() for p in backbone if p.requires_grad),
            "backbone_added": sum(p.numel() for p in backbone if id(p) not in self._pretrained_ids),
            "backbone_pretrained": sum(p.numel() for p in backbone if id(p) in self._pretrained_ids),
            "head_total": sum(p.numel() for p in self.head.parameters()),
            "head_trainable": sum(p.numel() for p in self.head.parameters() if p.requires_grad),
        }

    # -- compute ------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.training and self.backbone_trainable():
            return self.backbone(images)
        with torch.no_grad():
            return self.backbone(images)

    def forward(self, images: torch.Tensor) -> Any:
        return self.head(self.features(images))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss; `["loss"]` is what is minimised, other keys are logged parts."""
        return self.head.loss(self(images), labels)

    def step_of(self, labels_of_micro_batches: list[torch.Tensor]) -> contextlib.AbstractContextManager:
        """Where the micro-batches of one optimizer step compute their losses: a head whose loss is
        normalised over its batch (Mask2Former's mask count) normalises over the whole step's."""
        step = getattr(self.head, "step", None)
        return step(labels_of_micro_batches) if step is not None else contextlib.nullcontext()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Per-class scores [B, K, H, W] at the input size."""
        return self.head.semantic_logits(self(images), images.shape[-2:])


# -- from the config --------------------------------------------------------------------------------
def weights_for(exp: Experiment, backbone: str) -> str | None:
    for entry in exp.model.weights:
        name, sep, path = entry.partition("=")
        if not sep or not path:
            raise UserError(f"model.weights entry {entry!r} must look like BACKBONE=PATH")
        if name == backbone:
            return path
    return None


def effective_weights(exp: Experiment, backbone: str) -> str | None:
    """The weight file a run of `backbone` loads: the one given, else the shipped default if present."""
    from benchmarks.backbones import get_spec

    given = weights_for(exp, backbone)
    if given is not None:
        return None if given == "random" else given
    default = get_spec(backbone).default_weights
    return str(default) if default is not None and Path(default).is_file() else None


def build_model(exp: Experiment, method: Method | None = None, device: str | torch.device | None = None) -> SegModel:
    """Backbone and head from the config, then the method attached (seeded: same head init for all)."""
    from benchmarks.backbones import build_backbone
    from benchmarks.heads import build_head

    try:
        head_options = json.loads(exp.model.head_options)
    except json.JSONDecodeError as err:
        raise UserError(f"model.head_options must be a JSON object, e.g. '{{\"hidden_dim\": 64}}': {err}") from None
    with torch.device(device) if device is not None else contextlib.nullcontext():
        backbone = build_backbone(
            exp.model.backbone,
            img_size=exp.model.img_size,
            weights=weights_for(exp, exp.model.backbone),
            patch_size=exp.model.patch_size or None,
            resample=exp.model.patch_resample,
        )
        head = build_head(exp.model.head, backbone.embed_dim, NUM_CLASSES, **head_options)
        model = SegModel(backbone, head)
        if method is not None:
            method.attach(model)
    return model


def reported_parameter_counts(exp: Experiment, method_name: str) -> dict[str, int]:
    """The counts a run of `method_name` on `exp`'s model reports (the method's own report, see
    `Method.parameter_counts`), from a meta-device build: shapes only, no memory, no weights read."""
    from benchmarks.method import build_method

    method = build_method(method_name, exp.methods.get(method_name))
    return method.parameter_counts(build_model(exp, method, device="meta"))


def check_buildable(exp: Experiment, backbones: tuple[str, ...], method_names: list[str]) -> None:
    """Before any data is read or any step is taken: each backbone's weight file is readable and of its family,
    every (backbone, method) of the matrix builds (on the meta device: shapes only, about 0.2 s each) and the
    training and evaluation crops fit the backbone's patch. A
    setting the model cannot take is then one line at the start, not a traceback after the data loaded, nor a
    failure at evaluation after the whole schedule trained (`eval.crop_size`)."""
    import dataclasses

    from benchmarks.backbones import check_weights_file
    from benchmarks.method import build_method

    for backbone in backbones:
        matrix_exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, backbone=backbone))
        for name in method_names:
            method = build_method(name, exp.methods.get(name))
            try:
                model = build_model(matrix_exp, method, device="meta")
            except (ValueError, ZeroDivisionError) as err:  # a size the head or method cannot be built with
                raise UserError(f"{backbone} with {exp.model.head} head and {name} cannot be built ({type(err).__name__}: "
                                f"{err}); check model.head_options and methods.{name}") from None
        weights = effective_weights(matrix_exp, backbone)
        if weights is not None:
            check_weights_file(build_model(matrix_exp, None, device="meta").backbone, weights, exp.model.patch_resample)
        patch = model.backbone.patch_size
        for setting, size in (("data.crop_size", exp.data.crop_size), ("eval.crop_size", exp.eval.crop_size)):
            if size % patch:
                raise UserError(f"{setting}={size} is not a multiple of {backbone}'s patch size {patch}; pass "
                                f"--set {setting}={max(patch, size - size % patch)} (or another multiple of {patch})")
