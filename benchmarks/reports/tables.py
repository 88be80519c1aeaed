"""Paper-style tables built from result files only.

Three views of the runs, each grouped by *protocol* (`grouping`) so that numbers from different
protocols never share a table; seeds of one protocol are aggregated.

- the main table: method, backbone-side trainable parameters (M), mIoU per target and their
  unweighted average, mean ± sample std (n−1) over seeds when there are several, best in bold;
- the per-class IoU tables, one per target;
- the published numbers (results/published.csv) beside the harness's, with the difference
  (harness − published), for the (setting, backbone, method) triples both have;
- for a proxy backbone (one that stands in for a VFM the papers use, `PROXY_STANDS_IN_FOR`), the
  published averages of the VFM it stands in for beside the proxy's, both ranks and Spearman's ρ (of
  the seed means, and of each seed alone): how far the proxy's ordering of the methods can be trusted.

Every table renders as Markdown, LaTeX (booktabs) or HTML; CSV output is the tidy numeric frame
behind the tables (full precision, mean and std in separate columns, one row per method; with
`--published`, the direct comparisons' rows and the proxy's rank rows in one file).

Built on `grouping` (which runs share a table), `frames` (their numbers, the CSV output) and
`render` (the table model and its formats).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks import provenance
from benchmarks.errors import UserError
from benchmarks.reports.frames import (
    comparison_frame,
    load_published,
    per_class_frame,
    seed_frame,
    summary_frame,
)
from benchmarks.reports.grouping import (
    PROTOCOL_COLUMNS,
    TARGET_LABELS,
    Protocol,
    group_results,
    latest_runs,
    method_name,
    source_label,
    split_runs,
    target_label,
    targets_of,
)
from benchmarks.reports.render import MISSING, Cell, Table, mark_best, render, text_cell

FORMATS = ("markdown", "latex", "csv", "html")
log = logging.getLogger(__name__)

# A proxy backbone → the published backbone whose role it plays (benchmarks/backbones.py: proxy_vit is
# the small ViT pretrained to stand in for DINOv2-L on a CPU).
PROXY_STANDS_IN_FOR = {"proxy_vit": "dinov2_vitl14"}


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


def _unfinished_notes(unfinished: list[dict[str, Any]]) -> list[str]:
    notes = []
    for res in sorted(unfinished, key=lambda r: (method_name(r), str(r.get("seed")))):
        status = res.get("status", "?")
        reason = res.get("failure") or ("interrupted or still running" if status == "running" else "no reason recorded")
        notes.append(f"{status}: {method_name(res)} seed {res.get('seed')} — {reason} ({res.get('run_id', '?')})")
    if notes:
        notes.insert(0, "Not in the table:")
    return notes


def _inputs_note(finished: list[dict[str, Any]]) -> str | None:
    """Which rows were measured on other weights or data than the rest (a method's own runs that differ are
    marked ‡ on its row): one protocol, but a difference between those rows includes their inputs'."""
    methods_by_inputs: dict[str, set[str]] = {}
    for res in finished:
        if key := provenance.identity(res.get("provenance")):
            methods_by_inputs.setdefault(key, set()).add(method_name(res))
    if len(methods_by_inputs) < 2:
        return None
    records = [res["provenance"] for res in finished if res.get("provenance")]
    differing = ["weights"] if len({(r.get("weights") or {}).get("sha256") for r in records}) > 1 else []
    splits = sorted({split for r in records for split in (r.get("data") or {})})
    differing += [split for split in splits
                  if len({((r.get("data") or {}).get(split) or {}).get("sha256") for r in records}) > 1]
    groups = sorted(methods_by_inputs.values(), key=lambda methods: (-len(methods), sorted(methods)))
    # A method whose runs span two sets of inputs (its row marked ‡) is named by "some runs of", and not counted
    # among the others.
    split = {m for m in groups[0] if any(m in group for group in groups[1:])}
    named = "; ".join(", ".join(f"some runs of {m}" if m in split else m for m in sorted(methods))
                      for methods in groups[1:])
    rest = len(groups[0] - split)
    others = f"the other {rest} method" + ("s" if rest != 1 else "")
    return (f"The rows come from {len(groups)} sets of inputs (their results' `provenance`; differing: "
            f"{', '.join(differing) or 'the record'}): {named} apart from {others}; a difference between those "
            "rows includes the inputs'.")


