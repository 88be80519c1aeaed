"""`pretrain`: reproduce the proxy VFM checkpoint shipped in benchmarks/weights/."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

NAME = "pretrain"
HELP = "pretrain the small proxy ViT on randomly styled generated scenes (no benchmark labels)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from benchmarks.pretrain import PretrainConfig

    parser.add_argument("--out", type=Path, default=Path("benchmarks/weights/proxy_vit.safetensors"))
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    for field in dataclasses.fields(PretrainConfig):
        if field.type in ("int", "float", int, float):
            kind = int if field.type in ("int", int) else float
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    from benchmarks.pretrain import PretrainConfig, pretrain

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig) if hasattr(args, f.name)}
    report = pretrain(PretrainConfig(**values), args.out, device=args.device)
    print(json.dumps(report, indent=2))
    return 0
