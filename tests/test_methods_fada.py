"""FADA: the Haar split and its inverse, both branches, the effect at initialisation, where the paper's
and the released variant differ (permute vs reshape of the token-first tensor), the DINOv2-L counts,
and a smoke run of each variant through the runner with the backbone staying frozen."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from benchmarks import runner
from benchmarks.method import build_method, no_decay_names
from benchmarks.runner import RunSpec, execute_run
from methods.fada import FrequencyTokenAdapter, haar_merge, haar_split
from tests.test_methods_common import added_parameters, images, pretrained_parameters, tiny_model
from tests.test_methods_counts import meta_model

VARIANTS = ("fada", "fada_released")

# The Haar filters written out (rows × columns), independently of methods/fada.py.
FILTERS = 0.5 * torch.tensor([[[1.0, 1.0], [1.0, 1.0]],  # LL
                              [[-1.0, 1.0], [-1.0, 1.0]],  # LH: high across columns
                              [[-1.0, -1.0], [1.0, 1.0]],  # HL: high across rows
                              [[1.0, -1.0], [-1.0, 1.0]]])  # HH


def conv_bands(maps, filters=None):
    """[B, C, H, W] (even sides) → 4 × [B, C, H/2, W/2] by a depthwise stride-2 convolution."""
    channels = maps.shape[1]
    filters = FILTERS if filters is None else filters
    weight = filters.to(maps.dtype).reshape(4, 1, 2, 2).repeat(channels, 1, 1, 1)
    return F.conv2d(maps, weight, stride=2, groups=channels).unflatten(1, (channels, 4)).unbind(2)


def conv_inverse(bands):
    channels = bands[0].shape[1]
    weight = FILTERS.to(bands[0].dtype).reshape(4, 1, 2, 2).repeat(channels, 1, 1, 1)
    return F.conv_transpose2d(torch.stack(bands, dim=2).flatten(1, 2), weight, stride=2, groups=channels)


def refine(f, tokens, branch, logit_dim, standardize):
    """Rein's ΔF written out: logits (standardised over the tokens on the high branch) / sqrt(logit_dim)."""
    logits = f @ tokens.T
    if standardize:
        variance = logits.var(-1, unbiased=False, keepdim=True)
        logits = (logits - logits.mean(-1, keepdim=True)) / torch.sqrt(variance + 1e-5)
    weights = torch.softmax(logits / math.sqrt(logit_dim), dim=-1)[..., 1:]
    return branch.delta(weights @ branch.token2feat(tokens[1:]) + f)


def reference_paper_delta(adapter, f, grid, index=0):
    """Per image: permute to the grid, pad odd sides by repetition, Haar, refine each band, invert, crop."""
    batch, _, channels = f.shape
    height, width = grid
    maps = F.pad(f.permute(0, 2, 1).reshape(batch, channels, height, width), (0, width % 2, 0, height % 2),
                 mode="replicate")
    low_tokens, high_tokens = adapter.tokens.layer(index), adapter.high_tokens.layer(index)
    refined = []
    for k, band in enumerate(conv_bands(maps)):
        seq = band.flatten(2).transpose(1, 2)
        out = (refine(seq, low_tokens, adapter.refinement, channels, False) if k == 0 else
               refine(seq, high_tokens, adapter.high_refinement, channels, True))
        refined.append(out.transpose(1, 2).reshape(band.shape))
    return conv_inverse(refined)[..., :height, :width].flatten(2).transpose(1, 2)


def reference_released_delta(adapter, f, index=0):
    """The released forward on [B, N, C] batch-first tokens, as its code reads: token-first, flat reshape."""
    batch, count, channels = f.shape
    side, quarter = int(math.sqrt(count)), channels // 4
    token_first = f.permute(1, 0, 2).contiguous()  # [N, B, C]
    filters = adapter.wavelet.weight[0]  # every channel starts from the same four filters
    ll, lh, hl, hh = conv_bands(token_first.view(batch, channels, side, side), filters)
    low = ll.contiguous().view(count, batch, quarter)
    high = torch.cat([b.contiguous().view(batch, count, quarter) for b in (lh, hl, hh)], -1)
    high = high.view(count, batch, -1)
    low = refine(low, adapter.tokens.layer(index), adapter.refinement, channels, False)
    high = refine(high, adapter.high_tokens.layer(index), adapter.high_refinement, channels, True)
    delta = torch.cat([low, high], dim=-1)
    return delta.permute(1, 0, 2)


