"""`report`: one self-contained HTML page (tables and figures inline) readable offline."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.commands.table import add_runs_argument, load_runs
from benchmarks.outputs import given_path, require_writable_file, require_writable_folder

NAME = "report"
HELP = "write a self-contained HTML report (every table and figure inline) from result files"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_runs_argument(parser)
    parser.add_argument("--out", type=given_path, default=Path("results/report"),
                        help="folder for index.html and the figures as PNG (default: results/report)")
    parser.add_argument("--title", default="DGSS-Bench report")


def run(args: argparse.Namespace) -> int:
    from benchmarks.reports.html import write_report

    require_writable_folder(args.out, "--out")
    require_writable_file(args.out / "index.html", "--out", "index.html")  # before any figure is drawn
    page = write_report(load_runs(args.runs), args.out, title=args.title)
    print(page)
    return 0
