"""Backbones: checkpoint formats and the protocol's conversion, feature taps, hooks, registry.

Everything builds tiny DINOv2/EVA/SAM-like timm models through the same code path as the real
ones (a `BackboneSpec` with shrunken timm kwargs); the ViT-L count is taken on the meta device.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from benchmarks import backbones as bb
from benchmarks.backbones import BackboneSpec, build_backbone, describe_parameters, tap_indices
from benchmarks.errors import UserError

DIM = 32
TINY = dict(embed_dim=DIM, depth=4, num_heads=2)
# DINOv2-like: patch 14, released at 70 px (5×5 grid) the way ViT-L is released at 518 (37×37).
TINY_DINO = BackboneSpec("vit_small_patch14_dinov2", "vit", 14, 70, DIM, 4, TINY, protocol_patch=16)
TINY_DINO_REG = BackboneSpec("vit_small_patch14_reg4_dinov2", "vit", 14, 70, DIM, 4, TINY, protocol_patch=16)
TINY_EVA = BackboneSpec("eva02_large_patch14_224", "eva", 14, 70, DIM, 4, TINY, protocol_patch=16)
TINY_SAM = BackboneSpec(
    "samvit_base_patch16", "sam", 16, 64, DIM, 4,
    dict(TINY, global_attn_indexes=[1, 3], window_size=2, neck_chans=None),
)


def native(spec: BackboneSpec) -> bb.Backbone:
    """The model at the release's own patch and size (what a checkpoint file was saved from)."""
    torch.manual_seed(0)
    return build_backbone(spec, spec.native_img_size, weights="random", patch_size=spec.native_patch)