def identity_refinements(adapter):
    """token2feat = 0 and delta = identity: each branch returns its input."""
    for branch in (adapter.refinement, adapter.high_refinement):
        branch.token2feat.weight.zero_()
        branch.token2feat.bias.zero_()
        branch.delta.weight.copy_(torch.eye(branch.delta.weight.shape[0]))
        branch.delta.bias.zero_()


def standalone(layout, dim=16, depth=1):
    torch.manual_seed(0)
    return FrequencyTokenAdapter(depth, dim, 8, 0, num_tokens=5, rank=2, init_scale=1e-3, query_dim=None,
                                 layout=layout)


# -- the transform -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(4, 4), (6, 8), (5, 7), (3, 2), (1, 1), (9, 6)])
def test_haar_split_and_merge_reconstruct_exactly(size):
    x = torch.randn(2, 5, *size, generator=torch.Generator().manual_seed(3))
    bands = haar_split(x)
    assert all(b.shape == (2, 5, math.ceil(size[0] / 2), math.ceil(size[1] / 2)) for b in bands)
    assert (haar_merge(*bands, size=size) - x).abs().max() < 1e-6
    if size[0] % 2 == 0 and size[1] % 2 == 0:
        for ours, conv in zip(bands, conv_bands(x), strict=True):
            torch.testing.assert_close(ours, conv, rtol=0, atol=1e-6)
        # orthonormal: the bands carry the features' energy exactly
        torch.testing.assert_close(sum(b.square().sum() for b in bands), x.square().sum())


def test_odd_sides_repeat_the_last_row_so_its_high_bands_are_zero():
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64)
    _, lh, hl, hh = haar_split(x)
    # no edge across the repeated pair
    for border in (hl[..., -1, :], hh[..., -1, :], lh[..., -1], hh[..., -1]):
        assert border.abs().max() < 1e-12
    torch.testing.assert_close(haar_merge(*haar_split(x), size=(3, 5)), x, rtol=0, atol=1e-12)


def test_released_filters_start_as_haar_and_train():
    model = tiny_model("fada_released")
    wavelet = model.backbone.fada.wavelet
    assert wavelet.weight.shape == (32, 4, 2, 2) and wavelet.weight.requires_grad
    torch.testing.assert_close(wavelet.weight, FILTERS.expand(32, 4, 2, 2))
    x = torch.randn(2, 32, 4, 6)
    for ours, ref in zip(wavelet(x), haar_split(x), strict=True):
        torch.testing.assert_close(ours, ref)
    decayed = {id(p) for g in build_method("fada_released").param_groups(model, 0.05) if g["weight_decay"] > 0
               for p in g["params"]}
    assert id(wavelet.weight) in decayed  # no custom optimiser key in the release matches them
    assert not hasattr(tiny_model("fada").backbone.fada, "wavelet")  # the paper's Haar is fixed


# -- the refinement and its effect at initialisation ----------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_block_output_at_initialisation_is_the_frozen_output_plus_1e_3_delta(name):
    model = tiny_model(name).eval()
    adapter, backbone = model.backbone.fada, model.backbone
    assert adapter.scale.item() == pytest.approx(1e-3)
    with torch.no_grad():
        backbone(images())  # records the grid
        x, _, _ = backbone._embed(images())
        raw = backbone.blocks[0].forward(x)  # `.forward` bypasses the hooks: the frozen block alone
        refined = backbone.blocks[0](x)
        patches = raw[:, 2:]
        expected = (reference_paper_delta(adapter, patches, (4, 4)) if name == "fada"
                    else torch.cat([reference_released_delta(adapter, p) for p in patches.split(1)]))
    assert torch.equal(refined[:, :2], raw[:, :2])  # cls + register untouched
    torch.testing.assert_close(refined[:, 2:], patches + 1e-3 * expected, rtol=1e-5, atol=1e-6)
    # no zero init (as Rein): the features move at step 0, but only by the small scale
    moved = (refined[:, 2:] - patches).abs().max()
    assert 0 < moved < 1e-2 * patches.abs().max()


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (2, 6), (5, 5)])
def test_paper_delta_on_any_grid_matches_the_reference(grid):
    adapter = standalone("grid")
    f = torch.randn(2, grid[0] * grid[1], 16)
    adapter.grid = grid
    with torch.no_grad():
        torch.testing.assert_close(adapter.feature_delta(0, f), reference_paper_delta(adapter, f, grid))
        identity_refinements(adapter)  # unrefined bands recompose the features themselves
        torch.testing.assert_close(adapter.feature_delta(0, f), f, rtol=0, atol=1e-6)


