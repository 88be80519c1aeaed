"""The protocol's train and eval transforms (protocol.md "Data" and "Evaluation"), in PIL/numpy.

They follow mmseg's pipeline (the reference implementation of the Rein-family protocol):
RandomChoiceResize(ResizeShortestEdge, max_size) → RandomCrop(cat_max_ratio) → RandomFlip →
PhotoMetricDistortion → normalize → pad. All randomness comes from the ``rng`` argument, so a sample is
a pure function of (file, seed) and a resumed run sees the same crops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from datasets.labels import IGNORE_INDEX

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


def _opencv():
    """OpenCV, with its own thread pool off inside a data-loader worker: the thread plan gives a worker one core
    (mmengine's `opencv_num_threads=0`, which the reference's runtime config sets), where OpenCV would start a
    pool as wide as the machine in every worker."""
    import cv2

    if cv2.getNumThreads() > 1 and torch.utils.data.get_worker_info() is not None:
        cv2.setNumThreads(0)  # then getNumThreads() is 1: set once a worker
    return cv2


def _resize_cv2(array: np.ndarray, size_wh: tuple[int, int], labels: bool) -> np.ndarray:
    cv2 = _opencv()
    return cv2.resize(array, size_wh, interpolation=cv2.INTER_NEAREST if labels else cv2.INTER_LINEAR)


def _resize_pillow(array: np.ndarray, size_wh: tuple[int, int], labels: bool) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size_wh, Image.NEAREST if labels else Image.BILINEAR))


_RESIZERS = {"cv2": _resize_cv2, "pillow": _resize_pillow}

#: How images are resized (bilinear) and labels (nearest): "cv2" is mmcv's default backend, what the
#: reference pipeline runs (no antialiasing when shrinking; OpenCV's nearest samples floor(x·scale));
#: "pillow" antialiases when shrinking and samples pixel centres (what the proxy and smoke presets were
#: calibrated with).
RESIZE_BACKENDS = tuple(_RESIZERS)


def resize_pair(image: np.ndarray, label: np.ndarray | None, size_wh: tuple[int, int],
                backend: str = "cv2") -> tuple[np.ndarray, np.ndarray | None]:
    """Resize image bilinear and label nearest to (w, h) with `backend` (`RESIZE_BACKENDS`)."""
    if backend not in _RESIZERS:
        raise ValueError(f"resize backend {backend!r} is not one of {', '.join(RESIZE_BACKENDS)}")
    resize = _RESIZERS[backend]
    if (image.shape[1], image.shape[0]) != size_wh:
        image = resize(np.ascontiguousarray(image), size_wh, labels=False)
    if label is not None and (label.shape[1], label.shape[0]) != size_wh:
        label = resize(np.ascontiguousarray(label), size_wh, labels=True)
    return image, label


def short_edge_size(h: int, w: int, short: int, max_long: int | None) -> tuple[int, int]:
    """(new_h, new_w) with the short edge at ``short``, the long edge capped at ``max_long`` (cap wins).

    Same arithmetic as mmseg's ResizeShortestEdge (from detectron2), rounding half up.
    """
    scale = short / min(h, w)
    new_h, new_w = h * scale, w * scale
    if max_long is not None and max(new_h, new_w) > max_long:
        s = max_long / max(new_h, new_w)
        new_h, new_w = new_h * s, new_w * s
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def fit_size(h: int, w: int, box: tuple[int, int]) -> tuple[int, int]:
    """(new_h, new_w) rescaled keeping aspect so the image fits the (long, short) box, as mmcv.imrescale."""
    long_box, short_box = max(box), min(box)
    scale = min(long_box / max(h, w), short_box / min(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


# --------------------------------------------------------------------------------------------------
# Photometric distortion (mmseg PhotoMetricDistortion, OpenCV uint8 HSV convention: H in 0..179)
# --------------------------------------------------------------------------------------------------


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv_u8(img: np.ndarray) -> np.ndarray:
    """RGB uint8 → HSV uint8 with OpenCV's 8-bit ranges (H 0..179, S and V 0..255)."""
    rgb = img.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    diff = v - mn
    s = np.where(v > 0, diff * 255.0 / np.maximum(v, 1e-6), 0.0)
    safe = np.maximum(diff, 1e-6)
    h = np.where(v == r, 60.0 * (g - b) / safe, np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    h = np.where(diff == 0, 0.0, h)
    h = np.mod(h, 360.0)
    out = np.empty(img.shape, dtype=np.uint8)
    out[..., 0] = np.clip(np.round(h / 2.0), 0, 180).astype(np.uint8) % 180
    out[..., 1] = np.clip(np.round(s), 0, 255).astype(np.uint8)
    out[..., 2] = v.astype(np.uint8)
    return out


def hsv_u8_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hsv_u8`."""
    h = hsv[..., 0].astype(np.float32) * 2.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    c = v * s
    hp = h / 60.0
    x = c * (1 - np.abs(np.mod(hp, 2.0) - 1))
    m = v - c
    z = np.zeros_like(c)
    sector = np.floor(hp).astype(np.int64) % 6
    r = np.choose(sector, [c, x, z, z, x, c])
    g = np.choose(sector, [x, c, c, x, z, z])
    b = np.choose(sector, [z, z, x, c, c, x])
    rgb = np.stack([r + m, g + m, b + m], axis=-1)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _rgb_to_hsv_cv2(img: np.ndarray) -> np.ndarray:
    cv2 = _opencv()
    return cv2.cvtColor(img, cv2.COLOR_RGB2HSV)


def _hsv_to_rgb_cv2(hsv: np.ndarray) -> np.ndarray:
    cv2 = _opencv()
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


_HSV_CONVERSIONS = {"cv2": (_rgb_to_hsv_cv2, _hsv_to_rgb_cv2), "numpy": (rgb_to_hsv_u8, hsv_u8_to_rgb)}

#: How the photometric distortion converts RGB to HSV and back: "cv2" is OpenCV's `cvtColor`, what mmcv's
#: `bgr2hsv`/`hsv2bgr` call in the reference pipeline (on BGR images: the same HSV); "numpy" is this module's
#: own conversion with OpenCV's 8-bit ranges (what the proxy and smoke presets were calibrated with), one level
#: apart in a few per cent of values, which a saturation or hue step can widen to about ten grey levels.
HSV_BACKENDS = tuple(_HSV_CONVERSIONS)


def photometric_distortion(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
    hsv: str = "cv2",
) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness, then contrast first or last, saturation, hue (p=0.5 each),
    converting to HSV and back with `hsv` (`HSV_BACKENDS`)."""
    if hsv not in _HSV_CONVERSIONS:
        raise ValueError(f"HSV backend {hsv!r} is not one of {', '.join(HSV_BACKENDS)}")
    to_hsv, to_rgb = _HSV_CONVERSIONS[hsv]
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        channels = to_hsv(img)
        channels[..., 1] = _convert(channels[..., 1], alpha=rng.uniform(*saturation_range))
        img = to_rgb(channels)
    if rng.integers(2):
        channels = to_hsv(img)
        shift = int(rng.integers(-hue_delta, hue_delta, endpoint=False))
        channels[..., 0] = (channels[..., 0].astype(np.int64) + shift) % 180
        img = to_rgb(channels)
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    return img


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 → normalized float tensor [3, H, W] (RGB order)."""
    arr = (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def label_tensor(label: np.ndarray) -> torch.Tensor:
    """HxW uint8 → LongTensor [H, W]."""
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


class TrainTransform:
    """Random short-edge resize, random crop (cat_max_ratio), flip, photometric distortion, normalize, pad.

    Short edge = int(scale_base * x * 0.1) for x drawn uniformly from ``scale_steps`` (scale_base 512 →
    256..1024), long edge capped at ``max_long_edge`` keeping the aspect ratio.
    """

    def __init__(
        self,
        crop_size: int,
        scale_base: int,
        scale_steps: Sequence[int] = tuple(range(5, 21)),
        max_long_edge: int | None = None,
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        resize: str = "cv2",
        hsv: str = "cv2",
    ) -> None:
        self.crop_size = int(crop_size)
        self.resize = resize
        self.hsv = hsv
        self.scale_base = int(scale_base)
        self.scale_steps = tuple(scale_steps)
        self.short_edges = tuple(int(scale_base * x * 0.1) for x in self.scale_steps)
        self.max_long_edge = max_long_edge if max_long_edge is None else int(max_long_edge)
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = photometric
        self.mean = tuple(mean)
        self.std = tuple(std)

    def _crop_box(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        c = self.crop_size
        y0 = int(rng.integers(0, max(h - c, 0) + 1))
        x0 = int(rng.integers(0, max(w - c, 0) + 1))
        return y0, min(y0 + c, h), x0, min(x0 + c, w)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        short = self.short_edges[int(rng.integers(len(self.short_edges)))]
        h, w = image.shape[:2]
        new_h, new_w = short_edge_size(h, w, short, self.max_long_edge)
        image, label = resize_pair(image, label, (new_w, new_h), self.resize)

        box = self._crop_box(new_h, new_w, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = label[box[0]:box[1], box[2]:box[3]]
                values, counts = np.unique(crop, return_counts=True)
                counts = counts[values != IGNORE_INDEX]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._crop_box(new_h, new_w, rng)
        image = image[box[0]:box[1], box[2]:box[3]]
        label = label[box[0]:box[1], box[2]:box[3]]

        if rng.random() < self.flip_prob:
            image = image[:, ::-1]
            label = label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng, hsv=self.hsv)

        image_t = to_tensor(image, self.mean, self.std)
        label_t = label_tensor(label)
        c = self.crop_size
        ph, pw = c - image_t.shape[1], c - image_t.shape[2]
        if ph > 0 or pw > 0:
            image_t = torch.nn.functional.pad(image_t, (0, pw, 0, ph), value=0.0)
            label_t = torch.nn.functional.pad(label_t, (0, pw, 0, ph), value=IGNORE_INDEX)
        return image_t, label_t


class EvalTransform:
    """Resize the image (keep aspect) to fit ``fit_size`` = (long, short), or keep it native (None).

    The label is NOT resized: predictions are resized to the label and scored at its resolution.
    """

    def __init__(self, fit_size: tuple[int, int] | None, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                 resize: str = "cv2") -> None:
        self.fit_size = None if fit_size is None else (int(fit_size[0]), int(fit_size[1]))
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.resize = resize

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fit_size is not None:
            new_h, new_w = fit_size(image.shape[0], image.shape[1], self.fit_size)
            image, _ = resize_pair(image, None, (new_w, new_h), self.resize)
        return to_tensor(image, self.mean, self.std), label_tensor(label)


def eval_transform_for(adapter: object, fit: tuple[int, int] | None, mean: Sequence[float] = MEAN,
                       std: Sequence[float] = STD, resize: str = "cv2") -> EvalTransform:
    """The eval transform a target's `eval_preparation` asks for, with the (configurable) fit box and
    resize backend."""
    prep = getattr(adapter, "eval_preparation", None)
    box = prep.fit_box(fit) if prep is not None and fit is not None else None
    return EvalTransform(box, mean, std, resize)
