"""The protocol transforms: sizes, crop rules, padding, determinism from the rng, eval fitting."""

from __future__ import annotations

import numpy as np
import torch

from datasets.transforms import (
    EvalTransform,
    TrainTransform,
    fit_size,
    hsv_u8_to_rgb,
    photometric_distortion,
    resize_pair,
    rgb_to_hsv_u8,
    short_edge_size,
)


def sample(h=64, w=128, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lab = (np.arange(h * w).reshape(h, w) // 97 % 19).astype(np.uint8)
    return img, lab


def test_short_edge_scales_and_cap():
    t = TrainTransform(crop_size=512, scale_base=512, max_long_edge=2048)
    assert t.short_edges[0] == 256 and t.short_edges[-1] == 1024 and len(t.short_edges) == 16
    assert 307 in t.short_edges and 358 in t.short_edges
    assert short_edge_size(1052, 1914, 1024, 2048) == (1024, 1863)
    # cap wins and keeps the aspect ratio
    assert short_edge_size(1000, 4000, 1000, 2048) == (512, 2048)


def test_train_transform_shapes_pad_and_determinism():
    img, lab = sample(32, 64)
    t = TrainTransform(crop_size=48, scale_base=32, scale_steps=(5,), max_long_edge=1000)  # short edge 16
    x, y = t(img, lab, np.random.default_rng(0))
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert y.shape == (48, 48) and y.dtype == torch.int64
    assert (y[16:] == 255).all() and (x[:, 16:] == 0).all()  # padded below the 16-row image
    x2, y2 = t(img, lab, np.random.default_rng(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = t(img, lab, np.random.default_rng(1))
    assert not torch.equal(x, x3)


def test_cat_max_ratio_avoids_single_class_crops():
    img = np.zeros((64, 256, 3), np.uint8)
    lab = np.zeros((64, 256), np.uint8)
    lab[:, 224:] = 5  # a thin stripe of a second class
    t = TrainTransform(crop_size=48, scale_base=64, scale_steps=(10,), max_long_edge=1000, flip_prob=0.0, photometric=False)
    hits = 0
    for s in range(20):
        _, y = t(img, lab, np.random.default_rng(s))
        vals, counts = np.unique(y.numpy(), return_counts=True)
        hits += len(vals) > 1 and counts.max() / counts.sum() < 0.75
    assert hits >= 10  # without the re-draw almost no crop would contain two classes


def test_flip_and_normalize():
    img, _ = sample(16, 32)
    lab = np.broadcast_to((np.arange(32) % 19).astype(np.uint8), (16, 32)).copy()  # columns identifiable
    t = TrainTransform(crop_size=16, scale_base=16, scale_steps=(10,), max_long_edge=None, cat_max_ratio=1.0,
                       flip_prob=1.0, photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    # short edge 16 = native; a 16x32 image cropped to 16x16 then flipped
    x, y = t(img, lab, np.random.default_rng(0))
    x0 = None
    for off in range(17):
        if np.array_equal(y.numpy(), lab[:, off:off + 16][:, ::-1]):
            x0 = off
    assert x0 is not None
    np.testing.assert_allclose(x.numpy().transpose(1, 2, 0), img[:, x0:x0 + 16][:, ::-1].astype(np.float32))


def test_images_are_normalised_with_imagenets_mean_and_std_in_rgb_order():
    # The VFMs were pretrained on inputs normalised so (ImageNet's statistics, RGB); the transforms' defaults
    # are what every preset feeds them. Literal values, not the module's constants.
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 0, 128  # red, green, blue
    expected = [(255 - 0.485 * 255) / (0.229 * 255), (0 - 0.456 * 255) / (0.224 * 255), (128 - 0.406 * 255) / (0.225 * 255)]
    x, _ = EvalTransform(None)(image, np.zeros((2, 2), np.uint8))
    np.testing.assert_allclose(x[:, 0, 0].numpy(), expected, rtol=1e-5)
    t = TrainTransform(crop_size=2, scale_base=2, scale_steps=(10,), max_long_edge=None, cat_max_ratio=1.0,
                       flip_prob=0.0, photometric=False)
    x, _ = t(image, np.zeros((2, 2), np.uint8), np.random.default_rng(0))
    np.testing.assert_allclose(x[:, 0, 0].numpy(), expected, rtol=1e-5)


def test_hsv_roundtrip_and_photometric_bounds():
    img, _ = sample(32, 32)
    back = hsv_u8_to_rgb(rgb_to_hsv_u8(img))
    assert np.abs(back.astype(int) - img.astype(int)).max() <= 6
    out = photometric_distortion(img, np.random.default_rng(3))
    assert out.dtype == np.uint8 and out.shape == img.shape


def test_eval_transform_fits_box_and_keeps_label():
    img, lab = sample(100, 400)
    assert fit_size(1024, 2048, (1024, 512)) == (512, 1024)
    assert fit_size(720, 1280, (1024, 512)) == (512, 910)
    x, y = EvalTransform((64, 32))(img, lab)
    assert x.shape == (3, 16, 64) and y.shape == (100, 400)
    x, y = EvalTransform(None)(img, lab)
    assert x.shape == (3, 100, 400)


def test_the_cv2_backend_is_opencvs_resize_and_pillow_antialiases_when_shrinking():
    import cv2
    from PIL import Image

    img, lab = sample(h=96, w=160)
    size = (60, 36)  # shrinking by 2.67: where antialiasing differs most
    image, label = resize_pair(img, lab, size, "cv2")
    assert np.array_equal(image, cv2.resize(img, size, interpolation=cv2.INTER_LINEAR))
    assert np.array_equal(label, cv2.resize(lab, size, interpolation=cv2.INTER_NEAREST))
    soft, soft_label = resize_pair(img, lab, size, "pillow")
    assert np.array_equal(soft, np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR)))
    assert np.array_equal(soft_label, np.asarray(Image.fromarray(lab).resize(size, Image.NEAREST)))
    # Pillow averages the noise away when shrinking; OpenCV's bilinear samples it.
    assert soft.astype(float).std() < 0.8 * image.astype(float).std()


def test_transforms_resize_with_the_backend_they_are_given():
    import cv2

    img, lab = sample(h=64, w=128)
    for backend in ("cv2", "pillow"):
        out, _ = EvalTransform((32, 16), resize=backend)(img, lab)
        expected, _ = EvalTransform(None)(resize_pair(img, None, (32, 16), backend)[0], lab)
        assert torch.equal(out, expected), backend
    # Short edge 16: the image shrinks to 32×16, then a 16×16 crop of it.
    shrink = TrainTransform(crop_size=16, scale_base=16, scale_steps=(10,), max_long_edge=None, flip_prob=0.0,
                            photometric=False, cat_max_ratio=1.0, resize="cv2")
    resized = cv2.resize(img, (32, 16), interpolation=cv2.INTER_LINEAR)
    out, _ = shrink(img, lab, np.random.default_rng(0))
    crops = [EvalTransform(None)(resized[:, x:x + 16], lab[:16, :16])[0] for x in range(17)]
    assert any(torch.equal(out, crop) for crop in crops)


def test_the_resize_backends_are_the_settings_choices():
    from benchmarks.config import CHOICES
    from datasets.transforms import RESIZE_BACKENDS

    assert tuple(CHOICES["data.resize"]) == RESIZE_BACKENDS


def test_the_hsv_backends_are_the_settings_choices():
    from benchmarks.config import CHOICES
    from datasets.transforms import HSV_BACKENDS

    assert tuple(CHOICES["data.hsv"]) == HSV_BACKENDS


class _ScriptedDraws:
    """An rng whose draws are given in order: the photometric distortion's branches chosen by the test."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def integers(self, *args, **kwargs):
        return self.draws.pop(0)

    def uniform(self, *args, **kwargs):
        return self.draws.pop(0)

    def random(self):
        return 1.0  # never below a flip probability


def test_the_cv2_hsv_backend_is_opencvs_round_trip_as_in_the_reference():
    """Saturation ×1.3 then hue +7 (brightness and contrast not drawn): with "cv2" each step goes through
    `cv2.cvtColor`, as mmcv's bgr2hsv/hsv2bgr do; the harness's own conversion ("numpy") lands elsewhere."""
    import cv2

    img, _ = sample(48, 48, seed=5)
    draws = (0, 0, 1, 1.3, 1, 7, 0)  # no brightness; mode 0; saturation 1.3; hue +7; no contrast last
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * 1.3, 0, 255).astype(np.uint8)
    expected = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    hsv = cv2.cvtColor(expected, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + 7) % 180
    expected = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    np.testing.assert_array_equal(photometric_distortion(img, _ScriptedDraws(*draws), hsv="cv2"), expected)
    assert not np.array_equal(photometric_distortion(img, _ScriptedDraws(*draws), hsv="numpy"), expected)


def test_the_train_transform_and_the_preset_pass_the_hsv_backend_on():
    from benchmarks.config import load_experiment

    img, lab = sample(32, 32, seed=2)
    outputs = {}
    for backend in ("cv2", "numpy"):
        transform = TrainTransform(crop_size=32, scale_base=32, scale_steps=(10,), max_long_edge=None,
                                   cat_max_ratio=1.0, flip_prob=0.0, hsv=backend)
        draws = [0, 0, 0, 0, 0, 1, 1.4, 0, 0]  # scale, crop y, crop x, then the photometric draws: saturation only
        outputs[backend] = transform(img, lab, _ScriptedDraws(*draws))[0]
    assert not torch.equal(outputs["cv2"], outputs["numpy"])
    assert load_experiment("paper").data.hsv == "cv2"
    assert load_experiment("proxy").data.hsv == load_experiment("smoke").data.hsv == "numpy"


def test_opencv_runs_one_thread_in_a_loader_worker():
    """The thread plan counts a loader worker as one core; OpenCV's own pool would be as wide as the machine
    in every worker (the reference's runtime config turns it off: mmengine's opencv_num_threads=0)."""
    import cv2

    from datasets.transforms import resize_pair

    class Resizing(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            resize_pair(np.zeros((8, 8, 3), np.uint8), None, (4, 4), "cv2")
            return cv2.getNumThreads()

    threads_here = cv2.getNumThreads()
    loader = torch.utils.data.DataLoader(Resizing(), batch_size=None, num_workers=1)
    assert [int(n) for n in loader] == [1, 1]
    resize_pair(np.zeros((8, 8, 3), np.uint8), None, (4, 4), "cv2")
    assert cv2.getNumThreads() == threads_here  # the main process's pool is left as it was
