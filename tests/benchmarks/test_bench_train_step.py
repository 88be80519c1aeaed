"""Training step of every registered method at proxy scale, and the harness's own overhead."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from benchmarks.method import TrainContext, available_methods, build_method
from benchmarks.model import build_model
from benchmarks.protocol import autocast, autocast_dtype, build_optimizer, poly_lr_factor
from tests.benchmarks.conftest import proxy_batch

pytestmark = pytest.mark.bench
DEVICE = torch.device("cpu")


def _model(exp, name: str, overrides: dict | None = None):
    torch.manual_seed(0)
    method = build_method(name, {**exp.methods.get(name, {}), **(overrides or {})})
    model = build_model(exp, method)
    model.train()
    return model, method


# FisherTune's step is timed in its selective phase, reached through its own hooks; its DR-FIM
# estimate's cost does not change the step's, so two batches stand in for the paper's 50.
BENCH_OVERRIDES = {"fishertune": {"estimation_batches": 2}}


@pytest.mark.parametrize("method_name", sorted(available_methods()))
def test_train_step(benchmark, proxy_exp, method_name):
    """loss → backward → AdamW, with the method's hooks (before_training, on_step, after the step) as the protocol runs them."""
    model, method = _model(proxy_exp, method_name, BENCH_OVERRIDES.get(method_name))
    optimizer = build_optimizer(method.param_groups(model, proxy_exp.train.weight_decay), proxy_exp.train, DEVICE)
    images, labels = proxy_batch(proxy_exp)
    amp = autocast_dtype(proxy_exp.train.amp, DEVICE)

    def loss_of(batch):
        with autocast(DEVICE, amp):
            return model.loss(batch["image"], batch["label"])["loss"]

    ctx = TrainContext(model=model, total_iters=proxy_exp.train.iters, device=DEVICE,
                       next_batch=lambda: {"image": images, "label": labels}, loss=loss_of, optimizer=optimizer)
    method.before_training(ctx)
    model.train()
    step = [proxy_exp.train.iters // 2]  # mid-schedule, as the profile command times it

    def one_step():
        method.on_step(step[0], ctx)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * poly_lr_factor(step[0], proxy_exp.train)
        optimizer.zero_grad(set_to_none=True)
        loss_of({"image": images, "label": labels}).backward()
        optimizer.step()
        method.after_optimizer_step(step[0], ctx)
        step[0] += 1

    benchmark.extra_info["images_per_step"] = images.shape[0]
    benchmark.pedantic(one_step, rounds=3, iterations=1, warmup_rounds=1)


def test_harness_step_overhead_vs_bare_loop(benchmark, proxy_exp):
    """protocol.train's step path against a bare PyTorch loop on the same model, batch and data.

    Both run the same steps on a frozen-backbone model (the cheapest step, so overhead shows most), in
    alternating rounds so that a change of the machine's load hits both alike (one after the other, a load
    change read as overhead: a ratio of 0.17 on a shared box); the ratio of medians is reported in extra_info
    (≈1.0 means no measurable harness overhead).
    """
    from benchmarks.timing import summarize, time_training_steps

    rounds, warmup, repeats = 3, 1, 3
    model, method = _model(proxy_exp, "freeze")
    bare_model, _ = _model(proxy_exp, "freeze")
    images, labels = proxy_batch(proxy_exp)
    params = [p for p in bare_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

    def bare_step():
        optimizer.zero_grad(set_to_none=True)
        bare_model.loss(images, labels)["loss"].backward()
        optimizer.step()

    harness, bare = [], []
    for _ in range(rounds):
        harness += time_training_steps(model, method, proxy_exp, DEVICE, warmup=warmup, repeats=repeats)
        for i in range(warmup + repeats):
            started = time.perf_counter()
            bare_step()
            if i >= warmup:
                bare.append(time.perf_counter() - started)
    ratio = statistics.median(harness) / statistics.median(bare)
    benchmark.extra_info.update(harness_step_s=summarize(harness), bare_step_s=summarize(bare), harness_over_bare=ratio)
    print(f"\nharness step {statistics.median(harness) * 1e3:.1f} ms, bare step {statistics.median(bare) * 1e3:.1f} ms, "
          f"ratio {ratio:.3f}")
    benchmark.pedantic(bare_step, rounds=3, iterations=1)
