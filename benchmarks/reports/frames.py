"""The numbers behind every table, as pandas frames (also what CSV output writes): one row per
(protocol, method) over its seeds, one per run, one per class; the published numbers beside them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks import provenance
from benchmarks.errors import UserError
from benchmarks.reports.grouping import (
    PROTOCOL_COLUMNS,
    TARGET_LABELS,
    group_results,
    has_source_score,
    method_name,
    method_role,
    split_runs,
    targets_of,
)

PUBLISHED_CSV = Path(__file__).resolve().parents[2] / "results" / "published.csv"

# The columns every frame has, whatever the runs: what an empty frame still names, so that its CSV is a
# header a reader can parse rather than a blank line.
SUMMARY_COLUMNS = [*PROTOCOL_COLUMNS, "method", "role", "seeds", "provenances", "method_versions",
                   "trainable_params_m", "average", "average_std"]
PER_CLASS_COLUMNS = [*PROTOCOL_COLUMNS, "method", "target", "class", "class_index", "iou", "iou_std", "seeds"]
COMPARISON_COLUMNS = [*PROTOCOL_COLUMNS, "method", "seeds",
                      *(f"{metric}_{side}" for metric in ("params_m", "average")
                        for side in ("published", "harness", "delta")),
                      "citation", "verified"]


def _average(result: dict[str, Any]) -> float | None:
    if result.get("average_miou") is not None:
        return float(result["average_miou"])
    values = [m.get("miou") for m in (result.get("targets") or {}).values()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    series = pd.Series(values, dtype="float64").dropna()
    if series.empty:
        return math.nan, math.nan
    std = float(series.std(ddof=1)) if len(series) > 1 else math.nan
    return float(series.mean()), std


def summary_frame(results: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (protocol, method) over its finished seeds, ranked by average mIoU.

    Columns: preset, setting, backbone, head, config, method, seeds, trainable_params_m, then
    `source`, `source_std` (held-out source pairs, when scored), `<target>` and `<target>_std` for
    each target and `average`, `average_std`.
    """
    rows = []
    for proto, members in group_results(results).items():
        finished, _ = split_runs(members)
        targets = targets_of(proto.setting, finished)
        by_method: dict[str, list[dict[str, Any]]] = {}
        for res in finished:
            by_method.setdefault(method_name(res), []).append(res)
        for method, runs in by_method.items():
            params = [(r.get("params") or {}).get("backbone_trainable") for r in runs]
            params = [p for p in params if p is not None]
            row: dict[str, Any] = {
                **proto.columns, "method": method, "role": method_role(runs[0]),
                "seeds": len(runs),
                # Runs of one configuration from different weight files or data: a row to read apart.
                "provenances": len({provenance.identity(r.get("provenance")) for r in runs} - {""}),
                # Or from method code that differed: other defaults, or another count of trainable parameters.
                "method_versions": len({_method_version(r) for r in runs} - {None}),
                "trainable_params_m": (sum(params) / len(params) / 1e6) if params else math.nan,
            }
            if has_source_score(finished):
                values = [(r.get("source_heldout") or {}).get("miou") for r in runs]
                row["source"], row["source_std"] = _mean_std([v for v in values if v is not None])
            for target in targets:
                values = [((r.get("targets") or {}).get(target) or {}).get("miou") for r in runs]
                row[target], row[f"{target}_std"] = _mean_std([v for v in values if v is not None])
            row["average"], row["average_std"] = _mean_std([a for a in map(_average, runs) if a is not None])
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    frame = frame.sort_values([*PROTOCOL_COLUMNS, "average"], ascending=[True] * len(PROTOCOL_COLUMNS) + [False],
                              na_position="last")
    return frame.reset_index(drop=True)


def _method_version(result: dict[str, Any]) -> str | None:
    """The method's recorded hyperparameters and trainable parameter count, as one comparable string (None
    where the result records neither)."""
    method = result.get("method")
    hyperparameters = method.get("hyperparameters") if isinstance(method, dict) else None
    trainable = (result.get("params") or {}).get("backbone_trainable")
    if hyperparameters is None and trainable is None:
        return None
    return json.dumps([hyperparameters, trainable], sort_keys=True, default=str)