def dinov2_original_layout(sd: dict[str, torch.Tensor], registers: bool, chunks: int = 2) -> dict[str, torch.Tensor]:
    """Write a timm DINOv2 state dict the way facebookresearch/dinov2 releases it (independently of
    the loader): chunked blocks `blocks.<chunk>.<i>.`, mask_token, and with registers the cls
    position inside pos_embed and `register_tokens`."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per_chunk = depth // chunks
    out = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            i = int(key.split(".")[1])
            key = f"blocks.{i // per_chunk}.{i}." + key.split(".", 2)[2]
        out[key] = value.clone()
    out["mask_token"] = torch.zeros(1, DIM)
    out["norm.weight"], out["norm.bias"] = torch.ones(DIM), torch.zeros(DIM)  # the release has a final norm
    if registers:
        cls_pos = torch.randn(1, 1, DIM)
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)
        out["cls_token"] = out["cls_token"] - cls_pos  # so that cls + cls_pos is the timm cls token
    return out


def bicubic_kernel(w: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(w, size=(size, size), mode="bicubic", align_corners=False)


def bicubic_grid(pos: torch.Tensor, old: int, new: int) -> torch.Tensor:
    grid = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)


# -- checkpoint formats and conversion -------------------------------------------------------------------
@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_original_layout_is_converted_like_the_reference(tmp_path: Path, registers: bool) -> None:
    spec = TINY_DINO_REG if registers else TINY_DINO
    src = native(spec).vit.state_dict()
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    orig = dinov2_original_layout(src, registers)
    torch.save(orig, path)

    model = build_backbone(spec, 64, weights=path)  # patch 16, grid 4×4
    got = model.vit.state_dict()
    assert got["patch_embed.proj.weight"].shape[-1] == 16
    torch.testing.assert_close(got["patch_embed.proj.weight"], bicubic_kernel(src["patch_embed.proj.weight"], 16))
    if registers:  # no_embed_class: cls position folded into the cls token, grid only in pos_embed
        torch.testing.assert_close(got["cls_token"], orig["cls_token"] + orig["pos_embed"][:, :1])
        torch.testing.assert_close(got["reg_token"], orig["register_tokens"])
        torch.testing.assert_close(got["pos_embed"], bicubic_grid(orig["pos_embed"][:, 1:], 5, 4))
    else:
        torch.testing.assert_close(got["pos_embed"][:, :1], src["pos_embed"][:, :1])  # cls position kept
        torch.testing.assert_close(got["pos_embed"][:, 1:], bicubic_grid(src["pos_embed"][:, 1:], 5, 4))
    torch.testing.assert_close(got["blocks.3.mlp.fc2.weight"], src["blocks.3.mlp.fc2.weight"])
    assert "mask_token" not in dict(model.named_parameters())


@pytest.mark.parametrize("registers", [False, True])
def test_original_and_timm_layout_give_the_same_model(tmp_path: Path, registers: bool) -> None:
    spec = TINY_DINO_REG if registers else TINY_DINO
    src = native(spec).vit.state_dict()
    torch.save(dinov2_original_layout(src, registers), tmp_path / "orig.pth")
    save_file({k: v.contiguous() for k, v in src.items()}, str(tmp_path / "timm.safetensors"))
    x = torch.randn(2, 3, 70, 70)
    a = build_backbone(spec, 70, weights=tmp_path / "orig.pth", patch_size=14).eval()
    b = build_backbone(spec, 70, weights=tmp_path / "timm.safetensors", patch_size=14).eval()
    for fa, fb in zip(a(x), b(x), strict=True):
        torch.testing.assert_close(fa, fb)


def test_swiglu_w12_w3_keys_are_renamed(tmp_path: Path) -> None:
    spec = dataclasses.replace(TINY_DINO, timm_name="vit_giant_patch14_dinov2")
    src = native(spec).vit.state_dict()
    orig = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in src.items()}
    orig["mask_token"] = torch.zeros(1, DIM)
    torch.save(orig, tmp_path / "g.pth")
    got = build_backbone(spec, 70, weights=tmp_path / "g.pth", patch_size=14).vit.state_dict()
    torch.testing.assert_close(got["blocks.1.mlp.fc1.weight"], src["blocks.1.mlp.fc1.weight"])


def test_timm_resample_option_uses_timms_patch_resampling(tmp_path: Path) -> None:
    from timm.layers import resample_patch_embed

    src = native(TINY_DINO).vit.state_dict()
    torch.save(src, tmp_path / "w.pth")
    plain = build_backbone(TINY_DINO, 64, weights=tmp_path / "w.pth").vit.patch_embed.proj.weight
    flexi = build_backbone(TINY_DINO, 64, weights=tmp_path / "w.pth", resample="timm").vit.patch_embed.proj.weight
    torch.testing.assert_close(flexi, resample_patch_embed(src["patch_embed.proj.weight"], [16, 16]))
    assert not torch.allclose(plain, flexi)


def test_fp16_safetensors_default_weights_load_as_fp32(tmp_path: Path) -> None:
    proxy = bb.BACKBONES["proxy_vit"]
    torch.manual_seed(1)
    src = build_backbone("proxy_vit", 128, weights="random").vit.state_dict()
    path = tmp_path / "proxy_vit.safetensors"
    save_file({k: v.half().contiguous() for k, v in src.items()}, str(path))
    model = build_backbone(dataclasses.replace(proxy, default_weights=path), 128)
    w = model.vit.blocks[0].attn.qkv.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, src["blocks.0.attn.qkv.weight"].half().float())


def test_missing_default_weights_warn_and_init_randomly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = dataclasses.replace(bb.BACKBONES["proxy_vit"], default_weights=tmp_path / "absent.safetensors")
    with caplog.at_level(logging.WARNING, logger="benchmarks.backbones"):
        model = build_backbone(spec, 64)
    assert "random initialisation" in caplog.text and "absent.safetensors" in caplog.text
    assert model.patch_size == 8 and model.num_prefix_tokens == 1


@pytest.mark.parametrize("spec", [TINY_EVA, TINY_SAM], ids=["eva", "sam"])
def test_timm_layout_roundtrip_for_other_families(tmp_path: Path, spec: BackboneSpec) -> None:
    src = native(spec).vit.state_dict()
    torch.save(src, tmp_path / "w.pth")
    size = 32 if spec.family == "sam" else 64  # SAM: 4×4 grid → 2×2; EVA: patch 14→16, grid 5→4
    model = build_backbone(spec, size, weights=tmp_path / "w.pth")
    got = model.vit.state_dict()
    if spec.family == "sam":
        expected = F.interpolate(src["pos_embed"].permute(0, 3, 1, 2), size=(2, 2), mode="bicubic", align_corners=False)
        torch.testing.assert_close(got["pos_embed"], expected.permute(0, 2, 3, 1))
        assert got["blocks.1.attn.rel_pos_h"].shape[0] == 3  # global block: 2·2−1 positions
    else:
        torch.testing.assert_close(got["patch_embed.proj.weight"], bicubic_kernel(src["patch_embed.proj.weight"], 16))
    feats = model(torch.randn(1, 3, size, size))
    assert [f.shape[-1] for f in feats] == [size // model.patch_size * 4, size // model.patch_size * 2,
                                            size // model.patch_size, size // model.patch_size // 2]


def test_a_release_holding_model_and_model_ema_is_read_as_the_references_conversion_reads_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Rein's EVA-02 conversion reads checkpoint["model"]; the EMA copy was taken, silently.
    weights = native(TINY_DINO).vit.state_dict()
    ema = {key: value + 1.0 if value.is_floating_point() else value for key, value in weights.items()}
    torch.save({"model_ema": ema, "model": weights, "epoch": 3}, tmp_path / "both.pth")
    with caplog.at_level(logging.WARNING):
        loaded = build_backbone(TINY_DINO, 64, weights=tmp_path / "both.pth")
    torch.testing.assert_close(loaded.vit.state_dict()["cls_token"], weights["cls_token"])
    assert any("'model' and 'model_ema': reading 'model'" in r.getMessage() for r in caplog.records)


def test_wrong_size_checkpoint_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    wide = dataclasses.replace(TINY_DINO, timm_kwargs=dict(TINY, embed_dim=48))
    torch.save(native(wide).vit.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(UserError, match=r"wide\.pth.*shape.*NAME"):
        build_backbone(TINY_DINO, 64, weights=tmp_path / "wide.pth")


def test_unknown_and_missing_keys_are_refused(tmp_path: Path) -> None:
    sd = native(TINY_DINO).vit.state_dict()
    torch.save({**sd, "decoder.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"extra\.pth: 1 unexpected entries.*decoder\.weight"):
        build_backbone(TINY_DINO, 64, weights=tmp_path / "extra.pth")
    del sd["blocks.2.attn.qkv.weight"]
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(UserError, match=r"short\.pth: 1 entries missing.*blocks\.2\.attn\.qkv\.weight"):
        build_backbone(TINY_DINO, 64, weights=tmp_path / "short.pth")


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.pth not found"):
        build_backbone(TINY_DINO, 64, weights=tmp_path / "nope.pth")


class _Payload:
    """Pickles to a call that creates a marker file: proof of execution if it is ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    sd = native(TINY_DINO).vit.state_dict()
    torch.save({**sd, "evil": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"evil\.pth refused: it contains pickled Python objects") as refused:
        build_backbone(TINY_DINO, 64, weights=tmp_path / "evil.pth")
    assert not marker.exists()
    # the line names what was pickled, not torch's paragraph cut mid-word (with its terminal colour codes)
    assert "(a pickled getattr)" in str(refused.value) and "\x1b" not in str(refused.value)  # Path.touch, reduced
    assert len(str(refused.value)) < 300


def test_a_folder_given_as_the_weights_file_is_named_a_folder(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()  # it was "not found", though it is there
    with pytest.raises(UserError, match=r"ckpt is a folder; pass --weights NAME=PATH with the checkpoint file in it"):
        build_backbone(TINY_DINO, 64, weights=tmp_path / "ckpt")


def test_garbage_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="junk.safetensors"):
        build_backbone(TINY_DINO, 64, weights=tmp_path / "junk.safetensors")


# -- feature taps -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth, taps", [(24, (7, 11, 15, 23)), (12, (3, 5, 7, 11)), (40, (12, 19, 26, 39)),
                                         (6, (1, 2, 3, 5)), (4, (0, 1, 2, 3)), (32, (10, 15, 20, 31))])
