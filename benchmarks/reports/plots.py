"""Figures for the report, as PNG bytes, drawn with matplotlib's Agg canvas.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot, so drawing a report
touches no global backend state (safe inside a test run or a process that also uses pyplot).

One set of figures per protocol (see `grouping.group_results`): average mIoU against backbone-side
trainable parameters, per-class IoU heatmaps, training loss and target mIoU against iterations
(when the runs recorded "history"/"evaluations"), and speed/memory per method (from "profile").
A figure whose data no run recorded is skipped, never drawn empty.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from benchmarks.reports.frames import per_class_frame, summary_frame
from benchmarks.reports.grouping import (
    Protocol,
    group_results,
    method_name,
    split_runs,
    target_label,
    targets_of,
)

log = logging.getLogger(__name__)

DPI = 110


@dataclass(frozen=True)
class Plot:
    name: str
    """File stem, unique within a report (protocol slug + kind)."""
    title: str
    png: bytes
    protocol: Protocol | None = None


def figure_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _text(name: str) -> str:
    """A method's name as matplotlib shows it literally (a `$` would start its math notation)."""
    return str(name).replace("$", r"\$")


def _colors(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    names = list(dict.fromkeys(names))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def method_colors(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One colour per method for every figure of a set of runs: in the tables' order (best target average
    first), so a method keeps its colour from the Rein figure to the training curves and the profile bars."""
    ranked = summary_frame(results)
    return _colors([*(ranked["method"] if not ranked.empty else []), *sorted({method_name(r) for r in results})])


# -- individual figures ------------------------------------------------------------------------------
def miou_vs_params(results: list[dict[str, Any]], title: str = "") -> Figure | None:
    """Rein's Fig. 5: mIoU (mean, std bars) against backbone-side trainable parameters on a log axis,
    the held-out source beside the target average when the runs scored a source holdout.

    The two panels together show the field's inverted U: more trainable parameters fit the source
    better, while the target average peaks at a few million and falls off towards full fine-tuning.
    A log axis has no zero, so frozen-backbone methods (0 trainable) sit on a marked floor a decade
    below the smallest non-zero count.
    """
    summary = summary_frame(results)
    if summary.empty or summary["average"].isna().all():
        return None
    # A method whose runs record no parameter count has no place on this axis (drawn at 0, it read as frozen).
    uncounted = summary.loc[summary["trainable_params_m"].isna(), "method"].tolist()
    summary = summary[summary["trainable_params_m"].notna()]
    if summary.empty:
        return None
    panels = [("average", "average target mIoU (%)")]
    if "source" in summary.columns and summary["source"].notna().any():
        panels.insert(0, ("source", "held-out source mIoU (%)"))
    params = summary["trainable_params_m"].to_numpy(dtype=float)
    positive = params[params > 0]
    floor = (positive.min() / 10.0) if positive.size else 1e-3
    xs = np.where(params > 0, params, floor)
    fig = Figure(figsize=(6.4 * len(panels), 4.2))
    FigureCanvasAgg(fig)  # label placement measures the texts with its renderer
    colors = method_colors(results)
    for index, (column, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        points = []
        for x, (_, row) in zip(xs, summary.iterrows(), strict=True):
            if math.isnan(row[column]):
                continue
            std = row[f"{column}_std"] if not math.isnan(row[f"{column}_std"]) else None
            ax.errorbar([x], [row[column]], yerr=None if std is None else [[std], [std]], fmt="o",
                        color=colors[row["method"]], capsize=3, markersize=7)
            points.append(((x, row[column]), std or 0.0, _text(row["method"])))
        ax.set_xscale("log")
        ax.margins(x=0.15, y=0.12)
        if (params <= 0).any():
            ax.axvline(floor, color="0.7", linestyle=":", linewidth=1)
            ax.annotate("0 (frozen)", (floor, 0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                        textcoords="offset points", fontsize=7, color="0.4")
        ax.set_xlabel("backbone-side trainable parameters (M, log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        _place_labels(ax, points)
    missing = f" (not drawn, no parameter count recorded: {', '.join(uncounted)})" if uncounted else ""
    fig.suptitle(_text((title or "mIoU vs trainable parameters") + missing), fontsize=9)
    return fig


def _label_places() -> tuple[tuple[tuple[int, int], str, str, bool], ...]:
    """Where a label may go around its point, in points from it, with its alignment and whether a leader line
    joins it: the usual place first, then the other sides, then rings farther out every 30 degrees."""
    near = (((6, 4), "left", "baseline"), ((6, 0), "left", "center"), ((-6, 0), "right", "center"),
            ((0, 7), "center", "bottom"), ((0, -7), "center", "top"), ((6, -4), "left", "top"),
            ((-6, 4), "right", "bottom"), ((-6, -4), "right", "top"))
    places = [(offset, ha, va, False) for offset, ha, va in near]
    for radius in (16, 26, 38, 52):
        for degrees in range(0, 360, 30):
            dx, dy = radius * math.cos(math.radians(degrees)), radius * math.sin(math.radians(degrees))
            ha = "left" if dx > 0.3 * radius else "right" if dx < -0.3 * radius else "center"
            va = "bottom" if dy > 0.3 * radius else "top" if dy < -0.3 * radius else "center"
            places.append(((round(dx), round(dy)), ha, va, True))
    return tuple(places)


_LABEL_PLACES = _label_places()
_MARKER_CLEARANCE_PT = 6.0  # a 7-pt marker and the air that keeps a label beside it from reading as its own
# What a place costs: each px² of text, marker or error bar it covers (or of the axes it leaves), each of a leader
# line's samples inside another marker (the line then reads as that method's), and each point of the leader's
# length (a far label is harder to match to its point). Covering outweighs a leader's length.
_COVERED_COST = 3.0
_LEADER_CROSSING_COST = 10.0
_LEADER_LENGTH_COST = 1.0


def _place_labels(ax, points: list[tuple[tuple[float, float], float, str]], fontsize: float = 8.0) -> None:
    """Label each point (data position, std, text) where its text covers no other label, no marker and no
    error bar, measured with the figure's renderer: the usual place to the right first, then the other sides,
    then farther out with a thin leader line. Methods of one parameter count and score (lora and dora, set
    and set_released, the parameter-efficient cluster of the target panel) printed over each other and
    over each other's markers when labels only stepped down a line. Where no place is free, the cheapest
    is taken (`_COVERED_COST` and the leader's costs). The most crowded points choose first."""
    if not points:
        return
    renderer = ax.figure.canvas.get_renderer()
    ax.autoscale_view()  # the limits the drawing will have (margins applied), so data → pixels holds
    to_px = ax.transData.transform
    px_per_pt = ax.figure.dpi / 72.0
    radius = _MARKER_CLEARANCE_PT * px_per_pt
    centres = [to_px(xy) for xy, _, _ in points]
    markers = [Bbox.from_extents(cx - radius, cy - radius, cx + radius, cy + radius) for cx, cy in centres]
    error_bars = [Bbox.from_extents(cx - 3 * px_per_pt, to_px((xy[0], xy[1] - std))[1],  # the line and its caps
                                    cx + 3 * px_per_pt, to_px((xy[0], xy[1] + std))[1])
                  for (xy, std, _), (cx, _) in zip(points, centres, strict=True) if std > 0]
    inside = ax.get_window_extent(renderer)
    crowding = [sum(math.dist(c, other) < 40 * px_per_pt for other in centres) for c in centres]
    placed: list = []
    for i in sorted(range(len(points)), key=lambda k: -crowding[k]):
        xy, _, text = points[i]
        others = markers[:i] + markers[i + 1:]  # its own marker a label may touch
        probe = ax.annotate(text, xy, textcoords="offset points", xytext=(6, 4), fontsize=fontsize)
        best = None
        for offset, ha, va, leader in _LABEL_PLACES:
            probe.set_position(offset)
            probe.set_ha(ha)
            probe.set_va(va)
            box = probe.get_window_extent(renderer).padded(1.0)
            covered = sum(_shared_area(box, other) for other in (*placed, *others, *error_bars))
            covered += box.width * box.height - _shared_area(box, inside)  # the part outside the axes
            cost = _COVERED_COST * covered
            if leader:
                leader_points = _along(centres[i], (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
                crossings = sum(marker.contains(*point) for marker in others for point in leader_points)
                cost += _LEADER_CROSSING_COST * crossings + _LEADER_LENGTH_COST * math.hypot(*offset)
            if best is None or cost < best[0]:
                best = (cost, offset, ha, va, leader)
            if cost == 0:
                break
        probe.remove()
        _, offset, ha, va, leader = best
        label = ax.annotate(text, xy, textcoords="offset points", xytext=offset, fontsize=fontsize, ha=ha, va=va,
                            arrowprops=dict(arrowstyle="-", linewidth=0.4, color="0.6", shrinkA=0, shrinkB=3)
                            if leader else None)
        placed.append(_text_extent(label, renderer))


def _text_extent(annotation, renderer):
    """The box of an annotation's text alone (its own `get_window_extent` adds the leader line's)."""
    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def _along(start, x_end: float, y_end: float, samples: int = 12):
    """Points (px) along the segment from `start` to the end, both ends left out."""
    x0, y0 = start
    return [(x0 + (x_end - x0) * s / samples, y0 + (y_end - y0) * s / samples) for s in range(1, samples)]


def _shared_area(box, other) -> float:
    """Area (px²) the two boxes share, 0 when apart."""
    width = min(box.x1, other.x1) - max(box.x0, other.x0)
    height = min(box.y1, other.y1) - max(box.y0, other.y0)
    return max(width, 0.0) * max(height, 0.0)


def per_class_heatmap(results: list[dict[str, Any]], title: str = "") -> Figure | None:
    """Methods × classes IoU, one panel per target, cells annotated with the value."""
    frame = per_class_frame(results)
    if frame.empty:
        return None
    setting = str(frame["setting"].iloc[0])
    targets = targets_of(setting, [{"targets": {t: {}}} for t in frame["target"].unique()])
    ranking = summary_frame(results)["method"].tolist()
    methods = [m for m in ranking if m in set(frame["method"])]
    classes = frame.sort_values("class_index").drop_duplicates("class")["class"].tolist()
    fig = Figure(figsize=(max(7.0, 0.42 * len(classes) + 2.0), (0.32 * len(methods) + 1.0) * len(targets) + 0.6))
    axes = fig.subplots(len(targets), 1, squeeze=False)[:, 0]
    image = None
    for ax, target in zip(axes, targets, strict=False):
        last = ax is axes[-1]
        sub = frame[frame["target"] == target].pivot_table(index="method", columns="class", values="iou", dropna=False)
        grid = sub.reindex(index=methods, columns=classes).to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(methods)), labels=[_text(m) for m in methods], fontsize=7)
        ax.set_xticks(range(len(classes)), labels=classes if last else [], fontsize=7, rotation=60, ha="right")
        ax.set_title(f"{target_label(target)} ({target})", fontsize=8)
        for (i, j), value in np.ndenumerate(grid):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=5.5,
                        color="white" if value < 60 else "black")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="IoU (%)", shrink=0.8)
    fig.suptitle(_text(title or "per-class IoU"), fontsize=9)
    return fig


