"""`python -m benchmarks data ...`: check a data root, write the synthetic world, run conversions.

    data check --root DIR [--full]                 pairs per dataset found and any problem (exit 2 if any)
    data synth --out DIR --size small|medium [--seed N] [--workers N] [--preview PNG]
    data convert {gtav,cityscapes,synthia,mapillary-half} --root DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.errors import UserError
from benchmarks.outputs import require_writable_file, require_writable_folder

# The splits `check` looks at: required ones must exist, optional ones are checked when present.
CHECK_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gtav": (("train",), ()),
    "synthia": (("train",), ()),
    "cityscapes": (("train", "val"), ()),
    "bdd100k": (("val",), ("train",)),
    "mapillary": (("val",), ("train",)),
    "acdc": (("val",), ("train",)),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its subcommands."""
    parser = subparsers.add_parser("data", help="check, synthesize or convert datasets",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=run)
    sub = parser.add_subparsers(dest="data_command", required=True)

    check = sub.add_parser("check", help="validate every dataset found under a data root, without training")
    check.add_argument("--root", required=True, type=Path, help="data root holding gta/, cityscapes/, ...")
    check.add_argument("--full", action="store_true", help="decode every label (default: a sample per split)")

    synth = sub.add_parser("synth", help="write the synthetic world in the real datasets' layouts")
    synth.add_argument("--out", required=True, type=Path, help="output data root")
    synth.add_argument("--size", choices=("small", "medium"), default="small")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    synth.add_argument("--preview", type=Path, default=None, help="also write a PNG preview grid here")

    convert = sub.add_parser("convert", help="one-off label conversions (idempotent, atomic)")
    convert.add_argument("what", choices=("gtav", "cityscapes", "synthia", "mapillary-half"))
    convert.add_argument("--root", required=True, type=Path, help="data root")


def _adapter_for(name: str, root: Path, split: str):  # noqa: ANN202 - adapter instance
    from datasets.registry import get_adapter

    return get_adapter(name)(root, split)


def _split_present(adapter) -> bool:  # noqa: ANN001
    """Whether an optional split has any folder on disk (then it must be valid)."""
    name, base, split = adapter.name, adapter.base, adapter.split
    candidates = {
        "bdd100k": [base / "images" / "10k" / split, base / "labels" / "sem_seg" / "masks" / split, base / "seg" / "images" / split],
        "mapillary": [base / {"train": "training", "val": "validation"}[split]],
        "acdc": [base / "rgb_anon" / c / split for c in ("fog", "night", "rain", "snow")],
    }.get(name, [])
    return any(p.is_dir() for p in candidates)


def run_check(root: Path, full: bool = False) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Rows (dataset, split, pairs, status) and the list of problems, for every family under root."""
    from datasets.registry import find_datasets

    rows: list[tuple[str, str, str, str]] = []
    problems: list[str] = []
    for name in find_datasets(root):
        required, optional = CHECK_SPLITS[name]
        for split in required + optional:
            adapter = _adapter_for(name, root, split)
            if split in optional and not _split_present(adapter):
                continue
            try:
                n = len(adapter.pairs())
                found = adapter.check(full=full)
            except UserError as exc:
                rows.append((name, split, "-", f"error: {exc}"))
                problems.append(str(exc))
                continue
            if found:
                rows.append((name, split, str(n), f"error: {found[0]}" + (f" (+{len(found) - 1} more)" if len(found) > 1 else "")))
                problems += found
            else:
                rows.append((name, split, str(n), "ok"))
    return rows, problems


def run(args: argparse.Namespace) -> int:
    """Run a `data` subcommand; user mistakes raise UserError (the CLI prints them, exit 2)."""
    if args.data_command == "check":
        from datasets.base import broken_link

        root = args.root.expanduser()
        link = broken_link(root)
        if link:
            raise UserError(f"--root {link}")
        if not root.is_dir():
            raise UserError(f"{root}: data root not found; pass an existing folder (or write the synthetic world: "
                            "python -m benchmarks data synth --out DIR)")
        rows, problems = run_check(root, full=args.full)
        if not rows:
            raise UserError(f"{root}: no dataset folder found; expected some of gta/, cityscapes/, bdd100k/, "
                            "mapillary/, synthia/, acdc/ (python -m benchmarks data synth --out DIR writes all four)")
        width = max(len(r[0]) for r in rows)
        print(f"{'dataset':<{width}}  {'split':<6} {'pairs':>6}  status")
        for name, split, n, status in rows:
            print(f"{name:<{width}}  {split:<6} {n:>6}  {status}")
        if problems:
            raise UserError(f"{len(problems)} problem(s) under {root}; first: {problems[0]}")
        return 0

    if args.data_command == "synth":
        from datasets.synthetic import format_frequencies, generate_world, save_preview

        require_writable_folder(args.out, "--out")
        if args.preview is not None:
            require_writable_file(args.preview, "--preview", "preview.png")
        start = time.perf_counter()
        stats = generate_world(args.out, size=args.size, seed=args.seed, workers=args.workers)
        elapsed = time.perf_counter() - start
        print(f"synthetic world ({args.size}, seed {args.seed}) written to {args.out} in {elapsed:.1f} s")
        for key, value in stats.get("pairs", {}).items():
            print(f"  {key}: {value} pairs")
        print("\nclass frequencies (% of labelled pixels) per domain:")
        print(format_frequencies(stats["frequencies"]))
        if args.preview is not None:
            save_preview(args.out, args.preview)
            print(f"preview written to {args.preview}")
        return 0

    if args.data_command == "convert":
        from datasets.convert import CONVERTERS

        stats = CONVERTERS[args.what](args.root.expanduser())
        print(f"{args.what}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        return 0

    raise UserError(f"unknown data command {args.data_command!r}; expected check, synth or convert")