def test_tap_indices_are_the_depth_quartiles(depth: int, taps: tuple[int, ...]) -> None:
    assert tap_indices(depth) == taps


def test_every_depth_taps_four_distinct_blocks_the_last_one_last() -> None:
    # depth 5 tapped block 1 twice, and the model's forward failed on it
    for depth in range(4, 41):
        taps = tap_indices(depth)
        assert len(set(taps)) == 4 and list(taps) == sorted(taps) and taps[-1] == depth - 1, (depth, taps)
    five = dataclasses.replace(TINY_DINO, depth=5, timm_kwargs=dict(TINY, depth=5))
    assert len(build_backbone(five, 64, weights="random")(torch.randn(1, 3, 64, 64))) == 4


def test_clips_image_tower_alone_loads_as_the_whole_model_does(tmp_path: Path) -> None:
    whole = openai_clip_visual(grid=4)
    torch.save(whole, tmp_path / "whole.pt")
    torch.save({key.removeprefix("visual."): value for key, value in whole.items() if key.startswith("visual.")},
               tmp_path / "tower.pt")  # `model.visual.state_dict()`: refused as another family's file
    a = build_backbone(TINY_CLIP, img_size=64, weights=tmp_path / "whole.pt").vit.state_dict()
    b = build_backbone(TINY_CLIP, img_size=64, weights=tmp_path / "tower.pt").vit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_transformers_layout_under_a_models_prefix_and_eva02_clip_are_named_as_what_they_are(tmp_path: Path) -> None:
    torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(DIM, 3, 14, 14),
                "vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, DIM)}, tmp_path / "hf.pt")
    with pytest.raises(UserError, match="Hugging Face transformers layout"):
        build_backbone(TINY_CLIP, img_size=64, weights=tmp_path / "hf.pt")
    eva = native(TINY_EVA).vit.state_dict()
    for inner_norm in ("blocks.0.attn.norm.weight", "visual.blocks.0.attn.inner_attn_ln.weight"):  # timm's; BAAI's
        torch.save({**eva, inner_norm: torch.ones(DIM)}, tmp_path / "eva_clip.pt")
        with pytest.raises(UserError, match="is an EVA-02-CLIP image tower.*; pass the authors' file"):
            build_backbone(TINY_EVA, img_size=64, weights=tmp_path / "eva_clip.pt")


