"""`python -m benchmarks data ...`: check a data root, write the synthetic world, run conversions.

    data check --root DIR [--full]                 pairs per dataset found and any problem (exit 2 if any)
    data synth --out DIR --size small|medium|paper[_tiny] [--seed N] [--world-version N] [--workers N] [--preview PNG]
               [--archives DIR]
    data convert {gtav,cityscapes,synthia,mapillary-half} --root DIR
    data prepare --from DOWNLOADS --to ROOT [--datasets a,b] [--expect official|listing] [--crc] [--overwrite]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.errors import UserError
from benchmarks.outputs import given_path, require_writable_file, require_writable_folder

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
    check.add_argument("--root", required=True, type=given_path, help="data root holding gta/, cityscapes/, ...")
    check.add_argument("--full", action="store_true", help="decode every label (default: a sample per split)")

    synth = sub.add_parser("synth", help="write the synthetic world in the real datasets' layouts")
    synth.add_argument("--out", required=True, type=given_path, help="output data root")
    synth.add_argument("--size", choices=("small", "medium", "paper", "paper_tiny"), default="small",
                       help="small (default) and medium: ~1/8 of the real resolutions, for the proxy preset; paper: "
                            "a few dozen pairs per domain at the real datasets' resolutions, for --preset paper "
                            "(paper_tiny: one or two per split, for tests and dry runs)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--world-version", type=int, default=None, metavar="N",
                       help="the generator's version to draw (default: the one --out's name says, synthetic-v<N>, "
                            "as the presets name their data root; else the newest; docs/datasets.md)")
    synth.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    synth.add_argument("--preview", type=given_path, default=None, help="also write a PNG preview grid here")
    synth.add_argument("--archives", type=given_path, default=None,
                       help="also pack the world as the official download archives into this folder")

    convert = sub.add_parser("convert", help="one-off label conversions (idempotent, atomic)")
    convert.add_argument("what", choices=("gtav", "cityscapes", "synthia", "mapillary-half"))
    convert.add_argument("--root", required=True, type=given_path, help="data root")

    prepare = sub.add_parser(
        "prepare", help="from the official downloads to a checked data root, in one command",
        description="Recognise the official archives in DOWNLOADS by name, check them, extract each complete "
                    "dataset into ROOT (staged, renamed into place only when whole), run the conversions the "
                    "protocol needs, then `data check` ROOT. docs/datasets.md lists the names.")
    prepare.add_argument("--from", dest="downloads", required=True, type=given_path, metavar="DOWNLOADS",
                         help="folder holding the downloaded archives")
    prepare.add_argument("--to", dest="root", required=True, type=given_path, metavar="ROOT",
                         help="data root to prepare (created if missing)")
    prepare.add_argument("--datasets", default=None,
                         help="comma-separated datasets to prepare (default: every dataset whose archives are all there)")
    prepare.add_argument("--expect", choices=("official", "listing"), default="official",
                         help="official (default): the pairs per split must be the official release's; listing: "
                              "accept what the archives hold (the synthetic world's archives)")
    prepare.add_argument("--crc", action="store_true",
                         help="read every member and check its CRC before extracting anything (a full read of the "
                              "archives; by default each member's CRC is checked as it is extracted)")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace dataset folders already under ROOT (default: skip them)")


def _adapter_for(name: str, root: Path, split: str):  # noqa: ANN202 - adapter instance
    """The adapter of `split` as a run reads it: a target's evaluation split with its preparation (Mapillary
    val halved, from its converted copy where there is one), so that what is checked is what is scored."""
    from datasets.registry import get_adapter

    cls = get_adapter(name)
    if split == cls.default_eval_split and cls.eval_preparation.half_resolution:
        return cls(root, split, half_resolution=True)
    return cls(root, split)


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
        found_rows, found = _check_dataset(root, name, full)
        rows += found_rows
        problems += found
    return rows, problems


def _check_dataset(root: Path, name: str, full: bool) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """`data check` of one dataset family under root: its rows and its problems. A split of a real dataset
    (a root that is no synthetic world) with fewer pairs than the official release is ok, but said: a
    partly extracted download would otherwise be scored as if it were the protocol's split."""
    from datasets.archives import OFFICIAL_ARCHIVES
    from datasets.synthetic import world_record

    official = {} if world_record(root) is not None or name not in OFFICIAL_ARCHIVES else \
        OFFICIAL_ARCHIVES[name].official_pairs
    rows: list[tuple[str, str, str, str]] = []
    problems: list[str] = []
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
        elif n < official.get(split, 0):
            rows.append((name, split, str(n), f"ok, partial: {n:,} of the official release's {official[split]:,} pairs"))
        else:
            rows.append((name, split, str(n), "ok"))
    return rows, problems


