"""`list`: what the harness can run — methods, backbones, heads, datasets, presets."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from benchmarks.commands.run import add_method_file_argument

NAME = "list"
HELP = "show the registered methods (paper, defaults, trainable parameters), backbones, heads, datasets and presets"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="all", choices=["all", "methods", "backbones", "heads", "datasets", "presets"])
    parser.add_argument("--backbone", default="dinov2_vitl14",
                        help="backbone whose trainable-parameter counts the method list shows (default: dinov2_vitl14 @512)")
    parser.add_argument("--head", default="mask2former", help="head used for those counts (default: mask2former)")
    parser.add_argument("--img-size", type=int, default=512)
    add_method_file_argument(parser)


def run(args: argparse.Namespace) -> int:
    sections = ["methods", "backbones", "heads", "datasets", "presets"] if args.what == "all" else [args.what]
    if "methods" in sections:
        check_model_choices(args)  # before printing anything: a bad name would only show "n/a" counts
    listings = {section: globals()[f"_{section}"](args) for section in sections}  # all, or an error and nothing
    for section, listing in listings.items():
        print(f"## {section}")
        print(listing)
        print()
    return 0


def check_model_choices(args: argparse.Namespace) -> None:
    """UserError naming the valid choices for an unknown --backbone or --head."""
    from benchmarks.backbones import get_spec
    from benchmarks.errors import UserError
    from benchmarks.heads import available_heads

    get_spec(args.backbone)
    if args.head not in available_heads():
        raise UserError(f"unknown head {args.head!r}; valid: {', '.join(available_heads())}")


def _methods(args: argparse.Namespace) -> str:
    from tabulate import tabulate

    from benchmarks.config import Experiment, ModelConfig
    from benchmarks.errors import UserError
    from benchmarks.method import available_methods, build_method
    from benchmarks.model import reported_parameter_counts

    exp = Experiment(model=ModelConfig(backbone=args.backbone, head=args.head, img_size=args.img_size))
    rows, failures = [], []
    for name, cls in available_methods().items():
        method = build_method(name)
        try:
            counts = reported_parameter_counts(exp, name)
            trainable = f"{counts['backbone_trainable']:,}"
        except Exception as err:  # a count that cannot be computed is shown, not fatal to the listing
            log.debug("counting %s on %s failed: %s", name, args.backbone, err)
            failures.append(err)
            trainable = "n/a"
        defaults = ", ".join(f"{k}={v}" for k, v in method.hyperparameters().items()) or "-"
        rows.append([name, cls.paper, trainable, defaults])
    if rows and len(failures) == len(rows):  # not one method: the options themselves are wrong (--img-size 0)
        reason = (str(failures[0]).splitlines() or [""])[0]
        raise UserError(f"no method could be counted on {args.backbone} at --img-size {args.img_size} "
                        f"({type(failures[0]).__name__}: {reason}); pass a positive --img-size that is a multiple "
                        "of the backbone's patch")
    return tabulate(rows, headers=["method", "paper", f"trainable ({args.backbone}@{args.img_size})", "defaults"], maxcolwidths=[None, 40, None, 60])


def _backbones(args: argparse.Namespace) -> str:
    from tabulate import tabulate

    from benchmarks.backbones import BACKBONES

    rows = []
    for name, spec in BACKBONES.items():
        fields = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
        patch = fields.get("protocol_patch") or fields.get("native_patch")
        rows.append([name, fields.get("timm_name"), fields.get("native_patch"), patch, fields.get("embed_dim"),
                     fields.get("depth")])
    # The protocol's patch is the one inputs must be a multiple of (the 14-patch VFMs run at 16).
    return tabulate(rows, headers=["backbone", "timm model", "native patch", "protocol patch", "width", "depth"])


def _heads(args: argparse.Namespace) -> str:
    from benchmarks.heads import HEADS

    return "\n".join(f"{name:12} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}" for name, cls in HEADS.items())


def _datasets(args: argparse.Namespace) -> str:
    from datasets.registry import ADAPTERS

    return "\n".join(f"{name:12} {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}" for name, cls in ADAPTERS.items())


def _presets(args: argparse.Namespace) -> str:
    from benchmarks.config import PRESET_DIR, available_presets

    lines = []
    for name in available_presets():
        comment = []  # the file's opening comment, whole: its first line alone stops mid-sentence
        for line in (PRESET_DIR / f"{name}.toml").read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("# ").strip())
        lines.append(f"{name:8} {' '.join(part for part in comment if part)}")
    return "\n".join(lines)
