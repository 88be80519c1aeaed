"""Paper-style tables built from result files only.

Three views of the runs, each grouped by *protocol* so that numbers from different protocols never
share a table: a protocol is (preset, setting, backbone, head) plus a fingerprint of every setting
that can change the numbers (see `protocol_fingerprint`); seeds of one protocol are aggregated.

- the main table: method, backbone-side trainable parameters (M), mIoU per target and their
  unweighted average, mean ± sample std (n−1) over seeds when there are several, best in bold;
- the per-class IoU tables, one per target;
- the published numbers (results/published.csv) beside the harness's, with the difference
  (harness − published), for the (setting, backbone, method) triples both have;
- for a proxy backbone (one that stands in for a VFM the papers use, `PROXY_STANDS_IN_FOR`), the
  published averages of the VFM it stands in for beside the proxy's, both ranks and Spearman's ρ (of
  the seed means, and of each seed alone): how far the proxy's ordering of the methods can be trusted.

Every table renders as Markdown, LaTeX (booktabs) or HTML; CSV output is the tidy numeric frame
behind the tables (full precision, mean and std in separate columns, one row per method).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import pandas as pd

from benchmarks import provenance
from benchmarks.config import NOT_HASHED, SETTINGS
from benchmarks.errors import UserError

log = logging.getLogger(__name__)

PUBLISHED_CSV = Path(__file__).resolve().parents[2] / "results" / "published.csv"
FORMATS = ("markdown", "latex", "csv", "html")

# A proxy backbone → the published backbone whose role it plays (benchmarks/backbones.py: proxy_vit is
# the small ViT pretrained to stand in for DINOv2-L on a CPU).
PROXY_STANDS_IN_FOR = {"proxy_vit": "dinov2_vitl14"}

TARGET_LABELS = {"cityscapes": "Citys.", "bdd100k": "BDD", "mapillary": "Map.", "acdc": "ACDC"}
MISSING = "—"
#: The numeric frames' columns that name a protocol; grouping a frame by them gives `Protocol(*key)`.
PROTOCOL_COLUMNS = ["preset", "setting", "backbone", "head", "config"]

# Settings that cannot change a run's numbers (where files live, how many loader workers, how often
# to log) or that are a matrix axis the table already shows (seed, backbone). Two runs whose
# experiments differ only here belong to the same protocol.
NON_PROTOCOL_KEYS: tuple[tuple[str, ...], ...] = (
    ("run",),
    ("preset",),
    ("train", "seed"),
    ("train", "device"),
    ("train", "eval_interval"),
    ("model", "backbone"),
    ("data", "root"),
    ("eval", "batch_windows"),
    *NOT_HASHED,  # what leaves the run's own identity (workers, preflight, log and checkpoint cadence)
)


# -- grouping ---------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Protocol:
    """What must be equal for two runs' numbers to be comparable in one table."""

    preset: str
    setting: str
    backbone: str
    head: str
    fingerprint: str = ""
    #: What sets this configuration apart from the others of its base, e.g. "model.weights=[proxy_vit=random]".
    variant: str = field(default="", compare=False)

    @property
    def base(self) -> tuple[str, str, str, str]:
        return (self.preset, self.setting, self.backbone, self.head)

    @property
    def columns(self) -> dict[str, str]:
        """The protocol as the numeric frames' leading columns (`PROTOCOL_COLUMNS`)."""
        return {"preset": self.preset, "setting": self.setting, "backbone": self.backbone, "head": self.head,
                "config": self.fingerprint}

    @property
    def title(self) -> str:
        text = f"{self.setting} · {self.backbone} · {self.head} head · preset {self.preset}"
        if not self.fingerprint:
            return text
        return f"{text} · {self.variant} (config {self.fingerprint})" if self.variant else f"{text} · config {self.fingerprint}"

    @property
    def slug(self) -> str:
        raw = f"{self.preset}_{self.setting}_{self.backbone}_{self.head}_{self.fingerprint}".strip("_")
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in raw.replace("->", "2"))


