"""Shared fixtures for the method tests, and what every method of the peft/token family must do.

A tiny ViT (width 32, depth 4, patch 8, cls + 1 register) is built through the same
`build_backbone` path as the real backbones, so hooks and prefix handling are exercised as in runs.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from benchmarks.backbones import BackboneSpec, build_backbone
from benchmarks.config import EvalConfig
from benchmarks.errors import UserError
from benchmarks.heads import build_head
from benchmarks.method import available_methods, build_method, no_decay_names
from benchmarks.model import SegModel

TINY_VIT = BackboneSpec(
    timm_name="vit_tiny_patch16_224", family="vit", native_patch=8, native_img_size=32, embed_dim=32, depth=4,
    timm_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "init_values": 0.5, "reg_tokens": 1, "class_token": True},
)
TINY_EVA = BackboneSpec(
    timm_name="eva02_tiny_patch14_224", family="eva", native_patch=8, native_img_size=32, embed_dim=32, depth=4,
    timm_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2, "qkv_fused": False},  # as eva02_large
)
IMG = 32
PEFT_METHODS = ("lora", "dora", "loha", "lokr", "vera", "ia3", "oft")
TOKEN_METHODS = ("vpt", "adaptformer", "rein", "set", "set_released", "fada", "fada_released")
MY_METHODS = PEFT_METHODS + TOKEN_METHODS
SMALL_M2F = {"hidden_dim": 32, "num_heads": 2, "encoder_layers": 1, "encoder_ffn_dim": 32, "decoder_layers": 2,
             "decoder_ffn_dim": 32, "num_points": 64, "num_queries": 5}


def tiny_model(method: str | None = None, head: str = "light", spec: BackboneSpec = TINY_VIT, seed: int = 0,
               **overrides) -> SegModel:
    torch.manual_seed(seed)
    backbone = build_backbone(spec, IMG, weights="random")
    head_module = build_head(head, backbone.embed_dim, 19, **(SMALL_M2F if head == "mask2former" else {"channels": 16}))
    model = SegModel(backbone, head_module)
    if method is not None:
        build_method(method, overrides).attach(model)
    return model


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def backbone_tokens(model: SegModel, x: torch.Tensor) -> list[torch.Tensor]:
    return model.backbone.tokens(x)


def pretrained_parameters(model: SegModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.backbone.named_parameters() if id(p) in model._pretrained_ids}


def added_parameters(model: SegModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.backbone.named_parameters() if id(p) not in model._pretrained_ids}


@pytest.mark.parametrize("name", MY_METHODS)
def test_method_declares_paper_and_dataclass_defaults(name):
    method = build_method(name)
    assert type(method).name == name and len(type(method).paper) > 10
    assert dataclasses.is_dataclass(method.config)
    assert method.hyperparameters() == dataclasses.asdict(type(method).Config())


@pytest.mark.parametrize("name", MY_METHODS)
def test_only_added_parameters_get_gradients_and_move(name):
    method = build_method(name)
    model = tiny_model()
    method.attach(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    optimizer = torch.optim.AdamW(method.param_groups(model, 0.05), lr=1e-2)
    loss = model.loss(images(), torch.randint(0, 19, (2, IMG, IMG)))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    pretrained, added = pretrained_parameters(model), added_parameters(model)
    assert added, "the method added nothing under the backbone"
    assert all(p.grad is None and not p.requires_grad for p in pretrained.values())
    assert all(p.requires_grad and p.grad is not None for p in added.values()), [n for n, p in added.items() if p.grad is None]
    assert any(p.grad.abs().sum() > 0 for p in added.values())
    counts = model.parameter_counts()
    assert counts["backbone_trainable"] == counts["backbone_added"] == sum(p.numel() for p in added.values())
    optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in pretrained.items())
    assert any(not torch.equal(p, before[n]) for n, p in added.items())


@pytest.mark.parametrize("name", ("vpt", "rein", "set", "set_released"))
def test_tokens_and_scale_get_no_weight_decay(name):
    model = tiny_model(name)
    names = no_decay_names(model)
    added = added_parameters(model)
    tokens = {n for n, p in added.items() if p.ndim >= 2 and n.endswith((".A", ".B", ".tokens", ".prompts"))}
    assert tokens and all(f"backbone.{n}" in names for n in tokens)
    groups = build_method(name).param_groups(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    linear_weights = [p for n, p in added.items() if n.endswith("weight") and p.ndim == 2]
    if name != "vpt":
        assert linear_weights and all(id(p) in decayed for p in linear_weights)  # Rein's Linear layers: 0.05
        assert "backbone.rein.scale" in names or "backbone.set_tokens.scale" in names
    assert not any(id(added[n]) in decayed for n in tokens)


@pytest.mark.parametrize("name", ("vpt", "adaptformer", "rein", "set", "lora"))
def test_deepcopy_keeps_hooks_bound_to_the_copy(name):
    model = tiny_model(name).eval()
    clone = copy.deepcopy(model)
    x = images()
    with torch.no_grad():
        for p in added_parameters(clone).values():
            p.add_(0.3)
        original, copied = model.backbone(x)[-1], clone.backbone(x)[-1]
        assert not torch.allclose(original, copied)  # the copy's hooks use the copy's parameters
        for p in added_parameters(clone).values():
            p.sub_(0.3)
        assert torch.allclose(model.backbone(x)[-1], clone.backbone(x)[-1], atol=1e-5)


@pytest.mark.parametrize("name", MY_METHODS)
def test_attach_works_on_meta_tensors(name):
    with torch.device("meta"):
        model = tiny_model(name, head="mask2former")
    counts = model.parameter_counts()
    assert counts["backbone_trainable"] > 0
    assert all(p.device.type == "meta" for p in model.backbone.parameters())


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_a_method_couples_the_images_of_a_batch_exactly_when_it_declares_so(name):
    """`couples_batch` decides how a method is evaluated (one window per forward when set), so it must
    say the truth: every parameter is nudged so zero-initialised modules act too, then the first
    image's features are compared beside two different batch partners."""
    model = tiny_model(name).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        a, b, c = images(1, seed=1), images(1, seed=2), images(1, seed=3)
        beside_b = model.backbone(torch.cat([a, b]))[-1][0]
        beside_c = model.backbone(torch.cat([a, c]))[-1][0]
    coupled = (beside_b - beside_c).abs().max().item() > 1e-4
    assert coupled == build_method(name).couples_batch
    evaluation = build_method(name).evaluation_settings(EvalConfig(batch_windows=8))
    assert evaluation.batch_windows == (1 if coupled else 8)


def _numeric_hyperparameters() -> list[tuple[str, str]]:
    found = []
    for name in sorted(available_methods()):
        config = build_method(name).config
        if dataclasses.is_dataclass(config):
            found += [(name, f.name) for f in dataclasses.fields(config)
                      if isinstance(getattr(config, f.name), (int, float)) and not isinstance(getattr(config, f.name), bool)]
    return found


@pytest.mark.parametrize(("name", "key"), _numeric_hyperparameters())
def test_every_numeric_hyperparameter_refuses_a_negative_or_nan_value(name, key):
    # Unchecked, `methods.rein.num_tokens=-3` was a traceback from torch after the data had been read,
    # `methods.rein.rank=0` a run that trained an empty module.
    for bad in (-3, float("nan")):
        with pytest.raises(UserError, match=key):
            build_method(name, {key: bad})
