"""Seconds per training step and per evaluated image, measured on the protocol's own code paths.

Per-step times come from a stamp taken (after a device synchronisation) when each step begins, so
warm-up steps are dropped; `summarize` reports the median and inter-quartile range of the rest.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.config import Experiment
from benchmarks.resources import synchronize
from benchmarks.synthetic_inputs import SyntheticSource, eval_image_size

NUM_CLASSES = 19


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and inter-quartile range (the spread that ignores a stray slow repeat)."""
    if not samples:
        return {"median": None, "q1": None, "q3": None, "iqr": None, "n": 0}
    if len(samples) == 1:
        q1 = q3 = samples[0]
    else:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median": statistics.median(samples), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(samples)}


class _EnoughSteps(Exception):
    """Raised from the step hook once the timed steps are done: ends `protocol.train` early."""


def time_training_steps(model, method, exp: Experiment, device: torch.device, warmup: int, repeats: int,
                        start_fraction: float = 0.5, each_step: Callable[[], None] | None = None) -> list[float]:
    """Seconds per step of the protocol's training loop, warm-up steps dropped.

    Runs `benchmarks.protocol.train` itself (the real step path, hooks and schedule included) on
    in-memory batches, resumed at `start_fraction` of the schedule. The method's `on_step` is
    wrapped to stamp the time at each step's start (after a device synchronisation, so the stamp
    closes the previous step's device work) and to stop the loop after the timed steps.
    `each_step` is called at every stamp (a profiler's `step`).
    """
    from benchmarks.protocol import TrainState, train

    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, num_workers=0))
    source = SyntheticSource(exp.data.crop_size, count=exp.train.batch_size)
    stamps: list[float] = []
    needed = warmup + repeats + 1
    original = method.on_step

    def stamped_on_step(step: int, ctx: Any) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())
        if each_step is not None:
            each_step()
        if len(stamps) >= needed:
            raise _EnoughSteps
        original(step, ctx)

    start = min(int(exp.train.iters * start_fraction), max(exp.train.iters - needed, 0))
    if exp.train.iters - start < needed:  # a short schedule: stretch it, the step is the same
        exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, iters=start + needed))
    method.on_step = stamped_on_step
    try:
        train(model, method, source, exp, device, state=TrainState(step=start), progress=False)
    except _EnoughSteps:
        pass
    finally:
        del method.on_step
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return steps[warmup:]


def time_inference(model, exp: Experiment, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per target image of the protocol's sliding-window inference."""
    from benchmarks.protocol import autocast, autocast_dtype, slide_logits

    amp = autocast_dtype(exp.train.amp, device)
    height, width = eval_image_size(exp)
    image = torch.randn(1, 3, height, width, device=device)
    model.eval()
    seconds = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            synchronize(device)
            started = time.perf_counter()
            with autocast(device, amp):
                slide_logits(model, image, exp.eval, NUM_CLASSES)
            synchronize(device)
            if i >= warmup:
                seconds.append(time.perf_counter() - started)
    return seconds
