"""Heads: the light FPN, smp's UPerNet and the transformers-built Mask2Former (targets, loss, inference, queries)."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.errors import UserError
from benchmarks.heads import HEADS, build_head
from benchmarks.heads.mask2former import Mask2FormerHead, SemanticMask2FormerLoss, linear_sum_assignment

REPO = Path(__file__).resolve().parents[1]
TINY_M2F = dict(hidden_dim=32, num_queries=8, num_heads=4, encoder_layers=1, encoder_ffn_dim=64,
                decoder_layers=2, decoder_ffn_dim=64, num_points=256)


def pyramid(batch: int = 2, channels: int = 16, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size // 2**i, size // 2**i, generator=g) for i in range(4)]


def test_transformers_mask2former_imports_with_the_repo_on_the_path() -> None:
    # The repo's top-level `datasets/` shadows Hugging Face datasets; importing the Mask2Former parts,
    # timm and peft must still work from the repository root.
    code = ("import datasets, peft, timm; "
            "from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder, Mask2FormerLoss; "
            "import benchmarks.heads; print(datasets.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(REPO / "datasets") in out.stdout


# -- Hungarian solver ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3), (1, 5), (5, 1)])
def test_assignment_is_optimal_against_brute_force(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.normal(size=shape)
        rows, cols = linear_sum_assignment(torch.from_numpy(cost).float())
        n, m = shape
        k = min(n, m)
        best = min(
            sum(cost[r, c] for r, c in zip(rs, cs, strict=True))
            for rs in itertools.combinations(range(n), k)
            for cs in itertools.permutations(range(m), k)
        )
        assert len(rows) == k and list(rows) == sorted(rows) and len(set(cols)) == k
        assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-5)


def test_assignment_survives_huge_costs() -> None:
    big = float(torch.finfo(torch.float32).max)
    cost = np.array([[big, 1.0], [2.0, big], [big, big]])
    rows, cols = linear_sum_assignment(cost)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (1, 0)]


def test_loss_sets_exactly_the_attributes_of_transformers_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.mask2former import modeling_mask2former as m2f

    monkeypatch.setattr(m2f, "requires_backends", lambda *a, **k: None)  # build the original without scipy
    head = Mask2FormerHead(16, 5, **TINY_M2F)
    original = m2f.Mask2FormerLoss(head.config, head.weight_dict)
    ours = head.criterion
    assert isinstance(ours, SemanticMask2FormerLoss)
    public = lambda obj: {k for k in vars(obj) if not k.startswith("_")}  # noqa: E731
    assert public(ours) == public(original)
    assert set(dict(ours.named_buffers())) == set(dict(original.named_buffers()))
    torch.testing.assert_close(ours.empty_weight, original.empty_weight)
    values = lambda obj: {k: getattr(obj, k) for k in public(obj) if not isinstance(getattr(obj, k), torch.nn.Module)}  # noqa: E731
    assert values(ours) == values(original) and values(ours.matcher) == values(original.matcher)


# -- Mask2Former ------------------------------------------------------------------------------------------
def test_protocol_settings_by_default() -> None:
    with torch.device("meta"):
        head = build_head("mask2former", 1024, 19)
    cfg = head.config
    assert len(head.pixel_decoder.encoder.layers) == 6 and len(head.transformer.decoder.layers) == 9
    attn = head.pixel_decoder.encoder.layers[0].self_attn
    assert (attn.d_model, attn.n_heads, attn.n_levels, attn.n_points) == (256, 8, 3, 4)
    assert head.pixel_decoder.encoder.layers[0].fc1.out_features == 1024
    assert head.transformer.decoder.layers[0].fc1.out_features == 2048
    assert head.transformer.queries_embedder.num_embeddings == 100
    assert (cfg.dropout, cfg.class_weight, cfg.mask_weight, cfg.dice_weight, cfg.no_object_weight) == (0.0, 2.0, 5.0, 5.0, 0.1)
    assert (head.criterion.num_points, head.criterion.oversample_ratio, head.criterion.importance_sample_ratio) == (12544, 3.0, 0.75)
    m = head.criterion.matcher
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.num_points) == (2.0, 5.0, 5.0, 12544)
    assert isinstance(head.pixel_decoder.input_projections[0][1], torch.nn.GroupNorm)
    assert head.pixel_decoder.input_projections[0][1].num_groups == 32
    assert sum(p.numel() for p in head.parameters()) == 20_565_204  # DINOv2-L width (1024) in, 19 classes


def test_outputs_and_deep_supervision() -> None:
    head = Mask2FormerHead(16, 5, **TINY_M2F)
    out = head(pyramid())
    assert out["pred_logits"].shape == (2, 8, 6)  # K + no-object
    assert out["pred_masks"].shape == (2, 8, 16, 16)  # stride p/4, the finest level
    assert len(out["aux_outputs"]) == 2  # initial prediction + every decoder layer but the last
    labels = torch.randint(0, 5, (2, 64, 64))
    parts = head.loss(out, labels)
    assert set(parts) == {"loss", "loss_cls", "loss_mask", "loss_dice"}
    torch.testing.assert_close(parts["loss"].detach(), parts["loss_cls"] + parts["loss_mask"] + parts["loss_dice"])
    head.deep_supervision = False
    assert head.loss(out, labels)["loss"] < parts["loss"]  # 1 supervised prediction instead of 3


def test_semantic_targets_one_mask_per_present_class_without_ignore() -> None:
    head = Mask2FormerHead(16, 5, **TINY_M2F)
    labels = torch.tensor([[[0, 0, 3], [255, 3, 3]], [[255, 255, 255], [255, 255, 255]]])
    classes, masks = head.semantic_targets(labels)
    assert classes[0].tolist() == [0, 3] and classes[1].numel() == 0
    assert masks[0].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [0, 1, 1]]]
    assert masks[1].shape == (0, 2, 3)


def fit(head: Mask2FormerHead, feats: list[torch.Tensor], labels: torch.Tensor, steps: int) -> list[float]:
    """AdamW steps of the head alone on fixed features; the loss of each step."""
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = head.loss(head(feats), labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_decreases_over_a_short_fit() -> None:
    torch.manual_seed(0)
    head = Mask2FormerHead(16, 4, **TINY_M2F)
    feats = pyramid(batch=3, size=16, seed=1)
    # labels are a function of the features (sign of two channels) so there is something to learn
    base = torch.nn.functional.interpolate(feats[0][:, :2], size=(32, 32), mode="nearest")
    labels = (base[:, 0] > 0).long() * 2 + (base[:, 1] > 0).long()
    labels[:, :2] = 255
    losses = fit(head, feats, labels, steps=30)
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses  # observed ≈0.75


def test_loss_decreases_fitting_rendered_scenes_on_the_shipped_proxy_backbone() -> None:
    """The protocol's path: pyramid features of the frozen pretrained proxy ViT on street scenes of
    the synthetic world (real class masks for the Hungarian matcher), a small Mask2Former on top."""
    from benchmarks.backbones import build_backbone
    from benchmarks.synthetic_inputs import SyntheticSource

    torch.manual_seed(0)
    backbone = build_backbone("proxy_vit", img_size=64).eval()
    source = SyntheticSource(64, count=4, seed=3)
    images = torch.stack([source[i]["image"] for i in range(4)])
    labels = torch.stack([source[i]["label"] for i in range(4)])
    assert len(labels.unique()) > 5  # several classes per batch: the matcher has work to do
    with torch.no_grad():
        feats = backbone(images)
    head = Mask2FormerHead(backbone.embed_dim, 19, **TINY_M2F)
    losses = fit(head, feats, labels, steps=25)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses  # observed ≈0.70


def test_semantic_inference_matches_a_hand_computation() -> None:
    head = Mask2FormerHead(16, 2, **TINY_M2F)
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]]])  # B=1, Q=2, K=2 + no-object
    masks = torch.tensor([[[[0.0, 2.0]], [[-1.0, 1.0]]]])  # [1, 2, 1, 2]
    got = head.semantic_logits({"pred_logits": logits, "pred_masks": masks}, (1, 2))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    expected = np.zeros((2, 2))
    for q in range(2):
        p = np.exp(logits[0, q].numpy()) / np.exp(logits[0, q].numpy()).sum()
        for k in range(2):
            for x in range(2):
                expected[k, x] += p[k] * sig(masks[0, q, 0, x].item())
    np.testing.assert_allclose(got[0, :, 0].numpy(), expected, rtol=1e-6)
    up = head.semantic_logits({"pred_logits": logits, "pred_masks": masks}, (4, 8))
    assert up.shape == (1, 2, 4, 8)


def test_query_provider_replaces_the_learned_queries() -> None:
    torch.manual_seed(0)
    head = Mask2FormerHead(16, 3, **TINY_M2F).eval()
    feats = pyramid()
    before = head(feats)["pred_logits"]
    pos, content = torch.randn(5, 32), torch.randn(5, 32, requires_grad=True)
    head.set_query_provider(lambda: (pos, content))
    out = head(feats)
    assert out["pred_logits"].shape == (2, 5, 4) and out["pred_masks"].shape[1] == 5  # Q follows the provider
    assert not head.transformer.queries_features.weight.requires_grad
    head.loss(out, torch.randint(0, 3, (2, 16, 16)))["loss"].backward()
    assert content.grad is not None and content.grad.abs().sum() > 0  # gradients reach the provider
    head.set_query_provider(lambda: (pos * 2, content))
    assert not torch.allclose(head(feats)["pred_logits"], out["pred_logits"])  # positions matter
    head.set_query_provider(None)
    torch.testing.assert_close(head(feats)["pred_logits"], before)
    assert head.transformer.queries_features.weight.requires_grad
    head.set_query_provider(lambda: (torch.randn(5, 31), torch.randn(5, 31)))
    with pytest.raises(ValueError, match=r"\[Q, 32\]"):
        head(feats)


def test_no_weight_decay_names_exist() -> None:
    head = Mask2FormerHead(16, 3, **TINY_M2F)
    names = dict(head.named_parameters())
    assert head.no_weight_decay() <= set(names)
    # Rein's keys `query_embed` and `level_embed` match mmdet's query position embedding and the decoder's
    # level embedding only: its query content (`query_feat`) and pixel-decoder `level_encoding` are decayed.
    assert head.no_weight_decay() == {"transformer.queries_embedder.weight", "transformer.level_embed.weight"}


def test_level_embedding_and_deformable_offsets_are_initialised() -> None:
    head = Mask2FormerHead(16, 3, **TINY_M2F)
    assert torch.isfinite(head.pixel_decoder.level_embed).all()
    attn = head.pixel_decoder.encoder.layers[0].self_attn
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.sampling_offsets.bias.abs().max() == 4.0


def test_transformer_layers_start_as_mmdet_initialises_them() -> None:
    # mmdet: xavier_normal_ on every matrix of the decoder and the pixel decoder's encoder, and attention
    # biases at 0 (torch's MultiheadAttention); transformers' self-attention biases start uniform.
    torch.manual_seed(0)
    head = Mask2FormerHead(16, 3, **TINY_M2F)
    layer = head.transformer.decoder.layers[0]
    attention = layer.self_attn
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
        assert projection.bias.abs().max() == 0
    assert layer.cross_attn.in_proj_bias.abs().max() == 0 and layer.cross_attn.out_proj.bias.abs().max() == 0
    for weight in (layer.fc1.weight, head.pixel_decoder.encoder.layers[0].fc1.weight):
        fan_out, fan_in = weight.shape
        uniform_bound = math.sqrt(6 / (fan_in + fan_out))  # xavier_uniform's; a normal of its std passes it
        assert weight.abs().max() > uniform_bound
        assert weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1)
    # mmdet's self-attention is torch's MultiheadAttention: q, k and v one [3D, D] matrix, whose xavier std
    # is √(2 / 4D), where transformers' three [D, D] layers drawn alone got √(2 / 2D), √2 larger
    wide = Mask2FormerHead(16, 3, **dict(TINY_M2F, hidden_dim=128, num_heads=8))
    attention = wide.transformer.decoder.layers[0].self_attn
    qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert qkv.std().item() == pytest.approx(math.sqrt(2 / (4 * 128)), rel=0.05)
    assert attention.out_proj.weight.std().item() == pytest.approx(math.sqrt(2 / (2 * 128)), rel=0.05)


# -- light head and the registry ---------------------------------------------------------------------------
def test_light_head_shapes_and_ignore() -> None:
    head = build_head("light", 16, 7, channels=32)
    out = head(pyramid())
    assert out.shape == (2, 7, 16, 16) and head.semantic_logits(out, (64, 64)).shape == (2, 7, 64, 64)
    labels = torch.randint(0, 7, (2, 64, 64))
    full = head.loss(out, labels)["loss"]
    labels_ignored = labels.clone()
    labels_ignored[:, :32] = 255
    assert head.loss(out, labels_ignored)["loss"] != full
    zero = head.loss(out, torch.full((2, 64, 64), 255))["loss"]
    assert zero.item() == 0.0 and zero.requires_grad


def test_registry_and_argument_errors() -> None:
    assert set(HEADS) == {"light", "mask2former", "upernet"}
    assert HEADS["mask2former"].supports_queries and not HEADS["light"].supports_queries
    assert not HEADS["upernet"].supports_queries
    with pytest.raises(UserError, match="unknown head 'uper'"):
        build_head("uper", 16, 3)
    with pytest.raises(UserError, match="has no setting hidden .*--set model.head_options="):
        build_head("light", 16, 3, hidden=3)


# -- UPerNet (segmentation-models-pytorch's decoder) and the finest decoded level -------------------------
def test_upernet_is_smps_decoder_with_batch_independent_norms() -> None:
    from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

    head = build_head("upernet", 16, 7, channels=32)
    assert isinstance(head.decoder, UPerNetDecoder)
    norms = {type(m).__name__ for m in head.modules()}
    assert "BatchNorm2d" not in norms and "GroupNorm" in norms
    original = build_head("upernet", 16, 7, channels=32, norm="batchnorm")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in original.modules())
    with pytest.raises(UserError, match="norm must be one of"):
        build_head("upernet", 16, 7, norm="layernorm")


def test_upernet_convolutions_are_decayed_though_smp_names_them_conv_norm_relu() -> None:
    # The reference's optimiser exempts parameters whose name holds "norm" (written for mmseg's modules, where
    # only norm layers carry the word); smp names its lateral 1x1 convolutions `conv_norm_relu.0`.
    from benchmarks.method import no_decay_names, split_decay_groups

    head = build_head("upernet", 16, 7, channels=32)
    exempt = no_decay_names(head)
    laterals = {n for n in dict(head.named_parameters()) if "conv_norm_relu.0.weight" in n}
    assert laterals and not laterals & exempt
    norms = {f"{prefix}.{n}" for prefix, m in head.named_modules() if isinstance(m, torch.nn.GroupNorm)
             for n, _ in m.named_parameters()}
    assert norms and norms <= exempt
    groups = split_decay_groups(head.named_parameters(), 0.05, exempt)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    parameters = dict(head.named_parameters())
    assert all(id(parameters[n]) in decayed for n in laterals)
    assert not any(id(parameters[n]) in decayed for n in norms)


def test_upernet_starts_as_smp_initialises_its_decoder_and_mmseg_its_classifier() -> None:
    torch.manual_seed(0)
    head = build_head("upernet", 64, 19, channels=64)
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)  # mmseg's conv_seg: normal(0.01)
    assert head.classifier.bias.abs().max().item() == 0.0
    convs = [m for m in head.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    # kaiming-uniform, fan-in, ReLU gain: std sqrt(2 / fan_in); PyTorch's default gives a third of that
    for conv in convs:
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15), conv
        assert conv.bias is None or conv.bias.abs().max().item() == 0.0


def test_upernet_trains_at_a_micro_batch_of_one() -> None:
    # The PSP branch pools to 1×1: batch-normalised, one image has a single value per channel and
    # training fails; the default GroupNorm takes it.
    head = build_head("upernet", 16, 5, channels=16).train()
    out = head(pyramid(batch=1))
    assert out.shape == (1, 5, 16, 16)
    head.loss(out, torch.randint(0, 5, (1, 64, 64)))["loss"].backward()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        build_head("upernet", 16, 5, channels=16, norm="batchnorm").train()(pyramid(batch=1))


def test_upernet_loss_decreases_over_a_short_fit() -> None:
    torch.manual_seed(0)
    head = build_head("upernet", 16, 4, channels=16, dropout=0.0)
    feats = pyramid(batch=2)
    # a function of the features (the class is the strongest of the finest level's first 4 channels)
    labels = feats[0][:, :4].argmax(1).repeat_interleave(4, 1).repeat_interleave(4, 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = head.loss(head(feats), labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", ["light", "upernet"])
def test_finest_level_sets_the_output_stride(name: str) -> None:
    feats = pyramid(batch=2, size=16)
    assert build_head(name, 16, 3, channels=16)(feats).shape[-2:] == (16, 16)  # p/4
    coarse = build_head(name, 16, 3, channels=16, finest_level=1)
    assert coarse(feats).shape[-2:] == (8, 8)  # p/2
    assert coarse.loss(coarse(feats), torch.randint(0, 3, (2, 64, 64)))["loss"].isfinite()
    with pytest.raises(UserError, match="finest_level must be 0 or 1"):
        build_head(name, 16, 3, finest_level=2)


# -- the class-balanced cross-entropy of the per-pixel heads ------------------------------------------
def test_median_frequency_weights_give_each_present_class_an_equal_share() -> None:
    from benchmarks.heads.light import median_frequency_weights

    labels = torch.full((2, 10, 10), 255)
    labels[0, :5] = 0  # 50 pixels
    labels[0, 5:, :2] = 1  # 10 pixels
    labels[1, :2] = 2  # 20 pixels; class 3 absent, the rest ignored
    weights = median_frequency_weights(labels, 4)
    # frequencies 50/80, 10/80, 20/80; median 20/80 → weights 0.4, 2, 1, and 0 for the absent class
    torch.testing.assert_close(weights, torch.tensor([0.4, 2.0, 1.0, 0.0]))
    counts = torch.tensor([50.0, 10.0, 20.0, 0.0])
    assert torch.allclose(weights * counts, torch.tensor([20.0, 20.0, 20.0, 0.0]))  # equal total weight per class
    assert median_frequency_weights(torch.full((1, 4, 4), 255), 4).eq(0).all()


@pytest.mark.parametrize("name", ["light", "upernet"])
def test_class_balance_reweights_the_cross_entropy(name: str) -> None:
    feats = pyramid(batch=2, size=16)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :8, :8] = 1  # a rare class: 64 of 4,096 pixels per image
    labels[:, -4:] = 255
    torch.manual_seed(0)
    plain = build_head(name, 16, 3, channels=16, dropout=0.0)
    torch.manual_seed(0)
    balanced = build_head(name, 16, 3, channels=16, dropout=0.0, class_balance="median_frequency")
    outputs = plain(feats)
    torch.testing.assert_close(outputs, balanced(feats))
    logits = plain.semantic_logits(outputs, labels.shape[-2:])
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    valid = labels != 255
    rare, common = per_pixel[labels == 1].mean(), per_pixel[valid & (labels == 0)].mean()
    # the two classes present have equal total weight, so the balanced loss is the mean of their mean losses
    torch.testing.assert_close(balanced.loss(outputs, labels)["loss"], (rare + common) / 2)
    torch.testing.assert_close(plain.loss(outputs, labels)["loss"], per_pixel[valid].mean())
    assert set(balanced.loss(outputs, labels)) == {"loss", "loss_ce"}
    all_ignored = balanced.loss(outputs, torch.full_like(labels, 255))["loss"]
    assert all_ignored.item() == 0.0 and all_ignored.requires_grad
    with pytest.raises(UserError, match="class_balance must be one of none, median_frequency"):
        build_head(name, 16, 3, class_balance="inverse")


# -- Mask2Former's loss normaliser over a whole step ------------------------------------------------------
def _deterministic_loss(head: Mask2FormerHead) -> None:
    """Fixed points and identity matching, so that the normaliser alone differs between two ways of a step."""
    points = torch.rand(1, 64, 2, generator=torch.Generator().manual_seed(0))
    head.criterion.sample_points_using_uncertainty = lambda logits, *args: points.expand(logits.shape[0], -1, -1)
    head.criterion.matcher.forward = lambda masks, logits, mask_labels, class_labels: [
        (torch.arange(len(c)), torch.arange(len(c))) for c in class_labels]


def test_an_accumulated_step_weighs_every_mask_as_one_batch_does() -> None:
    # mmdet divides the mask and dice terms by the batch's mask count; two micro-batches of one image
    # each divided by their own (5 and 2 here), so a mask of the second image weighed 2.5 times one of the first.
    torch.manual_seed(0)
    head = Mask2FormerHead(16, 5, **TINY_M2F)
    _deterministic_loss(head)
    with torch.no_grad():
        out = head([torch.randn(2, 16, s, s) for s in (16, 8, 4, 2)])
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[1] = torch.where(torch.arange(32)[:, None] < 16, 0, 3).expand(32, 32)  # 5 classes, then 2

    def terms(images: slice) -> torch.Tensor:
        part = {"pred_masks": out["pred_masks"][images], "pred_logits": out["pred_logits"][images], "aux_outputs": []}
        loss = head.loss(part, labels[images])
        return torch.stack([loss["loss_mask"], loss["loss_dice"]])

    whole = terms(slice(0, 2))
    alone = (terms(slice(0, 1)) + terms(slice(1, 2))) / 2
    with head.step([labels[0:1], labels[1:2]]):
        accumulated = (terms(slice(0, 1)) + terms(slice(1, 2))) / 2
    torch.testing.assert_close(accumulated, whole)
    assert not torch.allclose(alone, whole, rtol=1e-3)  # each micro-batch by its own count: not the batch's
    assert head.criterion._masks_per_micro_batch is None  # the step's count does not outlive it


def test_the_mask_count_is_averaged_over_the_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers averages it only under an accelerate state, which a run never makes: on 4 GPUs at batch 1
    # each image's masks were divided by that image's own count. mmdet: reduce_mean over the processes.
    head = Mask2FormerHead(16, 5, **TINY_M2F)
    other_rank = 7.0
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: tensor.add_(other_rank))
    classes = [torch.tensor([0, 1, 2])]
    assert head.criterion.get_num_masks(classes, torch.device("cpu")).item() == (3 + other_rank) / 2
