"""Experiment configuration: frozen dataclasses, presets as TOML files, `--set key=value` overrides.

The data flow starts here: preset file + overrides → `Experiment` → matrix of runs. Every setting
of a preset can be overridden, each override is type-checked against the field it names, and the
resolved experiment is saved with every result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).parent / "presets"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Setting name → (source dataset, target datasets), the standard DGSS settings. A source of several
# datasets trained on together joins their names with "+" (`source_families`).
SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "G->CBM": ("gtav", ("cityscapes", "bdd100k", "mapillary")),
    "G+S->CBM": ("gtav+synthia", ("cityscapes", "bdd100k", "mapillary")),
    "C->BM": ("cityscapes", ("bdd100k", "mapillary")),
    # ACDC per condition, as the protocol and Rein's DGIoUMetric score it (the average is their mean).
    "C->ACDC": ("cityscapes", ("acdc_fog", "acdc_night", "acdc_rain", "acdc_snow")),
}


def source_families(source: str) -> tuple[str, ...]:
    """The datasets of a setting's source ("gtav+synthia" → gtav, synthia), the first one's pairs held out."""
    return tuple(source.split("+"))


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/synthetic-v3"
    """Data root holding gta/, cityscapes/, bdd100k/, mapillary/ in their real layouts. Kept in its normal
    form (`./data/x/` is `data/x`), so that spellings of one folder name one run (the config hash holds it)."""
    synthetic: str = "small"
    """Size of the synthetic world generated at `root` when it is missing; "" never generates."""
    crop_size: int = 512
    scale_base: int = 512
    """Short edge drawn from int(scale_base·x·0.1), x = 5..20 (the protocol's 256..1024 at 512)."""
    max_long_edge: int = 2048
    cat_max_ratio: float = 0.75
    photometric: bool = True
    resize: str = "cv2"
    """How images (bilinear) and labels (nearest) are resized in training and for inference: "cv2", mmcv's
    default backend and so the reference pipeline's (no antialiasing when shrinking), or "pillow"
    (antialiased; what the proxy and smoke presets were calibrated with)."""
    hsv: str = "cv2"
    """How the photometric distortion converts RGB to HSV and back: "cv2" (OpenCV's `cvtColor`, as mmcv's
    `bgr2hsv` in the reference pipeline) or "numpy" (the harness's own conversion with OpenCV's ranges, a level
    apart in a few per cent of values; what the proxy and smoke presets were calibrated with)."""
    num_workers: int = -1
    """Data-loader workers; -1 = sized to the machine (`benchmarks.resources`: 1 on a CPU, up to 8 with a GPU)."""
    preflight: str = "sample"
    """Before the first step, check every split the run reads: "sample" (every pair's headers and file ends,
    labels decoded for a few pairs per split), "full" (every label decoded) or "off"."""
    train_limit: int = 0
    """Use only the first N pairs of each source dataset (0 = all): a joint source ("gtav+synthia") trains on
    N of each, so both stay in the mix of a small run."""
    eval_limit: int = 0
    """Score only the first N pairs of each target (0 = all)."""
    source_holdout: int = 0
    """Hold the last N source pairs out of training and score them as an in-domain reference, so the
    table shows the source→target gap (0 = the protocol: train on every source pair, no source score)."""

    def __post_init__(self) -> None:
        if isinstance(self.root, str) and self.root:  # another type is refused by name when checked
            object.__setattr__(self, "root", os.path.normpath(self.root))


def _normalised_weights_entry(entry: str) -> str:
    name, sep, path = entry.partition("=")
    if not sep or not path or path == "random":
        return entry  # malformed entries are refused by name where they are read (`model.weights_for`)
    return f"{name}={os.path.normpath(path)}"


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "dinov2_vitl14"
    head: str = "mask2former"
    img_size: int = 512
    """Input size the position grid is converted to (patch grid = img_size / patch)."""
    patch_size: int = 0
    """Patch size after conversion; 0 = the protocol's (16 for the 14-patch VFMs)."""
    patch_resample: str = "bicubic"
    """"bicubic" (the reference's plain resize of the patch kernel) or "timm" (pseudo-inverse)."""
    weights: tuple[str, ...] = ()
    """Local weight files as "BACKBONE=PATH"; a backbone not named uses its default (shipped or none)."""
    head_options: str = "{}"
    """JSON object of head keyword arguments (e.g. '{"hidden_dim": 64}') for shrunk presets."""

    def __post_init__(self) -> None:
        # One file written two ways ("./w.pth", "w.pth", "dir/../w.pth") is one setting: the config hash, which
        # names a run's result file, took each spelling for another run and trained it again.
        if isinstance(self.weights, tuple) and all(isinstance(entry, str) for entry in self.weights):
            object.__setattr__(self, "weights", tuple(map(_normalised_weights_entry, self.weights)))


@dataclass(frozen=True)
class TrainConfig:
    iters: int = 40_000
    batch_size: int = 4
    grad_accum: int = 1
    """Micro-batches per optimiser step; the effective batch is batch_size·grad_accum."""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    poly_power: float = 0.9
    warmup_iters: int = 0
    seed: int = 42
    amp: str = "auto"
    """"auto": bf16 autocast on CUDA, fp32 on CPU; "bf16", "fp16" (with a dynamic loss scale, as mmengine's
    AmpOptimWrapper) or "none" to force."""
    log_interval: int = 50
    eval_interval: int = 0
    """Score the held-out source pairs (data.source_holdout) every N iterations (0 = never); targets are
    scored once, after training, so no model is chosen on the unseen domains."""
    checkpoint_interval: int = -1
    """Save a resumable checkpoint every N iterations; 0 = never; -1 = by training time (`protocol.CheckpointCadence`:
    about every 5 minutes, spaced so saving costs under 1 % of the training time, and once when training ends)."""
    device: str = "auto"
    grad_checkpointing: bool = False
    """Recompute backbone block activations in the backward pass (less memory, ~1/3 more compute)."""
    compile: bool = False
    """torch.compile the backbone and head (off by default: see docs/performance.md for measurements)."""


@dataclass(frozen=True)
class EvalConfig:
    crop_size: int = 512
    stride: int = 341
    batch_windows: int = 8
    """Sliding windows of one image run through the model together, this many at a time."""
    fit_size: tuple[int, int] = (1024, 512)
    """(long, short) box targets are resized into before inference (Cityscapes, Mapillary)."""


@dataclass(frozen=True)
class RunConfig:
    methods: str = "all"
    backbones: tuple[str, ...] = ()
    """Backbones of the matrix; empty = model.backbone."""
    seeds: tuple[int, ...] = ()
    """Seeds of the matrix; empty = train.seed."""
    settings: tuple[str, ...] = ("G->CBM",)
    results_dir: str = "results/runs"


@dataclass(frozen=True)
class Experiment:
    preset: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method hyperparameter overrides, e.g. {"rein": {"num_tokens": 50}}."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Stable over key order; the matrix fields are excluded so adding a method keeps old runs, and
        so are the settings that cannot change a run's numbers (`NOT_HASHED`) and the settings added since
        results were first written, where they keep what those results did (`ADDED_SETTINGS`)."""
        payload = without_added_settings_at_their_old_behaviour(self.to_dict())
        payload.pop("run")
        payload.pop("preset")
        for section, name in NOT_HASHED:
            payload[section].pop(name)
        for (section, name), value in HASHED_AT.items():
            payload[section][name] = value
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path.cwd() / path


# How a run is carried out, not what it computes: loader workers and checkpoints are exact (the data
# stream is a function of seed and position, a resume reproduces the metrics), logging only reads the
# loss, and the preflight only reads files. Changing them keeps a run's identity and its finished result.
NOT_HASHED: tuple[tuple[str, str], ...] = (
    ("data", "num_workers"), ("data", "preflight"), ("train", "log_interval"), ("train", "checkpoint_interval"),
)

# Settings that change how fast a run is scored, not its numbers (evaluation's windows a forward: batched
# scores equal one-at-a-time ones), hashed at the value every stored result was written with rather than
# left out, which would rename them all: lowering one to fit a GPU's memory keeps a finished run finished.
HASHED_AT: dict[tuple[str, str], Any] = {
    ("eval", "batch_windows"): 8,
}

# Settings added after results were first written, with the value that does what every result written
# before them did: at that value a setting leaves a run's identity (its config hash, the table's
# fingerprint) as it was, so those results still count as finished runs of the same configuration.
ADDED_SETTINGS: dict[tuple[str, str], Any] = {
    ("data", "resize"): "pillow",
    ("data", "hsv"): "numpy",
}


def without_added_settings_at_their_old_behaviour(experiment: dict[str, Any]) -> dict[str, Any]:
    """A copy of an experiment dict without the `ADDED_SETTINGS` that hold their old behaviour's value."""
    payload = json.loads(json.dumps(experiment, default=str))
    for (section, name), old in ADDED_SETTINGS.items():
        values = payload.get(section)
        if isinstance(values, dict) and values.get(name, old) == old:
            values.pop(name, None)
    return payload


SECTION_TYPES: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig, "run": RunConfig,
}
SECTIONS = tuple(SECTION_TYPES)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_experiment(preset: str = "proxy", overrides: list[str] | None = None) -> Experiment:
    path = Path(preset) if preset.endswith(".toml") else PRESET_DIR / f"{preset}.toml"
    if not path.is_file():
        raise UserError(f"unknown preset {preset!r}; valid: {', '.join(available_presets())} or a path to a .toml file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"preset file {path} is not valid TOML: {err}") from None
    experiment = experiment_from_dict(raw, source=str(path), name=path.stem)
    for item in overrides or []:
        experiment = apply_override(experiment, item)
    validate(experiment)
    return experiment


def experiment_from_dict(raw: dict[str, Any], source: str = "config", name: str = "custom") -> Experiment:
    unknown = sorted(set(raw) - set(SECTIONS) - {"methods", "preset"})
    if unknown:
        raise UserError(f"{source}: unknown section {', '.join(unknown)}; valid: {', '.join(SECTIONS)}, methods")
    sections = {}
    for section in SECTIONS:
        cls = _section_type(section)
        values = raw.get(section, {})
        sections[section] = cls(**{k: _coerce(cls, k, v, source) for k, v in _checked(cls, values, section, source).items()})
    methods = raw.get("methods", {})
    if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
        raise UserError(f"{source}: [methods] must hold one table per method, e.g. [methods.rein]")
    preset_name = raw.get("preset", name)
    if not isinstance(preset_name, str) or not preset_name.strip():
        raise UserError(f"{source}: `preset` must be a name in quotes (e.g. preset = \"mine\"), "
                        f"got {preset_name!r}")
    return Experiment(preset=preset_name, methods=methods, **sections)


def apply_override(experiment: Experiment, item: str) -> Experiment:
    """`section.key=value` (or `methods.NAME.key=value`), type-checked against the field."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like section.key=value, e.g. train.iters=2000")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if parts[0] == "methods" and len(parts) == 3:
        methods = {name: dict(hp) for name, hp in experiment.methods.items()}
        methods.setdefault(parts[1], {})[parts[2]] = _parse_literal(text)
        return dataclasses.replace(experiment, methods=methods)
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(f"override {item!r}: key must be section.field with section one of {', '.join(SECTIONS)} (or methods.NAME.field)")
    section, name = parts
    cls = _section_type(section)
    _checked(cls, {name: None}, section, f"override {item!r}")
    parsed = _parse_literal(text)
    if (section, name) == ("model", "head_options") and isinstance(parsed, dict):
        parsed = json.dumps(parsed)  # `--set model.head_options={}` as a shell leaves it (its quotes stripped)
    value = _coerce(cls, name, parsed, f"override {item!r}")
    return dataclasses.replace(experiment, **{section: dataclasses.replace(getattr(experiment, section), **{name: value})})


# -- ranges ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    """The closed or half-open interval a numeric setting must lie in (NaN lies in none)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        def show(value: float) -> str:
            return str(int(value)) if float(value).is_integer() else f"{value:g}"

        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '≥'} {show(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '≤'} {show(self.high)}")
        return " and ".join(parts) or "finite"


AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE = Bound(1), Bound(0), Bound(0, low_open=True)
# numpy's seed sequences refuse negative entropy; a seed beyond 32 bits overflows a generator's seed mid-run.
SEED = Bound(0, 2**32 - 1)

# Every numeric setting's range, checked when an experiment is resolved: a zero or negative count
# otherwise trains nothing and still "finishes", or crashes mid-run without naming the setting.
# Tuples are checked element by element. A test keeps this table covering every numeric field.
NUMERIC_RANGES: dict[str, Bound] = {
    "data.crop_size": AT_LEAST_ONE, "data.scale_base": AT_LEAST_ONE, "data.max_long_edge": AT_LEAST_ONE,
    "data.cat_max_ratio": Bound(0, 1, low_open=True), "data.num_workers": Bound(-1),
    "data.train_limit": NOT_NEGATIVE, "data.eval_limit": NOT_NEGATIVE, "data.source_holdout": NOT_NEGATIVE,
    "model.img_size": AT_LEAST_ONE, "model.patch_size": NOT_NEGATIVE,
    "train.iters": AT_LEAST_ONE, "train.batch_size": AT_LEAST_ONE, "train.grad_accum": AT_LEAST_ONE,
    "train.lr": POSITIVE, "train.betas": Bound(0, 1, high_open=True), "train.weight_decay": NOT_NEGATIVE,
    "train.poly_power": NOT_NEGATIVE, "train.warmup_iters": NOT_NEGATIVE,
    "train.seed": SEED,
    "train.log_interval": AT_LEAST_ONE, "train.eval_interval": NOT_NEGATIVE, "train.checkpoint_interval": Bound(-1),
    "eval.crop_size": AT_LEAST_ONE, "eval.stride": AT_LEAST_ONE, "eval.batch_windows": AT_LEAST_ONE,
    "eval.fit_size": AT_LEAST_ONE,
    "run.seeds": SEED,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.preflight": ("sample", "full", "off"),
    "model.patch_resample": ("bicubic", "timm"),
    "train.amp": ("auto", "none", "bf16", "fp16"),
    "data.resize": ("cv2", "pillow"),
    "data.hsv": ("cv2", "numpy"),
}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
#: The precision of a run's forward passes for each `train.amp` but "auto" (`trained_precision`).
AMP_PRECISION = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}