def test_pyramid_shapes_and_strides_for_non_square_input() -> None:
    model = build_backbone(TINY_DINO_REG, 64, weights="random").eval()
    feats = model(torch.randn(2, 3, 64, 96))  # other than the build size: pos grid interpolated
    assert [tuple(f.shape) for f in feats] == [(2, DIM, 16, 24), (2, DIM, 8, 12), (2, DIM, 4, 6), (2, DIM, 2, 3)]
    assert model.strides == (4.0, 8.0, 16.0, 32.0)
    with pytest.raises(UserError, match="not divisible by the patch size 16"):
        model(torch.randn(1, 3, 60, 64))


def test_features_are_the_tapped_blocks_patch_tokens_without_prefix() -> None:
    model = build_backbone(TINY_DINO_REG, 64, weights="random").eval()
    assert model.num_prefix_tokens == 5  # cls + 4 registers
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out))
    x = torch.randn(1, 3, 64, 64)
    feats = model(x)
    assert set(seen) == set(range(4))  # every block ran through self.blocks[i](x)
    for level, (i, scale) in enumerate(zip(model.tap_indices, (4, 2, 1, 0.5), strict=True)):
        grid = seen[i][:, 5:].transpose(1, 2).reshape(1, DIM, 4, 4)
        expected = grid if scale == 1 else F.interpolate(grid, scale_factor=scale, mode="bilinear", align_corners=False)
        torch.testing.assert_close(feats[level], expected)