def protocol_fingerprint(experiment: dict[str, Any] | None, loaded: dict[str, Any] | None = None) -> str:
    """Short hash of the experiment without the settings in NON_PROTOCOL_KEYS ("" when unknown);
    `loaded` is the provenance record of the weights the run loaded, when the result has one."""
    if not experiment:
        return ""
    return hashlib.sha256(json.dumps(protocol_settings(experiment, loaded), sort_keys=True).encode()).hexdigest()[:8]


def protocol_settings(experiment: dict[str, Any], loaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The experiment as the fingerprint sees it: settings that cannot change the numbers removed,
    checkpoints named by content where the run recorded what it loaded, else by file name."""
    payload = json.loads(json.dumps(experiment, default=str))
    model = payload.get("model")
    if isinstance(model, dict) and loaded and "sha256" in loaded:
        # Which checkpoint, not how it was named: the backbone's default file and the same file
        # passed as model.weights (from any folder) are one protocol; another file or random
        # initialisation is not.
        model["weights"] = [f"{loaded.get('backbone')}={_content_name(loaded.get('sha256'))}"]
    elif isinstance(model, dict) and model.get("weights"):
        # A result from before provenance existed: the same file in another folder (or on another
        # machine) is the same protocol.
        model["weights"] = sorted(_weights_identity(str(entry)) for entry in model["weights"])
    for path in NON_PROTOCOL_KEYS:
        node = payload
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return payload


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _variant_labels(results: dict[str, dict[str, Any]], most: int = 3) -> dict[str, str]:
    """fingerprint → "key=value, ..." over the settings in which these configurations differ
    (`results`: one result of each configuration)."""
    flat = {fp: _flatten(protocol_settings(res.get("experiment") or {}, _loaded_weights(res)))
            for fp, res in results.items()}
    keys = sorted({k for f in flat.values() for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]

    def show(value: Any) -> str:
        if value is None:
            return "unset"
        if isinstance(value, list):
            return "[" + ", ".join(map(str, value)) + "]"
        return str(value)

    labels = {}
    for fp, settings in flat.items():
        parts = [f"{k}={show(settings.get(k))}" for k in differing[:most]]
        labels[fp] = ", ".join(parts) + (f", +{len(differing) - most} more" if len(differing) > most else "")
    return labels


def _weights_identity(entry: str) -> str:
    """"BACKBONE=/any/folder/file.pth" → "BACKBONE=file.pth"; "BACKBONE=random" stays."""
    name, _, path = entry.partition("=")
    return f"{name}={PurePath(path).name or path}"


def _content_name(sha256: str | None) -> str:
    """A checkpoint as a configuration label names it. Not `provenance.short`: a label is a key (no
    ellipsis), and random initialisation is spelled as `model.weights` spells it, "random"."""
    return f"sha256:{sha256[:12]}" if sha256 else "random"


def _loaded_weights(result: dict[str, Any]) -> dict[str, Any] | None:
    """The provenance record of the weights a run loaded (None for a result written before provenance)."""
    record = result.get("provenance")
    return record.get("weights") if isinstance(record, dict) and isinstance(record.get("weights"), dict) else None


def protocol_of(result: dict[str, Any]) -> Protocol:
    return Protocol(
        preset=str(result.get("preset") or "?"),
        setting=str(result.get("setting") or "?"),
        backbone=str(result.get("backbone") or "?"),
        head=str(result.get("head") or "?"),
        fingerprint=protocol_fingerprint(result.get("experiment"), _loaded_weights(result)),
    )


def method_name(result: dict[str, Any]) -> str:
    method = result.get("method")
    return str(method.get("name") if isinstance(method, dict) else method)


def method_role(result: dict[str, Any]) -> str:
    """The method's role in the comparison as its result records it; results written before the
    field existed take it from the registered method of that name (empty when none is)."""
    method = result.get("method")
    if isinstance(method, dict) and method.get("role"):
        return str(method["role"])
    from benchmarks.method import available_methods

    registered = available_methods().get(method_name(result))
    return registered.role if registered else ""


def group_results(results: Iterable[dict[str, Any]]) -> dict[Protocol, list[dict[str, Any]]]:
    """Results by protocol; fingerprints are kept only where a (preset, setting, backbone, head)
    holds more than one configuration, so ordinary tables get short titles."""
    by_exact: dict[Protocol, list[dict[str, Any]]] = {}
    for res in results:
        by_exact.setdefault(protocol_of(res), []).append(res)
    fingerprints: dict[tuple[str, str, str, str], set[str]] = {}
    for proto in by_exact:
        fingerprints.setdefault(proto.base, set()).add(proto.fingerprint)
    labels: dict[str, str] = {}
    for base, prints in fingerprints.items():
        if len(prints) > 1:
            labels.update(_variant_labels({p.fingerprint: members[0]
                                           for p, members in by_exact.items() if p.base == base}))
    grouped: dict[Protocol, list[dict[str, Any]]] = {}
    for proto, members in by_exact.items():
        if len(fingerprints[proto.base]) == 1:
            proto = Protocol(*proto.base)
        else:
            proto = dataclasses.replace(proto, variant=labels.get(proto.fingerprint, ""))
        grouped.setdefault(proto, []).extend(members)
    return dict(sorted(grouped.items()))


def split_runs(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(finished, unfinished) of one protocol, one result per (method, seed).

    A re-run replaces an earlier attempt: when a (method, seed) finished at least once, its failed
    attempts are stale and not listed; among several finished ones the latest is kept.
    """
    finished: dict[tuple[str, Any], dict[str, Any]] = {}
    unfinished: dict[tuple[str, Any], dict[str, Any]] = {}
    for res in results:
        key = (method_name(res), res.get("seed"))
        if res.get("status") == "finished":
            if key not in finished or _finish_time(res) >= _finish_time(finished[key]):
                finished[key] = res
        elif key not in unfinished or _finish_time(res) >= _finish_time(unfinished[key]):
            unfinished[key] = res
    stale = [key for key in unfinished if key in finished]
    for key in stale:
        del unfinished[key]
    return list(finished.values()), list(unfinished.values())


def _finish_time(result: dict[str, Any]) -> str:
    timings = result.get("timings") or {}
    return str(timings.get("finished") or timings.get("started") or "")


def targets_of(setting: str, results: Iterable[dict[str, Any]]) -> list[str]:
    """The setting's targets in the papers' order, then any other target the runs scored."""
    ordered = list(SETTINGS.get(setting, ("", ()))[1])
    extra = sorted({t for res in results for t in (res.get("targets") or {})} - set(ordered))
    present = {t for res in results for t in (res.get("targets") or {})}
    return [t for t in ordered if t in present] + extra


def has_source_score(results: Iterable[dict[str, Any]]) -> bool:
    """Whether any run scored held-out source pairs (presets with data.source_holdout > 0)."""
    return any(res.get("source_heldout") for res in results)


def _average(result: dict[str, Any]) -> float | None:
    if result.get("average_miou") is not None:
        return float(result["average_miou"])
    values = [m.get("miou") for m in (result.get("targets") or {}).values()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# -- numeric frames (also the CSV output) -----------------------------------------------------------
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
        return frame
    frame = frame.sort_values([*PROTOCOL_COLUMNS, "average"], ascending=[True] * len(PROTOCOL_COLUMNS) + [False],
                              na_position="last")
    return frame.reset_index(drop=True)


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
    return pd.DataFrame(rows)


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
    return frame


def comparison_frame(summary: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Harness rows joined with the published rows of the same (setting, backbone, method).

    Columns: the summary's group columns and method, then for params, each target and the average:
    `<x>_published`, `<x>_harness`, `<x>_delta` (harness − published), then source and verified.
    """
    if summary.empty:
        return pd.DataFrame()
    merged = summary.merge(published, on=["setting", "backbone", "method"], how="inner", suffixes=("", "_pub"))
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
        out["source"], out["verified"] = row["source"], row["verified"]
        rows.append(out)
    return pd.DataFrame(rows)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


# -- the table model and its renderers --------------------------------------------------------------
@dataclass
class Cell:
    """A number with an optional spread; `text` is set for non-numeric cells."""

    value: float | None = None
    std: float | None = None
    digits: int = 1
    bold: bool = False
    signed: bool = False
    text: str | None = None

    def plain(self, plus_minus: str = " ± ") -> str:
        if self.text is not None:
            return self.text
        if self.value is None or math.isnan(self.value):
            return MISSING
        number = f"{self.value:+.{self.digits}f}" if self.signed else f"{self.value:.{self.digits}f}"
        if self.std is not None and not math.isnan(self.std):
            number += f"{plus_minus}{self.std:.{self.digits}f}"
        return number

    @property
    def rounded(self) -> float | None:
        if self.text is not None or self.value is None or math.isnan(self.value):
            return None
        return round(self.value, self.digits)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    align: str = ""
    """One letter per column (l/r); default: first column left, the rest right."""

    def alignment(self) -> str:
        return self.align or "l" + "r" * (len(self.header) - 1)


def text_cell(text: Any) -> Cell:
    return Cell(text=str(text))


def mark_best(table: Table, columns: Iterable[int]) -> None:
    """Bold the highest value of each given column; equal values at display precision tie. A column
    whose values all tie (a class every method misses, say) has no best and stays plain."""
    for col in columns:
        values = [row[col].rounded for row in table.rows if row[col].rounded is not None]
        if len(set(values)) < 2:
            continue
        best = max(values)
        for row in table.rows:
            row[col].bold = row[col].rounded == best


def render_markdown(table: Table) -> str:
    def fmt(cell: Cell) -> str:
        text = cell.plain().replace("|", "\\|")
        return f"**{text}**" if cell.bold else text

    align = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [f"### {table.title}", ""]
    lines.append("| " + " | ".join(h.replace("|", "\\|") for h in table.header) + " |")
    lines.append("| " + " | ".join(align[a] for a in table.alignment()) + " |")
    lines.extend("| " + " | ".join(fmt(c) for c in row) + " |" for row in table.rows)
    if table.notes:
        lines.append("")
        lines.extend(table.notes)
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_SYMBOLS = {"→": r"$\rightarrow$", "·": r"$\cdot$", "Δ": r"$\Delta$", "—": "--", "−": "-", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)
    for symbol, command in _LATEX_SYMBOLS.items():
        out = out.replace(symbol, command)
    return out.replace("->", r"$\rightarrow$")


def render_latex(table: Table) -> str:
    def fmt(cell: Cell) -> str:
        text = latex_escape(cell.plain(plus_minus=" ± "))
        return rf"\textbf{{{text}}}" if cell.bold else text

    lines = [f"% {table.title}", r"% needs \usepackage{booktabs}",
             rf"\begin{{tabular}}{{{table.alignment()}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in table.header) + r" \\", r"\midrule"]
    lines.extend(" & ".join(fmt(c) for c in row) + r" \\" for row in table.rows)
    lines.extend([r"\bottomrule", r"\end{tabular}"])
    lines.extend(f"% {note}" for note in table.notes)
    return "\n".join(lines) + "\n"


def render_html(table: Table) -> str:
    def fmt(cell: Cell, align: str) -> str:
        text = html.escape(cell.plain())
        style = ' class="num"' if align == "r" else ""
        return f"<td{style}><strong>{text}</strong></td>" if cell.bold else f"<td{style}>{text}</td>"

    align = table.alignment()
    parts = [f"<h3>{html.escape(table.title)}</h3>", "<table>", "<thead><tr>"]
    parts.extend(f"<th>{html.escape(h)}</th>" for h in table.header)
    parts.append("</tr></thead><tbody>")
    for row in table.rows:
        parts.append("<tr>" + "".join(fmt(c, align[i]) for i, c in enumerate(row)) + "</tr>")
    parts.append("</tbody></table>")
    if table.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(parts) + "\n"


RENDERERS = {"markdown": render_markdown, "latex": render_latex, "html": render_html}


def render(tables: list[Table], fmt: str = "markdown") -> str:
    if fmt not in RENDERERS:
        raise UserError(f"unknown table format {fmt!r}; valid: {', '.join(RENDERERS)} (csv is written from the frames)")
    return "\n".join(RENDERERS[fmt](t) for t in tables)


# -- the tables -------------------------------------------------------------------------------------
def format_params_m(value: float) -> str:
    if value is None or math.isnan(value):
        return MISSING
    if value == 0:
        return "0"
    if value >= 100:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def target_label(target: str) -> str:
    return TARGET_LABELS.get(target, target)


def source_label(setting: str) -> str:
    source = SETTINGS.get(setting, ("source", ()))[0]
    return {"gtav": "GTAV", "synthia": "SYNTHIA"}.get(source, target_label(source))


def _unfinished_notes(unfinished: list[dict[str, Any]]) -> list[str]:
    notes = []
    for res in sorted(unfinished, key=lambda r: (method_name(r), str(r.get("seed")))):
        status = res.get("status", "?")
        reason = res.get("failure") or ("interrupted or still running" if status == "running" else "no reason recorded")
        notes.append(f"{status}: {method_name(res)} seed {res.get('seed')} — {reason} ({res.get('run_id', '?')})")
    if notes:
        notes.insert(0, "Not in the table:")
    return notes


def main_tables(results: Iterable[dict[str, Any]], setting: str | None = None) -> list[Table]:
    """The G→{C,B,M}-style table of each protocol (of one setting when `setting` is given)."""
    tables = []
    for proto, members in group_results(results).items():
        if setting is not None and proto.setting != setting:
            continue
        finished, unfinished = split_runs(members)
        summary = summary_frame(finished)
        targets = targets_of(proto.setting, finished)
        several_seeds = not summary.empty and bool((summary["seeds"] > 1).any())
        # The held-out source score sits before the targets, like the papers' "source" column, and
        # stays out of the average and the bolding: it measures the gap, not generalisation.
        source = ["source"] if "source" in summary.columns else []
        header = (["Method", "Params (M)"] + [f"{source_label(proto.setting)} (src.)" for _ in source]
                  + [target_label(t) for t in targets] + ["Avg."])
        if several_seeds:
            header.append("Seeds")
        rows = []
        mixed = False
        for _, row in summary.iterrows():
            name = row["method"]
            if row["provenances"] > 1:
                name, mixed = f"{name} ‡", True
            cells = [text_cell(name), text_cell(format_params_m(row["trainable_params_m"]))]
            for metric in source + targets + ["average"]:
                cells.append(Cell(_nan_to_none(row[metric]), _nan_to_none(row[f"{metric}_std"])))
            if several_seeds:
                cells.append(text_cell(int(row["seeds"])))
            rows.append(cells)
        notes = []
        if source:
            counts = {(r.get("source_heldout") or {}).get("num_images") for r in finished} - {None}
            notes.append(f"{source_label(proto.setting)} (src.): {'/'.join(map(str, sorted(counts)))} held-out "
                         "source images, not trained on and not in the average.")
        if several_seeds:
            notes.append("Mean ± sample standard deviation over seeds.")
            if noise := seed_noise_note(summary):
                notes.append(noise)
        if mixed:
            notes.append("‡ its runs come from different weight files or data (their results' `provenance` "
                         "differs): not one measurement; compare them apart.")
        notes.extend(_unfinished_notes(unfinished))
        table = Table(title=f"{proto.title}: mIoU (%)", header=header, rows=rows, notes=notes)
        mark_best(table, range(2 + len(source), 2 + len(source) + len(targets) + 1))
        tables.append(table)
    return tables


def seed_noise_note(summary: pd.DataFrame) -> str:
    """Whether a table separates its methods: the seed-to-seed standard deviation of the target
    average beside the spread of the methods' means, and which methods the noise cannot tell from
    the best (its mean minus theirs within one mean standard deviation)."""
    seeded = summary[(summary["seeds"] > 1) & summary["average_std"].notna()]
    if len(seeded) < 2:
        return ""
    noise = float(seeded["average_std"].mean())
    spread = float(seeded["average"].max() - seeded["average"].min())
    best = seeded.loc[seeded["average"].idxmax()]
    tied = [m for m, a in zip(seeded["method"], seeded["average"], strict=True)
            if m != best["method"] and best["average"] - a <= noise]
    ratio = f"{noise / spread:.2f} of it" if spread > 0 else "all of it"
    return (f"Seed noise over the {len(seeded)} methods with several seeds: mean standard deviation of the average "
            f"{noise:.2f}, spread of their means {spread:.2f} ({ratio}); within one standard deviation of the best "
            f"({best['method']}): {', '.join(tied) if tied else 'none'}.")


def per_class_tables(results: Iterable[dict[str, Any]], setting: str | None = None) -> list[Table]:
    """Per-class IoU: one table per protocol and target, methods as rows, classes as columns."""
    tables: list[Table] = []
    results = list(results)
    frame = per_class_frame(results)
    if frame.empty:
        return tables
    # each protocol's methods, best average first (summary_frame's order)
    ranked_methods = {key: rows["method"].tolist() for key, rows in summary_frame(results).groupby(PROTOCOL_COLUMNS)}
    for key, group in frame.groupby(PROTOCOL_COLUMNS, sort=True):
        proto = Protocol(*key)
        if setting is not None and proto.setting != setting:
            continue
        ranked = ranked_methods.get(key, [])
        for target in targets_of(proto.setting, [{"targets": {t: {}}} for t in group["target"].unique()]):
            sub = group[group["target"] == target]
            classes = sub.sort_values("class_index").drop_duplicates("class")["class"].tolist()
            methods = [m for m in ranked if m in set(sub["method"])]
            header = ["Method"] + classes + ["mIoU"]
            rows = []
            for method in methods:
                by_class = sub[sub["method"] == method].set_index("class")
                cells = [text_cell(method)]
                for cls in classes:
                    cells.append(Cell(_nan_to_none(by_class["iou"].get(cls, math.nan))))
                present = [v for v in by_class["iou"].tolist() if not math.isnan(v)]
                cells.append(Cell(sum(present) / len(present) if present else None))
                rows.append(cells)
            table = Table(title=f"{proto.title}: per-class IoU (%) on {target}", header=header, rows=rows,
                          notes=["Mean over seeds; — marks a class absent from predictions and labels of the whole set."])
            mark_best(table, range(1, len(header)))
            tables.append(table)
    return tables


def published_tables(results: Iterable[dict[str, Any]], published: pd.DataFrame | None = None,
                     setting: str | None = None) -> list[Table]:
    """The harness's numbers beside the papers' for every (setting, backbone, method) both have."""
    published = load_published() if published is None else published
    results = list(results)
    summary = summary_frame(results)
    if summary.empty:
        return []
    if setting is not None:
        summary = summary[summary["setting"] == setting]
    comparison = comparison_frame(summary, published)
    stand_in = proxy_rank_tables(summary, published, seed_frame(results))
    if comparison.empty and not stand_in:
        have = sorted(set(zip(published["setting"], published["backbone"], strict=False)))
        ran = sorted(set(zip(summary["setting"], summary["backbone"], strict=False)))
        note = (f"No published numbers for the runs' (setting, backbone): {', '.join(f'{s} {b}' for s, b in ran)}; "
                f"published ones exist for {', '.join(f'{s} {b}' for s, b in have)}.")
        return [Table(title="Published vs harness", header=["Note"], rows=[[text_cell(note)]], align="l")]
    tables = stand_in
    for key, group in (comparison.groupby(PROTOCOL_COLUMNS, sort=True) if not comparison.empty else ()):
        proto = Protocol(*key)
        metrics = [t for t in TARGET_LABELS
                   if f"{t}_harness" in group.columns and group[f"{t}_harness"].notna().any()]
        metrics = ["params_m"] + metrics + ["average"]
        header = ["Method"]
        for metric in metrics:
            label = "Params (M)" if metric == "params_m" else ("Avg." if metric == "average" else target_label(metric))
            header += [f"{label} paper", f"{label} ours", f"{label} Δ"]
        header += ["Source", "Verified"]
        rows = []
        for _, row in group.iterrows():
            cells = [text_cell(row["method"])]
            for metric in metrics:
                digits = 2 if metric == "params_m" else 1
                cells += [Cell(_nan_to_none(row[f"{metric}_published"]), digits=digits),
                          Cell(_nan_to_none(row[f"{metric}_harness"]), digits=digits),
                          Cell(_nan_to_none(row[f"{metric}_delta"]), digits=digits, signed=True)]
            cells += [text_cell(row["source"]), text_cell(row["verified"])]
            rows.append(cells)
        tables.append(Table(
            title=f"{proto.title}: published vs harness", header=header, rows=rows,
            align="l" + "r" * (len(header) - 3) + "ll",
            notes=["Δ = harness − published (mIoU points; params in M). Published rows come from results/published.csv "
                   "with their source and how they were checked."]))
    return tables


def rank_agreement(ours: pd.Series, theirs: pd.Series) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks (ties share a rank)."""
    if len(ours) < 3:
        return math.nan
    return float(ours.rank().corr(theirs.rank()))


def proxy_rank_tables(summary: pd.DataFrame, published: pd.DataFrame, seeds: pd.DataFrame | None = None) -> list[Table]:
    """For each protocol on a proxy backbone: the published averages of the VFM it stands in for,
    the proxy's, both ranks (1 = best) and Spearman's ρ over the methods both have; with `seeds`
    (`seed_frame`) and several seeds, ρ of each seed's runs alone too."""
    tables = []
    runs_of = {key: runs for key, runs in seeds.groupby(PROTOCOL_COLUMNS)} if seeds is not None else {}
    for key, group in summary.groupby(PROTOCOL_COLUMNS, sort=True):
        reference = PROXY_STANDS_IN_FOR.get(key[2])
        if reference is None:
            continue
        papers = published[(published["setting"] == key[1]) & (published["backbone"] == reference)]
        papers = papers[papers["average"].notna()][["method", "average"]]
        both = group.merge(papers, on="method", suffixes=("", "_paper")).dropna(subset=["average"])
        if both.empty:
            continue
        both = both.assign(rank_paper=both["average_paper"].rank(ascending=False, method="min"),
                           rank_ours=both["average"].rank(ascending=False, method="min"))
        both = both.sort_values("average_paper", ascending=False)
        rho = rank_agreement(both["average"], both["average_paper"])
        has_source = "source" in both.columns and both["source"].notna().any()
        header = ["Method", f"Avg. {reference} (paper)", "Rank (paper)", f"Avg. {key[2]} (ours)", "Rank (ours)"]
        if has_source:
            header.append("Source mIoU (ours)")
        rows = []
        for _, row in both.iterrows():
            cells = [text_cell(row["method"]), Cell(float(row["average_paper"]), digits=2),
                     Cell(float(row["rank_paper"]), digits=0), Cell(float(row["average"]), _nan_to_none(row["average_std"])),
                     Cell(float(row["rank_ours"]), digits=0)]
            if has_source:
                cells.append(Cell(_nan_to_none(row["source"]), _nan_to_none(row.get("source_std"))))
            rows.append(cells)
        notes = [f"Spearman ρ = {rho:.2f} over the {len(both)} methods with a published {reference} average "
                 f"({key[1]}); 1 = the proxy orders them as the papers do." if not math.isnan(rho) else
                 f"Too few methods ({len(both)}) with a published {reference} average for a rank correlation."]
        if key in runs_of:
            notes.append(per_seed_rank_note(runs_of[key], both[["method", "average_paper"]]))
        notes.append(inverted_u_note(group))
        proto = Protocol(*key)
        tables.append(Table(title=f"{proto.title}: the proxy beside the published {reference}", header=header,
                            rows=rows, align="l" + "r" * (len(header) - 1), notes=[n for n in notes if n]))
    return tables


def per_seed_rank_note(runs: pd.DataFrame, papers: pd.DataFrame) -> str:
    """Spearman's ρ of each seed's runs alone against the published averages: what a one-seed table
    (the default `run`) would have shown, and so how much of the seed-mean ρ the seeds agree on."""
    runs = runs.dropna(subset=["average", "seed"]).merge(papers, on="method")
    if runs["seed"].nunique() < 2:
        return ""
    every = papers["method"].nunique()
    parts = []
    for seed, members in runs.groupby("seed", sort=True):
        rho = rank_agreement(members["average"], members["average_paper"])
        if math.isnan(rho):
            continue
        count = "" if len(members) == every else f", {len(members)} methods"
        parts.append(f"{rho:.2f} (seed {seed}{count})")
    return f"ρ of each seed alone: {', '.join(parts)}." if len(parts) > 1 else ""


def inverted_u_note(group: pd.DataFrame) -> str:
    """Rein's finding, checked on one protocol's rows: full fine-tuning fits the source best and
    generalises below the best parameter-efficient method."""
    from benchmarks.method import FULL_FINE_TUNING, PARAMETER_EFFICIENT

    full_rows = group[group["role"] == FULL_FINE_TUNING] if "role" in group.columns else group.iloc[0:0]
    if "source" not in group.columns or full_rows.empty:
        return ""
    full = full_rows.iloc[0]
    others = group[group["role"] == PARAMETER_EFFICIENT].dropna(subset=["average"])
    if others.empty or math.isnan(full["source"]):
        return ""
    best = others.loc[others["average"].idxmax()]
    source_best = full["source"] >= group["source"].max()
    below = full["average"] < best["average"]
    verdict = "shows the inverted U" if source_best and below else "does not show the inverted U"
    return (f"{full['method']}: source {full['source']:.1f} ({'best' if source_best else 'not the best'}), target "
            f"average {full['average']:.1f} vs {best['average']:.1f} for the best parameter-efficient method "
            f"({best['method']}): {verdict}.")


def _nan_to_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# -- entry points -----------------------------------------------------------------------------------
def leaderboard(results: Iterable[dict[str, Any]], fmt: str = "markdown", setting: str | None = "G->CBM") -> str:
    """The main table of every protocol of `setting` (all settings when None), failed runs below."""
    results = list(results)
    if fmt == "csv":
        summary = summary_frame([r for r in results if setting is None or r.get("setting") == setting])
        return summary.to_csv(index=False)
    tables = main_tables(results, setting=setting)
    if not tables:
        where = f" for setting {setting}" if setting else ""
        return f"No results{where}.\n"
    return render(tables, fmt)


def build_tables(results: Iterable[dict[str, Any]], *, fmt: str = "markdown", per_class: bool = False,
                 published: bool = False, setting: str | None = None,
                 published_path: Path | None = None) -> str:
    """What `python -m benchmarks table` prints: the main tables, or the per-class / published view."""
    results = list(results)
    if fmt not in FORMATS or fmt == "html":
        raise UserError(f"unknown table format {fmt!r}; valid: markdown, latex, csv")
    if published:
        pub = load_published(published_path)
        if fmt == "csv":
            summary = summary_frame(results)
            if setting is not None and not summary.empty:
                summary = summary[summary["setting"] == setting]
            return comparison_frame(summary, pub).to_csv(index=False)
        return render(published_tables(results, pub, setting=setting), fmt)
    if per_class:
        if fmt == "csv":
            frame = per_class_frame(results)
            if setting is not None and not frame.empty:
                frame = frame[frame["setting"] == setting]
            return frame.drop(columns=["class_index"], errors="ignore").to_csv(index=False)
        tables = per_class_tables(results, setting=setting)
        return render(tables, fmt) if tables else "No per-class results.\n"
    return leaderboard(results, fmt=fmt, setting=setting)
