"""Where a training step's time goes: `torch.profiler` over a few of the protocol's own steps.

`profile` attaches this to a method's row when its model FLOP utilisation is below `LOW_MFU`
(or for every method with `--breakdown all`). Three views of the same steps:

- device busy: kernel time over wall time (CUDA). A low share means the GPU waits for the host
  (Python overhead, the Hungarian matching's host copies, data) — more FLOPs will not help;
- categories: operator self time summed by kind (matmul, attention, convolution, normalisation,
  elementwise, copies, optimizer, FFT). On CUDA an operator's self time is the time of the kernels
  it launched, so the categories add up to the device busy time; on the CPU it is host time;
- the top operators and (CUDA) the top kernels by self time.

The profiler adds its own overhead to each operator, so the wall time here is above the timed
steps' median; shares are what this view is for.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

LOW_MFU = 0.30
"""Below this model FLOP utilisation a training step gets a breakdown (issue 7's threshold)."""

# Checked in order on the lower-cased operator name; the first match names the category.
CATEGORIES: tuple[tuple[str, str], ...] = (
    # The profiler's step range: its self time is host time spent outside any operator (Python).
    ("host outside operators", r"^profilerstep"),
    ("attention", r"scaled_dot_product|flash|efficient_attention|fmha|cudnn_attention"),
    ("matmul", r"\b(aten::)?(mm|addmm|bmm|baddbmm|addbmm|matmul|linear|_addmm_activation|einsum)\b|gemm"),
    ("convolution", r"conv"),
    ("optimizer", r"adam|_foreach|fused_sgd"),
    ("normalisation", r"norm"),
    ("fft", r"fft"),
    ("copies", r"copy|::to\b|_to_copy|contiguous|clone|cat\b|stack|memcpy|memset|index|gather|scatter|pad"),
    ("host sync", r"item|_local_scalar_dense|nonzero|synchronize"),
)


def category(operator: str) -> str:
    name = operator.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            return label
    return "elementwise & other"


def _self_device_us(event: Any) -> float:
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0)


def summarize_events(events: Any, on_device: bool, wall_s: float, steps: int, top: int = 12) -> dict[str, Any]:
    """The breakdown's numbers from `prof.key_averages()` (times in seconds per step)."""
    from torch.autograd import DeviceType

    operators = [e for e in events if e.device_type == DeviceType.CPU]
    # On the device's timeline the profiler also records the ranges of `record_function` annotations
    # (`ProfilerStep#N`, `Optimizer.step#AdamW.step`): spans around kernels, not kernels; counted, they
    # put the GPU busier than the wall (132 % on the first H200 profile). torch's own table skips them too.
    kernels = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]

    def self_s(event: Any) -> float:
        return (_self_device_us(event) if on_device else float(event.self_cpu_time_total)) / 1e6 / steps

    measured = sum(self_s(e) for e in operators) or 1e-12
    per_category: dict[str, float] = defaultdict(float)
    for event in operators:
        per_category[category(event.key)] += self_s(event)
    wall_per_step = wall_s / steps
    summary: dict[str, Any] = {
        "steps": steps,
        "clock": "device (kernel time)" if on_device else "host (CPU self time)",
        "wall_s_per_step": wall_per_step,
        "measured_s_per_step": measured,
        "categories": [{"category": k, "s_per_step": v, "share": v / measured}
                       for k, v in sorted(per_category.items(), key=lambda kv: -kv[1])],
        "top_operators": [{"name": e.key, "category": category(e.key), "calls_per_step": e.count / steps,
                           "s_per_step": self_s(e), "share": self_s(e) / measured}
                          for e in sorted(operators, key=self_s, reverse=True)[:top]],
    }
    if on_device:
        busy = sum(_self_device_us(e) for e in kernels) / 1e6 / steps
        summary["device_busy_s_per_step"] = busy
        summary["device_busy_share"] = busy / wall_per_step if wall_per_step else None
        summary["top_kernels"] = [{"name": e.key[:120], "s_per_step": _self_device_us(e) / 1e6 / steps,
                                   "share": _self_device_us(e) / 1e6 / steps / (busy or 1e-12)}
                                  for e in sorted(kernels, key=_self_device_us, reverse=True)[:top]]
    return summary


def time_breakdown(model, method, exp, device: torch.device, steps: int = 3) -> dict[str, Any]:
    """Profile `steps` protocol training steps (after one warm-up step) and summarise them."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from benchmarks.timing import time_training_steps

    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    # Profiler steps follow the protocol's step stamps: the set-up before the first stamp waits,
    # the first protocol step warms up, the next `steps` are recorded.
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps, repeat=1)) as prof:
        seconds = time_training_steps(model, method, exp, device, warmup=1, repeats=steps, each_step=prof.step)
    return summarize_events(prof.key_averages(), on_device, sum(seconds), steps)


def format_breakdown(row: dict[str, Any]) -> str:
    """A markdown section for one method's breakdown."""
    info = row["time_breakdown"]
    ms = 1000.0
    lines = [f"## {row['method']}", ""]
    facts = [f"{info['steps']} profiled steps, {info['wall_s_per_step'] * ms:,.1f} ms wall per step under the profiler",
             f"clock: {info['clock']}"]
    if row.get("mfu") is not None:
        facts.insert(0, f"MFU {row['mfu'] * 100:.1f} %")
    if info.get("device_busy_share") is not None:
        facts.append(f"device busy {info['device_busy_s_per_step'] * ms:,.1f} ms per step "
                     f"({info['device_busy_share'] * 100:.0f} % of the wall time)")
    lines += [f"- {fact}" for fact in facts] + ["", "| category | ms/step | share |", "| --- | ---: | ---: |"]
    lines += [f"| {c['category']} | {c['s_per_step'] * ms:,.2f} | {c['share'] * 100:.1f} % |" for c in info["categories"]]
    lines += ["", "| operator | category | calls/step | ms/step | share |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| `{o['name']}` | {o['category']} | {round(o['calls_per_step'], 1):g} | {o['s_per_step'] * ms:,.2f} | "
              f"{o['share'] * 100:.1f} % |" for o in info["top_operators"]]
    if info.get("top_kernels"):
        lines += ["", "| kernel | ms/step | share of busy |", "| --- | ---: | ---: |"]
        lines += [f"| `{k['name']}` | {k['s_per_step'] * ms:,.2f} | {k['share'] * 100:.1f} % |" for k in info["top_kernels"]]
    return "\n".join(lines) + "\n"


def breakdown_markdown(rows: list[dict[str, Any]], subject: str) -> str:
    """The `<stem>-breakdown.md` file: one section per row that has a breakdown."""
    intro = [f"# Where the training step's time goes: {subject}", "",
             f"Methods profiled with torch.profiler (those below {LOW_MFU:.0%} MFU, or all with `--breakdown all`); "
             "see `benchmarks/breakdown.py` for what each view counts.", ""]
    return "\n".join(intro + [format_breakdown(r) for r in rows])