def _sampled_problems(root: Path, name: str) -> list[str]:
    """What `data check` finds in a sample of one dataset's pairs (the check `prepare` runs before a dataset
    goes into place)."""
    return _check_dataset(root, name, full=False)[1]


def _print_check(rows: list[tuple[str, str, str, str]]) -> None:
    width = max([len(r[0]) for r in rows] + [len("dataset")])
    print(f"{'dataset':<{width}}  {'split':<6} {'pairs':>6}  status")
    for name, split, n, status in rows:
        print(f"{name:<{width}}  {split:<6} {n:>6}  {status}")


def run(args: argparse.Namespace) -> int:
    """Run a `data` subcommand; user mistakes raise UserError (the CLI prints them, exit 2)."""
    if args.data_command == "check":
        root = _existing_root(args.root)
        rows, problems = run_check(root, full=args.full)
        if not rows:
            raise UserError(f"{root}: no dataset folder found; expected some of gta/, cityscapes/, bdd100k/, "
                            "mapillary/, synthia/, acdc/ (python -m benchmarks data synth --out DIR writes all four)")
        _print_check(rows)
        if problems:
            raise UserError(f"{len(problems)} problem(s) under {root}; first: {problems[0]}")
        return 0

    if args.data_command == "synth":
        from benchmarks.storage import is_out_of_space
        from datasets.synthetic import (
            PRETRAINING_SEEDS_FROM,
            WORLD_VERSION,
            WORLD_VERSIONS,
            format_frequencies,
            generate_world,
            save_preview,
            world_version_named_by,
        )

        if args.seed < 0:  # numpy's seed sequences refuse negative entropy, after --out was made
            raise UserError(f"--seed {args.seed}: must be at least 0")
        if args.seed >= PRETRAINING_SEEDS_FROM:  # a world's scenes could then be the proxy's pretraining scenes
            raise UserError(f"--seed {args.seed}: must be below {PRETRAINING_SEEDS_FROM:,}, where the proxy "
                            "backbone's pretraining scenes are seeded")
        named = world_version_named_by(args.out)
        drawn = ", ".join(map(str, WORLD_VERSIONS))
        if args.world_version is not None and args.world_version not in WORLD_VERSIONS:
            raise UserError(f"--world-version {args.world_version}: this generator draws versions {drawn}")
        if named is not None and named not in WORLD_VERSIONS:
            raise UserError(f"--out {args.out} is named for world version {named}, which this generator does not "
                            f"draw (it draws {drawn}); pass an --out named synthetic-v<N> for one of them, or "
                            "another name")
        version = args.world_version if args.world_version is not None else named if named is not None else WORLD_VERSION
        if named is not None and named != version:  # a run reading that folder would take it for version `named`
            raise UserError(f"--out {args.out} is named for world version {named}, asked for version {version}; "
                            f"pass --out .../synthetic-v{version} or --world-version {named}")
        require_writable_folder(args.out, "--out")
        if args.preview is not None:
            require_writable_file(args.preview, "--preview", "preview.png")
        if args.archives is not None:
            from datasets.archives import refuse_to_replace_archives

            require_writable_folder(args.archives, "--archives")
            refuse_to_replace_archives(args.archives)  # before minutes of rendering
        start = time.perf_counter()
        try:
            stats = generate_world(args.out, size=args.size, seed=args.seed, workers=args.workers, version=version)
        except OSError as err:
            if not is_out_of_space(err, args.out, 0):
                raise
            raise UserError(f"--out {args.out}: {err.strerror}; free space on that disk and run the same command "
                            "again (the pairs written are kept and skipped), or pass another --out") from None
        elapsed = time.perf_counter() - start
        print(f"synthetic world ({args.size}, seed {args.seed}, version {version}) written to {args.out} in "
              f"{elapsed:.1f} s")
        for key, value in stats.get("pairs", {}).items():
            print(f"  {key}: {value} pairs")
        print("\nclass frequencies (% of labelled pixels) per domain:")
        print(format_frequencies(stats["frequencies"]))
        if args.preview is not None:
            save_preview(args.out, args.preview)
            print(f"preview written to {args.preview}")
        if args.archives is not None:
            from datasets.archives import write_official_archives

            written = write_official_archives(args.out, args.archives)
            print(f"{len(written)} archives with the official names written to {args.archives} "
                  f"(prepare them with: python -m benchmarks data prepare --from {args.archives} --to ROOT "
                  "--expect listing)")
        return 0

    if args.data_command == "convert":
        from datasets.convert import CONVERTERS

        stats = CONVERTERS[args.what](_existing_root(args.root))
        print(f"{args.what}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        return 0

    if args.data_command == "prepare":
        return run_prepare(args)

    raise UserError(f"unknown data command {args.data_command!r}; expected check, synth, convert or prepare")


def _existing_root(given: Path) -> Path:
    """`--root`, which must be a data root that exists (the adapters' own message names `run`'s --data-root)."""
    from datasets.base import broken_link

    root = given.expanduser()
    link = broken_link(root)
    if link:
        raise UserError(f"--root {link}")
    if not root.is_dir():
        raise UserError(f"--root {root}: data root not found; pass an existing folder (or write the synthetic "
                        "world: python -m benchmarks data synth --out DIR)")
    return root


def _requested_datasets(text: str | None) -> list[str] | None:
    from datasets.registry import ADAPTERS

    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ADAPTERS]
    if unknown or not names:
        raise UserError(f"--datasets {text!r}: unknown dataset {', '.join(unknown) or '(none given)'}; expected "
                        f"some of {', '.join(ADAPTERS)}, comma-separated")
    return list(dict.fromkeys(names))


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _inventory_lines(found: dict, manual: dict[str, Path]) -> list[str]:
    """One line per dataset: complete, partial (what is missing) or absent; what cannot be used and why."""
    from datasets.archives import MANUAL_ARCHIVES, MANUAL_DATASETS
    from datasets.registry import ADAPTERS

    notes = {MANUAL_ARCHIVES[name][0]: f"{name}: {MANUAL_ARCHIVES[name][1]}" for name in manual}
    width = max(len(name) for name in ADAPTERS)
    lines = []
    for name in ADAPTERS:
        if name in found:
            downloads = found[name]
            names = downloads.spec.archive_names
            if downloads.state == "complete":
                detail = " + ".join(names) if len(names) <= 2 else f"{len(names)} archives ({names[0]} ... {names[-1]})"
            elif downloads.state == "partial":
                detail = f"missing {_names(downloads.missing)}"
            else:
                detail = f"expects {_names(names, 2)}"
            state = downloads.state
        else:  # a dataset whose official download this command cannot read (SYNTHIA's RAR)
            archive = MANUAL_DATASETS[name]
            state = "manual" if archive in manual else "absent"
            detail = "" if archive in manual else f"expects {archive}, extracted by hand (docs/datasets.md)"
        detail = "; ".join(part for part in (detail, notes.get(name, "")) if part)
        lines.append(f"  {name:<{width}}  {state:<8}  {detail}")
    return lines


