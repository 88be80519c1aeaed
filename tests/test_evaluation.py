"""Scoring exactly as the protocol says: confusion matrix per target, nan-mean IoU, sliding windows."""

import math

import pytest
import torch
from torch import nn

from benchmarks.config import EvalConfig
from benchmarks.metrics import iou_from_confusion, miou_percent
from benchmarks.protocol import evaluate, slide_logits, window_origins


class PixelwiseModel(nn.Module):
    """A 1×1 convolution: translation-equivariant and local, so windows must reproduce the whole image."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.calls = []

    def predict(self, images):
        self.calls.append(tuple(images.shape))
        return self.conv(images)


class LabelEcho(nn.Module):
    """Predicts whatever class channel 0 of the image encodes (for hand-computed confusion matrices)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def predict(self, images):
        cls = images[:, 0].round().long().clamp(0, self.num_classes - 1)
        return torch.nn.functional.one_hot(cls, self.num_classes).permute(0, 3, 1, 2).float()


def test_window_origins_follow_mmseg_grid():
    # mmseg: h_grids = max(h - crop + stride - 1, 0) // stride + 1, last window flush with the edge
    assert window_origins(512, 512, 341) == [0]
    assert window_origins(1024, 512, 341) == [0, 341, 512]
    assert window_origins(683, 512, 341) == [0, 171]
    assert window_origins(300, 512, 341) == [0]


@pytest.mark.parametrize("size, batch_windows", [((64, 100), 2), ((40, 30), 8), ((48, 48), 1)])
def test_sliding_window_equals_whole_image_for_a_local_model(size, batch_windows):
    torch.manual_seed(0)
    model = PixelwiseModel()
    image = torch.randn(1, 3, *size)
    cfg = EvalConfig(crop_size=32, stride=21, batch_windows=batch_windows, fit_size=(0, 0))
    scores = slide_logits(model, image, cfg, num_classes=4)
    torch.testing.assert_close(scores, model.conv(image), rtol=1e-5, atol=1e-5)
    assert all(shape[0] <= batch_windows and shape[2:] == (32, 32) for shape in model.calls)


def test_iou_and_nan_mean():
    confusion = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    iou = iou_from_confusion(confusion)
    assert iou[0].item() == pytest.approx(5 / (5 + 1 + 2))
    assert iou[1].item() == pytest.approx(3 / (3 + 2 + 1))
    assert math.isnan(iou[2].item())  # absent from prediction and ground truth: excluded
    assert miou_percent(iou) == pytest.approx(100 * (5 / 8 + 3 / 6) / 2)


def test_evaluate_matches_a_hand_computed_confusion_matrix():
    num_classes = 3
    # Two images; the "prediction" is encoded in the image, the labels differ in known places.
    pred_a = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 1]])
    label_a = torch.tensor([[0, 1, 1, 1], [2, 255, 1, 0]])
    pred_b = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    label_b = torch.tensor([[1, 1, 255, 255], [0, 0, 2, 2]])
    samples = [
        {"image": torch.stack([p.float()] * 3), "label": lab, "name": str(i)}
        for i, (p, lab) in enumerate([(pred_a, label_a), (pred_b, label_b)])
    ]
    hand = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for pred, label in [(pred_a, label_a), (pred_b, label_b)]:
        keep = label != 255
        for t, p in zip(label[keep].tolist(), pred[keep].tolist(), strict=True):
            hand[t, p] += 1
    expected_iou = iou_from_confusion(hand)

    cfg = EvalConfig(crop_size=4, stride=3, batch_windows=4, fit_size=(0, 0))
    result = evaluate(LabelEcho(num_classes), samples, cfg, torch.device("cpu"), num_classes, class_names=("a", "b", "c"))
    assert result["num_images"] == 2
    assert result["miou"] == pytest.approx(miou_percent(expected_iou))
    for name, value in zip("abc", expected_iou.tolist(), strict=True):
        assert result["per_class_iou"][name] == pytest.approx(value * 100)


def test_predictions_are_resized_to_the_label_resolution():
    # The image is half the label's size (Cityscapes: inferred at 1024×512, scored at 2048×1024).
    num_classes = 2
    image = torch.zeros(3, 4, 4)
    image[0, :, 2:] = 1  # right half predicts class 1
    label = torch.zeros(8, 8, dtype=torch.long)
    label[:, 4:] = 1
    cfg = EvalConfig(crop_size=4, stride=3, batch_windows=1, fit_size=(0, 0))
    result = evaluate(LabelEcho(num_classes), [{"image": image, "label": label, "name": "x"}], cfg, torch.device("cpu"), num_classes)
    assert result["miou"] == pytest.approx(100.0)
