"""A self-contained HTML report: every table and figure inline, readable offline from one file.

Figures are embedded as base64 PNG data URIs and the style sheet is inline; the page has no
scripts, no external links and needs no server (open results/report/index.html in any browser).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.errors import UserError
from benchmarks.provenance import is_code_path
from benchmarks.reports.frames import load_published
from benchmarks.reports.grouping import Protocol, group_results, split_runs
from benchmarks.reports.plots import FIGURES, Plot, make_plots
from benchmarks.reports.render import render_html
from benchmarks.reports.tables import main_tables, per_class_tables, published_tables
from benchmarks.results import write_files_together

log = logging.getLogger(__name__)

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
h3 { font-size: 1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: .85em; display: block; overflow-x: auto; }
th, td { padding: .25em .6em; border-bottom: 1px solid #ddd; white-space: nowrap; }
thead th { border-top: 2px solid #222; border-bottom: 1px solid #222; text-align: center; }
tbody tr:last-child td { border-bottom: 2px solid #222; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
ul.notes { font-size: .8em; color: #555; margin-top: 0; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .8em; color: #555; }
.meta { font-size: .8em; color: #555; }
nav ul { columns: 2; font-size: .9em; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(plot: Plot) -> str:
    return (f'<figure><img src="{data_uri(plot.png)}" alt="{html.escape(plot.title, quote=True)}">'
            f"<figcaption>{html.escape(plot.title)}</figcaption></figure>")


def _uncommitted_code(env: dict[str, Any]) -> str:
    """What a run's tree held beyond its commit, as far as it can change a number: the digest of the uncommitted
    code and its paths. A results folder, load log or doc edited beside the run is left out, as the digest leaves
    it out (`provenance.is_code_path`): listed, it made each run of one invocation its own line, the untracked
    results of the runs before it growing the list. Results older than the digest list every dirty path; those
    written before the digest was limited to code (6ed3e26) carry one of every tracked change, so this line names
    it a digest of changes, not of code."""
    if env.get("git_dirty") is None:  # not recorded, or run outside a checkout
        return ""
    paths = env.get("git_dirty_paths") or []
    if env["git_dirty"] and "git_dirty_sha256" not in env:
        return f"uncommitted files ({', '.join(paths)})"
    if not env["git_dirty"] or not env["git_dirty_sha256"]:
        return "uncommitted code none"
    code_paths = [path for path in paths if is_code_path(path)]
    return f"uncommitted changes sha256 {env['git_dirty_sha256'][:12]}" + (f" ({', '.join(code_paths)})"
                                                                           if code_paths else "")


def _environment_lines(results: list[dict[str, Any]]) -> list[str]:
    """The distinct environments the runs came from (package versions, device, commit, uncommitted code)."""
    seen: dict[str, int] = {}
    for res in results:
        env = res.get("environment") or {}
        parts = [f"{k} {env[k]}" for k in ("torch", "device_name", "git_commit") if k in env]
        if code := _uncommitted_code(env):
            parts.append(code)
        if parts:
            text = ", ".join(parts)
            seen[text] = seen.get(text, 0) + 1
    return [f"{count} run(s): {text}" for text, count in seen.items()]


def render_report(results: Iterable[dict[str, Any]], title: str = "DGSS-Bench report",
                  published_path: Path | None = None, plots: list[Plot] | None = None) -> str:
    """The whole page as one string: per protocol its main, published-comparison and per-class
    tables and its figures; runs that did not finish are listed under their table."""
    results = list(results)
    plots = make_plots(results) if plots is None else plots
    try:
        published = load_published(published_path)
    except UserError as err:  # a report without the comparison beats no report
        log.warning("published numbers unavailable: %s", err)
        published = None

    groups = group_results(results)
    finished_count = sum(len(split_runs(members)[0]) for members in groups.values())
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="{GENERATOR}">',
        f'<meta name="{FIGURE_LIST}" content="{html.escape(" ".join(f"{p.name}.png" for p in plots or []))}">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{len(results)} result file(s), {finished_count} finished run(s) in '
        f"{len(groups)} protocol(s); generated {_dt.datetime.now().isoformat(timespec='seconds')}. "
        "mIoU in %, params are backbone-side trainable parameters (decode head excluded).</p>",
    ]
    env_lines = _environment_lines(results)
    if env_lines:
        parts.append('<ul class="meta">' + "".join(f"<li>{html.escape(line)}</li>" for line in env_lines) + "</ul>")
    if not groups:
        parts.append("<p>No result files found.</p>")
    else:
        parts.append("<nav><ul>" + "".join(
            f'<li><a href="#{proto.slug}">{html.escape(proto.title)}</a></li>' for proto in groups) + "</ul></nav>")
    for proto, members in groups.items():
        parts.append(_protocol_section(proto, members, published, [p for p in plots if p.protocol == proto]))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _protocol_section(proto: Protocol, members: list[dict[str, Any]], published, plots: list[Plot]) -> str:
    parts = [f'<section id="{proto.slug}"><h2>{html.escape(proto.title)}</h2>']
    tables = main_tables(members)
    if published is not None:
        tables += [t for t in published_tables(members, published) if t.header != ["Note"]]
    tables += per_class_tables(members)
    parts.extend(render_html(t) for t in tables)
    parts.extend(_figure(p) for p in plots)
    parts.append("</section>")
    return "\n".join(parts)


GENERATOR = "DGSS-Bench report"
FIGURE_LIST = "dgss-bench-figures"
"""The page names the PNG files written beside it, so the next report into the folder removes those it does not
write again, and only those: a folder may hold the user's own pictures."""
# A page written before it named its figures: its summary line, which no other page is likely to carry.
_EARLIER_PAGE = re.compile(r'<p class="meta">\d+ result file\(s\), \d+ finished run\(s\) in \d+ protocol\(s\); generated ')