def test_a_hook_on_a_block_changes_the_features() -> None:
    model = build_backbone(TINY_DINO, 64, weights="random").eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    handle = model.blocks[model.tap_indices[0]].register_forward_hook(lambda m, a, out: out + 1.0)
    after = model(x)
    handle.remove()
    torch.testing.assert_close(after[0], before[0] + 1.0)  # the tapped level sees the refined output
    assert not torch.allclose(after[3], before[3])  # and later blocks consume it
    pre = model.blocks[0].register_forward_pre_hook(lambda m, args: (args[0] * 0.0,))
    assert not torch.allclose(model(x)[3], before[3])
    pre.remove()


def test_eva_and_sam_blocks_take_and_return_token_sequences() -> None:
    for spec, size in ((TINY_EVA, 64), (TINY_SAM, 64)):
        model = build_backbone(spec, size, weights="random").eval()
        shapes = []
        model.blocks[1].register_forward_hook(lambda m, a, out, shapes=shapes: shapes.append(tuple(out.shape)))
        model(torch.randn(2, 3, size, size))
        grid = size // model.patch_size
        assert shapes == [(2, model.num_prefix_tokens + grid * grid, DIM)], spec.family


def test_blocks_are_a_module_list_and_attention_is_fused() -> None:
    model = build_backbone(TINY_DINO, 64, weights="random")
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == model.depth == 4
    assert all(block.attn.fused_attn for block in model.blocks)
    # one name per tensor (safetensors refuses shared tensors), no final norm or classifier
    names = list(model.state_dict())
    assert len(names) == len(set(names)) and not any(n.startswith(("vit.norm.", "vit.head.")) for n in names)


def test_registry_names_and_unknown_name() -> None:
    names = bb.available_backbones()
    for n in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vitl14_reg",
              "eva02_large_patch14", "clip_vitl14", "sam_vith16", "proxy_vit"):
        assert n in names
    with pytest.raises(UserError, match="unknown backbone 'vit_xxl'"):
        build_backbone("vit_xxl", 224)



@pytest.mark.parametrize(("name", "global_blocks"), [("sam_vitb16", [2, 5, 8, 11]), ("sam_vitl16", [5, 11, 17, 23]),
                                                      ("sam_vith16", [7, 15, 23, 31])])
def test_every_sam_release_builds_as_segment_anything_does(name, global_blocks) -> None:
    # segment-anything's encoders normalise with eps 1e-6 (timm's SAM ViT alone would give torch's 1e-5), and
    # each size has its own global-attention blocks; sam_vit_b and sam_vit_l releases had no name to load under.
    with torch.device("meta"):
        backbone = build_backbone(name, 512, weights="random")
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and {m.eps for m in norms} == {1e-6}
    assert [i for i, block in enumerate(backbone.blocks) if block.window_size == 0] == global_blocks

def test_paper_backbone_count_on_meta_device() -> None:
    info = describe_parameters("dinov2_vitl14", 512)
    # 24 blocks × 12,598,272 + patch 16 kernel (787,456) + 1+32² positions (1,049,600) + cls (1,024);
    # no mask token, no final norm: the protocol's 304.2M.
    assert info["backbone_params"] == 304_196_608
    assert info["patch_size"] == 16 and info["grid"] == 32 and info["tap_indices"] == (7, 11, 15, 23)


def test_proxy_vit_architecture() -> None:
    model = build_backbone("proxy_vit", 128, weights="random")
    vit = model.vit
    assert (model.patch_size, model.embed_dim, model.depth, vit.blocks[0].attn.num_heads) == (8, 192, 6, 3)
    assert vit.blocks[0].ls1.gamma.shape == (192,) and vit.reg_token is None and vit.blocks[0].attn.qkv.bias is not None
    assert [tuple(f.shape[-2:]) for f in model(torch.randn(1, 3, 128, 128))] == [(64, 64), (32, 32), (16, 16), (8, 8)]


# -- original layouts converted by timm's filters: renamed only, resized once, by the protocol's rule ------
TINY_CLIP = BackboneSpec("vit_large_patch14_clip_quickgelu_224", "vit", 14, 56, DIM, 4, TINY, protocol_patch=16)