def test_released_delta_matches_the_reference_in_training():
    adapter = standalone("token_first", dim=32).train()
    f = torch.randn(3, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapter.feature_delta(0, f), reference_released_delta(adapter, f))


def test_branch_widths_token_init_and_logit_scale():
    paper, released = tiny_model("fada").backbone.fada, tiny_model("fada_released").backbone.fada
    assert paper.tokens.B.shape == (4, 16, 32) and paper.high_tokens.B.shape == (4, 16, 32)
    assert released.tokens.B.shape == (4, 16, 8) and released.high_tokens.B.shape == (4, 16, 24)
    assert released.refinement.delta.weight.shape == (8, 8)
    assert released.high_refinement.delta.weight.shape == (24, 24)
    # logits divided by sqrt(C), not by the branch's width
    assert released.refinement.logit_dim == released.high_refinement.logit_dim == 32
    # VPT-style bounds: the release bounds its C/4-wide low tokens with the full width C
    for adapter, low_fan, high_fan in ((paper, 32, 32), (released, 32, 24)):
        for tensor, fan in ((adapter.tokens.A, low_fan), (adapter.high_tokens.A, high_fan)):
            bound = math.sqrt(6.0 / (3 * 8**2 + math.sqrt(fan * 16)))
            assert bound * 0.9 < tensor.abs().max() <= bound


# -- where the variants differ -----------------------------------------------------------------------
def test_permute_keeps_features_and_reshape_scrambles_them():
    f = torch.randn(2, 16, 32)  # two images, a 4×4 grid, C = 32: N ≠ C
    paper, released = standalone("grid", dim=32), standalone("token_first", dim=32).train()
    with torch.no_grad():
        for adapter in (paper, released):
            identity_refinements(adapter)
        paper.grid = (4, 4)
        torch.testing.assert_close(paper.feature_delta(0, f), f, rtol=0, atol=1e-6)
        scrambled = released.feature_delta(0, f)
    # the released "delta" of unrefined bands is the token-first reshape's bands laid back flat, not f
    token_first = f.permute(1, 0, 2).reshape(2, 32, 4, 4)
    ll, lh, hl, hh = conv_bands(token_first)
    high = torch.cat([b.reshape(2, 16, 8) for b in (lh, hl, hh)], -1).reshape(16, 2, 24)
    expected = torch.cat([ll.reshape(16, 2, 8), high], -1).permute(1, 0, 2)
    torch.testing.assert_close(scrambled, expected, rtol=0, atol=1e-6)
    assert (scrambled - f).abs().max() > 0.5


@pytest.mark.parametrize(("name", "mode", "coupled"), [("fada", "train", False), ("fada", "eval", False),
                                                       ("fada_released", "train", True),
                                                       ("fada_released", "eval", False)])
