"""`check`: re-run the smoke matrix from scratch and fail on a regression against the baseline.

Runs go to a fresh temporary folder (old results are never re-used, so the check always measures
the current code) and are compared with results/baselines/smoke.json by
`benchmarks.regression.compare`: per-target, per-class and held-out source IoU within the baseline's tolerance
(0.05 points by default), the last training loss within 1e-4 of itself, parameter counts exactly, all after the
protocol and the inputs are found the same (benchmarks/regression.py says why these tolerances). Exit status 0 when
nothing regressed, 1 on a regression, 2 on a usage error (e.g. no baseline yet).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from benchmarks.commands.run import add_method_file_argument
from benchmarks.locking import exclusive
from benchmarks.outputs import given_path, require_writable_file, require_writable_folder
from benchmarks.regression import DEFAULT_BASELINE, DEFAULT_TOLERANCE_LOSS, DEFAULT_TOLERANCE_MIOU

NAME = "check"
HELP = "re-run the smoke preset and compare with the stored baseline (exit 1 on a regression)"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", type=given_path, default=DEFAULT_BASELINE, help=f"baseline file (default: {DEFAULT_BASELINE})")
    parser.add_argument("--update-baseline", action="store_true", help="rewrite the baseline from this run instead of comparing")
    parser.add_argument("--methods", help="only these methods (comma-separated); default: every registered method")
    add_method_file_argument(parser)
    parser.add_argument("--tolerance", type=float,
                        help=f"mIoU tolerance in points (default: the baseline's, else {DEFAULT_TOLERANCE_MIOU}); "
                             "stored in the baseline with --update-baseline")
    parser.add_argument("--preset", default="smoke", help="preset to run (default: smoke)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the preset (repeatable), e.g. --set data.root=/tmp/synthetic")
    parser.add_argument("--keep-runs", type=given_path, metavar="DIR",
                        help="write the fresh results here (must not hold results yet) instead of a temporary folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from benchmarks.config import load_experiment
    from benchmarks.errors import UserError
    from benchmarks.method import available_methods, resolve_methods
    from benchmarks.regression import compare, format_report, is_tolerance, make_baseline, write_baseline
    from benchmarks.results import iter_results
    from benchmarks.runner import run_matrix

    if args.tolerance is not None and not is_tolerance(args.tolerance):
        raise UserError(f"--tolerance must be a finite number of mIoU points ≥ 0, got {args.tolerance:g}")
    exp = load_experiment(args.preset, args.overrides)
    methods = args.methods or exp.run.methods
    # Some methods, by --methods or --set run.methods (spelt however resolve_methods reads it): the baseline's
    # other runs are neither compared nor dropped by an update.
    chosen = set(resolve_methods(methods))
    partial = chosen != set(available_methods())
    baseline = _existing_baseline(args, partial)
    if baseline is not None and (earlier := baseline.get("preset", exp.preset)) != exp.preset:
        if not args.update_baseline:
            raise UserError(f"baseline {args.baseline} was made with preset {earlier!r}, this check runs "
                            f"{exp.preset!r}; pass that preset's --baseline or create one with --update-baseline")
        if partial:
            raise UserError(f"baseline {args.baseline} holds preset {earlier!r} runs, this update of some methods runs "
                            f"{exp.preset!r}: the file would mix two presets; pass a new --baseline for "
                            f"{exp.preset!r}, or update every method to replace it whole")
        log.warning("baseline %s holds preset %r runs; this update replaces them whole with preset %r's",
                    args.baseline, earlier, exp.preset)
    if args.update_baseline:  # before the matrix runs: a baseline that cannot be written is lost with its runs
        require_writable_file(args.baseline, "--baseline", "smoke.json")
    if args.keep_runs is not None and args.keep_runs.exists() and not args.keep_runs.is_dir():
        raise UserError(f"--keep-runs {args.keep_runs}: is a file, not a folder; pass an empty or new folder")
    if args.keep_runs is not None:
        require_writable_folder(args.keep_runs, "--keep-runs")
    if args.keep_runs is not None and args.keep_runs.exists() and iter_results([args.keep_runs]):
        raise UserError(f"--keep-runs {args.keep_runs} already holds results; the check must not re-use runs, pass an empty folder")

    with tempfile.TemporaryDirectory(prefix="dgss-check-") as scratch:
        results_dir = args.keep_runs or Path(scratch)
        log.info("check: preset %s, methods %s, fresh results in %s", exp.preset, methods, results_dir)
        results = run_matrix(exp, methods, results_dir=results_dir, progress=not args.no_progress)

    if args.update_baseline:
        # Read again under a lock of its folder: another update that ran meanwhile (`--methods` of others) is
        # merged into, not undone by this one's copy from before the matrix ran.
        args.baseline.parent.mkdir(parents=True, exist_ok=True)  # checked writable before the runs
        with exclusive(args.baseline.parent):  # flock on the folder itself: no lock file beside the baseline
            baseline = _existing_baseline(args, partial)
            tolerance = args.tolerance if args.tolerance is not None else float(
                (baseline or {}).get("tolerance_miou", DEFAULT_TOLERANCE_MIOU))
            tolerance_loss = float((baseline or {}).get("tolerance_loss_relative", DEFAULT_TOLERANCE_LOSS))
            fresh = make_baseline(results, preset=exp.preset, tolerance=tolerance, tolerance_loss=tolerance_loss)
            if partial and baseline is not None:
                # a partial re-run refreshes its own entries and keeps the others (each entry names its code)
                fresh["runs"] = {**baseline.get("runs", {}), **fresh["runs"]}
            if baseline is not None:
                print(_moved_since(baseline, results, fresh))
            write_baseline(args.baseline, fresh)
        print(f"baseline {args.baseline} written: {len(fresh['runs'])} run(s), tolerance ±{tolerance:g} IoU points, "
              f"final loss ±{fresh['tolerance_loss_relative']:g} of itself")
        return 0

    assert baseline is not None
    if partial:
        baseline = {**baseline, "runs": {k: v for k, v in baseline["runs"].items() if k.split("/")[0] in chosen}}
    if args.tolerance is not None:
        baseline = {**baseline, "tolerance_miou": args.tolerance}
    diffs = compare(baseline, results)
    environment = next((r.get("environment") for r in results if r.get("environment")), {})
    print(format_report(diffs, baseline, compared=len(results), environment=environment,
                        update_command=_update_command(args)))
    return 1 if any(d.failing for d in diffs) else 0


def _update_command(args: argparse.Namespace) -> str:
    """The command that rewrites what this check compared: the user's own baseline, preset, methods and settings
    (the bare command would rerun every method and rewrite the project's baseline)."""
    import shlex

    parts = ["python", "-m", "benchmarks", "check", "--update-baseline"]
    if args.baseline != DEFAULT_BASELINE:
        parts += ["--baseline", str(args.baseline)]
    if args.preset != "smoke":
        parts += ["--preset", args.preset]
    if args.methods:
        parts += ["--methods", args.methods]
    for override in args.overrides:
        parts += ["--set", override]
    for method_file in getattr(args, "method_files", None) or []:
        parts += ["--method-file", str(method_file)]
    return shlex.join(parts)


def _moved_since(baseline: dict, results: list[dict], fresh: dict) -> str:
    """What an update changes in the stored values: runs added or dropped, the tolerances, and the baseline's
    runs that were re-run, their numbers compared exactly even where the protocol or the inputs changed (which
    the lines before them say)."""
    from benchmarks.regression import baseline_entry, compare, run_key

    rerun = {run_key(r): r for r in results}
    old_keys, new_keys = set(baseline.get("runs", {})), set(fresh["runs"])
    lines = [f"  + {key} (new)" for key in sorted(new_keys - old_keys)]
    lines += [f"  - {key} (dropped: not re-run)" for key in sorted(old_keys - new_keys)]
    for field, unit in (("tolerance_miou", " IoU points"), ("tolerance_loss_relative", " of the final loss")):
        if field in baseline and float(baseline[field]) != float(fresh[field]):
            lines.append(f"  {field} ±{float(baseline[field]):g} → ±{float(fresh[field]):g}{unit}")
    previous_runs = {}
    for key, entry in baseline.get("runs", {}).items():
        if key not in rerun:
            continue
        fresh = baseline_entry(rerun[key])
        for field in ("protocol", "inputs"):
            if field in entry and field in fresh and entry[field] != fresh[field]:
                lines.append(f"  - {key}: {field} {entry[field]} → {fresh[field]}")
        previous_runs[key] = {k: v for k, v in entry.items() if k not in ("protocol", "inputs")}
    changed = [d for d in compare({**baseline, "runs": previous_runs}, results, tolerance=0.0, tolerance_loss=0.0)
               if d.failing]
    lines += [f"  - {d.message}" for d in changed[:10]]
    if len(changed) > 10:
        lines.append(f"  - ... and {len(changed) - 10} more")
    if not lines:
        return "the re-run runs reproduce the previous baseline's stored values exactly, and it keeps its runs and tolerances"
    numbers = f"{len(changed)} stored number(s) change" if changed else "every stored number of the re-run runs is the same"
    return f"against the previous baseline: {numbers}\n" + "\n".join(lines)


def _existing_baseline(args: argparse.Namespace, partial: bool) -> dict | None:
    """The baseline, fully checked before anything runs; None when --update-baseline will write it anew.
    `partial`: the check runs some of the methods (an update keeps the others' entries)."""
    from benchmarks.errors import UserError
    from benchmarks.regression import BadBaseline, load_baseline

    if not args.update_baseline:
        return load_baseline(args.baseline)
    if not args.baseline.exists():
        return None
    try:
        return load_baseline(args.baseline)
    except BadBaseline as err:
        if partial:
            raise UserError(f"baseline {err.path}: {err.problem}; an update of some methods would keep its other "
                            "runs, so fix the file or update every method (--methods all) to replace it whole") from None
        # Replaced whole by this run's baseline (written atomically, only once the runs are done).
        log.warning("baseline %s: %s; --update-baseline replaces it", err.path, err.problem)
        return None