def earlier_figures(out_dir: Path) -> list[str]:
    """The figures an earlier report wrote into `out_dir` (by its page). Raises `UserError` when the folder
    holds an index.html no report of ours wrote: writing would replace someone's page."""
    page = out_dir / "index.html"
    if not page.is_file():
        return []
    text = page.read_text(encoding="utf-8", errors="replace")
    listed = re.search(rf'<meta name="{FIGURE_LIST}" content="([^"]*)">', text)
    if listed:
        return html.unescape(listed.group(1)).split()
    if _EARLIER_PAGE.search(text):  # the figures of such a page are named by their kind
        return sorted(p.name for kind, _, _ in FIGURES for p in out_dir.glob(f"*_{kind}.png"))
    raise UserError(f"--out {out_dir} holds an index.html that no DGSS-Bench report wrote; pass another --out "
                    "(or move that page away): a report replaces the index.html of its folder")


def write_report(results: Iterable[dict[str, Any]], out_dir: Path | str = "results/report",
                 title: str = "DGSS-Bench report", published_path: Path | None = None) -> Path:
    """Write out_dir/index.html and the figures beside it as PNG files, all of them or (a full disk) none;
    then the figures of the earlier report there that this one has not are removed (a page beside the PNGs
    of another one's protocols misleads whoever opens the folder)."""
    results = list(results)
    out_dir = Path(out_dir)
    earlier = earlier_figures(out_dir)
    plots = make_plots(results)
    page = render_report(results, title=title, published_path=published_path, plots=plots)
    files = {f"{plot.name}.png": plot.png for plot in plots}
    write_files_together(out_dir, {**files, "index.html": page.encode("utf-8")})
    for name in set(earlier) - set(files):
        (out_dir / name).unlink(missing_ok=True)
    log.info("wrote %s from %d result file(s) with %d figure(s)", out_dir / "index.html", len(results), len(plots))
    return out_dir / "index.html"