def openai_clip_visual(grid: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny image tower in OpenAI CLIP's key layout (`visual.*`, fused `in_proj`, `c_fc`/`c_proj`)
    at patch 14 and a `grid`×`grid` position grid, with a text tower's `positional_embedding` beside it."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    sd = {"visual.conv1.weight": rand(DIM, 3, 14, 14), "visual.class_embedding": rand(DIM),
          "visual.positional_embedding": rand(grid * grid + 1, DIM), "positional_embedding": rand(77, DIM),
          "visual.ln_pre.weight": torch.ones(DIM), "visual.ln_pre.bias": torch.zeros(DIM),
          "visual.ln_post.weight": torch.ones(DIM), "visual.ln_post.bias": torch.zeros(DIM), "visual.proj": rand(DIM, 8)}
    for i in range(4):
        block = f"visual.transformer.resblocks.{i}."
        sd |= {block + "ln_1.weight": torch.ones(DIM), block + "ln_1.bias": torch.zeros(DIM),
               block + "attn.in_proj_weight": rand(3 * DIM, DIM), block + "attn.in_proj_bias": rand(3 * DIM),
               block + "attn.out_proj.weight": rand(DIM, DIM), block + "attn.out_proj.bias": rand(DIM),
               block + "ln_2.weight": torch.ones(DIM), block + "ln_2.bias": torch.zeros(DIM),
               block + "mlp.c_fc.weight": rand(4 * DIM, DIM), block + "mlp.c_fc.bias": rand(4 * DIM),
               block + "mlp.c_proj.weight": rand(DIM, 4 * DIM), block + "mlp.c_proj.bias": rand(DIM)}
    return sd


