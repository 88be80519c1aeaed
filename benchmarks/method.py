"""The plugin interface every fine-tuning method implements, and the registry that finds them.

A method changes which backbone parameters train and what is added to the backbone or the head;
everything else (data, head, optimiser, schedule, evaluation) belongs to the protocol, which calls
the hooks below and never asks which method it runs. A method is one file in `methods/` (or, from
outside the repository, an installed plugin or a `--method-file`: benchmarks/plugins.py):

    @register_method
    class Rein(Method):
        name = "rein"
        paper = "Stronger, Fewer, & Superior (CVPR 2024)"
        Config = ReinConfig          # a dataclass whose defaults are the paper's

        def attach(self, model): ...

Modules added to the backbone must be registered as submodules of `model.backbone` so that the
parameter accounting (backbone-side trainable and added parameters, as the papers report them)
and checkpoints see them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from benchmarks import plugins
from benchmarks.config import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, Bound
from benchmarks.errors import UserError

if TYPE_CHECKING:
    from benchmarks.config import EvalConfig
    from benchmarks.model import SegModel

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
WEIGHT_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass
class TrainContext:
    """What the protocol hands to a method's phase hooks.

    `next_batch()` draws the next source batch from the same stream training uses (so a method that
    estimates statistics before training consumes batches the way the paper describes) and
    `loss(batch)` computes the protocol's segmentation loss with the current model.
    """

    model: SegModel
    total_iters: int
    device: torch.device
    next_batch: Callable[[], dict[str, torch.Tensor]]
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    optimizer: torch.optim.Optimizer | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CosineWeightDecay:
    """Weight decay annealed with a half cosine over the run, set before every iteration beside the lr.

    Each optimiser group starts from its own weight decay (the protocol's 0.05 for decayed groups)
    and ends at `end`, as mmengine's `CosineAnnealingParamScheduler` on `weight_decay` from the first to
    the last iteration takes the decayed groups. Groups declared without weight decay keep none, where
    mmengine's takes them from 0 towards `end` too (at most lr·1e-5 a step: docs/methods.md, SoMA).
    """

    end: float

    def value(self, start: float, step: int, total_iters: int) -> float:
        if start == 0.0:
            return 0.0
        progress = min(step, total_iters) / total_iters
        return self.end + (start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class EMA:
    """An exponential moving average of the trained weights, scored in place of the last iteration's.

    Once `start_iter(total)` iterations are done the average is seeded with a copy of the weights;
    after every later optimiser step avg ← d·avg + (1 − d)·weights. That is mmengine's `EMAHook`
    with its `ExponentialMovingAverage` (momentum = 1 − d, begin_iter = the start). The start is a
    fraction of the run so shortened presets keep its place. `reference_iters` is the schedule
    length `decay` belongs to: a run of another length uses d = decay^(reference_iters / total), so
    the average spans the same fraction of the run (0 keeps `decay` for any length).
    """

    decay: float
    start_fraction: float
    reference_iters: int = 0

    def start_iter(self, total_iters: int) -> int:
        return round(self.start_fraction * total_iters)

    def decay_for(self, total_iters: int) -> float:
        if not self.reference_iters:
            return self.decay
        return self.decay ** (self.reference_iters / total_iters)


FULL_FINE_TUNING, FROZEN_BACKBONE, PARAMETER_EFFICIENT = "full fine-tuning", "frozen backbone", "parameter-efficient"
ROLES = (FULL_FINE_TUNING, FROZEN_BACKBONE, PARAMETER_EFFICIENT)


class Method:
    """Base class: full fine-tuning semantics unless a hook is overridden.

    Besides the hooks, a method may declare protocol features the training loop applies to whoever
    declares them: a group's `lr_mult` in `param_groups` (on top of the schedule),
    `weight_decay_schedule()` and `ema()`.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    role: ClassVar[str] = PARAMETER_EFFICIENT
    """Where the method sits in the field's comparison (`ROLES`): the tables find the baselines by
    role, never by name (Rein's inverted U: full fine-tuning against the parameter-efficient methods)."""
    Config: ClassVar[type] = type(None)
    hyperparameter_ranges: ClassVar[dict[str, Bound]] = {}
    """Ranges of this method's own numeric hyperparameters (names `HYPERPARAMETER_RANGES` does not hold, or
    holds otherwise); checked when the method is built."""
    couples_batch: ClassVar[bool] = False
    """True when the images of one batch change each other's outputs (the released SET's FFT runs over
    the batch axis). Evaluation then runs one window at a time, as the reference's sliding-window
    inference does, so a score never depends on `eval.batch_windows` (`evaluation_settings`)."""
    depends_on_batch_layout: ClassVar[bool] = False
    """True when, in training, an image's output depends on the batch's size and its place in it though not
    on the other images (the released FADA's filters follow each token's flat place in [N, B, C]): a step
    split over processes or micro-batches then computes something else, as for `couples_batch`."""
    # A method that wants the backbone frozen in eval mode with features computed without autograd
    # needs no flag: the model does that whenever no backbone parameter requires gradients.

    def __init__(self, config: Any | None = None, **overrides: Any):
        if config is None:
            config = self.Config(**overrides) if dataclasses.is_dataclass(self.Config) else None
        self.config = config

    # -- building ---------------------------------------------------------------------------------
    def attach(self, model: SegModel) -> None:
        """Freeze/unfreeze backbone parameters and insert the method's modules. Default: train all."""
        model.backbone.requires_grad_(True)

    def param_groups(self, model: SegModel, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser groups over every trainable parameter (backbone, added modules and head).

        The protocol's rule: weight decay on everything (biases and LayerScale included) except norms
        and the parameters a method or head lists in `no_weight_decay()` (learnable tokens, the Rein
        scale, the query position and level embeddings); `no_decay_names` finds them.
        Parameters a method may unfreeze later (phased methods) are included by overriding this.
        A group may carry `lr_mult`: its learning rate is the protocol's times that factor, on top of
        the schedule (`scale_lr` sets it for a subset of the parameters).
        """
        return split_decay_groups(model.named_parameters(), weight_decay, no_decay_names(model))

    def weight_decay_schedule(self) -> CosineWeightDecay | None:
        """How weight decay changes over the run; None keeps each group's value."""
        return None

    def ema(self) -> EMA | None:
        """An average of the weights to evaluate instead of the last iteration's; None scores the last."""
        return None

    # -- phases -----------------------------------------------------------------------------------
    def enter_main_phase(self, model: SegModel) -> None:
        """Make `model` compute as in the method's main phase, without the phases before it, for costs counted
        off a freshly attached model (FLOPs): what the profile times from the middle of the schedule. Default:
        the method computes as attached; a phased method opens what its main phase trains."""

    def before_training(self, ctx: TrainContext) -> None:
        """Runs once after the optimiser is built and before the first step."""

    def on_step(self, step: int, ctx: TrainContext) -> None:
        """Runs before the forward pass of every step (0-based)."""

    def after_optimizer_step(self, step: int, ctx: TrainContext) -> None:
        """Runs right after every optimiser step (e.g. to restore entries that must not move)."""

    def state_dict(self) -> dict[str, Any]:
        """Method state a resumed run needs beyond module parameters (e.g. selection masks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def diagnostics(self) -> dict[str, Any]:
        """JSON-serialisable facts saved with the result (e.g. where a selection went)."""
        return {}

    def parameter_counts(self, model: SegModel) -> dict[str, int]:
        """The counts reported for this method (backbone-side, head excluded, as the papers do).

        A method that trains only some entries of the tensors requiring gradients (FisherTune's
        element-wise masks) reports what actually trains.
        """
        return model.parameter_counts()

    def evaluation_settings(self, cfg: EvalConfig) -> EvalConfig:
        """The evaluation settings this method is scored with: the protocol's, one window per batch for
        a method whose batch members interact."""
        return dataclasses.replace(cfg, batch_windows=1) if self.couples_batch else cfg

    def hyperparameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}


def no_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters the protocol trains without weight decay.

    The reference exempts norms, learnable tokens, the Rein scale, Mask2Former's query position
    embedding and its decoder's level embedding (Rein's keys `query_embed`, `level_embed`); biases,
    LayerScale, the query content and the pixel decoder's level embedding are decayed. Norms are
    found by type and by the name substring the reference's optimiser constructor matches ("norm"),
    except in convolutions and linear layers: the rule was written for mmseg's modules, where only
    norm layers carry the word, and smp's UPerNet names its lateral 1×1 convolutions
    `conv_norm_relu.0`. The rest are declared
    by the module that defines them through `no_weight_decay() -> set[str]` (names relative to
    itself, timm's convention). The pretrained timm model's own declaration (its cls token and
    position embedding) is not the protocol's, so it is not consulted.
    """
    backbone_vit = getattr(getattr(model, "backbone", None), "vit", None)
    names: set[str] = set()
    for prefix, module in model.named_modules():
        dotted = f"{prefix}." if prefix else ""
        if isinstance(module, NORM_TYPES):
            names.update(dotted + local for local, _ in module.named_parameters(recurse=False))
        elif not isinstance(module, WEIGHT_LAYER_TYPES):
            names.update(dotted + local for local, _ in module.named_parameters(recurse=False)
                         if "norm" in dotted + local)
        declare = getattr(module, "no_weight_decay", None)
        if callable(declare) and module is not backbone_vit:
            names.update(dotted + local for local in declare())
    return names


def split_decay_groups(
    named_parameters: Iterator[tuple[str, nn.Parameter]],
    weight_decay: float,
    exempt: set[str],
    include_frozen: bool = False,
) -> list[dict[str, Any]]:
    """AdamW groups: the parameters named in `exempt` (`no_decay_names`) at decay 0, the rest at `weight_decay`."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not (param.requires_grad or include_frozen):
            continue
        if name in exempt:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def scale_lr(groups: list[dict[str, Any]], selected: set[int], lr_mult: float) -> list[dict[str, Any]]:
    """The groups with the parameters whose ids are in `selected` moved into copies carrying `lr_mult`
    (each keeps its group's other settings, e.g. its weight decay)."""
    scaled: list[dict[str, Any]] = []
    for group in groups:
        chosen = [p for p in group["params"] if id(p) in selected]
        rest = [p for p in group["params"] if id(p) not in selected]
        if chosen:
            scaled.append({**group, "params": chosen, "lr_mult": group.get("lr_mult", 1.0) * lr_mult})
        if rest:
            scaled.append({**group, "params": rest})
    return scaled


# -- registry -------------------------------------------------------------------------------------
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set a `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise plugins.MethodNameTaken(cls.name, METHODS[cls.name], cls)
    if cls.role not in ROLES:
        raise TypeError(f"{cls.__qualname__}.role is {cls.role!r}; expected one of: {', '.join(ROLES)}")
    METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    """The built-in methods first, then installed plugins: a plugin's name clash names the plugin."""
    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"methods.{info.name}")
    plugins.load_entry_points(METHODS)


def use_method_files(paths: list[str]) -> list[str]:
    """Register the methods the `--method-file` files define (after every other, for the same reason);
    the names they registered."""
    _discover()
    return plugins.load_method_files(paths, METHODS)


def available_methods() -> dict[str, type[Method]]:
    _discover()
    return dict(sorted(METHODS.items()))


def resolve_methods(spec: str) -> list[str]:
    """`all` → every registered method; `a,b` → those, in that order; unknown names → UserError."""
    registry = available_methods()
    if spec.strip() == "all":
        return list(registry)
    names = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [name for name in names if name not in registry]
    if unknown or not names:
        raise UserError(
            f"unknown method {', '.join(map(repr, unknown)) or repr(spec)}; valid: all, {', '.join(registry)}"
        )
    return names


# The range of a hyperparameter of these names, whatever the method (a plugin's too), checked when the method is
# built: a zero or negative count otherwise builds an impossible module (a traceback from deep in torch, or
# mid-run) or an empty one that trains and "finishes". A method's own names go in its `hyperparameter_ranges`.
HYPERPARAMETER_RANGES: dict[str, Bound] = {
    "rank": AT_LEAST_ONE, "num_tokens": AT_LEAST_ONE, "amplitude_num_tokens": AT_LEAST_ONE,
    "num_prompts": AT_LEAST_ONE, "bottleneck": AT_LEAST_ONE, "block_size": AT_LEAST_ONE, "query_dim": AT_LEAST_ONE,
    "alpha": POSITIVE, "dropout": Bound(0, 1, high_open=True), "init_scale": NOT_NEGATIVE, "scale": NOT_NEGATIVE,
}


def _check_hyperparameter_ranges(cls: type[Method], config: Any) -> None:
    ranges = {**HYPERPARAMETER_RANGES, **cls.hyperparameter_ranges}
    for item in dataclasses.fields(config):
        value, bound = getattr(config, item.name), ranges.get(item.name)
        if bound is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not bound.holds(value):
            raise UserError(f"methods.{cls.name}.{item.name}={value!r} is out of range: it must be {bound.describe()}")


def build_method(name: str, overrides: dict[str, Any] | None = None) -> Method:
    cls = available_methods().get(name)
    if cls is None:
        raise UserError(f"unknown method {name!r}; valid: {', '.join(available_methods())}")
    overrides = overrides or {}
    if dataclasses.is_dataclass(cls.Config):
        valid = {f.name for f in dataclasses.fields(cls.Config)}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise UserError(
                f"method {name!r} has no hyperparameter {', '.join(bad)}; valid: {', '.join(sorted(valid)) or 'none'}"
            )
        hints = typing.get_type_hints(cls.Config)
        overrides = {key: _typed(name, key, hints[key], value) for key, value in overrides.items()}
        _check_hyperparameter_ranges(cls, cls.Config(**overrides))
    elif overrides:
        raise UserError(f"method {name!r} takes no hyperparameters")
    return cls(**overrides)


def _typed(method: str, key: str, expected: type, value: Any) -> Any:
    from benchmarks.config import coerce_value

    try:
        return coerce_value(expected, value)
    except (TypeError, ValueError):
        raise UserError(
            f"methods.{method}.{key} must be {getattr(expected, '__name__', expected)}, got {value!r}; fix it with "
            f"--set methods.{method}.{key}=... (`list methods` shows its default)"
        ) from None


def canonical_overrides(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` of method `name` as its code reads them: typed (alpha 8 is 8.0), those equal to the method's
    defaults left out (setting a default is not a different run), JSON's types (tuples as lists)."""
    method = build_method(name, overrides)
    if not overrides or not dataclasses.is_dataclass(method.config):
        return dict(overrides)
    defaults = dataclasses.asdict(type(method.config)())
    resolved = dataclasses.asdict(method.config)
    return {key: _json_value(resolved[key]) for key in overrides if resolved[key] != defaults[key]}


def _json_value(value: Any) -> Any:
    return [_json_value(v) for v in value] if isinstance(value, (tuple, list)) else value


def check_method_overrides(overrides: dict[str, dict[str, Any]]) -> None:
    """Every `methods.NAME` table names a registered method and valid, well-typed hyperparameters,
    so a typo is refused before anything runs instead of re-running an identical configuration."""
    registry = available_methods()
    for name, values in overrides.items():
        if name not in registry:
            raise UserError(f"methods.{name}: unknown method {name!r}; valid: {', '.join(registry)}")
        build_method(name, values)
