"""VPT-deep and AdaptFormer: what the frozen blocks see and compute with the new parameters at init."""

from __future__ import annotations

import math

import torch

from tests.test_methods_common import TINY_EVA, images, tiny_model


def test_vpt_keeps_the_grid_and_its_prompts_change_the_features():
    frozen, prompted = tiny_model().eval(), tiny_model("vpt").eval()
    x = images()
    seen = []
    prompted.backbone.blocks[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    with torch.no_grad():
        base = frozen.backbone(x)
        out = prompted.backbone(x)
        assert [t.shape for t in out] == [t.shape for t in base]
        assert seen == [torch.Size([2, 2 + 150 + 16, 32])]  # prefix, then prompts, then the 4x4 grid
        assert (out[-1] - base[-1]).abs().max() > 1e-3  # prompts take part in attention
        prompted.backbone.vpt.prompts[3].add_(torch.randn(150, 32))  # only the last block's prompts change
        moved = prompted.backbone(x)
    assert torch.equal(moved[0], out[0])  # earlier taps unchanged
    assert (moved[-1] - out[-1]).abs().max() > 1e-3


def test_vpt_prompt_init_and_prefix_order():
    model = tiny_model("vpt")
    prompts = model.backbone.vpt.prompts
    bound = math.sqrt(6.0 / (3 * 8**2 + 32))
    assert prompts.shape == (4, 150, 32)
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.95 * bound
    x = torch.zeros(1, 2 + 16, 32)
    inserted = model.backbone.vpt.insert(1, None, (x,))[0]
    assert torch.equal(inserted[0, 2:152], prompts[1].detach())
    assert torch.equal(model.backbone.vpt.remove(1, None, None, inserted), x)


def test_vpt_on_rotary_eva_counts_prompts_as_prefix():
    frozen, prompted = tiny_model(spec=TINY_EVA).eval(), tiny_model("vpt", spec=TINY_EVA).eval()
    assert prompted.backbone.blocks[0].attn.num_prefix_tokens == frozen.backbone.blocks[0].attn.num_prefix_tokens + 150
    with torch.no_grad():
        base, out = frozen.backbone(images()), prompted.backbone(images())
    assert [t.shape for t in out] == [t.shape for t in base]


def test_adaptformer_at_init_is_the_frozen_model():
    frozen, adapted = tiny_model().eval(), tiny_model("adaptformer").eval()
    with torch.no_grad():
        for a, b in zip(frozen.backbone(images()), adapted.backbone(images()), strict=False):
            assert torch.equal(a, b)
    adapter = adapted.backbone.adaptformer[0]
    assert adapter.down.out_features == 32  # bottleneck 64 capped at C = 32
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.down.weight) > 0


def test_adaptformer_adds_the_scaled_bottleneck_beside_the_mlp_branch_outside_its_layer_scale():
    """The paper's eq. 2 (x = x' + MLP(LN(x')) + s·x̃) and the official block (`residual + mlp + adapt_x`): the
    adapter is parallel to the whole MLP branch, so a LayerScale (DINOv2's γ) scales the MLP, not the adapter."""
    model = tiny_model("adaptformer").eval()
    block, adapter = model.backbone.blocks[1], model.backbone.adaptformer[1]
    with torch.no_grad():
        torch.nn.init.normal_(adapter.up.weight)
        torch.nn.init.normal_(adapter.up.bias)
        block.ls2.gamma.copy_(torch.linspace(0.05, 0.3, 32))
        tokens = torch.randn(2, 18, 32)
        after_attention = tokens + block.ls1(block.attn(block.norm1(tokens)))
        normed = block.norm2(after_attention)
        bottleneck = torch.relu(normed @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
        expected = after_attention + block.ls2.gamma * block.mlp.forward(normed) + 0.1 * bottleneck
        torch.testing.assert_close(block(tokens), expected)
