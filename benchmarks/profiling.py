"""Cost profiles of methods: training and inference throughput, peak memory, with FLOPs and MFU.

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
- FLOPs per image and MFU on GPUs: `benchmarks.flops`; the profile's files: `benchmarks.reports.profiles`.

`profile_method(exp, method, device)` returns the dict a result stores under "profile".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import plugins
from benchmarks.config import Experiment, experiment_from_dict
from benchmarks.errors import UserError
from benchmarks.flops import count_flops, model_flops_utilisation
from benchmarks.memory import current_rss_mb, is_out_of_memory, peak_memory, reset_peak_memory
from benchmarks.method import build_method, use_method_files
from benchmarks.resources import device_name
from benchmarks.synthetic_inputs import eval_image_size, window_count, without_weight_files
from benchmarks.timing import summarize, time_inference, time_training_steps

log = logging.getLogger(__name__)


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


# -- one method ---------------------------------------------------------------------------------------

def profile_method(exp: Experiment, method_name: str, device: torch.device | str = "auto",
                   settings: ProfileSettings | None = None) -> dict[str, Any]:
    """The cost profile of one method on `exp`'s model and sizes (random weights, synthetic data).

    Returns the keys results store under "profile" (train_images_per_s, eval_images_per_s,
    peak_memory_mb, flops_forward_per_image, flops_train_step_per_image, mfu, device, dtype) and
    the details behind them. Out-of-memory is reported as status "oom", not raised.
    """
    from benchmarks import resources
    from benchmarks.model import build_model
    from benchmarks.protocol import autocast_dtype, seed_everything, select_device

    settings = settings or ProfileSettings()
    device = select_device(str(device)) if not isinstance(device, torch.device) else device
    cpu_plan = resources.plan(exp.data.num_workers, device.type)
    resources.apply(cpu_plan)  # the threads a run of this preset would use here (affinity, cgroup quota)
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
        "eval_crop_size": exp.eval.crop_size,  # the window `flops_forward_per_image` is counted on
        "eval_image_size": list(eval_image_size(exp)),
        "windows_per_image": window_count(*eval_image_size(exp), exp.eval.crop_size, exp.eval.stride),
        "cpu_threads": torch.get_num_threads(),
        "cpu_plan": cpu_plan.reason,  # threads, loader workers and OpenMP's wait policy
        "baseline_memory_mb": current_rss_mb() if device.type == "cpu" else 0.0,
    }
    method = build_method(method_name, exp.methods.get(method_name))
    exp = dataclasses.replace(exp, eval=method.evaluation_settings(exp.eval))  # as a run scores it
    profile["eval_batch_windows"] = exp.eval.batch_windows
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