def _superseded_note(superseded: list[dict[str, Any]]) -> str | None:
    if not superseded:
        return None
    seeds: dict[str, list[str]] = {}
    for res in superseded:
        seeds.setdefault(method_name(res), []).append(str(res.get("seed")))
    listed = "; ".join(f"{method} seed {', '.join(sorted(s))}" for method, s in sorted(seeds.items()))
    return f"Replaced by a later run of the same method and seed, and not in the table: {len(superseded)} result(s) ({listed})."


def main_tables(results: Iterable[dict[str, Any]], setting: str | None = None) -> list[Table]:
    """The G→{C,B,M}-style table of each protocol (of one setting when `setting` is given)."""
    tables = []
    for proto, members in group_results(results).items():
        if setting is not None and proto.setting != setting:
            continue
        finished, unfinished, superseded = latest_runs(members)
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
        mixed = other_code = False
        for _, row in summary.iterrows():
            name = row["method"]
            if row["provenances"] > 1:
                name, mixed = f"{name} ‡", True
            if row["method_versions"] > 1:
                name, other_code = f"{name} †", True
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
        if other_code:
            notes.append("† its runs record different method hyperparameters or trainable parameter counts (the "
                         "method's code changed between them): not one measurement; compare them apart.")
        if inputs := _inputs_note(finished):
            notes.append(inputs)
        if replaced := _superseded_note(superseded):
            notes.append(replaced)
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
    summary = summary_frame(results)
    # each protocol's methods, best average first (summary_frame's order)
    ranked_methods = {key: rows["method"].tolist() for key, rows in summary.groupby(PROTOCOL_COLUMNS)}
    # The mIoU column is the main table's: the mean of each run's mIoU. The mean of the classes' seed means
    # differs from it where a class is absent from one seed's set and present in another's.
    target_means = {(*key, row["method"]): row for key, rows in summary.groupby(PROTOCOL_COLUMNS)
                    for _, row in rows.iterrows()}
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
                cells.append(Cell(_nan_to_none(target_means[(*key, method)].get(target, math.nan))))
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
            cells += [text_cell(row["citation"]), text_cell(row["verified"])]
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


STAND_IN_COLUMNS = [*PROTOCOL_COLUMNS, "method", "seeds", "compared_with", "average_published", "rank_published",
                    "average_harness", "average_harness_std", "rank_harness", "source_harness", "source_harness_std",
                    "spearman_rho", "citation", "verified"]


