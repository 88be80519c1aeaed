"""`pretrain`: reproduce the proxy VFM checkpoint shipped in benchmarks/weights/."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from benchmarks.errors import UserError

NAME = "pretrain"
HELP = "pretrain the small proxy ViT on randomly styled generated scenes (no benchmark labels)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from benchmarks.pretrain import PROXY_RECIPE, PretrainConfig

    parser.add_argument("--out", type=Path, default=Path("benchmarks/weights/proxy_vit.safetensors"))
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--stage", type=int, choices=range(1, len(PROXY_RECIPE) + 1),
                        help="run only this stage of the shipped recipe (default: every stage in turn)")
    parser.add_argument("--init", help="checkpoint a single --stage continues from (default: the stage before's output)")
    for field in dataclasses.fields(PretrainConfig):
        if field.type in ("int", "float", int, float):
            kind = int if field.type in ("int", int) else float
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                                help=f"override for every stage run ({field.name})")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    from benchmarks.pretrain import PROXY_RECIPE, PretrainConfig, pretrain_recipe

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
                 if getattr(args, f.name, None) is not None}
    stages = [dataclasses.replace(stage, **overrides) for stage in PROXY_RECIPE]
    first = 0
    if args.stage:
        first = args.stage - 1
        if stages[first].init and not args.init:
            raise UserError(f"stage {args.stage} continues from stage {first}'s checkpoint: pass --init PATH")
        if args.init and not Path(args.init).is_file():
            raise UserError(f"--init {args.init}: no such checkpoint")
        stages = [dataclasses.replace(stages[first], init=args.init or "")]
    elif args.init:
        raise UserError("--init goes with --stage (the full recipe starts from random initialisation)")
    report = pretrain_recipe(stages, args.out, device=args.device, first_stage=first + 1)
    print(json.dumps(report, indent=2))
    return 0
