"""`table`: the leaderboard (or per-class IoU, or published vs harness) from result files."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.config import SETTINGS
from benchmarks.errors import UserError
from benchmarks.outputs import given_path, require_writable_file

NAME = "table"
HELP = "print paper-style tables from result files: the leaderboard, per-class IoU, or published vs harness"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_runs_argument(parser)
    parser.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown",
                        help="markdown (default), latex (booktabs) or csv (the numbers at full precision)")
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--per-class", action="store_true", help="per-class IoU, one table per target")
    view.add_argument("--published", action="store_true",
                      help="the papers' numbers (results/published.csv) beside the harness's, with the difference")
    parser.add_argument("--setting", choices=sorted(SETTINGS), help="only this setting (default: every setting found)")
    parser.add_argument("--output", type=given_path, help="also write the table to this file")


def add_runs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=given_path, action="append", metavar="DIR",
                        help="folder (searched recursively) or file of results; repeatable (default: results/runs)")


def load_runs(dirs: list[Path] | None) -> list[dict]:
    from benchmarks.results import iter_results

    dirs = dirs or [Path("results/runs")]
    missing = [d for d in dirs if not d.exists()]
    if missing:
        raise UserError(f"results folder {missing[0]} does not exist; run `python -m benchmarks run` first or pass --runs DIR")
    results = iter_results(dirs)
    if not results:
        raise UserError(f"no result files under {', '.join(map(str, dirs))}; run `python -m benchmarks run` first or pass --runs DIR")
    return results


def _refuse_to_overwrite_a_result(output: Path) -> None:
    from benchmarks.results import BadResultFile, load_result

    try:
        is_result = load_result(output) is not None
    except BadResultFile:
        is_result = False
    if is_result:
        raise UserError(f"--output {output}: is a result file; pass a new file for the table (e.g. table.md)")


def run(args: argparse.Namespace) -> int:
    from benchmarks.reports.tables import build_tables
    from benchmarks.results import atomic_write_text

    if args.output:
        example = {"latex": "table.tex", "csv": "table.csv"}.get(args.format, "table.md")
        require_writable_file(args.output, "--output", example)
    results = load_runs(args.runs)
    if args.output and args.output.is_file():
        _refuse_to_overwrite_a_result(args.output)
    if args.setting and not any(r.get("setting") == args.setting for r in results):
        found = sorted({str(r.get("setting")) for r in results})
        raise UserError(f"--setting {args.setting}: none of the {len(results)} results read is of that setting (they "
                        f"are of {', '.join(found)}); pass one of those or leave --setting out")
    text = build_tables(results, fmt=args.format, per_class=args.per_class, published=args.published, setting=args.setting)
    print(text, end="" if text.endswith("\n") else "\n")
    if args.output:
        atomic_write_text(args.output, text)
        log.info("wrote %s", args.output)
    return 0