def test_only_released_training_mixes_the_images_of_a_batch(name, mode, coupled):
    model = tiny_model(name)
    model.backbone.train(mode == "train")
    with torch.no_grad():
        model.backbone.fada.scale.fill_(1.0)
        # 48×48: a 6×6 grid; 2·6 does not divide C = 32, so the released layout mixes rows (32×32 would not)
        a, b, c = (torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
        first_with_b = model.backbone(torch.cat([a, b]))[-1][0]
        first_with_c = model.backbone(torch.cat([a, c]))[-1][0]
        alone = model.backbone(a)[-1][0]
    if coupled:
        assert (first_with_b - first_with_c).abs().max() > 1e-3
    else:  # the released evaluation runs one image at a time, as its slide inference does
        torch.testing.assert_close(first_with_b, first_with_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first_with_b, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("count", "dim", "per_token"), [(16, 16, True), (16, 8, True), (64, 32, True),
                                                       (36, 24, True), (16, 4, False), (36, 32, False),
                                                       (64, 8, False)])
def test_released_works_per_token_exactly_when_twice_the_grid_side_divides_the_width(count, dim, per_token):
    """The token-first rows (C wide) laid flat into h×h maps, h = √N: when 2h divides C each row fills
    an even number of map rows, so no 2×2 block straddles two rows and every token keeps to itself —
    the Haar then runs over each token's own channels (a 32×32 image of them for DINOv2-L/16 at 512,
    N = 1024 = C). Otherwise blocks straddle neighbouring rows, which alternate between images."""
    adapter = standalone("token_first", dim=dim).train()
    f = torch.randn(3, count, dim)
    g = f.clone()
    g[1, 5] += 1.0
    with torch.no_grad():
        changed = (adapter.feature_delta(0, g) - adapter.feature_delta(0, f)).abs().amax(-1) > 1e-6
    assert changed[1, 5]
    if per_token:
        assert changed.sum() == 1
    else:
        assert changed[[0, 2]].any()  # another image moved


def test_released_filters_once_trained_make_a_token_depend_on_its_place_in_the_batch():
    """Per token only while its 4·C Haar filters are alike: which channel's filter a token's values meet
    follows its flat place in the [N, B, C] tensor, so once they differ (they train) an image's delta
    depends on its index in the batch and the batch size, and training (batch 4) and the one-image
    evaluation see other filters."""
    adapter = standalone("token_first", dim=16).train()  # N = 16: h = 4, 2h divides C
    f = torch.randn(3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(adapter.feature_delta(0, f)[:1], adapter.feature_delta(0, f[:1]), atol=1e-6)
        adapter.wavelet.weight.add_(0.05 * torch.randn_like(adapter.wavelet.weight))
        in_batch, alone = adapter.feature_delta(0, f)[:1], adapter.feature_delta(0, f[:1])
    assert (in_batch - alone).abs().max() > 1e-3
    # so a step split over processes or micro-batches computes something else: said as for set_released
    from benchmarks.method import build_method
    from benchmarks.runner import split_batch_warning

    released = build_method("fada_released", None)
    assert split_batch_warning(released, 4, 1, 1) is None
    assert "by the batch's size and the image's place in it" in split_batch_warning(released, 2, 1, 2)
    assert split_batch_warning(build_method("fada", None), 1, 4, 1) is None


# -- grids -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(24, 40), (40, 24), (24, 24)])
def test_paper_variant_takes_non_square_and_odd_grids_through_the_backbone(size):
    model = tiny_model("fada").eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        model.backbone.fada.scale.fill_(1.0)
        feats = model.backbone(x)
    assert model.backbone.fada.grid == (size[0] // 8, size[1] // 8)
    assert feats[2].shape == (2, 32, size[0] // 8, size[1] // 8) and torch.isfinite(feats[2]).all()
    clone = copy.deepcopy(model)  # the grid hook follows the copy
    with torch.no_grad():
        clone.backbone(torch.randn(1, 3, 16, 32))
    assert clone.backbone.fada.grid == (2, 4) and model.backbone.fada.grid == (size[0] // 8, size[1] // 8)


@pytest.mark.parametrize("size", [(24, 40), (24, 24)])  # 3×5 (15 tokens) and 3×3 (odd side)
def test_released_variant_refuses_grids_its_reshape_cannot_take(size):
    model = tiny_model("fada_released").eval()
    with pytest.raises(ValueError, match=r"square token grid with an even side.*N=(15|9) tokens"):
        model.backbone(torch.randn(1, 3, *size))


def test_released_variant_reads_a_non_square_grid_of_square_count_as_a_square():
    # 2×8 = 16 tokens: the release's int(sqrt(N)) takes them as 4×4 (the layout is scrambled anyway)
    adapter = standalone("token_first", dim=32).eval()
    f = torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapter.feature_delta(0, f), reference_released_delta(adapter, f))


# -- queries, decay, counts --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "low_width"), [("fada", 32), ("fada_released", 8)])
def test_queries_come_from_the_low_frequency_tokens(name, low_width):
    model = tiny_model(name, head="mask2former")
    adapter = model.backbone.fada
    assert adapter.transform.weight.shape[1] == low_width
    with torch.no_grad():
        per_layer = adapter.transform(adapter.tokens.A @ adapter.tokens.B)
        stats = torch.stack([per_layer.max(0).values, per_layer.mean(0), per_layer[-1]], dim=-1).flatten(-2)
        pos, _ = model.head._query_provider()
    torch.testing.assert_close(pos, adapter.merge(stats))


@pytest.mark.parametrize("name", VARIANTS)
def test_tokens_and_scale_get_no_weight_decay_and_linear_layers_do(name):
    model = tiny_model(name)
    names = no_decay_names(model)
    for tokens in ("tokens.A", "tokens.B", "high_tokens.A", "high_tokens.B", "scale"):
        assert f"backbone.fada.{tokens}" in names
    groups = build_method(name).param_groups(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    linears = [p for n, p in added_parameters(model).items() if n.endswith("weight") and p.ndim == 2]
    assert len(linears) == 4 and all(id(p) in decayed for p in linears)


C, L, M, R = 1024, 24, 100, 16
QUERIES = 256 * 256 + 256 + 3 * 256 * 256 + 256  # transform (from a 256-wide token) + merge, released
PAPER_L = (2 * (L * M * R + L * R * C)  # low and high low-rank tokens, C wide
           + 4 * (C * C + C)  # token2feat and delta of each branch
           + 1  # the shared scale
           + (C * 256 + 256) + (3 * 256 * 256 + 256))  # query transform and merge
RELEASED_L = (L * M * R + L * R * C // 4 + L * M * R + L * R * 3 * C // 4  # tokens, C/4 and 3C/4 wide
              + 2 * ((C // 4) ** 2 + C // 4) + 2 * ((3 * C // 4) ** 2 + 3 * C // 4)  # the two Linear pairs
              + 1 + 4 * C * 4  # scale; four depthwise 2×2 Haar filters per channel, trainable
              + QUERIES)


def test_dinov2_l_counts_against_the_reported_11_65m():
    assert PAPER_L == 5_520_897 and RELEASED_L == 2_061_825
    for name, expected in (("fada", PAPER_L), ("fada_released", RELEASED_L)):
        model = meta_model(name)
        counts = model.parameter_counts()
        assert counts["backbone_trainable"] == counts["backbone_added"] == expected
        assert all(p.device.type == "meta" for p in model.backbone.parameters())
        assert abs(expected - 11_650_000) > 6_000_000  # neither reading reaches the paper's 11.65M
    light = meta_model("fada_released", head="light").parameter_counts()["backbone_trainable"]
    assert light == RELEASED_L - QUERIES  # no query link without a query head


# -- end to end --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_smoke_run_through_the_runner_keeps_the_backbone_frozen(name, smoke_experiment, tmp_path,
                                                                 monkeypatch):
    built = {}

    def build_and_keep(*args, **kwargs):
        model = runner_build_model(*args, **kwargs)
        built["model"] = model
        built["before"] = {n: p.detach().clone() for n, p in pretrained_parameters(model).items()}
        built["added"] = {n: p.detach().clone() for n, p in added_parameters(model).items()}
        return model

    runner_build_model = runner.build_model
    monkeypatch.setattr(runner, "build_model", build_and_keep)
    spec = RunSpec("G->CBM", "proxy_vit", name, 42)
    result = execute_run(spec, smoke_experiment, tmp_path / "runs", progress=False)
    assert result["status"] == "finished", result.get("failure")
    assert set(result["targets"]) == {"cityscapes", "bdd100k", "mapillary"}
    assert all(0.0 <= t["miou"] <= 100.0 for t in result["targets"].values())
    model = built["model"]
    pretrained = pretrained_parameters(model)
    assert pretrained and all(not p.requires_grad for p in pretrained.values())
    assert all(torch.equal(p, built["before"][n]) for n, p in pretrained.items())
    assert any(not torch.equal(p, built["added"][n]) for n, p in added_parameters(model).items())
    added = sum(p.numel() for p in added_parameters(model).values())
    assert result["params"]["backbone_trainable"] == result["params"]["backbone_added"] == added
