"""`pretrain`: reproduce the proxy VFM checkpoint shipped in benchmarks/weights/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.errors import UserError
from benchmarks.outputs import given_path, require_writable_file

if TYPE_CHECKING:  # imported when the command runs: it brings torch
    from benchmarks.pretrain import PretrainConfig

NAME = "pretrain"
HELP = "pretrain the small proxy ViT on randomly styled generated scenes (no benchmark label files)"
SHIPPED = Path("benchmarks/weights/proxy_vit.safetensors")
PROXY_DEPTH = 6
"""`proxy_vit`'s blocks (`benchmarks.backbones`, which brings torch; a test keeps the two equal)."""


@dataclass(frozen=True)
class Bounds:
    """The values a numeric pretraining option accepts."""

    low: float
    low_allowed: bool = True
    high: float | None = None
    note: str = ""

    def problem(self, value: float) -> str | None:
        if not math.isfinite(value):  # NaN passes every comparison; inf trained a NaN checkpoint and exit 0
            return f"must be a finite number{self.note}"
        if value < self.low or (value == self.low and not self.low_allowed):
            return f"must be {'at least' if self.low_allowed else 'above'} {self.low:g}{self.note}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high:g}{self.note}"
        return None


# `benchmarks.pretrain.scene_seed` keeps a scene's seed below 2**32 for these (a test holds them to it).
SCENES_PER_SEED = 10_000_000
MAX_SEED = 328

# Every numeric field of PretrainConfig, so that a value the code cannot use never reaches rendering.
OPTION_BOUNDS: dict[str, Bounds] = {
    "scenes": Bounds(1, high=SCENES_PER_SEED, note=" (one --seed's share of the scene seeds)"),
    "views": Bounds(1, note=" (1 turns the cross-style objectives off)"),
    "scene_height": Bounds(1),
    "scene_width": Bounds(1),
    "crop_size": Bounds(1),
    "zoom": Bounds(0, low_allowed=False),
    "steps": Bounds(1),
    "batch_size": Bounds(1),
    "lr": Bounds(0),
    "weight_decay": Bounds(0),
    # The warm-up divides by it; 1 already means none (the first step is at the full learning rate).
    "warmup_steps": Bounds(1, note=" (1 means no warm-up)"),
    "head_warmup_steps": Bounds(0, note=" (0 means the backbone learns from the first step)"),
    "mask_ratio": Bounds(0, low_allowed=False, high=1),
    # More than the proxy's blocks would average all of them and record the number given.
    "target_layers": Bounds(1, high=PROXY_DEPTH, note=f" (the proxy ViT has {PROXY_DEPTH} blocks)"),
    "region_contrast": Bounds(0),
    "regions_per_image": Bounds(1),
    "contrast_temperature": Bounds(0, low_allowed=False),
    "seed": Bounds(0, high=MAX_SEED, note=" (the scenes' seeds stay below 2**32, apart from every world's)"),
    "workers": Bounds(1),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from benchmarks.pretrain import AMP_CHOICES, PROXY_RECIPE, PretrainConfig

    parser.add_argument("--out", type=given_path, default=SHIPPED,
                        help=f"the checkpoint to write (default: the shipped one, {SHIPPED}); earlier "
                             "stages and the .json recipe go beside it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoint (and its .json and stage files) if they exist; without "
                             "it an existing file stops the command before anything is rendered")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--stage", type=int, choices=range(1, len(PROXY_RECIPE) + 2),
                        help="run only this stage of the shipped recipe (default: every stage in turn); "
                             f"{len(PROXY_RECIPE) + 1} runs one more round of its last stage on new scenes")
    parser.add_argument("--init", help="checkpoint a single --stage continues from (default: the stage before's output); the "
                             "stages recorded in its .json, when written with it, head the new record")
    parser.add_argument("--amp", choices=AMP_CHOICES, default=None,
                        help="bf16: forward passes under bf16 autocast (about 2× faster a step on a CPU with AMX; "
                             "slower on one without a bf16 matrix unit); default none (fp32), as every shipped stage")
    for field in dataclasses.fields(PretrainConfig):
        if field.type in ("int", "float", int, float):
            kind = int if field.type in ("int", int) else float
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                                help=f"override for every stage run ({field.name})")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _check_overrides(overrides: dict[str, float]) -> None:
    for name, value in overrides.items():
        problem = OPTION_BOUNDS[name].problem(value)
        if problem:
            raise UserError(f"{_option(name)} {value:g}: {problem}")