def seed_frame(results: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per finished run: the protocol's keys, method, seed and target average (what
    `summary_frame` aggregates over seeds)."""
    rows = []
    for proto, members in group_results(results).items():
        finished, _ = split_runs(members)
        for res in finished:
            rows.append({**proto.columns, "method": method_name(res), "seed": res.get("seed"), "average": _average(res)})
    return pd.DataFrame(rows, columns=[*PROTOCOL_COLUMNS, "method", "seed", "average"])


def per_class_frame(results: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long frame: one row per (protocol, method, target, class) with the IoU's mean and std."""
    rows = []
    for proto, members in group_results(results).items():
        finished, _ = split_runs(members)
        collected: dict[tuple[str, str, str], list[float]] = {}
        order: dict[tuple[str, str, str], int] = {}
        for res in finished:
            for target, metrics in (res.get("targets") or {}).items():
                for position, (cls, iou) in enumerate((metrics.get("per_class_iou") or {}).items()):
                    key = (method_name(res), target, cls)
                    order.setdefault(key, position)
                    if iou is not None:
                        collected.setdefault(key, []).append(float(iou))
                    else:
                        collected.setdefault(key, [])
        for (method, target, cls), values in collected.items():
            mean, std = _mean_std(values)
            rows.append({
                **proto.columns, "method": method, "target": target,
                "class": cls, "class_index": order[(method, target, cls)], "iou": mean, "iou_std": std,
                "seeds": len(values),
            })
    return pd.DataFrame(rows, columns=PER_CLASS_COLUMNS)


def load_published(path: Path | str | None = None) -> pd.DataFrame:
    """results/published.csv: numbers from the papers, each row with its source and how verified."""
    path = Path(path) if path is not None else PUBLISHED_CSV
    if not path.is_file():
        raise UserError(f"published numbers file {path} not found; restore results/published.csv from the repository")
    frame = pd.read_csv(path)
    required = {"setting", "backbone", "method", "trainable_params_m", "average", "source", "verified"}
    missing = required - set(frame.columns)
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(sorted(missing))}; see the header of results/published.csv")
    # A row twice would count its method twice in ρ; a number with words in it would end in a traceback.
    key = ["setting", "backbone", "method"]
    repeated = frame[frame.duplicated(key, keep="first")]
    if not repeated.empty:
        line = int(repeated.index[0]) + 2  # the header is line 1
        first = repeated.iloc[0]
        raise UserError(f"{path} line {line}: {first['setting']} {first['backbone']} {first['method']} is listed "
                        "twice; keep one row per (setting, backbone, method)")
    for column in [c for c in frame.columns if c in ("trainable_params_m", "average", *TARGET_LABELS)]:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column].notna() & numbers.isna()
        if bad.any():
            line = int(frame.index[bad][0]) + 2
            raise UserError(f"{path} line {line}: {column}={frame[column][bad].iloc[0]!r} is not a number; "
                            "leave the cell empty where the paper gives none")
        frame[column] = numbers
    return frame


def comparison_frame(summary: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Harness rows joined with the published rows of the same (setting, backbone, method).

    Columns: the summary's group columns and method, then for params, each target and the average:
    `<x>_published`, `<x>_harness`, `<x>_delta` (harness − published), then citation (published.csv's
    `source`, renamed: the main frame's `source` is the held-out source score) and verified.
    """
    if summary.empty:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    # published.csv's `source` is the citation; the summary's is the held-out source score.
    citations = published.rename(columns={"source": "citation"})
    merged = summary.merge(citations, on=["setting", "backbone", "method"], how="inner", suffixes=("", "_pub"))
    rows = []
    for _, row in merged.iterrows():
        out: dict[str, Any] = {k: row[k] for k in (*PROTOCOL_COLUMNS, "method", "seeds")}
        metrics = ["trainable_params_m"] + [t for t in TARGET_LABELS if t in summary.columns] + ["average"]
        for metric in metrics:
            ours = row.get(metric, math.nan)
            theirs = row.get(f"{metric}_pub", math.nan) if metric in published.columns else math.nan
            name = "params_m" if metric == "trainable_params_m" else metric
            out[f"{name}_published"] = theirs
            out[f"{name}_harness"] = ours
            out[f"{name}_delta"] = ours - theirs if _is_number(ours) and _is_number(theirs) else math.nan
        out["citation"], out["verified"] = row["citation"], row["verified"]
        rows.append(out)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=COMPARISON_COLUMNS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
