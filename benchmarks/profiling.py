"""Cost profiles of methods: training and inference throughput, peak memory, FLOPs, MFU.

Every method is measured the same way, on the preset's model and sizes with random weights and
synthetic batches (no data, no weight files):

- training images/s: the protocol's own step (`benchmarks.protocol.train`: loss, backward, AdamW,
  the method's hooks, the poly schedule), started at `start_fraction` of the schedule so a phased
  method is timed in its main phase; per-step times come from a stamp taken (after a device
  synchronisation) when each step begins, so warm-up steps are dropped and the median and
  inter-quartile range of the rest are reported;
- inference images/s: `benchmarks.protocol.slide_logits` on one image of the target's evaluation
  size (`eval.fit_size`), windows batched as evaluated;
- peak memory: on CUDA the allocator's max allocated and reserved bytes over the training steps;
  on CPU the process's peak resident set size (Linux VmHWM, reset before the phase; the `profile`
  command runs each method in a fresh process so earlier methods leave nothing behind);
- FLOPs per image (`torch.utils.flop_counter`, 2 FLOPs per multiply-add, matmuls/convs/attention):
  forward of one crop, a training step (forward + backward through what trains) and evaluation of
  one image (windows × forward). Counted on fake tensors (shapes only, no memory, seconds even for
  DINOv2-L + Mask2Former) with a surrogate loss touching every output; where a method's code
  needs real values, on real CPU tensors with the head's loss;
- MFU on GPUs: training FLOPs/s over the device's dense bf16 peak (`PEAK_BF16_TFLOPS`).

`profile_method(exp, method, device)` returns the dict a result stores under "profile".
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import plugins
from benchmarks.config import Experiment, experiment_from_dict
from benchmarks.errors import UserError
from benchmarks.memory import current_rss_mb, is_out_of_memory, peak_memory, reset_peak_memory  # noqa: F401
from benchmarks.method import build_method, use_method_files
from benchmarks.synthetic_inputs import SyntheticSource, eval_image_size, window_count, without_weight_files  # noqa: F401
from benchmarks.timing import summarize, time_inference, time_training_steps  # noqa: F401

log = logging.getLogger(__name__)
NUM_CLASSES = 19

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched
# against the lower-cased device name in order (the first pattern whose words all occur wins).
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gh200",), 989.0),
    (("h200",), 989.0),
    (("h100", "pcie"), 756.0),
    (("h100", "nvl"), 835.0),
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


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak in FLOP/s for a device name, or None when the table does not know it."""
    name = device_name.lower()
    for words, tflops in PEAK_BF16_TFLOPS:
        if all(re.search(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])", name) for w in words):
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class ProfileSettings:
    warmup: int = 3
    """Training steps run before timing (allocator, autotuning, lazy init, a phase's one-off work)."""
    repeats: int = 10
    """Timed training steps."""
    eval_warmup: int = 1
    eval_repeats: int = 5
    start_fraction: float = 0.5
    """Where in the schedule timing starts (phased methods are timed in their main phase)."""
    count_flops: bool = True
    breakdown: str = "auto"
    """Profile where a training step's time goes: "auto" (when MFU is below 30 %), "all" or "none"."""
    breakdown_steps: int = 3

    def __post_init__(self) -> None:
        if self.breakdown not in ("auto", "all", "none"):
            raise UserError(f"breakdown must be auto, all or none, not {self.breakdown!r}")

    def wants_breakdown(self, mfu: float | None) -> bool:
        from benchmarks.breakdown import LOW_MFU

        return self.breakdown == "all" or (self.breakdown == "auto" and mfu is not None and mfu < LOW_MFU)


# -- FLOPs --------------------------------------------------------------------------------------------
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