def _check_stage(stage: PretrainConfig) -> None:
    """What no single option's bounds catch: values that only fail together (as tracebacks or NaN losses)."""
    from benchmarks.backbones import BACKBONES

    patch = BACKBONES["proxy_vit"].native_patch
    if stage.crop_size % patch:
        raise UserError(f"--crop-size {stage.crop_size}: must be a multiple of {patch}, the proxy ViT's "
                        "patch size")
    largest_crop = stage.source_crop[1]
    for name in ("scene_height", "scene_width"):
        if getattr(stage, name) < largest_crop:
            raise UserError(f"{_option(name)} {getattr(stage, name)}: must be at least {largest_crop}, "
                            "the largest crop taken from a scene")
    if stage.head_warmup_steps >= stage.steps:
        raise UserError(f"--head-warmup-steps {stage.head_warmup_steps}: must be below --steps ({stage.steps}); "
                        "the backbone would never learn")
    patches = (stage.crop_size // patch) ** 2
    if int(stage.mask_ratio * patches) < 1:
        raise UserError(f"--mask-ratio {stage.mask_ratio:g}: masks none of the {patches} patches of a "
                        f"{stage.crop_size}-pixel crop; pass at least {1 / patches:g}")


def _refuse_to_overwrite(out: Path, stages: list[PretrainConfig], first_stage: int, kept: int) -> None:
    """Stop before anything is rendered if a file this pretraining writes exists, except the checkpoints (and
    records) of the `kept` stages an earlier run of this very recipe finished: it goes on after them."""
    from benchmarks.pretrain import stage_checkpoint

    last_stage = first_stage + len(stages) - 1
    written = []
    for number in range(first_stage + kept, last_stage + 1):
        checkpoint = stage_checkpoint(out, number, last_stage)
        written += [checkpoint, checkpoint.with_suffix(".json")]
    existing = [path for path in written if path.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more file(s) this pretraining writes)" if len(existing) > 1 else ""
        which = "them" if more else "it"
        raise UserError(f"{existing[0]} exists{more} and is not a stage this recipe finished; pass --overwrite "
                        f"to replace {which}, or --out PATH to write elsewhere")


def run(args: argparse.Namespace) -> int:
    from benchmarks.pretrain import (
        PROXY_RECIPE,
        another_round,
        finished_stages,
        is_stage_reference,
        pretrain_recipe,
    )

    # Only the numeric fields are options of their own (`--init` is the stage's starting checkpoint, below).
    overrides = {name: getattr(args, name) for name in OPTION_BOUNDS if getattr(args, name, None) is not None}
    _check_overrides(overrides)
    if args.amp is not None:
        overrides["amp"] = args.amp
    stages = [dataclasses.replace(stage, **overrides) for stage in (*PROXY_RECIPE, another_round())]
    first = 0
    if args.stage:
        first = args.stage - 1
        if stages[first].init and not args.init:
            raise UserError(f"stage {args.stage} continues from stage {first}'s checkpoint: pass --init PATH")
        if args.init and not Path(args.init).is_file():
            raise UserError(f"--init {args.init}: no such checkpoint")
        if args.init:  # a file that is no checkpoint stops here, not after minutes of rendering
            from benchmarks.weights_io import read_state_dict

            read_state_dict(Path(args.init))
        init = args.init or ""
        if is_stage_reference(init):  # a file named like a recipe's reference to a stage
            init = f"./{init}"
        stages = [dataclasses.replace(stages[first], init=init)]
    elif args.init:
        raise UserError("--init goes with --stage (the full recipe starts from random initialisation)")
    else:
        stages = stages[: len(PROXY_RECIPE)]
    for stage in stages:
        _check_stage(stage)
    from benchmarks.protocol import select_device

    device = str(select_device(args.device, "--device"))  # before minutes of rendering: a typo, or no CUDA here
    require_writable_file(args.out, "--out", SHIPPED.name)
    finished = [] if args.overwrite else finished_stages(stages, args.out, first + 1)  # read once: sha256 of files
    if not args.overwrite:
        _refuse_to_overwrite(args.out, stages, first + 1, kept=len(finished))
    report = pretrain_recipe(stages, args.out, device=device, first_stage=first + 1, finished=finished)
    print(json.dumps(report, indent=2))
    return 0
