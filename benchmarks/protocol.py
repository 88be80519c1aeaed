"""The protocol: one training loop and one evaluation for every method.

Training: AdamW over the method's parameter groups, poly schedule by iteration, gradient
accumulation, bf16 autocast on CUDA (fp32 on CPU), seeded; the method only speaks through its
hooks (`before_training`, `on_step`, `after_optimizer_step`) and the features it declares, applied
to whichever method declares them: a group's `lr_mult`, a weight-decay schedule
(`Method.weight_decay_schedule`) and an average of the weights scored in place of the last
iteration's (`Method.ema`). Evaluation: sliding windows with logits averaged over overlaps, resized
to the label's resolution, confusion matrix per target.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from benchmarks import resources
from benchmarks.config import EvalConfig, Experiment, TrainConfig, trained_precision
from benchmarks.errors import UserError
from benchmarks.method import EMA, CosineWeightDecay, Method, TrainContext
from benchmarks.metrics import confusion_metric, iou_from_confusion, miou_percent
from benchmarks.model import SegModel

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the run is recorded as failed with this reason."""


# -- devices and numerics ---------------------------------------------------------------------------
def select_device(name: str, option: str = "train.device") -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N, ...) means here; `option` is how the user gave it, for the
    one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # a malformed name first: "cuda:x" is no device, whether or not this machine has CUDA
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}={name} but no CUDA device is available; use {option}=cpu or auto")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `train.amp` means on `device` (None: fp32, no autocast)."""
    precision = trained_precision(amp, device.type)
    return None if precision == "float32" else getattr(torch, precision)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def checkpoint_blocks(backbone: torch.nn.Module) -> int:
    """Gradient checkpointing of the backbone blocks: activations recomputed in the backward pass.

    Each block's own `forward` is wrapped, not the module call, so the hooks methods register on a
    block (VPT's prompt insertion, Rein's refinement, FisherTune's perturbation) fire exactly once per
    forward, outside the recomputed region; hooks on a block's submodules (AdaptFormer's on `mlp`)
    run again during recomputation, which is harmless for the pure functions they are.
    Returns the number of blocks wrapped (already wrapped blocks are left alone).
    """
    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for block in backbone.blocks:
        if "_plain_forward" in block.__dict__:
            continue
        plain = block.forward

        def forward(*args: Any, _plain: Callable[..., Any] = plain, _block: torch.nn.Module = block, **kwargs: Any) -> Any:
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.__dict__["_plain_forward"] = plain
        block.forward = forward
        wrapped += 1
    return wrapped


def compile_model(model: SegModel) -> None:
    """torch.compile backbone and head in place (parameter names and hooks stay where they were)."""
    model.backbone.compile()
    model.head.compile()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def poly_lr_factor(step: int, cfg: TrainConfig) -> float:
    """A poly decay to 0 after the last iteration (mmengine's PolyLR reaches 0 one iteration earlier, at
    the last: docs/protocol.md, departures), with an optional linear warm-up (0 in the reference) that replaces
    the poly curve's first `warmup_iters` (rising to 1.0) instead of scaling it as mmcv's warm-up does: the
    factor steps down to the poly curve's value when the warm-up ends (0.91 at 120 of 1,200), kept because
    every proxy result was measured with it (docs/protocol.md)."""
    if cfg.warmup_iters and step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    return (1.0 - min(step, cfg.iters) / cfg.iters) ** cfg.poly_power


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the groups; a group's `lr_mult` scales its learning rate (kept in the group, so the
    optimiser's `param_groups` show it), and `initial_lr`/`initial_weight_decay` keep the values the
    schedules start from (checkpointed with the optimiser state)."""
    for group in groups:
        lr_mult = group.setdefault("lr_mult", 1.0)
        if not (math.isfinite(lr_mult) and lr_mult > 0):
            raise UserError(f"a parameter group's lr_mult must be a positive number, got {lr_mult!r}")
        group["lr"] = group.get("lr", cfg.lr) * lr_mult
        group["initial_lr"] = group["lr"]
        group["initial_weight_decay"] = group.get("weight_decay", cfg.weight_decay)
    if not any(p.numel() for g in groups for p in g["params"]):
        raise UserError("the method leaves no trainable parameter; nothing to optimise")
    # The fused kernel is the fast path on CUDA; it needs every parameter on the GPU.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A checkpoint's optimiser state in place of the fresh one. Its groups replace the fresh groups, keys
    and all, so one saved before `lr_mult`/`initial_weight_decay` existed gets them here: 1 and the group's
    weight decay, the values such a run trained with."""
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        group.setdefault("lr_mult", 1.0)
        group.setdefault("initial_weight_decay", group["weight_decay"])