def _cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU flash-attention kernels, where this torch's counter has none.

    Fake and real CPU tensors dispatch `scaled_dot_product_attention` to
    `_scaled_dot_product_flash_attention_for_cpu`; torch 2.14's counter registers formulas only for
    the CUDA kernels, so attention counted 0 there (ViT-L @512 lost 103 of 821 GFLOP per forward,
    and MFU on GPUs, which uses these counts, would have been understated). The formulas are
    torch's own `sdpa_flop_count` / `sdpa_backward_flop_count`; the arguments start with the same
    tensors as the CUDA kernels' (query, key, value; grad_out first in the backward).
    """
    from torch.utils import flop_counter as fc

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    formulas = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry and op.default not in fc.flop_registry:
            formulas[op] = formula
    return formulas


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
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
    """(forward FLOPs of one crop, training-step FLOPs of `batch_size` crops) on the model's device."""
    device = next(model.parameters()).device
    crop = exp.data.crop_size
    model.eval()
    with flop_counter() as counter:
        model(torch.randn(1, 3, exp.eval.crop_size, exp.eval.crop_size, device=device))
    forward = counter.get_total_flops()
    model.train()
    images = torch.randn(batch_size, 3, crop, crop, device=device)
    with flop_counter() as counter:
        if real_loss:
            labels = torch.randint(0, NUM_CLASSES, (batch_size, crop, crop), device=device)
            loss = model.loss(images, labels)["loss"]
        else:
            # Eval mode with autograd on: the graph records exactly what trains (nothing through a
            # frozen backbone), and no training-only branch asks fake tensors for a value
            # (transformers' Mask2Former inf check, peft's module-dropout draw); dropout and those
            # branches count no FLOPs.
            model.eval()
            with torch.enable_grad():
                loss = surrogate_loss(model.head(model.backbone(images)))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return forward, counter.get_total_flops()


