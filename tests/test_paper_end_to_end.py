"""The paper preset end to end: DINOv2-L/16 + Mask2Former on a world at the real datasets' resolutions.

No DINOv2 weights exist here, so the backbone is randomly initialised, which must be asked for by name
(`--weights dinov2_vitl14=random`): the numbers mean nothing, the data path and the model are the paper's.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.cli_helpers import error_line, run_cli


def test_a_backbone_without_weights_is_refused_unless_random_initialisation_is_asked_for(tmp_path, capsys):
    from benchmarks.config import load_experiment
    from benchmarks.runner import check_weights_given, plan_runs

    runs = tmp_path / "runs"
    code, _, err = run_cli(["run", "--preset", "paper", "--data-root", str(tmp_path), "--methods", "rein",
                            "--results-dir", str(runs)], capsys)
    assert code == 2
    assert "--weights dinov2_vitl14=random" in error_line(err)
    assert not runs.exists()  # refused before anything is written
    asked = load_experiment("paper", ["model.weights=dinov2_vitl14=random"])
    check_weights_given(asked, plan_runs(asked, "rein"))  # named: allowed
    shipped = load_experiment("smoke", [])  # the proxy ViT's shipped weights need no naming
    check_weights_given(shipped, plan_runs(shipped, "freeze"))


@pytest.mark.slow
def test_the_paper_preset_trains_and_scores_at_the_real_resolutions(tmp_path, monkeypatch):
    """Two iterations of Rein at batch 1, one image per target: each target's input is resized as the
    protocol says and scored on every labelled pixel of its label at the label's own resolution.

    Trimmed in the model only: DINOv2-S (the registered `dinov2_vits14`, converted to patch 16 like the
    paper's -L) under the paper's Mask2Former. DINOv2-L costs about 0.7 TFLOP per 512² window, 25 s on two
    busy CPU cores, so this test would take over 10 minutes with it (docs/performance.md measures it).
    """
    from benchmarks import protocol
    from benchmarks.cli import main
    from datasets.registry import get_adapter
    from datasets.synthetic import generate_world

    root = tmp_path / "paper"
    generate_world(root, size="paper_tiny", seed=0)
    inputs = []
    slide_logits = protocol.slide_logits

    def recording(model, image, cfg, num_classes):
        inputs.append(tuple(image.shape[-2:]))
        return slide_logits(model, image, cfg, num_classes)

    monkeypatch.setattr(protocol, "slide_logits", recording)
    code = main(["run", "--preset", "paper", "--data-root", str(root), "--methods", "rein",
                 "--backbones", "dinov2_vits14", "--weights", "dinov2_vits14=random",
                 "--set", "train.iters=2", "--set", "train.batch_size=1",
                 "--set", "train.log_interval=1", "--set", "data.eval_limit=1", "--num-workers", "0",
                 "--results-dir", str(tmp_path / "runs"), "--no-progress"])
    assert code == 0
    (path,) = (tmp_path / "runs").rglob("*.json")
    result = json.loads(path.read_text())
    assert result["status"] == "finished", result.get("failure")
    assert result["backbone"] == "dinov2_vits14" and result["head"] == "mask2former"
    assert result["experiment"]["model"]["weights"] == ["dinov2_vits14=random"]
    assert result["provenance"]["weights"]["file"] is None
    assert [h["iter"] for h in result["history"]] == [1, 2]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result["history"])

    # inference inputs: Cityscapes fitted to 1024×512, BDD100K native, Mapillary (4896×2752) halved then fitted
    assert inputs == [(512, 1024), (720, 1280), (512, 911)]
    labels = {
        "cityscapes": get_adapter("cityscapes")(root, "val"),
        "bdd100k": get_adapter("bdd100k")(root, "val"),
        "mapillary": get_adapter("mapillary")(root, "val", half_resolution=True),
    }
    assert set(result["targets"]) == set(labels)
    for name, adapter in labels.items():
        label = adapter.load_label(adapter.pairs()[0])
        expected_shape = {"cityscapes": (1024, 2048), "bdd100k": (720, 1280), "mapillary": (1376, 2448)}[name]
        assert label.shape == expected_shape
        target = result["targets"][name]
        assert target["num_images"] == 1
        assert target["scored_pixels"] == int(np.count_nonzero(label != 255)), name
        assert 0.0 <= target["miou"] <= 100.0
    assert set(result["profile"]["eval_seconds_per_image"]) == set(labels)
    assert all(s > 0 for s in result["profile"]["eval_seconds_per_image"].values())
    assert 0 < result["timings"]["data_wait_s"] < result["timings"]["train_s"]
    assert result["profile"]["peak_memory_mb"] > 0
    assert result["profile"]["world_size"] == 1  # the MFU of a run on W devices is over W peaks