def _trainable_weights_finite(model: torch.nn.Module) -> bool:
    """Whether every trainable weight is finite (one host sync; frozen weights cannot have changed)."""
    checks = [p.isfinite().all() for p in model.parameters() if p.requires_grad]
    return bool(torch.stack(checks).all()) if checks else True


def apply_schedules(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                    weight_decay_schedule: CosineWeightDecay | None) -> float:
    """Each group's learning rate (and weight decay, where the method schedules it) for `step`, from the
    values the group started with; returns the poly factor, for the log."""
    factor = poly_lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
        if weight_decay_schedule is not None:
            group["weight_decay"] = weight_decay_schedule.value(group["initial_weight_decay"], step, cfg.iters)
    return factor


# -- the training stream ----------------------------------------------------------------------------
class SourceStream(Sampler[list[tuple[int, int]]]):
    """Micro-batches of (index, augmentation seed), a pure function of (seed, position).

    Epochs are seeded permutations of the source set; each sample's augmentation draws from its
    own seed. So the data a run sees depends only on the seed and how many micro-batches it has
    consumed — which is what makes runs reproducible across worker counts and resumable exactly.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        stop: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_samples <= 0:
            raise UserError("the source dataset is empty; check data.root (run `python -m benchmarks data check`)")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.stop = start, stop
        # Data-parallel view: rank r's local position p is the single-process position p·W + r, so
        # one step of W ranks reads exactly what one process reads in W accumulated micro-batches.
        self.rank, self.world_size = rank, world_size
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def batch(self, position: int) -> list[tuple[int, int]]:
        items = []
        for slot in range(self.batch_size):
            sample = position * self.batch_size + slot
            epoch, offset = divmod(sample, self.num_samples)
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                self._perm_epoch = epoch
            items.append((int(self._perm[offset]), int(np.random.SeedSequence([self.seed, sample]).generate_state(1)[0])))
        return items

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start
        while self.stop is None or position < self.stop:
            yield self.batch(position * self.world_size + self.rank)
            position += 1

    def __len__(self) -> int:
        return (self.stop - self.start) if self.stop is not None else 2**31


def source_loader(
    dataset: Dataset, cfg: TrainConfig, num_workers: int, device: torch.device, start: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    stream = SourceStream(len(dataset), cfg.batch_size, cfg.seed, start=start, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_sampler=stream,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # Its own generator: creating the iterator draws a base seed, which must not move the global
        # RNG (a resumed run creates it at another point of the RNG stream than the original did).
        generator=torch.Generator().manual_seed(cfg.seed),
    )


# -- training ---------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a resumed run needs besides module and optimiser state."""

    step: int = 0
    batches_consumed: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    """The part of `train_seconds` spent waiting for the next batch (all of its loading with no loader workers)."""
    stray_label_pixels: int = 0
    """Source label pixels ignored (255) for values outside their encoding (`datasets.base.map_label`): this
    process's count; a checkpoint holds the group's, which a resume gives to rank 0 alone."""
    unlogged_loss_sum: float = 0.0
    unlogged_loss_count: int = 0
    """The losses since the last log line (`RunningLoss`) as of the checkpoint: one saved between two log lines
    (by training time, or for a restart) would otherwise resume into another logged mean. Under torchrun the
    ranks' average, from which every rank resumes."""
    ema: dict[str, torch.Tensor] | None = None
    """The weight average (`ParameterEMA.state_dict`) as of the last checkpoint; None before it starts."""
    model_selection: str = "final"
    """What the model holds when `train` returns: "final" (the last iteration's weights) or "ema"."""
    loss_scaler: dict[str, float | int] | None = None
    """fp16's dynamic loss scale (`torch.amp.GradScaler.state_dict`) as of the last checkpoint; None in other precisions."""


class ScaledBackward:
    """Backward passes and optimiser steps of one precision: in fp16 with a dynamic loss scale (mmengine's
    `AmpOptimWrapper`, `loss_scale="dynamic"`), since fp16 gradients of small losses underflow to zero;
    in fp32 and bf16 (fp32's exponent range) as they are."""

    def __init__(self, amp_dtype: torch.dtype | None, device: torch.device, state: dict[str, float | int] | None):
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step on the true gradients; in fp16 a step whose gradients overflowed is skipped
        and the scale lowered, as mmengine does."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, float | int] | None:
        return self.scaler.state_dict() if self.scaler is not None else None


