"""`profile`: per method, training and inference images/s, peak memory, FLOPs, MFU and parameters.

Random weights and synthetic batches at the preset's sizes: needs no data and no weight files.
Each method runs in a fresh process (clean peak memory; one method running out of memory is one
row with status "oom"). `--flops-only` counts FLOPs and parameters on fake tensors without timing,
which takes seconds per method even at paper scale on a laptop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
from pathlib import Path

from benchmarks.commands.run import add_method_file_argument
from benchmarks.outputs import given_path

NAME = "profile"
HELP = "measure training/inference throughput, peak memory, FLOPs and MFU of every method (random weights, synthetic data)"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default="all", help="'all' (default) or a comma-separated list, e.g. rein,lora")
    add_method_file_argument(parser)
    parser.add_argument("--preset", default="proxy", help="smoke, proxy (default), paper, or a .toml file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set train.batch_size=2 (repeatable)")
    parser.add_argument("--out", type=given_path, default="results/profiles", help="folder for <preset>-<device>-<date>.{json,md,png} (-2, -3, ... where that name is taken: "
                        "an earlier profile is never replaced)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 (default: the preset's train.device)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps before timing (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--eval-repeats", type=int, default=5, help="timed sliding-window inferences (default 5)")
    flops = parser.add_mutually_exclusive_group()
    flops.add_argument("--flops-only", action="store_true", help="FLOPs and parameter counts only (fake tensors, no timing)")
    flops.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--breakdown", choices=("auto", "all", "none"), default="auto",
                        help="torch.profiler view of where a training step's time goes, written to <stem>-breakdown.md: "
                             "auto (default) for methods below 30%% MFU on a GPU, all, or none")
    parser.add_argument("--in-process", action="store_true",
                        help="profile all methods in this process (faster start; peak memory then carries over between methods)")
    parser.add_argument("--note", default="", help="a line recorded with the table (e.g. 'CPU shared with other jobs')")


def run(args: argparse.Namespace) -> int:
    from benchmarks.config import load_experiment
    from benchmarks.errors import UserError
    from benchmarks.flops import flops_table
    from benchmarks.method import check_method_overrides, resolve_methods
    from benchmarks.model import check_buildable
    from benchmarks.outputs import require_writable_folder
    from benchmarks.profiling import ProfileSettings, profile_methods
    from benchmarks.protocol import select_device
    from benchmarks.reports.profiles import environment_summary, format_table, output_stem, write_profiles
    from benchmarks.synthetic_inputs import without_weight_files

    exp = load_experiment(args.preset, args.overrides)
    names = resolve_methods(args.methods)
    check_method_overrides(exp.methods)
    # counting FLOPs reads no weight file, so it needs none to exist; a setting the model cannot take is refused
    # either way (a method the counter cannot trace is a row of the FLOPs table of its own)
    check_buildable(without_weight_files(exp) if args.flops_only else exp, (exp.model.backbone,), names)
    if min(args.warmup, args.repeats, args.eval_repeats) < 0 or args.repeats == 0 or args.eval_repeats == 0:
        raise UserError("--repeats and --eval-repeats must be at least 1 and --warmup at least 0")
    out = Path(args.out)
    require_writable_folder(out, "--out")  # before minutes of profiling, not after
    today = dt.date.today()
    meta = {"date": today.isoformat(), "methods": ", ".join(names)}
    if args.note:
        meta["note"] = args.note

    stem = None
    try:
        if args.flops_only:
            rows = flops_table(exp, names)
            meta.update(environment_summary(None))
            meta["counted"] = "FLOPs per image: 2 per multiply-add over matmuls, convolutions and attention"
            stem = output_stem(exp.preset, "flops", today, out)
        else:
            device = select_device(args.device or exp.train.device, "--device" if args.device else "train.device")
            settings = ProfileSettings(warmup=args.warmup, repeats=args.repeats, eval_repeats=args.eval_repeats,
                                       count_flops=not args.no_flops, breakdown=args.breakdown)
            meta.update(environment_summary(device))
            meta["timing"] = (f"{settings.warmup} warm-up + {settings.repeats} timed training steps (protocol.train), "
                              f"{settings.eval_warmup} + {settings.eval_repeats} sliding-window inferences; median ± IQR/2")
            meta["isolation"] = "one process per method" if not args.in_process else "all methods in one process"
            stem = output_stem(exp.preset, meta.get("device_name") if device.type == "cuda" else "cpu", today, out)
            done: list[dict] = []

            def keep(row: dict) -> None:
                """Each finished method is on disk at once: a run cut off (a time limit, Ctrl-C) keeps its rows."""
                log.info("%s: %s", row["method"], _brief(row))
                done.append(row)
                write_profiles(done, exp, out, stem, {**meta, "finished": f"{len(done)} of {len(names)} methods"}, plots=False)

            previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, a scheduler: stop, taking the child along
            try:
                rows = profile_methods(exp, names, str(device), settings, isolate=not args.in_process, on_result=keep)
            finally:
                signal.signal(signal.SIGTERM, previous)  # a caller in the same process (tests) keeps its own
    except BaseException:
        _release_unwritten_name(out, stem)
        raise
    print(format_table(rows))
    paths = write_profiles(rows, exp, out, stem, meta)
    for path in paths:
        log.info("wrote %s", path)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def _release_unwritten_name(out: Path, stem: str | None) -> None:
    """A profile stopped before its first row leaves no empty `<stem>.md` (the name reserved for it), which would
    push the next profile of the day to `-2`."""
    reserved = out / f"{stem}.md" if stem else None
    if reserved is not None and reserved.is_file() and reserved.stat().st_size == 0:
        reserved.unlink()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as an exception (exit 143): on the way out subprocess.run kills and reaps the method's
    process instead of leaving it running as an orphan; the rows written so far stay."""
    raise SystemExit(128 + signum)


def _brief(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')} ({row.get('error')})"
    return (f"train {row.get('train_images_per_s') or 0:.2f} img/s, eval {row.get('eval_images_per_s') or 0:.2f} img/s, "
            f"peak {row.get('peak_memory_mb') or 0:.0f} MiB")