def count_flops(exp: Experiment, method_name: str, allow_real: bool = True) -> dict[str, Any]:
    """FLOPs per image: forward of one crop, training step, evaluation of one target image.

    Fake tensors first (the model built on the meta device, materialised as fake CPU tensors:
    shapes only); a method whose code needs values falls back to real CPU tensors (batch 1, the
    head's real loss), slow at paper scale, so `allow_real=False` records the reason instead.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.model import build_model

    exp = without_weight_files(exp)
    batch = exp.train.batch_size
    how = "fake tensors, surrogate loss"
    try:
        model = build_model(exp, build_method(method_name, exp.methods.get(method_name)), device="meta")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            forward, train = _count_model_flops(model, exp, batch, real_loss=False)
    except Exception as err:  # noqa: BLE001 - data-dependent code in a method or head
        if not allow_real:
            return {"flops_forward_per_image": None, "flops_train_step_per_image": None, "flops_eval_per_image": None,
                    "flops_counted_with": f"not counted: {type(err).__name__} on fake tensors"}
        log.info("%s: FLOPs on fake tensors failed (%s: %s); counting on real CPU tensors", method_name,
                 type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        torch.manual_seed(0)
        model = build_model(exp, build_method(method_name, exp.methods.get(method_name)), device="cpu")
        batch = 1
        how = "real CPU tensors, head loss, batch 1"
        forward, train = _count_model_flops(model, exp, batch, real_loss=True)
    height, width = eval_image_size(exp)
    windows = window_count(height, width, exp.eval.crop_size, exp.eval.stride)
    return {
        "flops_forward_per_image": forward,
        "flops_train_step_per_image": train / batch,
        "flops_eval_per_image": forward * windows,
        "flops_counted_with": how,
    }


# -- one method ---------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def profile_method(exp: Experiment, method_name: str, device: torch.device | str = "auto",
                   settings: ProfileSettings | None = None) -> dict[str, Any]:
    """The cost profile of one method on `exp`'s model and sizes (random weights, synthetic data).

    Returns the keys results store under "profile" (train_images_per_s, eval_images_per_s,
    peak_memory_mb, flops_forward_per_image, flops_train_step_per_image, mfu, device, dtype) and
    the details behind them. Out-of-memory is reported as status "oom", not raised.
    """
    from benchmarks.model import build_model
    from benchmarks.protocol import autocast_dtype, seed_everything, select_device

    settings = settings or ProfileSettings()
    device = select_device(str(device)) if not isinstance(device, torch.device) else device
    exp = without_weight_files(exp)
    amp = autocast_dtype(exp.train.amp, device)
    images_per_step = exp.train.batch_size * exp.train.grad_accum
    profile: dict[str, Any] = {
        "method": method_name,
        "status": "ok",
        "error": None,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(amp).replace("torch.", "") if amp else "float32",
        "backbone": exp.model.backbone,
        "head": exp.model.head,
        "batch_size": images_per_step,
        "crop_size": exp.data.crop_size,
        "eval_image_size": list(eval_image_size(exp)),
        "windows_per_image": window_count(*eval_image_size(exp), exp.eval.crop_size, exp.eval.stride),
        "cpu_threads": torch.get_num_threads(),
        "baseline_memory_mb": current_rss_mb() if device.type == "cpu" else 0.0,
    }
    method = build_method(method_name, exp.methods.get(method_name))
    model = None
    try:
        seed_everything(exp.train.seed)
        model = build_model(exp, method)
        counts = method.parameter_counts(model)  # the method's report, as in a run's result
        profile["params"] = counts
        profile["trainable_parameters"] = counts["backbone_trainable"]
        profile["added_parameters"] = counts["backbone_added"]

        reset_peak_memory(device)
        steps = time_training_steps(model, method, exp, device, settings.warmup, settings.repeats, settings.start_fraction)
        train_memory = peak_memory(device)
        step = summarize(steps)
        profile["train_step_s"] = step
        profile["train_images_per_s"] = images_per_step / step["median"] if step["median"] else None
        profile.update(train_memory)

        model.zero_grad(set_to_none=True)
        reset_peak_memory(device)
        per_image = summarize(time_inference(model, exp, device, settings.eval_warmup, settings.eval_repeats))
        profile["eval_image_s"] = per_image
        profile["eval_images_per_s"] = 1.0 / per_image["median"] if per_image["median"] else None
        profile["eval_peak_memory_mb"] = peak_memory(device)["peak_memory_mb"]
    except Exception as err:  # noqa: BLE001 - one method's failure is recorded, the others still run
        profile["status"] = "oom" if is_out_of_memory(err) else "failed"
        profile["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        log.error("%s: profile %s (%s)", method_name, profile["status"], profile["error"])
        if profile["status"] == "failed":
            log.debug("traceback", exc_info=True)
        model = None
    for key in ("train_images_per_s", "eval_images_per_s", "peak_memory_mb"):
        profile.setdefault(key, None)
    if settings.count_flops:
        try:
            profile.update(count_flops(exp, method_name))
        except Exception as err:  # noqa: BLE001
            log.warning("%s: FLOPs not counted (%s: %s)", method_name, type(err).__name__, err)
    profile["mfu"] = model_flops_utilisation(profile)
    if model is not None and settings.wants_breakdown(profile["mfu"]):
        from benchmarks.breakdown import time_breakdown

        try:  # after the timed phases: the profiler's overhead touches none of the numbers above
            profile["time_breakdown"] = time_breakdown(model, method, exp, device, settings.breakdown_steps)
        except Exception as err:  # noqa: BLE001
            log.warning("%s: no time breakdown (%s: %s)", method_name, type(err).__name__, err)
    model = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return profile


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


def model_flops_utilisation(profile: dict[str, Any]) -> float | None:
    """Training FLOPs per second over the device's dense bf16 peak (GPUs in the table only)."""
    if not str(profile.get("device", "")).startswith("cuda"):
        return None
    peak = peak_bf16_flops(profile.get("device_name", ""))
    flops, speed = profile.get("flops_train_step_per_image"), profile.get("train_images_per_s")
    if not (peak and flops and speed):
        return None
    return flops * speed / peak


# -- many methods, each in a fresh process -------------------------------------------------------------
def profile_in_subprocess(exp: Experiment, method_name: str, device: str, settings: ProfileSettings,
                          timeout_s: float | None = None) -> dict[str, Any]:
    """`profile_method` in a fresh interpreter: clean peak memory, and a killed process is one row."""
    payload = json.dumps({"experiment": exp.to_dict(), "method": method_name, "device": device,
                          "settings": dataclasses.asdict(settings), "method_files": plugins.loaded_method_files()})
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.profiling"], input=payload, capture_output=True,
                              text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"method": method_name, "status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode == 0:
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if lines:
            return json.loads(lines[-1])
    if proc.returncode in (-9, 137):
        return {"method": method_name, "status": "oom", "error": "killed (SIGKILL), likely by the out-of-memory killer"}
    if proc.returncode < 0:
        return {"method": method_name, "status": "failed", "error": f"terminated by signal {-proc.returncode}"}
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "Error" in line or line.startswith("error:")]
    return {"method": method_name, "status": "failed", "error": (errors or lines or ["no output"])[-1][:300]}