class ParameterEMA:
    """The exponential moving average a method declares (`Method.ema`), over the optimised parameters.

    Nothing is kept before the start iteration (the average would equal the weights); then a copy
    seeds it and every later optimiser step folds the weights in. Frozen parameters never change, so
    they need no average; buffers are the model's own, as mmengine's EMA without `update_buffers`.
    """

    @classmethod
    def declared_by(cls, method: Method, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    total_iters: int) -> ParameterEMA | None:
        """The average `method.ema()` asks for, over the parameters the optimiser updates; None if it asks none."""
        spec = method.ema()
        if spec is None:
            return None
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return cls(spec, {n: p for n, p in model.named_parameters() if id(p) in optimised}, total_iters)

    def __init__(self, spec: EMA, named: dict[str, torch.nn.Parameter], total_iters: int):
        if not (0.0 < spec.decay < 1.0 and 0.0 <= spec.start_fraction <= 1.0 and spec.reference_iters >= 0):
            raise UserError(f"an EMA needs 0 < decay < 1, 0 <= start_fraction <= 1 and reference_iters >= 0, got {spec}")
        self.decay = spec.decay_for(total_iters)
        self.start_iter = spec.start_iter(total_iters)
        self.named = named
        self.average: dict[str, torch.Tensor] | None = None

    @property
    def started(self) -> bool:
        return self.average is not None

    @torch.no_grad()
    def update(self, iterations_done: int) -> None:
        if iterations_done < self.start_iter:
            return
        if self.average is None:
            self.average = {name: p.detach().clone() for name, p in self.named.items()}
            return
        weight = 1.0 - self.decay
        for name, param in self.named.items():
            self.average[name].lerp_(param.detach(), weight)

    @torch.no_grad()
    def _swap(self) -> None:
        for name, param in self.named.items():
            kept = param.detach().clone()
            param.copy_(self.average[name])
            self.average[name].copy_(kept)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the model for the duration (an evaluation during training), then the weights back."""
        if self.average is None:
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def apply(self) -> None:
        """The average into the model for good (after the last iteration)."""
        for name, param in self.named.items():
            param.copy_(self.average[name])

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.average is None:
            return None
        return {name: value.detach().cpu().clone() for name, value in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            self.average = None
            return
        missing = sorted(set(self.named) - set(state))
        if missing:
            raise UserError(f"the checkpoint's weight average lacks {len(missing)} parameter(s), e.g. {missing[0]}; "
                            "delete the run's .ckpt folder to train afresh")
        self.average = {name: state[name].to(p.device, p.dtype).clone() for name, p in self.named.items()}


class CheckpointCadence:
    """The iterations at which training saves a resumable checkpoint (`train.checkpoint_interval`).

    N > 0: every N iterations; 0: never; -1 (the default): by training time. Then the first save comes
    after `AUTO_SECONDS` of training, each next one after max(`AUTO_SECONDS`, the last save's duration /
    `OVERHEAD_BUDGET`), so saving never costs more than 1 % of the training, and one more when training
    ends (if `FINAL_SECONDS` of training would otherwise be lost), so a run killed during evaluation
    resumes straight into it. Seconds become iteration numbers from the measured step time; under
    torchrun rank 0's iteration numbers and save duration are shared (`share`) at iterations every rank
    reaches, so all ranks save together without a collective in every step.
    """

    AUTO_SECONDS = 300.0
    OVERHEAD_BUDGET = 0.01
    FINAL_SECONDS = 60.0
    PROBE_STEPS = 10

    def __init__(self, interval: int, start_step: int, share: Callable[[Any], Any] = lambda value: value):
        self.interval, self.start_step, self.share = interval, start_step, share
        self.next_step: int | None = None
        self.last_save_step = start_step
        self.last_save_seconds = 0.0  # training seconds (this process) at the last save or the start
        self.save_duration: float | None = None

    def due(self, step: int, seconds: float) -> bool:
        """After iteration `step`, with `seconds` of training since this process started."""
        if self.interval > 0:
            return step % self.interval == 0
        if self.interval == 0:
            return False
        if self.next_step is None and step - self.start_step >= self.PROBE_STEPS:
            self.next_step = self._step_after(step, seconds, self.AUTO_SECONDS - seconds)
        return self.next_step is not None and step >= self.next_step

    def saved(self, step: int, seconds: float, duration: float) -> None:
        self.save_duration = self.share(duration)
        self.last_save_step, self.last_save_seconds = step, seconds
        if self.interval < 0:
            gap = max(self.AUTO_SECONDS, self.save_duration / self.OVERHEAD_BUDGET)
            self.next_step = self._step_after(step, seconds, gap)

    def final_due(self, step: int, seconds: float) -> bool:
        """Whether to save once more after the last iteration, before evaluation."""
        if self.interval >= 0 or step == self.last_save_step:
            return False
        worth = max(self.FINAL_SECONDS, (self.save_duration or 0.0) / self.OVERHEAD_BUDGET)
        return bool(self.share(seconds - self.last_save_seconds >= worth))

    def _step_after(self, step: int, seconds: float, wait_seconds: float) -> int:
        # rank 0's iteration, not its step time: each rank's clock started at its own arrival in training,
        # so the seconds left to wait differ by rank, and so would the iteration each computed
        step_seconds = seconds / max(step - self.start_step, 1)
        return self.share(step + max(1, math.ceil(max(wait_seconds, 0.0) / max(step_seconds, 1e-9))))


class RunningLoss:
    """The mean training loss between two log lines. The sum stays on the device, so a step has no
    host-device sync; `take_mean` syncs once (and averages over the process group through `reduce`)."""

    def __init__(self, device: torch.device, reduce: Callable[[torch.Tensor], torch.Tensor], total: float = 0.0,
                 count: int = 0):
        self.total = torch.tensor(total, dtype=torch.float32, device=device)
        self.count = count
        self.reduce = reduce

    def pending(self) -> tuple[float, int]:
        """The sum and count since the last `take_mean`, for a checkpoint (one sync; a collective under torchrun).
        The sum is averaged over the process group: every rank has run as many steps, so each resuming from that
        average logs the same mean as the uninterrupted run, whose logged mean is the average of the ranks'."""
        return self.reduce(self.total.clone()).item(), self.count

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.count += 1

    def take_mean(self) -> float:
        mean = self.reduce(self.total / max(self.count, 1)).item()
        self.total.zero_()
        self.count = 0
        return mean