def trained_precision(amp: str, device_type: str) -> str:
    """What `train.amp` means on a device ("cuda", "cpu", ...): "auto" is bf16 autocast on CUDA, fp32 elsewhere.
    Torch-free, so that reports can tell an fp32 run from a bf16 one by what its result records."""
    if amp == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    if amp not in AMP_PRECISION:
        raise UserError(f"train.amp={amp!r} is not one of {', '.join(CHOICES['train.amp'])}")
    return AMP_PRECISION[amp]


def validate(exp: Experiment) -> None:
    """Every setting within its range or choices, checked before anything runs; one line per mistake."""
    for key, bound in NUMERIC_RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(exp, section), name)
        for item in value if isinstance(value, tuple) else (value,):
            if not bound.holds(item):
                raise UserError(f"{key}={value!r} is out of range: it must be {bound.describe()}; fix it with --set {key}=...")
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(exp, section), name)
        if value not in choices:
            raise UserError(f"{key}={value!r} is not one of {', '.join(choices)}")
    for key, value in (("data.root", exp.data.root), ("run.results_dir", exp.run.results_dir)):
        if not str(value).strip():  # an empty path is the current folder to the file system: never meant
            raise UserError(f"{key} is empty; give it a folder (--set {key}=DIR), or leave it out for the preset's")
    if not DEVICE_PATTERN.fullmatch(exp.train.device):
        raise UserError(f"train.device={exp.train.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if exp.train.eval_interval and not exp.data.source_holdout:
        raise UserError(
            f"train.eval_interval={exp.train.eval_interval} scores held-out source pairs during training (never a "
            "target), but data.source_holdout=0 holds none out; set data.source_holdout=N or train.eval_interval=0"
        )
    if exp.train.warmup_iters > exp.train.iters:
        raise UserError(
            f"train.warmup_iters={exp.train.warmup_iters} exceeds train.iters={exp.train.iters}: the learning rate "
            f"would never reach train.lr nor decay; shorten the warm-up with it (e.g. --set train.warmup_iters="
            f"{round(exp.train.iters / 10)}, a tenth, as the proxy preset's 120 of 1,200)"
        )
    if exp.eval.stride > exp.eval.crop_size:
        raise UserError(
            f"eval.stride={exp.eval.stride} exceeds eval.crop_size={exp.eval.crop_size}: the sliding windows would "
            "leave pixels unscored; choose a stride ≤ the crop (the protocol: 341 for 512)"
        )


def _section_type(section: str) -> type:
    return SECTION_TYPES[section]


def _checked(cls: type, values: Any, section: str, source: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise UserError(f"{source}: [{section}] must be a table")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise UserError(f"{source}: unknown key {section}.{unknown[0]}; valid keys of [{section}]: {', '.join(sorted(valid))}")
    return values


def _parse_literal(text: str) -> Any:
    """Values as TOML would read them; a bare word is a string (`model.head=light`)."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    expected = hints[name]
    try:
        return coerce_value(expected, value)
    except (TypeError, ValueError):
        shown = str(expected).replace("typing.", "") if typing.get_origin(expected) else expected.__name__
        raise UserError(f"{source}: {name} must be {shown}, got {value!r}; give it a value of that type") from None


def coerce_value(expected: Any, value: Any) -> Any:
    """`value` as the annotated type `expected` (TOML's types; a comma list for a tuple); TypeError or
    ValueError when it is not one."""
    origin = typing.get_origin(expected)
    if origin is tuple:
        args = typing.get_args(expected)
        if isinstance(value, (str, int, float)):
            value = [_parse_literal(v) for v in value.split(",") if v.strip()] if isinstance(value, str) else [value]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(args[0], v) for v in value)
        if len(value) != len(args):
            raise ValueError
        return tuple(coerce_value(a, v) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType):
        raise TypeError  # no unions in configs
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise TypeError
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError
