"""Data-parallel training across GPUs and nodes with the standard engine: torchrun + DDP.

Launch: `torchrun --nproc-per-node 4 -m benchmarks run ...` (one node) or the same line with
`--nnodes/--node-rank/--rdzv-endpoint` on every node; under slurm `--launcher slurm
--slurm-gpus-per-node N` starts one task per GPU and this module reads the task's rank from
submitit. A process started without any of that is a world of one and nothing here changes it.

What is distributed and how (docs/scaling.md has the reasoning in full):
- the source stream: rank r of W reads micro-batch `g·W + r` of the single-process stream at its
  g-th micro-batch, so the W micro-batches of one global step are exactly the samples (and
  augmentation seeds) a single process with `grad_accum·W` micro-batches would read. With DDP's
  gradient averaging the update equals the single-process update with W times the accumulation;
- the model: the method is attached (parameters frozen) before wrapping, and the wrapped module
  is a thin `LossModule` whose forward returns the loss, because DDP synchronises gradients only
  through `forward`. The wrapper is rebuilt when a phased method changes which parameters train;
- `find_unused_parameters` is switched on only when a probe backward (one sample, RNG and
  buffers restored) leaves some trainable parameter without a gradient — e.g. a method module the
  chosen head never calls — because it costs a graph traversal every step;
- evaluation: every rank scores a strided shard of each target (no sample twice); the
  torchmetrics confusion matrix is summed across ranks when it is computed;
- rank 0 alone writes results and checkpoints; the others wait at a barrier.

Effective batch = per-device batch × world size × grad_accum. The learning rate is not scaled
with it (the reference recipe is single-GPU; scale it yourself with `--set train.lr=...`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.errors import UserError

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: rank among `world_size`, `local_rank` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistEnv()


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or a world of one without it."""
    environ = dict(os.environ if environ is None else environ)
    present = [name for name in TORCHRUN_VARIABLES if name in environ]
    if not present:
        return SINGLE
    if len(present) != len(TORCHRUN_VARIABLES):
        missing = sorted(set(TORCHRUN_VARIABLES) - set(present))
        raise UserError(f"distributed environment incomplete: {', '.join(missing)} not set; launch with torchrun")
    try:
        env = DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None
    if not 0 <= env.rank < env.world_size:
        raise UserError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}; launch with torchrun")
    return env


def current() -> DistEnv:
    """This process's place in an initialised process group (a world of one when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE


def init_distributed(device_name: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group torchrun describes (nccl with CUDA, gloo on CPU); a no-op alone.

    With CUDA each process takes the GPU `LOCAL_RANK`; `train.device` then names only the type.
    """
    env = detect_env()
    if not env.is_distributed or (dist.is_available() and dist.is_initialized()):
        return current() if env.is_distributed else env
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if use_cuda else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": dt.timedelta(minutes=timeout_minutes)}
    if use_cuda:
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    dist.init_process_group(**kwargs)
    log.info("rank %d/%d joined the process group (%s)", env.rank, env.world_size, backend)
    return env


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    """The device of this rank: CUDA device LOCAL_RANK when the run is on CUDA."""
    if env.is_distributed and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


def barrier() -> None:
    if current().is_distributed:
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s value on every rank (plain Python objects between our own processes)."""
    if not current().is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    env = current()
    if not env.is_distributed:
        return [value]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    if not current().is_distributed:
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean over ranks (a no-op alone)."""
    env = current()
    if env.is_distributed:
        dist.all_reduce(tensor)
        tensor /= env.world_size
    return tensor


def shard_indices(length: int, env: DistEnv | None = None) -> list[int]:
    """This rank's strided share of `range(length)`: each index on exactly one rank."""
    env = env or current()
    return list(range(env.rank, length, env.world_size))


# -- the model under DDP ---------------------------------------------------------------------------
class LossModule(nn.Module):
    """`forward(images, labels) → loss dict`: DDP hooks gradient sync on forward, so the loss is it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(images, labels)


def _trainable_signature(model: nn.Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


def unused_trainable_parameters(model: nn.Module, sample: dict[str, torch.Tensor]) -> list[str]:
    """Trainable parameters one forward/backward on `sample` leaves without a gradient.

    Runs with forked RNG, buffers and existing gradients restored: the probe changes nothing the
    run can observe.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved_grads = [p.grad for _, p in named]
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        for _, p in named:
            p.grad = None
        with torch.random.fork_rng(devices=devices):
            loss = model.loss(sample["image"], sample["label"])["loss"]
            loss.backward()
        return [n for n, p in named if p.grad is None]
    finally:
        for (_, p), grad in zip(named, saved_grads, strict=True):
            p.grad = grad
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved_buffers[n])


class DistributedLoss:
    """The protocol's loss call under DDP, rebuilt when the set of trainable parameters changes.

    `__call__(images, labels)` returns the loss dict through the DDP-wrapped `LossModule`;
    `accumulating()` is a context in which backward passes skip the all-reduce (all but the last
    micro-batch of a step).
    """

    def __init__(self, model: nn.Module, device: torch.device, probe: Callable[[], dict[str, torch.Tensor]]):
        from torch.nn.parallel import DistributedDataParallel

        self._ddp_cls = DistributedDataParallel
        self.model = model
        self.device = device
        self._probe = probe
        self._signature: tuple[bool, ...] | None = None
        self._wrapped: nn.Module | None = None
        self.find_unused_parameters = False

    def _ensure_wrapped(self) -> nn.Module:
        signature = _trainable_signature(self.model)
        if self._wrapped is None or signature != self._signature:
            unused = unused_trainable_parameters(self.model, self._probe())
            # Any rank may see unused parameters the others do not (data-dependent branches).
            flag = torch.tensor(float(bool(unused)), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.find_unused_parameters = bool(flag.item())
            if unused:
                log.info("DDP: %d trainable parameter(s) get no gradient (e.g. %s); find_unused_parameters on",
                         len(unused), unused[0])
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = self._ddp_cls(
                LossModule(self.model),
                device_ids=device_ids,
                find_unused_parameters=self.find_unused_parameters,
            )
            self._signature = signature
        return self._wrapped

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._ensure_wrapped()(images, labels)

    def accumulating(self) -> contextlib.AbstractContextManager:
        return self._ensure_wrapped().no_sync()


def loss_function(model: nn.Module, device: torch.device, probe: Callable[[], dict[str, torch.Tensor]]):
    """`(images, labels) → loss dict` for training: the model's own loss alone, DDP's in a group."""
    if not current().is_distributed:
        return model.loss
    return DistributedLoss(model, device, probe)


def accumulation_context(loss_fn: Any, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on every micro-batch of a step but the last."""
    if last or not isinstance(loss_fn, DistributedLoss):
        return contextlib.nullcontext()
    return loss_fn.accumulating()


def shard_stream_positions(start: int, env: DistEnv) -> Iterator[int]:
    """Global micro-batch positions rank `env.rank` reads from local position `start` on."""
    position = start
    while True:
        yield position * env.world_size + env.rank
        position += 1