@dataclass
class TrainHooks:
    """Callbacks from the runner: periodic evaluation and checkpointing, kept out of the loop body."""

    evaluate: Callable[[int], float] | None = None
    """Scores the held-out source pairs every `train.eval_interval` iterations (never a target)."""
    checkpoint: Callable[[TrainState, torch.optim.Optimizer], None] | None = None
    interrupt: Callable[[], BaseException | None] | None = None
    """Asked after every iteration; an exception it returns is raised once the run's checkpoint is saved (a
    restart the process needs: `resources.RestartForWaitPolicy`), so the run resumes exactly."""


def train(
    model: SegModel,
    method: Method,
    source: Dataset,
    exp: Experiment,
    device: torch.device,
    state: TrainState | None = None,
    optimizer_state: dict[str, Any] | None = None,
    hooks: TrainHooks | None = None,
    progress: bool = True,
    num_workers: int | None = None,
) -> TrainState:
    """`num_workers`: loader workers; None = `data.num_workers` as `benchmarks.resources` sizes it."""
    cfg = exp.train
    state = state or TrainState()
    hooks = hooks or TrainHooks()
    amp_dtype = autocast_dtype(cfg.amp, device)
    model.to(device)
    if cfg.grad_checkpointing:
        checkpoint_blocks(model.backbone)
    if cfg.compile:
        compile_model(model)
    optimizer = build_optimizer(method.param_groups(model, cfg.weight_decay), cfg, device)
    if optimizer_state is not None:
        restore_optimizer(optimizer, optimizer_state)
    weight_decay_schedule = method.weight_decay_schedule()
    ema = ParameterEMA.declared_by(method, model, optimizer, cfg.iters)
    if ema is not None:
        ema.load_state_dict(state.ema)
        state.ema = None  # the live average is `ema`; a checkpoint writes it back
    precision = ScaledBackward(amp_dtype, device, state.loss_scaler)

    from benchmarks import distributed

    world = distributed.current()
    if num_workers is None:
        num_workers = resources.plan(exp.data.num_workers, device.type).workers
    loader = source_loader(source, cfg, num_workers, device, start=state.batches_consumed,
                           rank=world.rank, world_size=world.world_size)
    batches = iter(loader)

    def next_batch() -> dict[str, torch.Tensor]:
        state.batches_consumed += 1
        waited = time.perf_counter()
        batch = next(batches)
        state.data_wait_seconds += time.perf_counter() - waited
        stray = batch.pop("stray_label_pixels", None)
        if stray is not None:  # a CPU tensor from the loader: summing it costs no device sync
            state.stray_label_pixels += int(stray.sum())
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def probe_sample() -> dict[str, torch.Tensor]:
        sample = source[(0, 0)]
        return {k: v[None].to(device) for k, v in sample.items() if k in ("image", "label")}

    # In a process group this goes through DDP (gradient sync); alone it is model.loss.
    forward_loss = distributed.loss_function(model, device, probe_sample)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device, amp_dtype):
            return forward_loss(batch["image"], batch["label"])["loss"]

    ctx = TrainContext(model=model, total_iters=cfg.iters, device=device, next_batch=next_batch, loss=loss_of, optimizer=optimizer)
    model.train()
    if state.step == 0:
        method.before_training(ctx)
        model.train()

    running_loss = RunningLoss(device, reduce=distributed.all_reduce_mean_, total=state.unlogged_loss_sum,
                               count=state.unlogged_loss_count)
    bar = tqdm(total=cfg.iters, initial=state.step, disable=not progress, desc=method.name, unit="it", dynamic_ncols=True)
    started = time.perf_counter()
    cadence = CheckpointCadence(cfg.checkpoint_interval, state.step, share=distributed.broadcast_object)
    trained_here = 0.0  # training seconds of this process before `started`, checkpoint writing excluded

    def save_checkpoint() -> None:
        nonlocal started, trained_here
        now = time.perf_counter()
        state.train_seconds += now - started
        trained_here += now - started
        state.unlogged_loss_sum, state.unlogged_loss_count = running_loss.pending()
        # Divergence is otherwise seen at log lines; a checkpoint between them must not keep non-finite
        # weights as the last good state (a resumed run would then report a later iteration).
        if not math.isfinite(state.unlogged_loss_sum) or not _trainable_weights_finite(model):
            raise TrainingDiverged(f"loss or weights became non-finite by iteration {state.step} "
                                   f"(lr {cfg.lr * poly_lr_factor(state.step - 1, cfg):.3g})")
        state.ema = ema.state_dict() if ema is not None else None
        state.loss_scaler = precision.state_dict()
        own_stray = state.stray_label_pixels
        state.stray_label_pixels = int(distributed.all_reduce_sum(own_stray, device))  # a collective, as `pending`
        hooks.checkpoint(state, optimizer)
        state.stray_label_pixels = own_stray
        state.ema = None
        started = time.perf_counter()
        cadence.saved(state.step, trained_here, started - now)

    while state.step < cfg.iters:
        step = state.step
        method.on_step(step, ctx)
        factor = apply_schedules(optimizer, step, cfg, weight_decay_schedule)
        optimizer.zero_grad(set_to_none=True)
        micro_batches = [next_batch() for _ in range(cfg.grad_accum)]
        with model.step_of([batch["label"] for batch in micro_batches]):
            for micro, batch in enumerate(micro_batches):
                with distributed.accumulation_context(forward_loss, last=micro == cfg.grad_accum - 1):
                    loss = loss_of(batch)
                    precision.backward(loss / cfg.grad_accum)
                running_loss.add(loss)
        precision.step(optimizer)
        method.after_optimizer_step(step, ctx)
        state.step += 1
        if ema is not None:
            ema.update(state.step)

        if state.step % cfg.log_interval == 0 or state.step == cfg.iters:
            mean_loss = running_loss.take_mean()
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"loss became {mean_loss} by iteration {state.step} (lr {cfg.lr * factor:.3g})")
            state.history.append({"iter": state.step, "loss": mean_loss, "lr": cfg.lr * factor})
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{cfg.lr * factor:.2e}")
        bar.update(1)
        if hooks.evaluate and cfg.eval_interval and state.step % cfg.eval_interval == 0 and state.step < cfg.iters:
            evaluation_started = time.perf_counter()
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                score = hooks.evaluate(state.step)
            state.evaluations.append({"iter": state.step, "source_heldout": score})
            model.train()
            started += time.perf_counter() - evaluation_started  # training seconds (and images/s) exclude it
        if hooks.checkpoint and cadence.due(state.step, trained_here + time.perf_counter() - started):
            save_checkpoint()
        if hooks.checkpoint and hooks.interrupt and state.step < cfg.iters and (stop := hooks.interrupt()):
            save_checkpoint()
            bar.close()
            raise stop
    if hooks.checkpoint and cadence.final_due(state.step, trained_here + time.perf_counter() - started):
        save_checkpoint()
    bar.close()
    # After the last checkpoint, which keeps the trained weights and the average apart: a resumed run
    # rebuilds both and ends here again.
    if ema is not None and ema.started:
        ema.apply()
        state.model_selection = "ema"
    resources.synchronize(device)
    state.train_seconds += time.perf_counter() - started
    return state


