"""The bf16 path (`train.amp=auto` on CUDA) for every method, exercised on the CPU.

The paper preset trains under bf16 autocast on GPUs. CPU autocast casts the same matrix products
to bf16, so a method that breaks on bf16 activations breaks here too — with one difference:
CPU autocast runs FFTs in fp32, CUDA autocast does not cast them (and cuFFT has no bf16). So the
test also watches every spectral op for reduced-precision inputs, which would pass here and fail
on a GPU. `DGSS_TEST_DEVICE=cuda` runs the same tests on a GPU's own autocast (tools/gpu-profile).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

from benchmarks import runner
from benchmarks.config import apply_override
from benchmarks.method import available_methods
from benchmarks.protocol import autocast
from tests.test_methods_common import IMG, images, tiny_model

DEVICE = torch.device(os.environ.get("DGSS_TEST_DEVICE", "cpu"))
REDUCED = (torch.bfloat16, torch.float16)


class ReducedPrecisionSpectra(TorchFunctionMode):
    """Records FFT and complex-building calls that receive bf16/fp16 tensors (before autocast sees them)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if "fft" in name or name in ("complex", "polar"):
            tensors = [a for a in (*args, *(kwargs or {}).values()) if torch.is_tensor(a)]
            if any(t.dtype in REDUCED for t in tensors):
                self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head", ["light", "mask2former"])
@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_trains_and_evaluates_under_bf16_autocast(method, head):
    model = tiny_model(method, head=head).to(DEVICE)
    model.train()
    labels = torch.randint(0, 19, (2, IMG, IMG), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    spectra = ReducedPrecisionSpectra()
    with spectra, autocast(DEVICE, torch.bfloat16):
        loss = model.loss(images().to(DEVICE), labels)["loss"]
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient under bf16 for {missing[:5]}"

    model.eval()
    with spectra, torch.inference_mode(), autocast(DEVICE, torch.bfloat16):
        logits = model.predict(images().to(DEVICE))
    assert torch.isfinite(logits.float()).all()
    assert not spectra.calls, f"FFT/complex ops got bf16 inputs (no CUDA kernel): {sorted(set(spectra.calls))}"


def test_bf16_run_through_the_protocol_writes_a_finished_result(smoke_experiment):
    """`train.amp=bf16` end to end (train, sliding-window evaluation, result file) for the method bf16 once broke."""
    exp = apply_override(apply_override(smoke_experiment, "train.amp=bf16"), f"train.device={DEVICE.type}")
    (result,) = runner.run_matrix(exp, "set", progress=False)
    assert result["status"] == "finished", result.get("failure")
    assert result["experiment"]["train"]["amp"] == "bf16"
    assert all(0.0 <= t["miou"] <= 100.0 for t in result["targets"].values())


def test_the_watch_sees_a_bf16_fft_that_cpu_autocast_would_hide():
    spectra = ReducedPrecisionSpectra()
    with spectra, autocast(torch.device("cpu"), torch.bfloat16):
        out = torch.fft.fft2(torch.ones(2, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.complex64  # CPU autocast ran it in fp32 ...
    assert spectra.calls == ["fft_fft2"]  # ... but a CUDA autocast would have passed bf16 to cuFFT


def test_fp16_scales_the_loss_so_that_small_gradients_do_not_underflow():
    # An fp16 gradient below 6e-8 is 0: without mmengine's dynamic loss scale a fp16 run trained on zeros.
    from benchmarks.protocol import ScaledBackward

    cpu = torch.device("cpu")
    inputs = torch.full((2, 4), 1e-4)

    def step(precision: ScaledBackward, amp: torch.dtype | None) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.ones(4, 4))
        optimizer = torch.optim.SGD([weight], lr=1e6)
        with autocast(cpu, amp):
            loss = (inputs @ weight).float().sum() * 1e-4  # d loss / d weight = 2e-8 per entry
        precision.backward(loss)
        precision.step(optimizer)
        return weight.detach() - 1.0

    exact = step(ScaledBackward(None, cpu, None), None)
    torch.testing.assert_close(exact, torch.full((4, 4), -2e-2))
    assert step(ScaledBackward(None, cpu, None), torch.float16).abs().max() == 0  # unscaled fp16: underflow
    scaled = ScaledBackward(torch.float16, cpu, None)
    torch.testing.assert_close(step(scaled, torch.float16), exact, rtol=1e-2, atol=0)
    assert scaled.state_dict()["scale"] == 2.0**16