def training_curves(results: list[dict[str, Any]], title: str = "") -> Figure | None:
    """Loss against iterations and, when evaluated during training, each target's mIoU."""
    finished = [r for r in results if r.get("history") or r.get("evaluations")]
    if not finished:
        return None
    setting = str(finished[0].get("setting") or "")
    targets = [t for t in targets_of(setting, finished)
               if any(t in (e.get("targets") or {}) for r in finished for e in r.get("evaluations") or [])]
    has_loss = any(any("loss" in h for h in r.get("history") or []) for r in finished)
    has_source = any("source_heldout" in e for r in finished for e in r.get("evaluations") or [])
    # Evaluations during training score the held-out source; target panels come from older results.
    panels = (["loss"] if has_loss else []) + (["source_heldout"] if has_source else []) + targets
    if not panels:
        return None
    fig = Figure(figsize=(3.6 * len(panels) + 0.8, 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = method_colors(results)
    labelled: set[tuple[int, str]] = set()
    for res in sorted(finished, key=lambda r: (method_name(r), str(r.get("seed")))):
        method = method_name(res)
        for ax_index, panel in enumerate(panels):
            if panel == "loss":
                points = [(h["iter"], h["loss"]) for h in res.get("history") or [] if "iter" in h and h.get("loss") is not None]
            elif panel == "source_heldout":
                points = [(e["iter"], e["source_heldout"]) for e in res.get("evaluations") or []
                          if "iter" in e and e.get("source_heldout") is not None]
            else:
                points = [(e["iter"], e["targets"][panel]) for e in res.get("evaluations") or []
                          if "iter" in e and (e.get("targets") or {}).get(panel) is not None]
            if not points:
                continue
            label = method if (ax_index, method) not in labelled else None
            labelled.add((ax_index, method))
            xs, ys = zip(*sorted(points), strict=False)
            axes[ax_index].plot(xs, ys, color=colors[method], label=None if label is None else _text(label), linewidth=1.2,
                                marker="o" if len(xs) < 12 else None, markersize=3)
    for ax, panel in zip(axes, panels, strict=False):
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss" if panel == "loss" else "held-out source mIoU (%)" if panel == "source_heldout"
                      else f"{target_label(panel)} mIoU (%)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")  # a loss falls: its upper right is the emptiest corner
    fig.suptitle(_text(title or "training curves"), fontsize=9)
    return fig


PROFILE_METRICS = (
    ("train_images_per_s", "train images/s"),
    ("eval_images_per_s", "eval images/s"),
    ("peak_memory_mb", "peak memory (MiB)"),
)


def profile_chart(results: list[dict[str, Any]], title: str = "") -> Figure | None:
    """Bars per method (mean over seeds) for throughput and peak memory, with the device named."""
    finished = [r for r in results if r.get("profile")]
    metrics = [(key, label) for key, label in PROFILE_METRICS
               if any(_number((r.get("profile") or {}).get(key)) is not None for r in finished)]
    if not metrics:
        return None
    methods = sorted({method_name(r) for r in finished})
    fig = Figure(figsize=(max(6.0, 3.0 * len(metrics)), 0.35 * len(methods) + 1.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colors = method_colors(results)
    for ax, (key, label) in zip(axes, metrics, strict=False):
        values = []
        for method in methods:
            found = [_number((r.get("profile") or {}).get(key)) for r in finished if method_name(r) == method]
            found = [v for v in found if v is not None]
            values.append(sum(found) / len(found) if found else math.nan)
        ax.barh(range(len(methods)), values, color=[colors[m] for m in methods])
        for row, value in enumerate(values):
            if math.isnan(value):  # not measured: said, not drawn as a zero-length bar
                ax.annotate("n/a", (0, row), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7, color="0.4")
        ax.set_yticks(range(len(methods)), labels=[_text(m) for m in methods] if ax is axes[0] else [""] * len(methods),
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label, fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    devices = sorted({str((r.get("profile") or {}).get("device", "?")) for r in finished})
    dtypes = sorted({str((r.get("profile") or {}).get("dtype", "?")) for r in finished})
    fig.suptitle(_text(f"{title or 'speed and memory'} — device {', '.join(devices)}, dtype {', '.join(dtypes)}"), fontsize=9)
    return fig


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# -- all figures of a set of runs ------------------------------------------------------------------
FIGURES = (
    ("miou_vs_params", "Source and target mIoU vs trainable parameters (Rein's Fig. 5)", miou_vs_params),
    ("per_class_iou", "Per-class IoU", per_class_heatmap),
    ("training_curves", "Training curves", training_curves),
    ("profile", "Speed and memory", profile_chart),
)


def make_plots(results: Iterable[dict[str, Any]]) -> list[Plot]:
    """Every figure the finished runs have data for, per protocol."""
    plots = []
    for proto, members in group_results(results).items():
        finished, _ = split_runs(members)
        if not finished:
            continue
        for kind, label, draw in FIGURES:
            title = f"{label} — {proto.title}"
            fig = draw(finished, title=title)
            if fig is None:
                log.debug("no data for %s of %s", kind, proto.title)
                continue
            plots.append(Plot(name=f"{proto.slug}_{kind}", title=title, png=figure_png(fig), protocol=proto))
    return plots