# -- evaluation -------------------------------------------------------------------------------------
def window_origins(length: int, crop: int, stride: int) -> list[int]:
    """mmseg's slide grid: windows every `stride`, the last one flush with the far edge."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, length - crop), 0) for i in range(count)})


def slide_logits(model: SegModel, image: torch.Tensor, cfg: EvalConfig, num_classes: int) -> torch.Tensor:
    """Per-class scores [1, K, H, W] for one image, windows run `batch_windows` at a time.

    Windows smaller than the crop (an image narrower than it) are zero-padded to the crop so the
    backbone always sees its trained grid; their padded scores are cut off before averaging.
    """
    _, _, height, width = image.shape
    crop = cfg.crop_size
    boxes = [(y, x) for y in window_origins(height, crop, cfg.stride) for x in window_origins(width, crop, cfg.stride)]
    scores = image.new_zeros((1, num_classes, height, width), dtype=torch.float32)
    counts = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    for first in range(0, len(boxes), cfg.batch_windows):
        chunk = boxes[first : first + cfg.batch_windows]
        windows = image.new_zeros((len(chunk), 3, crop, crop))
        for i, (y, x) in enumerate(chunk):
            patch = image[0, :, y : y + crop, x : x + crop]
            windows[i, :, : patch.shape[1], : patch.shape[2]] = patch
        logits = model.predict(windows).float()
        for i, (y, x) in enumerate(chunk):
            h, w = min(crop, height - y), min(crop, width - x)
            scores[:, :, y : y + h, x : x + w] += logits[i : i + 1, :, :h, :w]
            counts[:, :, y : y + h, x : x + w] += 1
    return scores / counts


@torch.inference_mode()
def evaluate(
    model: SegModel,
    dataset: Dataset,
    cfg: EvalConfig,
    device: torch.device,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
    class_names: tuple[str, ...] | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Score one target: mIoU (percent), per-class IoU (percent or None), images, labelled pixels scored, images/s."""
    model.eval()
    metric = confusion_metric(num_classes).to(device)
    # Its own generator: creating the iterator draws a base seed, which from the global RNG would move the
    # training's random stream (dropout) wherever an evaluation runs during training (`train.eval_interval`).
    loader = DataLoader(dataset, batch_size=None, num_workers=0, generator=torch.Generator())
    started = time.perf_counter()
    count = stray_label_pixels = 0
    for sample in tqdm(loader, disable=not progress, desc=desc, unit="img", leave=False):
        stray_label_pixels += int(sample.get("stray_label_pixels", 0))
        image = sample["image"].unsqueeze(0).to(device, non_blocking=True)
        label = sample["label"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            scores = slide_logits(model, image, cfg, num_classes)
        scores = F.interpolate(scores, size=label.shape[-2:], mode="bilinear", align_corners=False)
        metric.update(scores.argmax(1)[0], label)
        count += 1
    resources.synchronize(device)
    seconds = time.perf_counter() - started
    confusion = metric.compute().cpu()
    iou = iou_from_confusion(confusion)
    names = class_names or tuple(str(i) for i in range(num_classes))
    return {
        "miou": miou_percent(iou),
        "per_class_iou": {name: (None if math.isnan(v) else float(v) * 100.0) for name, v in zip(names, iou.tolist(), strict=True)},
        "num_images": count,
        "scored_pixels": int(confusion.sum()),  # labelled pixels scored, at the labels' own resolution
        "stray_label_pixels": stray_label_pixels,
        "images_per_s": count / seconds if seconds > 0 else None,
    }
