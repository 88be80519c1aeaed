"""The linear probe of frozen features: which label a token gets, that the probe finds what the features
hold (and not more), and the tool end to end on the tiny world."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest
import torch

from benchmarks.linear_probe import fit_and_score, pixel_patches, token_samples

ROOT = Path(__file__).resolve().parent.parent


class Frames(torch.utils.data.Dataset):
    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def test_a_token_is_labelled_by_the_pixel_at_the_centre_of_its_cell() -> None:
    label = torch.zeros(20, 27, dtype=torch.uint8)  # cropped to 16 × 24: two by three cells of 8
    for row in range(2):
        for col in range(3):
            label[row * 8 + 4, col * 8 + 4] = 1 + row * 3 + col  # only the centre pixel carries the cell's id
    label[12, 12] = 255  # the centre of cell (1, 1): ignored, so that token is left out
    frames = Frames([{"image": torch.randn(3, 20, 27), "label": label}])
    features, labels = token_samples(frames, pixel_patches(8), patch=8, images=1)
    assert labels.tolist() == [1, 2, 3, 4, 6]
    assert features.shape == (5, 3 * 8 * 8)


def test_a_token_of_an_image_fitted_smaller_than_its_label_takes_the_label_at_its_centre() -> None:
    # An evaluation transform fits the image into its box and keeps the label at full size (here twice as
    # large): a token's label is read where its centre falls on the label, not at the image's pixel grid.
    label = torch.zeros(40, 48, dtype=torch.uint8)
    for row in range(2):
        for col in range(3):
            label[row * 16 + 8, col * 16 + 8] = 1 + row * 3 + col  # the centres of the cells on the label
    frames = Frames([{"image": torch.randn(3, 20, 24), "label": label}])  # cells of 8 → 16 on the label
    _, labels = token_samples(frames, pixel_patches(8), patch=8, images=1)
    assert labels.tolist() == [1, 2, 3, 4, 5, 6]


def test_a_coarser_level_of_an_odd_grid_takes_the_label_at_each_feature_s_centre() -> None:
    # The pyramid's coarsest level halves the token grid (29 → 14 columns, the odd one dropped): its
    # feature i sits at pixel (2i + 1)·p; a stride from the sizes (232 // 14) gave 15 centres for 14 features.
    patch, columns = 8, 29
    label = torch.zeros(16, columns * patch, dtype=torch.uint8)
    for i in range(columns // 2):
        label[8, (2 * i + 1) * patch] = i % 19  # only each coarse feature's centre pixel carries its id
    frames = Frames([{"image": torch.randn(3, 16, columns * patch), "label": label}])

    def coarse(images: torch.Tensor) -> torch.Tensor:
        tokens = pixel_patches(patch)(images)[None]
        return torch.nn.functional.interpolate(tokens, scale_factor=0.5, mode="bilinear", align_corners=False)[0]

    features, labels = token_samples(frames, coarse, patch=patch, images=1)
    assert features.shape[0] == labels.shape[0] == columns // 2
    assert labels.tolist() == [i % 19 for i in range(columns // 2)]


def test_pixel_patches_are_the_patches_values() -> None:
    images = torch.arange(2 * 3 * 8 * 16, dtype=torch.float).view(2, 3, 8, 16)[:1]
    patches = pixel_patches(8)(images)
    assert patches.shape == (3 * 64, 1, 2)
    assert torch.equal(patches[:, 0, 1], images[0, :, :, 8:].reshape(-1))


def _clusters(per_class: list[int], separated: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    noise = torch.randn(len(labels), 8, generator=generator)
    return (noise + 6.0 * torch.eye(8)[labels] if separated else noise), labels


def test_the_probe_scores_separable_features_perfectly_and_noise_at_chance() -> None:
    counts = [2000, 400, 40, 10]  # a rare class of 0.4 %: the balanced loss must still learn it
    separable = fit_and_score(_clusters(counts, True, 0), _clusters(counts, True, 1), num_classes=4)
    # every token of every class found; the rare class's IoU pays for a few borrowed tokens (90.9 here)
    assert min(separable.recall) > 99 and separable.miou > 95
    noise = fit_and_score(_clusters(counts, False, 0), _clusters(counts, False, 1), num_classes=4)
    assert noise.miou < 40
    assert (separable.train_tokens, separable.test_tokens) == (2450, 2450)


def test_a_class_without_tokens_is_not_scored() -> None:
    score = fit_and_score(_clusters([50, 50], True, 0), _clusters([50, 50], True, 1), num_classes=3)
    assert score.recall[2] != score.recall[2] and score.miou > 99  # NaN, left out of the mean


def _tool():
    loader = importlib.machinery.SourceFileLoader("linear_probe_tool", str(ROOT / "tools" / "linear-probe"))
    spec = importlib.util.spec_from_loader("linear_probe_tool", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_tool_prints_a_row_per_feature(tiny_world, capsys) -> None:
    code = _tool().main(["--preset", "smoke", "--set", f"data.root={str(tiny_world)!r}", "--set", "data.source_holdout=2",
                         "--train-images", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert code == 0 and len(rows) == 3  # the header, raw pixels, the shipped proxy ViT
    assert "person" in rows[0] and rows[1].startswith("| raw pixels") and "proxy_vit" in rows[2]


@pytest.mark.parametrize(("argv", "named"), [(["--level", "4"], "--level 4"), (["--train-images", "0"], "--train-images 0")])
def test_the_tool_refuses_bad_options_in_one_line(tiny_world, capsys, argv, named) -> None:
    code = _tool().main(["--preset", "smoke", "--set", f"data.root={str(tiny_world)!r}", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and named in err and len(err.strip().splitlines()) == 1


def test_the_tool_takes_the_options_its_errors_advise(tiny_world, tmp_path, monkeypatch, capsys) -> None:
    # The backbone's errors say "pass --weights NAME=PATH" and the data's "pass --data-root DIR": the tool refused both.
    from benchmarks.backbones import get_spec

    shipped = get_spec("proxy_vit").default_weights
    dated = tmp_path / "2026-12-07"  # a folder named like a TOML date was refused as one
    dated.symlink_to(tiny_world, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    code = _tool().main(["--preset", "smoke", "--data-root", dated.name, "--set", "data.source_holdout=2",
                         "--train-images", "2", "--no-pixels", "--weights", f"proxy_vit={shipped}"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| proxy_vit")]
    assert code == 0 and len(rows) == 1
    code = _tool().main(["--preset", "smoke", "--data-root", dated.name, "--set", "data.source_holdout=2",
                         "--weights", "dinov2_vitl14=x.pth"])
    err = capsys.readouterr().err
    assert code == 2 and "not the preset's backbone proxy_vit" in err and len(err.strip().splitlines()) == 1
