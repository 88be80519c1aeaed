"""FLOPs per image and model FLOPs utilisation (MFU).

FLOPs come from `torch.utils.flop_counter` (2 per multiply-add over matmuls, convolutions and
attention): forward of one evaluation window (`eval.crop_size`), a training step (forward + backward through what trains) and
evaluation of one image (windows × forward). They are counted on fake tensors, the model built on
the meta device and materialised as fake CPU tensors (shapes only, no memory, seconds even for
DINOv2-L + Mask2Former), with a surrogate loss touching every output; where a method's code needs
real values, on real CPU tensors with the head's loss. MFU is training FLOPs/s over the device's
dense bf16 peak (`PEAK_BF16_TFLOPS`), on GPUs only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from benchmarks.config import Experiment
from benchmarks.errors import UserError
from benchmarks.method import build_method
from benchmarks.resources import device_name
from benchmarks.synthetic_inputs import eval_image_size, window_count, without_weight_files

log = logging.getLogger(__name__)
NUM_CLASSES = 19

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched
# against the lower-cased device name in order (the first pattern whose words all occur wins).
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gh200",), 989.0),
    (("h200", "nvl"), 835.5),  # the NVL cards: 1,671 with sparsity, as against the SXM parts' 1,979
    (("h200",), 989.0),
    (("h100", "pcie"), 756.0),
    (("h100", "nvl"), 835.5),
    (("h100",), 989.0),  # SXM ("H100 80GB HBM3")
    (("h800", "pcie"), 756.0),
    (("h800",), 989.0),
    (("b200",), 2250.0),
    (("b100",), 1750.0),
    (("a100",), 312.0),
    (("a800",), 312.0),
    (("l40s",), 362.0),
    (("l40",), 181.0),
    (("l4",), 121.0),
    (("a10g",), 70.0),  # AWS A10G (lower clocks than the A10)
    (("a10",), 125.0),
    (("a6000",), 155.0),
    (("mi300x",), 1307.0),
    (("mi250x",), 383.0),
)


def peak_bf16_flops(device_name: str, device: str) -> float | None:
    """Dense bf16 peak in FLOP/s for a device name, or None when the table does not know it.

    The table holds GPUs: on any other `device` the answer is None, so a CPU's model name ("AMD A10-7850K")
    never borrows a GPU's peak."""
    if not str(device).startswith("cuda"):
        return None
    name = device_name.lower()
    for words, tflops in PEAK_BF16_TFLOPS:
        if all(re.search(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])", name) for w in words):
            return tflops * 1e12
    return None


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: totals only.

    The tracker attaches autograd hooks to module inputs and rejects tensors that require grad but
    have no grad_fn (views of parameters taken under no_grad, as frozen backbones and some method
    hooks produce); the totals do not need it.
    """

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


SDPA_BACKWARD_KERNELS = ("_scaled_dot_product_flash_attention_backward",
                         "_scaled_dot_product_efficient_attention_backward",
                         "_scaled_dot_product_cudnn_attention_backward",
                         "_scaled_dot_product_flash_attention_for_cpu_backward")


def _attention_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for fused attention: the model's FLOPs, as MFU counts them.

    The CPU flash kernels have no formula in this torch's counter (torch 2.14 registers the CUDA
    kernels' only), so attention counted 0 there (ViT-L @512 lost 103 of 821 GFLOP per forward).
    Every fused backward is counted as the four products the math needs (2× the forward), not as
    torch's `sdpa_backward_flop_count`, which adds the kernels' recomputation of QKᵀ (2.5× the forward):
    MFU leaves recomputation out (PaLM's model FLOPs, not hardware FLOPs), as the harness does for
    gradient checkpointing; it raised the paper backbone's training count by 2–3 %. The arguments
    start with the same tensors in every kernel (query, key, value; grad_out first in the backward).
    """
    from torch.utils import flop_counter as fc

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        b, heads, queries, width = query_shape
        recomputed_scores = fc.bmm_flop((b * heads, queries, width), (b * heads, width, key_shape[2]))
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape) - recomputed_scores

    aten = torch.ops.aten
    formulas = {}
    cpu_forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_forward is not None and cpu_forward not in fc.flop_registry and cpu_forward.default not in fc.flop_registry:
        formulas[cpu_forward] = forward
    for name in SDPA_BACKWARD_KERNELS:
        op = getattr(aten, name, None)
        if op is not None:
            formulas[op] = backward
    return formulas


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_attention_formulas())
    counter.mod_tracker = _GlobalOnly()
    return counter