def test_an_openai_clip_checkpoint_of_another_grid_has_its_positions_resized_once_bicubic(tmp_path: Path) -> None:
    # A ViT-L/14@336-like release (grid 24; here 6) against a model released at 224 (grid 16; here 4):
    # timm's filter alone would resize 6 → 4 (antialiased) before the protocol's own 4 → 4.
    sd = openai_clip_visual(grid=6)
    torch.save(sd, tmp_path / "clip.pt")
    backbone = build_backbone(TINY_CLIP, img_size=64, weights=tmp_path / "clip.pt")  # patch 16: grid 4
    grid = sd["visual.positional_embedding"][1:].reshape(1, 6, 6, DIM).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(16, DIM)
    torch.testing.assert_close(backbone.vit.pos_embed[0, 1:], direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(backbone.vit.pos_embed[0, 0], sd["visual.positional_embedding"][0])


def test_an_original_eva_checkpoint_with_a_16_pixel_kernel_keeps_it(tmp_path: Path) -> None:
    # EVA02's segmentation release (`…_p14to16.pt`) holds the kernel already at 16×16: it must load as it
    # is, not be taken to 14 by timm's pseudo-inverse and back to 16 by the protocol's bicubic resize.
    timm_sd = native(TINY_EVA).vit.state_dict()
    renames = {"mlp.norm": "mlp.ffn_ln", "mlp.fc1_g": "mlp.w1", "mlp.fc1_x": "mlp.w2", "mlp.fc2": "mlp.w3",
               "q_proj.bias": "q_bias", "v_proj.bias": "v_bias"}
    original = {}
    for key, value in timm_sd.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        original[key] = value.clone()
    kernel = F.interpolate(original["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    original["patch_embed.proj.weight"] = kernel
    torch.save({"module": original}, tmp_path / "eva_p14to16.pt")
    backbone = build_backbone(TINY_EVA, img_size=80, weights=tmp_path / "eva_p14to16.pt")
    assert torch.equal(backbone.vit.patch_embed.proj.weight, kernel)


def test_the_patch_and_grid_a_checkpoint_was_saved_at():
    from benchmarks.backbones import checkpoint_patch_and_grid

    clip = openai_clip_visual(grid=24)
    assert checkpoint_patch_and_grid(clip) == (14, 24)  # the image tower's, not the text tower's 77
    assert checkpoint_patch_and_grid({"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                                      "image_encoder.pos_embed": torch.zeros(1, 64, 64, 8)}) == (16, 64)
    assert checkpoint_patch_and_grid({"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                                      "pos_embed": torch.zeros(1, 1 + 16 * 16, 8)}) == (16, 16)
    assert checkpoint_patch_and_grid({"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}) is None


def test_a_torchscript_archive_is_refused_saying_how_to_save_its_weights(tmp_path: Path) -> None:
    path = tmp_path / "ViT-L-14.pt"  # OpenAI's CLIP release is TorchScript
    torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)).save(str(path))
    with pytest.raises(UserError, match="is a TorchScript archive") as err:
        build_backbone(TINY_CLIP, img_size=64, weights=path)
    assert "torch.jit.load(PATH, map_location='cpu').state_dict()" in str(err.value)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    assert not bb.weights_io._is_torchscript(tmp_path / "plain.pt")


@pytest.mark.parametrize("content", [b"<html><body>404 Not Found</body></html>", bytes(range(256)) * 16])
def test_bytes_no_pickle_holds_are_not_called_pickled_objects(tmp_path: Path, content: bytes) -> None:
    """An error page or random bytes saved as .pth: a damaged download, not a file of pickled objects."""
    (tmp_path / "dinov2.pth").write_bytes(content)
    with pytest.raises(UserError, match=r"dinov2\.pth is not a PyTorch checkpoint .*download the checkpoint again"):
        build_backbone(TINY_DINO, 64, weights=tmp_path / "dinov2.pth")


def test_a_safetensors_file_under_a_pth_name_is_read_as_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = native(TINY_DINO).vit.state_dict()
    save_file(sd, tmp_path / "weights.pth")
    torch.save(sd, tmp_path / "pickled.pth")
    loaded = build_backbone(TINY_DINO, 64, weights=tmp_path / "weights.pth").vit.state_dict()
    expected = build_backbone(TINY_DINO, 64, weights=tmp_path / "pickled.pth").vit.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(("spec", "registers", "expected"), [
    (TINY_SAM, None, "unexpected entries"),  # another family's grid layout: never reaches a resize
    (TINY_SAM, False, "unexpected entries"),
    (TINY_DINO_REG, False, "entries missing (e.g. reg_token)"),  # Meta's file without registers for a *_reg name
])
def test_another_familys_file_is_named_before_anything_is_resized(tmp_path: Path, spec, registers, expected) -> None:
    sd = native(TINY_DINO).vit.state_dict()
    torch.save(sd if registers is None else dinov2_original_layout(sd, registers=registers), tmp_path / "dino.pth")
    with pytest.raises(UserError, match=r"dino\.pth: .*check the NAME in --weights NAME=PATH") as err:
        build_backbone(spec, 64, weights=tmp_path / "dino.pth")
    assert expected in str(err.value)



def test_a_half_precision_file_is_resized_in_fp32_and_rounded_once(tmp_path: Path) -> None:
    """The reference resizes `.float()` tensors and keeps them: fp16 → fp32 resize, no second rounding to fp16."""
    sd = native(TINY_DINO).vit.state_dict()
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "half.pth")
    torch.save({k: v.half().float() for k, v in sd.items()}, tmp_path / "widened.pth")
    loaded = build_backbone(TINY_DINO, 64, weights=tmp_path / "half.pth").vit.state_dict()
    expected = build_backbone(TINY_DINO, 64, weights=tmp_path / "widened.pth").vit.state_dict()
    for name in ("patch_embed.proj.weight", "pos_embed"):
        assert torch.equal(loaded[name], expected[name]), name


def test_a_hugging_face_transformers_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    """The right family and NAME, in a layout not read here: not 'check the NAME'."""
    layout = {"embeddings.cls_token": torch.zeros(1, 1, DIM), "embeddings.patch_embeddings.projection.weight":
              torch.zeros(DIM, 3, 14, 14), "encoder.layer.0.attention.attention.query.weight": torch.zeros(DIM, DIM)}
    torch.save(layout, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin is in the Hugging Face transformers layout") as err:
        build_backbone(TINY_DINO, 64, weights=tmp_path / "pytorch_model.bin")
    assert "check the NAME" not in str(err.value)