def _select_datasets(found: dict, manual: dict[str, Path], requested: list[str] | None, downloads: Path,
                     root: Path) -> list[str]:
    """The datasets to prepare; a requested or partly downloaded dataset that cannot be is one line."""
    from datasets.archives import MANUAL_ARCHIVES, MANUAL_DATASETS

    complete = [name for name, d in found.items() if d.state == "complete"]
    for name in requested or []:
        if name in MANUAL_DATASETS:
            archive = MANUAL_DATASETS[name]
            where = f"{downloads / archive} is" if archive in manual else f"its official download, {archive}, is"
            how = MANUAL_ARCHIVES[archive][1].replace("ROOT", str(root))
            raise UserError(f"{name}: {where} {how}, then run `python -m benchmarks data check --root {root}`; "
                            "leave it out of --datasets")
        downloads_of = found[name]
        if downloads_of.state == "absent":
            raise UserError(f"{downloads}: none of the {name} archives ({_names(downloads_of.spec.archive_names, 2)}) "
                            f"is there; download them from {downloads_of.spec.source}, or leave {name} out of --datasets")
        if downloads_of.state == "partial":
            raise UserError(f"{downloads}: {name} archive(s) missing: {_names(downloads_of.missing)}; download them "
                            f"from {downloads_of.spec.source}, or leave {name} out of --datasets")
    if requested is not None:
        return requested
    partial = [name for name, d in found.items() if d.state == "partial"]
    if partial:
        name = partial[0]
        others = f"--datasets {','.join(complete)}" if complete else "nothing else (no dataset is complete)"
        raise UserError(f"{downloads}: {name} archive(s) missing: {_names(found[name].missing)} (the others of "
                        f"{name} are there); download them from {found[name].spec.source}, or prepare the "
                        f"complete datasets only: {others}")
    if not complete:
        raise UserError(f"{downloads}: no dataset's official archives found (e.g. leftImg8bit_trainvaltest.zip "
                        "and gtFine_trainvaltest.zip for Cityscapes; docs/datasets.md lists every name); put the "
                        "downloaded archives there under their official names")
    return complete


