"""LoRA and the peft variants: targets, identity at init, frozen base, hookable blocks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.errors import UserError
from methods.lora import FUSED_QKV, attention_target_pattern
from tests.test_methods_common import PEFT_METHODS, TINY_EVA, images, pretrained_parameters, tiny_model


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_variant_at_init_is_the_base_model_and_keeps_blocks_hookable(name):
    base, adapted = tiny_model().eval(), tiny_model(name).eval()
    seen = []
    adapted.backbone.blocks[1].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        for a, b in zip(base.backbone(images()), adapted.backbone(images()), strict=False):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert seen == [torch.Size([2, 2 + 16, 32])]
    # the adapters wrap the qkv projections and nothing else; pretrained tensors are the same objects
    wrapped = {n.rsplit(".base_layer", 1)[0] for n, _ in adapted.backbone.vit.named_modules() if n.endswith("base_layer")}
    assert wrapped == {f"blocks.{i}.attn.qkv" for i in range(4)}
    assert adapted.parameter_counts()["backbone_pretrained"] == base.parameter_counts()["backbone_pretrained"]
    assert not any(p.requires_grad for p in pretrained_parameters(adapted).values())


def test_lora_update_is_rank_8_on_qkv():
    model = tiny_model("lora")
    qkv = model.backbone.blocks[0].attn.qkv
    assert qkv.lora_A["default"].weight.shape == (8, 32) and qkv.lora_B["default"].weight.shape == (96, 8)
    with torch.no_grad():
        torch.nn.init.normal_(qkv.lora_B["default"].weight)
        x = torch.randn(3, 32)
        delta = qkv.lora_B["default"].weight @ qkv.lora_A["default"].weight  # alpha / r = 1
        torch.testing.assert_close(qkv(x), qkv.base_layer(x) + x @ delta.T, rtol=1e-5, atol=1e-5)


def test_pattern_never_matches_patch_embed_and_handles_eva_separate_qkv():
    vit = tiny_model().backbone.vit
    assert attention_target_pattern(vit) == FUSED_QKV
    model = tiny_model("lora", spec=TINY_EVA)
    wrapped = sorted(n.rsplit(".base_layer", 1)[0] for n, _ in model.backbone.vit.named_modules() if n.endswith("base_layer"))
    assert wrapped == sorted(f"blocks.{i}.attn.{p}_proj" for i in range(4) for p in "qkv")
    assert "base_layer" not in "".join(n for n, _ in model.backbone.vit.patch_embed.named_modules())
    assert model.parameter_counts()["backbone_trainable"] == 4 * 3 * 8 * (32 + 32)
    with torch.no_grad():
        assert all(torch.isfinite(t).all() for t in model.backbone(images()))


def test_backbone_without_attention_projections_is_a_user_error():
    with pytest.raises(UserError, match="attn.qkv"):
        attention_target_pattern(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fused_qkv_with_separate_bias_is_refused():
    # EVA's fused qkv with q/v bias calls F.linear on the weight: an adapter there would be silently skipped
    fused_eva = dataclasses.replace(TINY_EVA, timm_kwargs={**TINY_EVA.timm_kwargs, "qkv_fused": True})
    with pytest.raises(UserError, match="fused qkv"):
        tiny_model("lora", spec=fused_eva)


def test_an_oft_block_size_that_does_not_divide_the_width_is_refused_naming_one_that_does():
    """peft would quietly train another block size than the one the result records (7 → 6 on width 32)."""
    with pytest.raises(UserError, match=r"block_size=7 does not divide the backbone's width 32.*block_size=8"):
        tiny_model("oft", block_size=7)
    assert sum(p.numel() for p in tiny_model("oft", block_size=8).parameters() if p.requires_grad) > 0


def test_oft_rotates_with_the_papers_exact_cayley_transform():
    # peft 0.21's default approximates (I - Q)⁻¹ by a Neumann series: RᵀR was 0.07 from I at entries of Q of
    # std 0.05 (a reviewer's measurement, 2026-12-06); OFT's paper rotates exactly.
    def rotation(**options):
        module = next(m for m in tiny_model("oft", block_size=8, **options).modules()
                      if type(m).__name__ == "OFTRotationModule")
        torch.manual_seed(0)
        with torch.no_grad():
            module.weight.normal_(0.0, 0.05)
        return module.get_weight().detach()

    exact = rotation()
    torch.testing.assert_close(exact.T @ exact, torch.eye(exact.shape[-1]), atol=1e-5, rtol=0)
    approximate = rotation(exact_cayley=False)  # OFTv2, asked for by name, and recorded so in the result
    assert (approximate.T @ approximate - torch.eye(exact.shape[-1])).abs().max() > 1e-3
    from benchmarks.method import build_method

    assert build_method("oft").hyperparameters() == {"block_size": 32, "exact_cayley": True}