def profile_methods(exp: Experiment, methods: Iterable[str], device: str = "auto", settings: ProfileSettings | None = None,
                    isolate: bool = True, on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    settings = settings or ProfileSettings()
    rows = []
    for name in methods:
        log.info("profiling %s (%s, %s)", name, exp.preset, device)
        row = profile_in_subprocess(exp, name, device, settings) if isolate else profile_method(exp, name, device, settings)
        rows.append(row)
        if on_result:
            on_result(row)
    return rows


def flops_table(exp: Experiment, methods: Iterable[str]) -> list[dict[str, Any]]:
    """FLOPs and parameter counts only (no timing): paper scale on any machine in seconds per method."""
    from benchmarks.model import reported_parameter_counts

    exp = without_weight_files(exp)
    rows = []
    for name in methods:
        counts = reported_parameter_counts(exp, name)
        row: dict[str, Any] = {"method": name, "status": "ok", "backbone": exp.model.backbone, "head": exp.model.head,
                               "crop_size": exp.data.crop_size, "batch_size": exp.train.batch_size, "params": counts,
                               "trainable_parameters": counts["backbone_trainable"], "added_parameters": counts["backbone_added"],
                               "eval_image_size": list(eval_image_size(exp)),
                               "windows_per_image": window_count(*eval_image_size(exp), exp.eval.crop_size, exp.eval.stride)}
        try:
            row.update(count_flops(exp, name, allow_real=False))
        except Exception as err:  # noqa: BLE001
            row.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
        rows.append(row)
    return rows


# -- output -------------------------------------------------------------------------------------------
def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / scale:,.{digits}f}"


def _spread(summary: dict[str, Any] | None, scale: float = 1.0) -> str:
    if not summary or summary.get("median") is None:
        return "-"
    return f"{_compact(summary['median'] * scale)} ± {_compact(summary['iqr'] * scale / 2)}"