def run_prepare(args: argparse.Namespace) -> int:
    """`data prepare`: every check that reads only listings first, then staged extraction, then `data check`."""
    from datasets.archives import OFFICIAL_ARCHIVES, find_downloads, plan_dataset, verify_crc
    from datasets.prepare import Staging, require_space, stale_staging

    downloads, root = args.downloads.expanduser(), args.root.expanduser()
    if not downloads.is_dir():
        raise UserError(f"--from {downloads}: not a folder; pass the folder holding the downloaded archives")
    if downloads.resolve() == root.resolve():
        raise UserError(f"--to {root}: is the downloads folder itself; pass another folder as the data root")
    require_writable_folder(root, "--to")
    requested = _requested_datasets(args.datasets)
    found, manual = find_downloads(downloads)
    print(f"archives in {downloads}:")
    print("\n".join(_inventory_lines(found, manual)))
    selected = _select_datasets(found, manual, requested, downloads, root)
    print(f"to prepare: {', '.join(selected)}")
    for leftover in stale_staging(root):
        print(f"note: {leftover} was left by an interrupted prepare; delete it when no prepare is running")

    plans = []
    for name in selected:
        target = root / OFFICIAL_ARCHIVES[name].folder
        if (target.exists() or target.is_symlink()) and not args.overwrite:
            print(f"{name}: skipped, {target} already exists (pass --overwrite to replace it)")
            continue
        plan = plan_dataset(found[name], args.expect)
        split_text = ", ".join(f"{split} {n:,}" for split, n in plan.pairs.items())
        print(f"{name}: archives hold {split_text} pairs; {len(plan.files):,} files, {plan.bytes / 2**20:,.1f} MB "
              "to extract" + (f" ({len(plan.empty_archives)} archive(s) hold none)" if plan.empty_archives else ""))
        plans.append(plan)
    if args.crc:
        for plan in plans:
            verify_crc(plan)
            print(f"{plan.spec.dataset}: every member's CRC checked")
    if plans:
        require_space(plans, root)
        with Staging(root) as staging:
            for plan in plans:
                prepared = staging.build(plan, overwrite=args.overwrite, check=_sampled_problems)
                extra = f"; {prepared.conversion}" if prepared.conversion else ""
                print(f"{prepared.dataset}: ready at {prepared.folder}{' (replaced)' if prepared.replaced else ''}"
                      f"{extra}")

    if not root.is_dir():
        raise UserError(f"--to {root}: nothing was prepared and the folder does not exist")
    print(f"\ndata check --root {root}:")
    rows, problems = run_check(root)
    _print_check(rows)
    if problems:
        raise UserError(f"{len(problems)} problem(s) under {root} after preparing; first: {problems[0]}")
    return 0