def _floating_leaves(value: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(value):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _floating_leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _floating_leaves(item)


def surrogate_loss(outputs: Any) -> torch.Tensor:
    """A scalar that depends on every output the head returns (deep-supervision outputs included).

    Its backward runs the same matmuls as the head's loss backward; the loss's own work (matching,
    point sampling, cross-entropy) has no matmul or convolution worth counting.
    """
    terms = [t.float().mean() for t in _floating_leaves(outputs) if t.requires_grad]
    if not terms:
        raise RuntimeError("the model's outputs do not require gradients; nothing trains")
    return torch.stack(terms).sum()


def _count_model_flops(model: torch.nn.Module, exp: Experiment, batch_size: int, real_loss: bool) -> tuple[int, int]:
    """(inference-forward FLOPs of one evaluation window, training-step FLOPs of `batch_size` training crops) on the
    model's device."""
    device = next(model.parameters()).device
    crop = exp.data.crop_size
    model.eval()
    with flop_counter() as counter:
        model(torch.randn(1, 3, exp.eval.crop_size, exp.eval.crop_size, device=device))
    forward = counter.get_total_flops()
    model.train()
    images = torch.randn(batch_size, 3, crop, crop, device=device)
    if real_loss:
        with flop_counter() as counter:
            labels = torch.randint(0, NUM_CLASSES, (batch_size, crop, crop), device=device)
            model.loss(images, labels)["loss"].backward()
        model.zero_grad(set_to_none=True)
        return forward, counter.get_total_flops()
    try:
        return forward, _surrogate_step_flops(model, images, backbone_training=True)
    except Exception:  # noqa: BLE001 - a value asked of a fake tensor in a training-only branch
        return forward, _surrogate_step_flops(model, images, backbone_training=False)


def _surrogate_step_flops(model: torch.nn.Module, images: torch.Tensor, backbone_training: bool) -> int:
    """A training step's FLOPs with the surrogate loss, autograd on and the head in eval mode: the graph
    records exactly what trains (nothing through a frozen backbone), and the head's training-only branch
    asks no fake tensor for a value (transformers' Mask2Former inf check). The backbone and the method's
    modules compute as in a training step (FADA as released refines a training batch at once, an
    evaluation window by window) unless one of theirs needs a value too (peft's module-dropout draw):
    then in eval mode, where dropout and those branches count no FLOPs."""
    model.eval()
    model.backbone.train(backbone_training)
    try:
        with flop_counter() as counter, torch.enable_grad():
            surrogate_loss(model.head(model.backbone(images))).backward()
        return counter.get_total_flops()
    finally:
        model.zero_grad(set_to_none=True)


def _in_main_phase(exp: Experiment, method_name: str, device: str) -> tuple[torch.nn.Module, int]:
    """The model of `method_name` as it computes in the method's main phase (the phase a profile times), and
    how many windows a batch of its evaluation holds."""
    from benchmarks.model import build_model

    method = build_method(method_name, exp.methods.get(method_name))
    model = build_model(exp, method, device=device)
    method.enter_main_phase(model)
    return model, method.evaluation_settings(exp.eval).batch_windows


def count_flops(exp: Experiment, method_name: str, allow_real: bool = True) -> dict[str, Any]:
    """FLOPs per image: inference forward of one evaluation window (`eval.crop_size`), training step (in the method's main phase, as profiled),
    evaluation of one target image.

    Fake tensors first (the model built on the meta device, materialised as fake CPU tensors:
    shapes only); a method whose code needs values falls back to real CPU tensors (batch 1, the
    head's real loss), slow at paper scale, so `allow_real=False` records the reason instead.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode


    exp = without_weight_files(exp)
    batch = exp.train.batch_size
    height, width = eval_image_size(exp)
    windows = window_count(height, width, exp.eval.crop_size, exp.eval.stride)
    how = "fake tensors, surrogate loss"
    try:
        model, per_batch = _in_main_phase(exp, method_name, device="meta")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            forward, train = _count_model_flops(model, exp, batch, real_loss=False)
            evaluation = _evaluation_flops(model, exp, windows, per_batch)
    except UserError:  # a setting the user can mend, not code the counter cannot trace
        raise
    except Exception as err:  # noqa: BLE001 - data-dependent code in a method or head
        if not allow_real:
            return {"flops_forward_per_image": None, "flops_train_step_per_image": None, "flops_eval_per_image": None,
                    "flops_counted_with": f"not counted: {type(err).__name__} on fake tensors"}
        log.info("%s: FLOPs on fake tensors failed (%s: %s); counting on real CPU tensors", method_name,
                 type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        torch.manual_seed(0)
        model, per_batch = _in_main_phase(exp, method_name, device="cpu")
        batch = 1
        how = "real CPU tensors, head loss, batch 1"
        forward, train = _count_model_flops(model, exp, batch, real_loss=True)
        evaluation = _evaluation_flops(model, exp, windows, per_batch)
    return {
        "flops_forward_per_image": forward,
        "flops_train_step_per_image": train / batch,
        "flops_eval_per_image": evaluation,
        "flops_counted_with": how,
    }


def _evaluation_flops(model: torch.nn.Module, exp: Experiment, windows: int, per_batch: int) -> int:
    """One target image's windows run as the evaluation runs them, `per_batch` at a time: a method's work
    that does not grow with the batch (Rein's and SET's token refinement, FADA's) is done once a batch."""
    device = next(model.parameters()).device
    crop = exp.eval.crop_size
    model.eval()
    total = 0
    full, rest = divmod(windows, per_batch)
    for size, times in ((per_batch, full), (rest, 1 if rest else 0)):
        if times:
            with flop_counter() as counter:
                model(torch.randn(size, 3, crop, crop, device=device))
            total += times * counter.get_total_flops()
    return total


def run_profile_extras(exp: Experiment, method_name: str, profile: dict[str, Any]) -> dict[str, Any]:
    """What a finished run adds to its measured profile: FLOPs per image (fake tensors) and MFU.

    Never fails a run: a count that cannot be made is recorded as such.
    """
    extras: dict[str, Any] = {}
    try:
        extras.update(count_flops(exp, method_name, allow_real=False))
    except Exception as err:  # noqa: BLE001
        extras["flops_counted_with"] = f"not counted: {type(err).__name__}"
    device = torch.device(profile.get("device", "cpu"))
    extras["device_name"] = device_name(device)
    extras["mfu"] = model_flops_utilisation({**profile, **extras})
    return extras


HALF_PRECISIONS = ("bfloat16", "float16")
"""The precisions the table's dense peak is for (the GPUs' bf16 and fp16 tensor-core peaks are equal)."""


def model_flops_utilisation(profile: dict[str, Any]) -> float | None:
    """Training FLOPs per second over the devices' dense bf16/fp16 peak (GPUs in the table only); None for a
    run in another precision, whose peak (fp32, or TF32 where enabled) the table does not hold.

    `train_images_per_s` is the whole job's rate, so a run on `world_size` devices (a profile's is 1) is
    measured against that many peaks."""
    if profile.get("dtype") not in HALF_PRECISIONS:
        return None
    peak = peak_bf16_flops(profile.get("device_name", ""), profile.get("device", ""))
    flops, speed = profile.get("flops_train_step_per_image"), profile.get("train_images_per_s")
    if not (peak and flops and speed):
        return None
    return flops * speed / (peak * profile.get("world_size", 1))


def flops_table(exp: Experiment, methods: Iterable[str]) -> list[dict[str, Any]]:
    """FLOPs and parameter counts only (no timing): paper scale on any machine in seconds per method."""
    from benchmarks.model import reported_parameter_counts

    exp = without_weight_files(exp)
    rows = []
    for name in methods:
        counts = reported_parameter_counts(exp, name)
        row: dict[str, Any] = {"method": name, "status": "ok", "backbone": exp.model.backbone, "head": exp.model.head,
                               "crop_size": exp.data.crop_size, "eval_crop_size": exp.eval.crop_size,
                               "batch_size": exp.train.batch_size, "params": counts,
                               "trainable_parameters": counts["backbone_trainable"], "added_parameters": counts["backbone_added"],
                               "eval_image_size": list(eval_image_size(exp)),
                               "windows_per_image": window_count(*eval_image_size(exp), exp.eval.crop_size, exp.eval.stride)}
        try:
            row.update(count_flops(exp, name, allow_real=False))
        except Exception as err:  # noqa: BLE001
            row.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
        rows.append(row)
    return rows
