"""Pretraining the proxy VFM: cross-style views of one layout, the objectives, the checkpoint it writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from benchmarks.backbones import build_backbone
from benchmarks.pretrain import (
    APPEARANCE_FIELDS,
    PROXY_RECIPE,
    PretrainConfig,
    _batch,
    _learning_rate,
    class_agnostic_regions,
    pool_on,
    pool_regions,
    pretrain,
    pretrain_recipe,
    recorded_stages_before,
    region_weights,
    render_pool,
    round_state_path,
    scene_views,
)
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
    first_image, first_label, _ = render_scene(rng, random_style(rng), 64, 112, version=2)
    assert np.array_equal(images[0], first_image) and np.array_equal(label, first_label)


def test_appearance_fields_are_style_fields_and_leave_the_camera_and_layout_alone() -> None:
    names = {f.name for f in dataclasses.fields(Style)}
    assert set(APPEARANCE_FIELDS) <= names
    assert not {"cam_height", "horizon", "focal", "road_width", "car_rate", "ego_hood"} & set(APPEARANCE_FIELDS)


def test_the_shipped_recipe_continues_each_stage_from_the_one_before() -> None:
    first, second, third = PROXY_RECIPE[:3]
    full_size_at = next(index for index, stage in enumerate(PROXY_RECIPE) if stage.crop_size == 128)
    further_rounds = PROXY_RECIPE[3:full_size_at]
    full_size_round, gpu_round, *longer_gpu_rounds = PROXY_RECIPE[full_size_at:]
    assert first.views == 1 and first.loss_weights[3] == 0 and not first.init
    assert second.views == 2 and second.loss_weights[3] > 0 and second.init == "stage1"
    assert third.views == 2 and third.loss_weights[3] > 0 and third.init == "stage2"
    assert further_rounds  # the region contrast was run again from its end
    for stage, later in enumerate(further_rounds, start=4):  # each a round of stage 3 from the one before
        assert later.init == f"stage{stage - 1}"
        assert dataclasses.replace(later, seed=third.seed, init=third.init) == third
    # stage 8: that round at the fine-tuning crop (128 px), objects at the benchmark's scale, half the steps
    assert full_size_round.init == f"stage{full_size_at}"
    changed = {f.name for f in dataclasses.fields(PretrainConfig) if getattr(full_size_round, f.name) != getattr(third, f.name)}
    assert changed == {"init", "seed", "crop_size", "source_crop", "scene_height", "scene_width", "steps"}
    assert full_size_round.crop_size == 128 and full_size_round.steps == third.steps // 2
    # then that round from its end at a GPU's scale: more scenes, 4x the batch, more steps
    assert gpu_round.init == f"stage{full_size_at + 1}"
    changed = {f.name for f in dataclasses.fields(PretrainConfig) if getattr(gpu_round, f.name) != getattr(full_size_round, f.name)}
    assert changed == {"init", "seed", "scenes", "batch_size", "steps"}
    assert gpu_round.batch_size == 4 * full_size_round.batch_size
    # and again from each one's end, every time longer and on more scenes
    assert longer_gpu_rounds
    for stage, (before, later) in enumerate(zip([gpu_round, *longer_gpu_rounds[:-1]], longer_gpu_rounds, strict=True), start=full_size_at + 3):
        assert later.init == f"stage{stage - 1}"
        changed = {f.name for f in dataclasses.fields(PretrainConfig) if getattr(later, f.name) != getattr(gpu_round, f.name)}
        assert changed == {"init", "seed", "scenes", "steps"}
        assert later.steps > before.steps and later.scenes > before.scenes
    assert first.region_contrast == second.region_contrast == 0 < third.region_contrast
    assert len({stage.seed for stage in PROXY_RECIPE}) == len(PROXY_RECIPE)  # new scenes for every stage


def test_the_shipped_checkpoint_records_the_recipe_that_reproduces_it() -> None:
    from pathlib import Path

    shipped = Path("benchmarks/weights/proxy_vit.safetensors")
    with safe_open(str(shipped), "pt") as f:
        recorded = json.loads(f.metadata()["dgss_bench"])["recipe"]
    last = json.loads(json.dumps(dataclasses.asdict(PROXY_RECIPE[-1])))  # tuples as the record holds them
    defaults = json.loads(json.dumps(dataclasses.asdict(PretrainConfig())))
    # A field added after the checkpoint was made reproduces it only at its default (the behaviour before it).
    differing = {k for k in last if k not in ("init", "workers") and recorded.get(k, defaults[k]) != last[k]}  # workers: the machine's
    assert not differing
    stages = json.loads(shipped.with_suffix(".json").read_text())["stages"]
    assert [s["stage"] for s in stages] == list(range(1, len(PROXY_RECIPE) + 1))


TINY = PretrainConfig(scenes=4, views=2, scene_height=64, scene_width=96, crop_size=32, source_crop=(48, 64),
                      steps=2, batch_size=4, warmup_steps=1, workers=1)


def test_a_tiny_pretraining_writes_a_loadable_checkpoint_with_its_recipe(tmp_path) -> None:
    out = tmp_path / "proxy.safetensors"
    report = pretrain(TINY, out)
    assert report["final"]["cross_style"] > 0 and "cross-style" in report["objectives"]
    history = json.loads(out.with_suffix(".json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 1]
    # each logged step says when it finished, so a rate can be read without the warm-up (tools/gpu-proxy)
    assert 0 <= history[0]["seconds"] <= history[1]["seconds"] <= report["train_seconds"] + 0.05
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["dgss_bench"])["recipe"]["views"] == 2
    assert all(t.dtype == torch.float16 for t in load_file(str(out)).values())
    backbone = build_backbone("proxy_vit", img_size=128, weights=out)
    assert torch.equal(backbone.vit.pos_embed.half(), load_file(str(out))["pos_embed"])


def test_the_record_names_the_machine_it_trained_on(monkeypatch) -> None:
    from benchmarks import pretrain as pretraining
    from benchmarks import resources

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(resources, "cpu_name", lambda: "AMD EPYC 7B13 (AVX2)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert pretraining._machine("cpu") == "cpu (AMD EPYC 7B13 (AVX2), 2 threads)"
    assert pretraining._machine("cuda") == "cuda (NVIDIA H200)"
    assert pretraining._machine("cuda:1") == "cuda:1 (NVIDIA H200)"
    assert pretraining._machine("mps") == "mps"  # not named by the CPU beside it


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


def test_one_view_turns_the_cross_style_objectives_off(tmp_path) -> None:
    report = pretrain(dataclasses.replace(TINY, views=1, region_contrast=1.0), tmp_path / "single.safetensors")
    assert report["final"]["cross_style"] == 0.0 and "cross-style" not in report["objectives"]
    assert "regions" not in report["final"]
    # nor are regions rendered that nothing would use
    assert render_pool(dataclasses.replace(TINY, views=1, region_contrast=1.0)).regions is None
    assert render_pool(dataclasses.replace(TINY, region_contrast=1.0)).regions is not None


def test_head_warmup_holds_the_backbone_still_and_then_warms_it_up() -> None:
    cfg = dataclasses.replace(TINY, steps=100, lr=1.0, warmup_steps=10, head_warmup_steps=20)
    rates = {backbone: [_learning_rate(cfg, step, step / cfg.steps, backbone) for step in range(cfg.steps)]
             for backbone in (True, False)}
    assert rates[True][:20] == [0.0] * 20 and min(rates[False][:20]) > 0  # the heads learn from the first step
    assert rates[True][20] == pytest.approx(rates[False][20] / 10)  # the backbone's own warm-up: a tenth in
    assert rates[True][29:] == rates[False][29:]  # warmed up, both follow the one cosine decay
    off = dataclasses.replace(cfg, head_warmup_steps=0)
    assert [_learning_rate(off, s, s / 100, True) for s in range(100)] == rates[False]  # 0: the schedule before


def test_head_warmup_holds_the_backbone_where_it_started(tmp_path) -> None:
    start = tmp_path / "start.safetensors"
    pretrain(TINY, start)
    continued = {}
    for head_warmup in (0, TINY.steps):  # the whole round: the backbone never learns (the command refuses that)
        out = tmp_path / f"warmup{head_warmup}.safetensors"
        report = pretrain(dataclasses.replace(TINY, init=str(start), seed=1, head_warmup_steps=head_warmup), out)
        assert report["recipe"]["head_warmup_steps"] == head_warmup and math.isfinite(report["final"]["loss"])
        continued[head_warmup] = load_file(str(out))
    before = load_file(str(start))
    assert all(torch.equal(before[k], continued[TINY.steps][k]) for k in before)
    assert not all(torch.equal(before[k], continued[0][k]) for k in before)  # without it the same round moves it


def _output_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    return seen


def test_amp_bf16_runs_the_forward_in_bf16_and_keeps_the_weights_fp32() -> None:
    from benchmarks.pretrain import _Learner

    cfg = dataclasses.replace(TINY, region_contrast=1.0)
    pool = pool_on(render_pool(cfg), "cpu")
    computed = {}
    for amp in ("none", "bf16"):
        torch.manual_seed(0)
        learner = _Learner(dataclasses.replace(cfg, amp=amp), "cpu")
        dtypes = _output_dtypes(learner.backbone.vit.blocks[0].attn.qkv)
        teacher_dtypes = _output_dtypes(learner.teacher.vit.blocks[0].attn.qkv)
        losses = learner.train_step(pool, 0)
        assert math.isfinite(losses["loss"].item())
        assert {p.dtype for p in learner.params} == {torch.float32}  # the optimiser updates fp32 weights
        computed[amp] = (set(dtypes), set(teacher_dtypes), losses["loss"].item())
    assert computed["none"][:2] == ({torch.float32}, {torch.float32})
    assert computed["bf16"][:2] == ({torch.bfloat16}, {torch.bfloat16})
    assert computed["bf16"][2] == pytest.approx(computed["none"][2], rel=0.05)  # the same step, rounded
    with pytest.raises(ValueError, match="fp16"):  # not a silent fp32 round
        dataclasses.replace(cfg, amp="fp16")


ROUND = dataclasses.replace(TINY, steps=4, warmup_steps=2, region_contrast=1.0)  # every stream a step draws from


def _interrupted_at(step: int, cfg: PretrainConfig, out, monkeypatch) -> None:
    """Run `cfg` with a state written after every step, killed as step `step` draws its batch."""
    from benchmarks import pretrain as pretraining

    calls, batch = [], pretraining._batch

    def batch_until_killed(*args, **kwargs):
        calls.append(1)
        if len(calls) > step:
            raise KeyboardInterrupt
        return batch(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(pretraining, "_batch", batch_until_killed)
        with pytest.raises(KeyboardInterrupt):
            pretrain(cfg, out, state_every_seconds=0)


def test_an_interrupted_round_resumes_to_the_checkpoint_of_an_uninterrupted_one(tmp_path, monkeypatch) -> None:
    whole = pretrain(ROUND, tmp_path / "whole.safetensors")
    out = tmp_path / "resumed.safetensors"
    _interrupted_at(2, ROUND, out, monkeypatch)
    assert round_state_path(out).is_file() and not out.exists()
    resumed = pretrain(ROUND, out)
    before, after = load_file(str(tmp_path / "whole.safetensors")), load_file(str(out))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed["history"]] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in whole["history"]]
    machine = whole["device"]
    assert resumed["segments"] == [{"from_step": 0, "device": machine}, {"from_step": 2, "device": machine}]
    assert "segments" not in whole
    assert not round_state_path(out).exists()  # the checkpoint holds what is worth keeping


def test_a_state_of_another_recipe_is_refused_and_kept(tmp_path, monkeypatch) -> None:
    from benchmarks.errors import UserError

    out = tmp_path / "round.safetensors"
    _interrupted_at(1, ROUND, out, monkeypatch)
    state = round_state_path(out).read_bytes()
    with pytest.raises(UserError, match=r"another recipe \(it differs in lr\)"):
        pretrain(dataclasses.replace(ROUND, lr=5e-4), out)
    assert round_state_path(out).read_bytes() == state and not out.exists()


class _RunsWhenUnpickled:
    def __reduce__(self):
        return (pytest.fail, ("the state file's pickled object was run",))


def test_a_state_file_of_pickled_objects_is_refused_unrun(tmp_path) -> None:
    from benchmarks.errors import UserError

    out = tmp_path / "round.safetensors"
    torch.save({"format": 1, "recipe": _RunsWhenUnpickled()}, round_state_path(out))
    with pytest.raises(UserError, match="refused: it holds pickled Python objects"):
        pretrain(ROUND, out)


@pytest.mark.parametrize("views", [0, -1])
def test_views_below_one_are_refused(tmp_path, views: int) -> None:
    with pytest.raises(ValueError, match="views"):
        pretrain(dataclasses.replace(TINY, views=views), tmp_path / "x.safetensors")


def test_regions_are_the_connected_parts_of_each_kind_and_say_nothing_of_the_kind() -> None:
    label = np.array([[0, 0, 5, 5, 0],
                      [0, 0, 5, 5, 0],
                      [255, 13, 13, 255, 13]], dtype=np.uint8)
    regions = class_agnostic_regions(label)
    assert regions[2, 0] == regions[2, 3] == 65535
    # one kind, two separate parts: two regions (the right-hand 0s and the last 13 as well)
    assert regions[0, 0] == regions[1, 1] != regions[0, 4]
    assert regions[2, 1] == regions[2, 2] != regions[2, 4]
    assert len(np.unique(regions[label != 255])) == 5


def test_region_weights_are_token_shares_of_the_regions_big_enough() -> None:
    regions = torch.full((1, 8, 8), 0, dtype=torch.long)
    regions[0, :4, :4] = 1  # exactly one 4×4 token
    regions[0, 7, 7] = 2  # one pixel: under half a token, never drawn
    regions[0, 6, 0] = 65535
    weights = region_weights(regions, patch=4, per_image=3, rng=np.random.default_rng(0))
    assert weights.shape == (1, 3, 4)
    drawn = weights[0][weights[0].sum(1) > 0]
    assert len(drawn) == 2  # regions 0 and 1; the third row stays empty
    assert any(torch.equal(row, torch.tensor([1.0, 0, 0, 0])) for row in drawn)
    assert torch.all(weights.sum(1) <= 1)
    tokens = torch.arange(8.0).view(1, 4, 2)
    pooled = pool_regions(tokens, weights)
    assert pooled.shape == (2, 2)
    expected = (weights[0, :2] @ tokens[0]) / weights[0, :2].sum(1, keepdim=True)
    assert torch.allclose(pooled, expected[weights[0, :2].sum(1) > 0])


def test_a_batch_is_each_drawn_scene_cropped_flipped_and_resized() -> None:
    cfg = dataclasses.replace(TINY, scenes=3, batch_size=6, crop_size=48, region_contrast=1.0)
    pool = render_pool(cfg)
    student, teacher, geometry, depth, regions = _batch(pool_on(pool, "cpu"), np.random.default_rng(7), cfg)
    # the same draws, in the order _batch takes them, crop by crop with numpy
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 3, 6)
    student_view = rng.integers(0, 2, 6)
    teacher_view = (student_view + rng.integers(1, 2, 6)) % 2
    crop = int(rng.integers(48, 65))
    top, left = rng.integers(0, 64 - crop + 1, 6), rng.integers(0, 96 - crop + 1, 6)
    flip = rng.random(6) < 0.5
    mean, std = torch.tensor((123.675, 116.28, 103.53)).view(3, 1, 1), torch.tensor((58.395, 57.12, 57.375)).view(3, 1, 1)

    def cut(array: np.ndarray, i: int) -> torch.Tensor:
        piece = array[top[i] : top[i] + crop, left[i] : left[i] + crop]
        return torch.from_numpy(np.ascontiguousarray(piece[:, ::-1] if flip[i] else piece))

    def resized(x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "nearest":
            return F.interpolate(x[None, None].float(), size=(48, 48), mode="nearest")[0, 0]
        return F.interpolate(x[None], size=(48, 48), mode="bilinear", align_corners=False, antialias=True)[0]

    for i in range(6):
        for view, batch in ((student_view[i], student), (teacher_view[i], teacher)):
            image = (cut(pool.images[idx[i], view], i).permute(2, 0, 1).float() - mean) / std
            assert torch.allclose(batch[i], resized(image, "bilinear"), atol=1e-5)
        assert torch.equal(geometry[i], resized(cut(pool.geometry[idx[i]], i), "nearest").long())
        assert torch.equal(depth[i], resized(cut(pool.depth[idx[i]].astype(np.float32), i), "nearest"))
        assert torch.equal(regions[i], resized(cut(pool.regions[idx[i]].astype(np.int32), i), "nearest").long())


def test_region_contrast_is_off_by_default_and_reported_when_on(tmp_path) -> None:
    off = pretrain(TINY, tmp_path / "off.safetensors")
    assert "regions" not in off["final"] and "DetCon" not in off["objectives"]
    on = pretrain(dataclasses.replace(TINY, region_contrast=1.0), tmp_path / "on.safetensors")
    assert on["final"]["regions"] > 0 and "class-agnostic regions" in on["objectives"]


def test_a_stage_resumed_from_a_checkpoint_records_the_stages_that_made_it(tmp_path) -> None:
    tiny = dataclasses.replace(TINY, views=1, loss_weights=(1.0, 0.5, 0.5, 0.0))
    first_two = tmp_path / "two.safetensors"
    pretrain_recipe([tiny, dataclasses.replace(tiny, init="stage1", seed=1)], first_two)
    resumed = tmp_path / "three.safetensors"
    pretrain_recipe([dataclasses.replace(tiny, init=str(first_two), seed=2)], resumed, first_stage=3)
    record = json.loads(resumed.with_suffix(".json").read_text())
    assert [s["stage"] for s in record["stages"]] == [1, 2, 3]
    assert record["stages"][:2] == json.loads(first_two.with_suffix(".json").read_text())["stages"]
    assert record["stages"][2]["init_sha256"] == hashlib.sha256(first_two.read_bytes()).hexdigest()


def test_a_checkpoint_named_like_a_stage_is_a_file_not_a_reference(tmp_path, monkeypatch) -> None:
    # `pretrain --init stage9.safetensors` was taken as the recipe's reference to stage 9: a KeyError
    tiny = dataclasses.replace(TINY, views=1, loss_weights=(1.0, 0.5, 0.5, 0.0))
    start = tmp_path / "stage9.safetensors"
    pretrain(tiny, start)
    monkeypatch.chdir(tmp_path)
    pretrain_recipe([dataclasses.replace(tiny, init="stage9.safetensors", seed=1)], tmp_path / "next.safetensors",
                    first_stage=10)
    record = json.loads((tmp_path / "next.json").read_text())
    assert record["stages"][-1]["init_sha256"] == hashlib.sha256(start.read_bytes()).hexdigest()


def test_a_record_not_written_with_the_checkpoint_is_not_taken_as_its_lineage(tmp_path) -> None:
    tiny = dataclasses.replace(TINY, views=1, loss_weights=(1.0, 0.5, 0.5, 0.0))
    start = tmp_path / "start.safetensors"
    pretrain_recipe([tiny], start)
    assert [s["stage"] for s in recorded_stages_before(start, first_stage=2)] == [1]
    assert recorded_stages_before(start, first_stage=3) == []  # it made stage 1, not stage 2
    record = json.loads(start.with_suffix(".json").read_text())
    record["stages"][-1]["final"]["loss"] += 1.0  # another run's record left beside this checkpoint
    start.with_suffix(".json").write_text(json.dumps(record))
    assert recorded_stages_before(start, first_stage=2) == []
    start.with_suffix(".json").unlink()
    assert recorded_stages_before(start, first_stage=2) == []


TWO_STAGES = [dataclasses.replace(TINY, steps=3, views=1, loss_weights=(1.0, 0.5, 0.5, 0.0)),
              dataclasses.replace(TINY, steps=3, views=1, loss_weights=(1.0, 0.5, 0.5, 0.0), init="stage1", seed=1)]


def test_an_interrupted_recipe_goes_on_at_its_stage_to_the_checkpoint_of_an_uninterrupted_one(tmp_path, monkeypatch):
    from benchmarks import pretrain as pretraining

    whole = tmp_path / "whole.safetensors"
    pretrain_recipe(TWO_STAGES, whole)
    out = tmp_path / "resumed.safetensors"
    with monkeypatch.context() as patched:  # killed in stage 2's second step, after a state every step
        patched.setattr(pretraining, "STATE_EVERY_SECONDS", 0)
        patched.setattr(pretraining.pretrain, "__defaults__", ("cpu", 0))
        calls, batch = [], pretraining._batch

        def batch_until_killed(*args, **kwargs):
            calls.append(1)
            if len(calls) > TWO_STAGES[0].steps + 1:
                raise KeyboardInterrupt
            return batch(*args, **kwargs)

        patched.setattr(pretraining, "_batch", batch_until_killed)
        with pytest.raises(KeyboardInterrupt):
            pretrain_recipe(TWO_STAGES, out)
    first = tmp_path / "resumed-stage1.safetensors"
    first_bytes, first_record = first.read_bytes(), first.with_suffix(".json").read_text()
    assert round_state_path(out).is_file() and not out.exists()

    trained = []
    real_pretrain = pretraining.pretrain
    monkeypatch.setattr(pretraining, "pretrain", lambda cfg, path, **kw: trained.append(path) or real_pretrain(cfg, path, **kw))
    report = pretrain_recipe(TWO_STAGES, out)
    assert trained == [out]  # stage 1 kept, not trained again; stage 2 resumed from its state
    assert first.read_bytes() == first_bytes and first.with_suffix(".json").read_text() == first_record
    expected, got = load_file(str(whole)), load_file(str(out))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    record = json.loads(out.with_suffix(".json").read_text())
    assert [s["stage"] for s in record["stages"]] == [1, 2]
    assert record["stages"][0] == {"stage": 1, **json.loads(first_record)}
    assert record["stages"][1]["segments"][1]["from_step"] == 1 and report["final"] == record["stages"][1]["final"]

    # Run once more: everything is finished, nothing trains, and the record is the same.
    trained.clear()
    again = pretrain_recipe(TWO_STAGES, out)
    assert trained == [] and json.dumps(again) == json.dumps(report)  # what the command prints
    assert json.loads(out.with_suffix(".json").read_text()) == record


def test_a_stage_file_of_another_recipe_or_start_is_not_finished(tmp_path) -> None:
    from benchmarks.pretrain import finished_stages

    out = tmp_path / "x.safetensors"
    pretrain_recipe(TWO_STAGES, out)
    assert [r["stage"] for r in finished_stages(TWO_STAGES, out)] == [1, 2]
    assert finished_stages(TWO_STAGES, out, first_stage=1) == finished_stages(
        [dataclasses.replace(s, workers=3) for s in TWO_STAGES], out)  # the machine's, not the recipe's
    assert finished_stages([dataclasses.replace(TWO_STAGES[0], lr=5e-4), TWO_STAGES[1]], out) == []
    # stage 1 trained again by another recipe: stage 2's file no longer continues it
    pretrain(dataclasses.replace(TWO_STAGES[0], seed=7), tmp_path / "x-stage1.safetensors")
    assert finished_stages(TWO_STAGES, out) == []
    assert [r["stage"] for r in finished_stages([dataclasses.replace(TWO_STAGES[0], seed=7), TWO_STAGES[1]], out)] == [1]
    # a record beside the checkpoint that was not written with it
    (tmp_path / "x-stage1.json").write_text(json.dumps({"history": [], "recipe": {}, "final": {}}))
    assert finished_stages([dataclasses.replace(TWO_STAGES[0], seed=7), TWO_STAGES[1]], out) == []
    (tmp_path / "x-stage1.safetensors").write_text("not a checkpoint")
    assert finished_stages(TWO_STAGES, out) == []
