"""Sliding-window inference as evaluated: windows of one image batched vs one at a time."""

from __future__ import annotations

import dataclasses
import statistics
import time

import pytest
import torch

from benchmarks.method import build_method
from benchmarks.model import build_model
from benchmarks.protocol import slide_logits
from benchmarks.synthetic_inputs import eval_image_size, window_count

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def frozen_model(proxy_exp):
    torch.manual_seed(0)
    model = build_model(proxy_exp, build_method("freeze"))
    return model.eval()


def _image(exp, scale: int = 1) -> torch.Tensor:
    height, width = eval_image_size(exp)
    return torch.randn(1, 3, height * scale, width * scale)


@pytest.mark.parametrize("batch_windows", [1, 8])
def test_slide_inference(benchmark, proxy_exp, frozen_model, batch_windows):
    cfg = dataclasses.replace(proxy_exp.eval, batch_windows=batch_windows)
    image = _image(proxy_exp, scale=2)  # twice the evaluated size; its window count is recorded below
    benchmark.extra_info["windows"] = window_count(image.shape[2], image.shape[3], cfg.crop_size, cfg.stride)

    def infer():
        with torch.inference_mode():
            slide_logits(frozen_model, image, cfg, 19)

    benchmark.pedantic(infer, rounds=5, iterations=1, warmup_rounds=1)


def test_batched_over_unbatched_windows(benchmark, proxy_exp, frozen_model):
    """Both settings in one run, alternating, so shared-machine load hits them alike; ratio in extra_info."""
    image = _image(proxy_exp, scale=2)
    times = {1: [], 8: []}
    with torch.inference_mode():
        for _ in range(6):
            for batch_windows in times:
                cfg = dataclasses.replace(proxy_exp.eval, batch_windows=batch_windows)
                started = time.perf_counter()
                slide_logits(frozen_model, image, cfg, 19)
                times[batch_windows].append(time.perf_counter() - started)
    one, eight = statistics.median(times[1][1:]), statistics.median(times[8][1:])
    benchmark.extra_info.update(unbatched_s=one, batched_s=eight, speedup=one / eight)
    print(f"\nsliding window {tuple(image.shape[2:])}: one window at a time {one * 1e3:.1f} ms, "
          f"8 at a time {eight * 1e3:.1f} ms, speed-up {one / eight:.2f}x")
    cfg = dataclasses.replace(proxy_exp.eval, batch_windows=8)

    def infer():
        with torch.inference_mode():  # as evaluation runs it: no autograd graph through the head
            slide_logits(frozen_model, image, cfg, 19)

    benchmark.pedantic(infer, rounds=3, iterations=1, warmup_rounds=1)