def _compact(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def format_table(rows: list[dict[str, Any]], fmt: str = "github") -> str:
    """One row per method: speed (median, ± half the IQR), memory, FLOPs, MFU, parameters."""
    from tabulate import tabulate

    timed = any("train_images_per_s" in r for r in rows)  # flops_table rows have no timing columns
    table = []
    for r in rows:
        line = [r["method"]]
        if timed:
            line += [
                _fmt(r.get("train_images_per_s"), digits=2),
                _spread(r.get("train_step_s"), 1000.0),
                _fmt(r.get("eval_images_per_s"), digits=2),
                _spread(r.get("eval_image_s"), 1000.0),
                _fmt(r.get("peak_memory_mb"), digits=0),
                _fmt(r.get("mfu"), 0.01, 1) if r.get("mfu") is not None else "-",
            ]
        line += [
            _fmt(r.get("flops_forward_per_image"), 1e9),
            _fmt(r.get("flops_train_step_per_image"), 1e9),
            _fmt(r.get("flops_eval_per_image"), 1e9),
            _fmt(r.get("trainable_parameters"), 1e6, 3),
            _fmt(r.get("added_parameters"), 1e6, 3),
            _status(r),
        ]
        table.append(line)
    headers = ["method"]
    if timed:
        headers += ["train img/s", "step ms (±IQR/2)", "eval img/s", "eval ms/img (±IQR/2)", "peak MB", "MFU %"]
    headers += ["fwd GFLOP/img", "train GFLOP/img", "eval GFLOP/img", "trainable M", "added M", "status"]
    return tabulate(table, headers=headers, tablefmt=fmt, disable_numparse=True)


def _status(row: dict[str, Any]) -> str:
    status = row.get("status", "ok")
    if status != "ok":
        return f"{status}: {row.get('error') or ''}"[:80]
    counted = str(row.get("flops_counted_with", ""))
    return f"ok (FLOPs {counted})" if counted.startswith("not counted") else "ok"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def output_stem(preset: str, device_label: str, when: dt.date | None = None) -> str:
    return f"{preset}-{_slug(device_label)}-{(when or dt.date.today()).isoformat()}"


def environment_summary(device: torch.device | None) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "timm", "transformers", "peft"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    info: dict[str, Any] = {"python": platform.python_version(), **versions, "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device is not None:
        info["device"] = str(device)
        info["device_name"] = device_name(device)
        info["peak_bf16_tflops"] = (peak_bf16_flops(info["device_name"]) or 0) / 1e12 or None
    with contextlib.suppress(OSError):
        info["load_average"] = list(os.getloadavg())
    return info


def write_profiles(rows: list[dict[str, Any]], exp: Experiment, out_dir: Path, stem: str, meta: dict[str, Any],
                   plots: bool = True) -> list[Path]:
    """JSON (rows + metadata), markdown table and, for timed rows, speed and memory plots."""
    from benchmarks.results import atomic_write_text

    out_dir = Path(out_dir)
    payload = {"preset": exp.preset, "experiment": exp.to_dict(), "meta": meta, "methods": rows}
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    atomic_write_text(paths[0], json.dumps(payload, indent=2, default=str) + "\n")
    lines = [f"# Cost profile: preset `{exp.preset}`", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", format_table(rows), ""]
    atomic_write_text(paths[1], "\n".join(lines))
    explained = [r for r in rows if r.get("time_breakdown")]
    if explained:
        from benchmarks.breakdown import breakdown_markdown

        paths.append(out_dir / f"{stem}-breakdown.md")
        atomic_write_text(paths[-1], breakdown_markdown(explained, f"preset `{exp.preset}`, {meta.get('device_name', '')}"))
    if plots and any(r.get("train_images_per_s") for r in rows):
        paths += write_plots(rows, out_dir, stem, title=f"{exp.preset} · {meta.get('device_name', '')}")
    return paths


def _rate_quartiles(row: dict[str, Any], spread_key: str, images: float) -> tuple[float, float] | None:
    """(low, high) of a rate images/seconds from the seconds' quartiles (q3 is the slow end)."""
    summary = row.get(spread_key) or {}
    if not summary.get("q1") or not summary.get("q3"):
        return None
    return images / summary["q3"], images / summary["q1"]


def write_plots(rows: list[dict[str, Any]], out_dir: Path, stem: str, title: str) -> list[Path]:
    """`<stem>-speed.png` (train and eval images/s, IQR bars) and `<stem>-memory.png` (peak MB)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from benchmarks.results import atomic_write_bytes

    names = [r["method"] for r in rows]
    panels = {
        "speed": [("train images/s", "train_images_per_s", "train_step_s", "batch_size"),
                  ("eval images/s", "eval_images_per_s", "eval_image_s", None)],
        "memory": [("peak memory (MB)", "peak_memory_mb", None, None)],
    }
    written = []
    for kind, specs in panels.items():
        fig = Figure(figsize=(max(6.0, 0.5 * len(names) * len(specs)), 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        for i, (label, key, spread_key, images_key) in enumerate(specs):
            ax = fig.add_subplot(1, len(specs), i + 1)
            values = np.array([r.get(key) or 0.0 for r in rows], dtype=float)
            errors = None
            if spread_key:
                low_high = [_rate_quartiles(r, spread_key, float(r.get(images_key) or 1) if images_key else 1.0) for r in rows]
                errors = np.array([[v - lh[0] if lh else 0.0 for v, lh in zip(values, low_high, strict=True)],
                                   [lh[1] - v if lh else 0.0 for v, lh in zip(values, low_high, strict=True)]]).clip(min=0.0)
            colours = ["tab:blue" if r.get("status", "ok") == "ok" else "tab:red" for r in rows]
            ax.bar(range(len(names)), values, yerr=errors, color=colours, capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{title} (median; bars: inter-quartile range)" if kind == "speed" else title, fontsize=9)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        path = Path(out_dir) / f"{stem}-{kind}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def _worker() -> int:
    """`python -m benchmarks.profiling` reads one job as JSON on stdin, prints the profile as JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(sys.stdin.read())
    use_method_files(job.get("method_files", []))  # a --method-file method is registered here too
    exp = experiment_from_dict(job["experiment"], source="profile job", name=job["experiment"].get("preset", "custom"))
    settings = ProfileSettings(**job["settings"])
    row = profile_method(exp, job["method"], job["device"], settings)
    print(json.dumps(row, default=str))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_worker())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
