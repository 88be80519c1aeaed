"""Rein: the four equations after every block, untouched prefix tokens, and the token → query link."""

from __future__ import annotations

import math

import torch

from tests.test_methods_common import IMG, SMALL_M2F, images, pretrained_parameters, tiny_model


def reference_refinement(f, A, B, W1, b1, W2, b2, scale):
    """Rein's equations written out independently of methods/rein.py."""
    C = f.shape[-1]
    T = A @ B
    S = torch.softmax(f @ T.T / math.sqrt(C), dim=-1)  # 1. over all m tokens
    dF_bar = S[..., 1:] @ (T[1:] @ W1.T + b1)  # 2. token 0 dropped after the softmax
    dF = (dF_bar + f) @ W2.T + b2  # 3. residual inside delta
    return f + scale * dF  # 4.


def test_block_output_follows_the_four_equations():
    model = tiny_model("rein").eval()
    adapter, backbone = model.backbone.rein, model.backbone
    with torch.no_grad():
        adapter.scale.fill_(0.7)  # large enough that a wrong equation shows
        x, _, _ = backbone._embed(images())
        raw = backbone.blocks[0].forward(x)  # `.forward` bypasses the hooks: the frozen block alone
        refined = backbone.blocks[0](x)
    P = backbone.num_prefix_tokens
    assert P == 2  # cls + one register in the tiny ViT
    ref = reference_refinement(raw[:, P:], adapter.tokens.A[0], adapter.tokens.B[0], adapter.refinement.token2feat.weight,
                               adapter.refinement.token2feat.bias, adapter.refinement.delta.weight,
                               adapter.refinement.delta.bias, 0.7)
    assert torch.equal(refined[:, :P], raw[:, :P])
    torch.testing.assert_close(refined[:, P:], ref, rtol=1e-5, atol=1e-5)
    assert (refined[:, P:] - raw[:, P:]).abs().max() > 1e-2


def test_every_block_is_refined_and_the_taps_see_it():
    model = tiny_model("rein").eval()
    x = images()
    with torch.no_grad():
        refined = model.backbone.tokens(x)
        model.backbone.rein.scale.zero_()
        frozen = model.backbone.tokens(x)
    assert all((a - b).abs().max() > 0 for a, b in zip(refined, frozen, strict=False))


def test_defaults_and_token_init():
    model = tiny_model("rein")
    adapter = model.backbone.rein
    assert adapter.tokens.A.shape == (4, 100, 16) and adapter.tokens.B.shape == (4, 16, 32)
    assert adapter.scale.item() == torch.tensor(1e-3).item() and adapter.scale.ndim == 0
    bound = math.sqrt(6.0 / (3 * 8**2 + math.sqrt(32 * 16)))
    for tensor in (adapter.tokens.A, adapter.tokens.B):
        assert tensor.abs().max() <= bound and tensor.abs().max() > 0.9 * bound
    assert adapter.transform is None and not hasattr(model.head, "query_content_from_tokens")  # light head: link off


def test_queries_interleave_max_mean_last_and_reach_mask2former():
    model = tiny_model("rein", head="mask2former")
    adapter, head = model.backbone.rein, model.head
    with torch.no_grad():
        per_layer = adapter.transform(adapter.tokens.A @ adapter.tokens.B)  # [L, m, D]
        L, m, D = per_layer.shape
        stats = torch.empty(m, 3 * D)
        for c in range(D):
            stats[:, 3 * c] = per_layer[:, :, c].max(dim=0).values
            stats[:, 3 * c + 1] = per_layer[:, :, c].mean(dim=0)
            stats[:, 3 * c + 2] = per_layer[-1, :, c]
        expected = adapter.merge(stats)
        pos, content = head._query_provider()
    torch.testing.assert_close(pos, expected)
    torch.testing.assert_close(content, head.query_content_from_tokens(expected))
    assert D == SMALL_M2F["hidden_dim"] and m == 100

    model.train()
    outputs = model(images())
    assert outputs["pred_logits"].shape[1] == 100  # number of queries = m
    model.loss(images(), torch.randint(0, 19, (2, IMG, IMG)))["loss"].backward()
    for module in (adapter.transform, adapter.merge, head.query_content_from_tokens):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert adapter.tokens.A.grad.abs().sum() > 0 and adapter.scale.grad is not None
    assert head.transformer.queries_embedder.weight.grad is None  # the head's own queries are replaced
    assert all(p.grad is None for p in pretrained_parameters(model).values())


def test_link_can_be_switched_off():
    model = tiny_model("rein", head="mask2former", link_queries=False)
    assert model.backbone.rein.transform is None and model.head._query_provider is None
