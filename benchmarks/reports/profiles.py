"""A cost profile's files: the JSON rows with their metadata, the Markdown table, the speed and
memory plots, and the environment they were measured in."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.config import Experiment
from benchmarks.flops import peak_bf16_flops
from benchmarks.resources import device_name, package_versions


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
        headers += ["train img/s", "step ms (±IQR/2)", "eval img/s", "eval ms/img (±IQR/2)", "peak MiB", "MFU %"]
    headers += ["fwd GFLOP/img", "train GFLOP/img", "eval GFLOP/img", "trainable M", "added M", "status"]
    if fmt == "github":  # a `|` in a cell (an error message's) would be read as one more column
        table = [[cell.replace("|", "\\|") for cell in line] for line in table]
    return tabulate(table, headers=headers, tablefmt=fmt, disable_numparse=True)


def conventions(rows: list[dict[str, Any]], exp: Experiment) -> list[str]:
    """What the table's columns count, in its own file: a reader of the numbers needs no source."""
    from benchmarks.synthetic_inputs import eval_image_size, window_count
    from datasets.synthetic import PAPER_RESOLUTIONS, SIZE_RESOLUTIONS  # BDD100K is scored at its own size

    height, width = eval_image_size(exp)
    windows = window_count(height, width, exp.eval.crop_size, exp.eval.stride)
    world = exp.data.synthetic  # the world a preset generates (the proxy's BDD100K is 160×90), or "" for real data
    bdd_width, bdd_height = SIZE_RESOLUTIONS.get(world, PAPER_RESOLUTIONS).bdd100k
    bdd_source = f"the synthetic world `{world}`" if world else "the real release"
    bdd = window_count(bdd_height, bdd_width, exp.eval.crop_size, exp.eval.stride)
    lines = [
        "Conventions:",
        "- FLOPs: 2 per multiply-add (torch's flop counter); a training step's in the method's main phase, the one "
        "timed (from half the schedule).",
        f"- eval: one image of {width}×{height} (`eval.fit_size`: Cityscapes' and Mapillary's evaluated size), "
        f"{windows} window(s) of {exp.eval.crop_size} at stride {exp.eval.stride}. BDD100K is scored at its images' "
        f"own size, {bdd_width}×{bdd_height} in {bdd_source}: {bdd} window(s), "
        f"{bdd / windows:.2f}× the time and FLOPs of a row's eval figures.",
    ]
    if any(r.get("train_images_per_s") for r in rows):
        lines += [
            "- memory in MiB (2^20 bytes): on CUDA the allocator's peak allocated bytes; on a CPU the process's peak "
            "resident set (VmHWM), which includes the interpreter and libraries (`baseline_memory_mb` in the JSON) "
            "and, for eval, what the training phase before it left held.",
            "- a timed step includes collating its batch and copying it to the device (the profile loads in the main "
            "process; a run's loader workers collate ahead).",
            "- MFU: training FLOPs per second over the GPU's dense bf16/fp16 peak; none for a run in fp32.",
        ]
    return lines


def _status(row: dict[str, Any]) -> str:
    status = row.get("status", "ok")
    if status != "ok":
        return f"{status}: {row.get('error') or ''}"[:80]
    counted = str(row.get("flops_counted_with", ""))
    return f"ok (FLOPs {counted})" if counted.startswith("not counted") else "ok"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def output_stem(preset: str, device_label: str, when: dt.date | None = None, out: Path | None = None) -> str:
    """`<preset>-<device>-<date>`, with `-2`, `-3`, ... where a profile of that name is already in `out`: a
    second profile on one day never replaces the first (nor does a re-run cut short replace a whole one).

    With `out`, the name is reserved at once by creating its (empty) `.md`, which the profile's table later
    replaces, so that two profiles started together into one folder cannot both take it."""
    stem = f"{preset}-{_slug(device_label)}-{(when or dt.date.today()).isoformat()}"
    if out is None:
        return stem
    Path(out).mkdir(parents=True, exist_ok=True)  # checked writable before; the reserved name is its first file
    taken = {p.stem for p in Path(out).glob(f"{stem}*.json")}
    candidate, number = stem, 1
    while True:
        if candidate not in taken:
            try:
                Path(out, f"{candidate}.md").open("x").close()
                return candidate
            except FileExistsError:
                pass
        number += 1
        candidate = f"{stem}-{number}"


def environment_summary(device: torch.device | None) -> dict[str, Any]:
    from benchmarks.config import PROJECT_ROOT
    from benchmarks.provenance import code_state

    info: dict[str, Any] = {"python": platform.python_version(), **package_versions(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            **code_state(PROJECT_ROOT)}
    if device is not None:
        info["device"] = str(device)
        info["device_name"] = device_name(device)
        peak = peak_bf16_flops(info["device_name"], str(device))
        info["peak_bf16_tflops"] = None if peak is None else peak / 1e12
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
    lines += ["", format_table(rows), "", *conventions(rows, exp), ""]
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
    """`<stem>-speed.png` (train and eval images/s, IQR bars) and `<stem>-memory.png` (peak MiB)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from benchmarks.results import atomic_write_bytes

    names = [r["method"] for r in rows]
    panels = {
        "speed": [("train images/s", "train_images_per_s", "train_step_s", "batch_size"),
                  ("eval images/s", "eval_images_per_s", "eval_image_s", None)],
        "memory": [("peak memory (MiB)", "peak_memory_mb", None, None)],
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
