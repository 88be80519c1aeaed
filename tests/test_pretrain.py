"""Pretraining the proxy VFM: cross-style views of one layout, the objectives, the checkpoint it writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from benchmarks.backbones import build_backbone
from benchmarks.pretrain import APPEARANCE_FIELDS, PROXY_RECIPE, PretrainConfig, pretrain, scene_views
from datasets.synthetic import Style


def test_views_share_the_layout_and_differ_in_appearance() -> None:
    images, label, depth = scene_views(1_000_000_007 + 5, 3, 64, 112)
    assert images.shape == (3, 64, 112, 3) and label.shape == depth.shape == (64, 112)
    again, label_again, _ = scene_views(1_000_000_007 + 5, 3, 64, 112)
    assert np.array_equal(images, again) and np.array_equal(label, label_again)  # deterministic
    differences = [np.abs(images[0].astype(int) - images[v].astype(int)).mean() for v in (1, 2)]
    assert min(differences) > 10  # mean absolute difference in grey levels: another look, not noise


def test_one_view_renders_the_first_releases_scene() -> None:
    from datasets.synthetic import random_style, render_scene

    seed = 1_000_000_007 + 11
    images, label, _ = scene_views(seed, 1, 64, 112)
    rng = np.random.default_rng(seed)
    first_image, first_label, _ = render_scene(rng, random_style(rng), 64, 112)
    assert np.array_equal(images[0], first_image) and np.array_equal(label, first_label)


def test_appearance_fields_are_style_fields_and_leave_the_camera_and_layout_alone() -> None:
    names = {f.name for f in dataclasses.fields(Style)}
    assert set(APPEARANCE_FIELDS) <= names
    assert not {"cam_height", "horizon", "focal", "road_width", "car_rate", "ego_hood"} & set(APPEARANCE_FIELDS)


def test_the_shipped_recipe_continues_its_first_stage() -> None:
    first, second = PROXY_RECIPE
    assert first.views == 1 and first.loss_weights[3] == 0 and not first.init
    assert second.views == 2 and second.loss_weights[3] > 0 and second.init == "stage1"
    assert first.seed != second.seed  # new scenes for the second stage


TINY = PretrainConfig(scenes=4, views=2, scene_height=64, scene_width=96, crop_size=32, source_crop=(48, 64),
                      steps=2, batch_size=4, warmup_steps=1, workers=1)


def test_a_tiny_pretraining_writes_a_loadable_checkpoint_with_its_recipe(tmp_path) -> None:
    out = tmp_path / "proxy.safetensors"
    report = pretrain(TINY, out)
    assert report["final"]["cross_style"] > 0 and "cross-style" in report["objectives"]
    history = json.loads(out.with_suffix(".json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 1]
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["dgss_bench"])["recipe"]["views"] == 2
    assert all(t.dtype == torch.float16 for t in load_file(str(out)).values())
    backbone = build_backbone("proxy_vit", img_size=128, weights=out)
    assert torch.equal(backbone.vit.pos_embed.half(), load_file(str(out))["pos_embed"])


def test_init_continues_from_a_checkpoint(tmp_path) -> None:
    first = tmp_path / "first.safetensors"
    pretrain(dataclasses.replace(TINY, views=1, loss_weights=(1.0, 0.5, 0.5, 0.0)), first)
    # lr 0: the continued model is exactly where it started, so the start was the given checkpoint
    frozen = tmp_path / "continued.safetensors"
    report = pretrain(dataclasses.replace(TINY, init=str(first), lr=0.0, seed=1), frozen)
    assert report["recipe"]["init"] == str(first)
    assert report["init_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    before, after = load_file(str(first)), load_file(str(frozen))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_one_view_turns_the_cross_style_objective_off(tmp_path) -> None:
    report = pretrain(dataclasses.replace(TINY, views=1), tmp_path / "single.safetensors")
    assert report["final"]["cross_style"] == 0.0 and "cross-style" not in report["objectives"]


@pytest.mark.parametrize("views", [0, -1])
def test_views_below_one_are_refused(tmp_path, views: int) -> None:
    with pytest.raises(ValueError, match="views"):
        pretrain(dataclasses.replace(TINY, views=views), tmp_path / "x.safetensors")