def stand_in_frame(summary: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """For each protocol on a proxy backbone, one row per method that the VFM it stands in for has a
    published average of: both averages, both ranks (1 = best, ties share the best rank) and the protocol's
    Spearman ρ over those methods (the same on each of its rows), in the published order."""
    frames = []
    for key, group in summary.groupby(PROTOCOL_COLUMNS, sort=True):
        reference = PROXY_STANDS_IN_FOR.get(key[2])
        if reference is None:
            continue
        papers = published[(published["setting"] == key[1]) & (published["backbone"] == reference)]
        papers = papers[papers["average"].notna()][["method", "average", "source", "verified"]]
        both = group.merge(papers.rename(columns={"source": "citation"}), on="method",
                           suffixes=("", "_paper")).dropna(subset=["average"])
        if both.empty:
            continue
        source = both["source"] if "source" in both.columns else math.nan
        source_std = both["source_std"] if "source_std" in both.columns else math.nan
        frames.append(pd.DataFrame({
            **{column: both[column] for column in (*PROTOCOL_COLUMNS, "method", "seeds")},
            "compared_with": reference,
            "average_published": both["average_paper"],
            "rank_published": both["average_paper"].rank(ascending=False, method="min").astype(int),
            "average_harness": both["average"], "average_harness_std": both["average_std"],
            "rank_harness": both["average"].rank(ascending=False, method="min").astype(int),
            "source_harness": source, "source_harness_std": source_std,
            "spearman_rho": rank_agreement(both["average"], both["average_paper"]),
            "citation": both["citation"], "verified": both["verified"],
        }).sort_values("average_published", ascending=False, kind="stable"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STAND_IN_COLUMNS)


def proxy_rank_tables(summary: pd.DataFrame, published: pd.DataFrame, seeds: pd.DataFrame | None = None) -> list[Table]:
    """For each protocol on a proxy backbone: the published averages of the VFM it stands in for,
    the proxy's, both ranks (1 = best) and Spearman's ρ over the methods both have (`stand_in_frame`);
    with `seeds` (`seed_frame`) and several seeds, ρ of each seed's runs alone too."""
    tables = []
    runs_of = {key: runs for key, runs in seeds.groupby(PROTOCOL_COLUMNS)} if seeds is not None else {}
    groups = {key: group for key, group in summary.groupby(PROTOCOL_COLUMNS, sort=True)}
    for key, both in stand_in_frame(summary, published).groupby(PROTOCOL_COLUMNS, sort=True):
        reference = both["compared_with"].iloc[0]
        rho = float(both["spearman_rho"].iloc[0])
        has_source = both["source_harness"].notna().any()
        header = ["Method", f"Avg. {reference} (paper)", "Rank (paper)", f"Avg. {key[2]} (ours)", "Rank (ours)"]
        if has_source:
            header.append("Source mIoU (ours)")
        rows = []
        for _, row in both.iterrows():
            cells = [text_cell(row["method"]), Cell(float(row["average_published"]), digits=2),
                     Cell(float(row["rank_published"]), digits=0),
                     Cell(float(row["average_harness"]), _nan_to_none(row["average_harness_std"])),
                     Cell(float(row["rank_harness"]), digits=0)]
            if has_source:
                cells.append(Cell(_nan_to_none(row["source_harness"]), _nan_to_none(row["source_harness_std"])))
            rows.append(cells)
        notes = [f"Spearman ρ = {rho:.2f} over the {len(both)} methods with a published {reference} average "
                 f"({key[1]}); 1 = the proxy orders them as the papers do." if not math.isnan(rho) else
                 f"Too few methods ({len(both)}) with a published {reference} average for a rank correlation."]
        if key in runs_of:
            notes.append(per_seed_rank_note(runs_of[key], both[["method", "average_published"]]))
        notes.append(inverted_u_note(groups[key]))
        notes.append(second_hand_note(both))
        proto = Protocol(*key)
        tables.append(Table(title=f"{proto.title}: the proxy beside the published {reference}", header=header,
                            rows=rows, align="l" + "r" * (len(header) - 1), notes=[n for n in notes if n]))
    return tables


def second_hand_note(both: pd.DataFrame) -> str:
    """The methods whose published average the project read second-hand (their `verified` in published.csv
    begins "secondary"): ρ rests on them as on the others, so the table says which they are."""
    second_hand = both.loc[both["verified"].fillna("").str.startswith("secondary"), "method"].tolist()
    if not second_hand:
        return ""
    return (f"Published averages read second-hand, not in the paper itself: {', '.join(second_hand)} "
            "(results/published.csv, its `verified` column; the CSV form of this table carries it).")


def per_seed_rank_note(runs: pd.DataFrame, papers: pd.DataFrame) -> str:
    """Spearman's ρ of each seed's runs alone against the published averages (`papers`: method,
    average_published): what a one-seed table (the default `run`) would have shown, and so how much of the
    seed-mean ρ the seeds agree on."""
    runs = runs.dropna(subset=["average", "seed"]).merge(papers, on="method")
    if runs["seed"].nunique() < 2:
        return ""
    every = papers["method"].nunique()
    parts = []
    for seed, members in runs.groupby("seed", sort=True):
        rho = rank_agreement(members["average"], members["average_published"])
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
    return (f"{full['method']}: source {full['source']:.1f} ({_source_place(group, full, source_best)}), target "
            f"average {full['average']:.1f} vs {best['average']:.1f} for the best parameter-efficient method "
            f"({best['method']}): {verdict}.")


def _source_place(group: pd.DataFrame, full: pd.Series, source_best: bool) -> str:
    """"best", or by how much another method fits the source better, and whether that is inside the seed
    noise (the verdict stays the strict one; the reader sees how near it was)."""
    if source_best:
        return "best"
    top = group.loc[group["source"].idxmax()]
    gap = top["source"] - full["source"]
    stds = [float(row.get("source_std", math.nan)) for row in (full, top)]
    noise = max((std for std in stds if not math.isnan(std)), default=0.0)
    within = f", within the seed std {noise:.2f}" if gap < noise else ""
    shown = f"{gap:.1f}" if gap >= 1 else f"{gap:.2g}"
    return f"not the best: {top['method']} {top['source']:.2f}, {shown} above{within}"


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
        chosen = _of_setting(results, setting)
        return _csv(summary_frame(chosen), chosen, setting)
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
            chosen = _of_setting(results, setting)
            summary = summary_frame(chosen)
            comparison = comparison_frame(summary, pub)
            stand_in = stand_in_frame(summary, pub)
            if comparison.empty and stand_in.empty and not summary.empty:
                log.warning("no published numbers for the runs' (setting, backbone): the CSV has a header only")
            # one row per (protocol, method) with a published number: the paper's own backbone (`_delta`
            # columns) and, for a proxy backbone, the VFM it stands in for (ranks and ρ); columns the other
            # kind has stay empty
            frames = [frame for frame in (comparison, stand_in) if not frame.empty] or [comparison]
            if len(frames) == 1:
                return _csv(frames[0], chosen, setting)
            both = pd.concat(frames, ignore_index=True)
            ranks = ["rank_published", "rank_harness"]
            return _csv(both.astype(dict.fromkeys(ranks, "Int64")), chosen, setting)  # whole ranks, empty elsewhere
        tables = published_tables(results, pub, setting=setting)
        if not tables:
            failures = [n for _, members in group_results(_of_setting(results, setting)).items()
                        for n in _unfinished_notes(split_runs(members)[1])[1:]]
            text = "\n".join(["No finished runs to set beside the papers.", *failures])
            return text if fmt == "markdown" else "\n".join(f"% {line}" for line in text.splitlines())
        return render(tables, fmt)
    if per_class:
        if fmt == "csv":
            chosen = _of_setting(results, setting)
            return _csv(per_class_frame(chosen).drop(columns=["class_index"]), chosen, setting)
        tables = per_class_tables(results, setting=setting)
        return render(tables, fmt) if tables else "No per-class results.\n"
    return leaderboard(results, fmt=fmt, setting=setting)


def _of_setting(results: list[dict[str, Any]], setting: str | None) -> list[dict[str, Any]]:
    return [r for r in results if setting is None or r.get("setting") == setting]


def _csv(frame: pd.DataFrame, considered: list[dict[str, Any]], setting: str | None) -> str:
    """The frame (of the results `considered`) as CSV; when it has no rows because none of them finished,
    stderr says so (stdout stays CSV)."""
    if frame.empty and not any(r.get("status") == "finished" for r in considered):
        statuses = pd.Series([str(r.get("status")) for r in considered], dtype="object").value_counts()
        counted = ", ".join(f"{n} {status}" for status, n in statuses.items()) or "none"
        where = f" of setting {setting}" if setting else ""
        log.warning("no finished run among the results%s (%s): the CSV has a header only; "
                    "`table` (markdown) lists why each run did not finish", where, counted)
    return frame.to_csv(index=False)
