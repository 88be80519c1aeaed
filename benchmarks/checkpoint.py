"""Resumable checkpoints of a run: small, atomic, and read without executing anything.

A checkpoint lives next to its result file, `<result stem>.ckpt/last.pt`, and holds what a resumed
run needs to continue exactly where it stopped:

- the trainable state only: parameters that require gradients, are in the optimiser, or were
  added by the method (never the frozen pretrained backbone, which the run rebuilds from its
  weights), plus every buffer;
- the optimiser state, the `TrainState` (step = scheduler position, `batches_consumed` = data
  position, loss history, evaluations, seconds), the method's `state_dict()`, the RNG states of
  Python, NumPy and torch (CPU and CUDA) of every rank;
- the config hash and world size it was written under, checked on load.

Everything is stored as tensors or plain Python values so it loads with `weights_only=True`: a file
carrying pickled objects is refused before anything in it runs. Writes go to a temporary file in
the same folder and are renamed into place (`os.replace`), so a run killed at any moment leaves
either the previous checkpoint or the new one, never half of one. The checkpoint is deleted when
the run finishes (the result file then holds everything worth keeping) and kept when it fails, so
the last good state survives a divergence or a crash.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.errors import UserError, not_a_pickle, refused_pickle
from benchmarks.storage import is_out_of_space, out_of_space_error

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_NAME = "last.pt"


def checkpoint_dir(result_path: Path) -> Path:
    return result_path.with_name(result_path.stem + ".ckpt")


def checkpoint_file(result_path: Path) -> Path:
    return checkpoint_dir(result_path) / CHECKPOINT_NAME


# -- what is saved ------------------------------------------------------------------------------------
def trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """Parameters that train, are optimised or were added, and all buffers; detached CPU copies."""
    optimised = {id(p) for group in (optimizer.param_groups if optimizer else []) for p in group["params"]}
    pretrained = getattr(model, "_pretrained_ids", set())
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        # Only the backbone's own parameters are "pretrained": the head and added modules are saved.
        if param.requires_grad or id(param) in optimised or id(param) not in pretrained:
            state[name] = param.detach().cpu().clone()
    for name, buffer in model.named_buffers():
        state[name] = buffer.detach().cpu().clone()
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise UserError(
            f"checkpoint {path} does not match the model ({len(unknown)} unknown entries, e.g. {unknown[0]}); "
            f"delete {path.parent} to start the run afresh"
        )
    # What `trainable_state` saves of this model before its first step (a method may make more trainable later,
    # never less): a checkpoint without one of them is of other code, and resuming would keep fresh values.
    pretrained = getattr(model, "_pretrained_ids", set())
    expected = {name for name, p in model.named_parameters() if p.requires_grad or id(p) not in pretrained}
    missing = sorted(expected.union(dict(model.named_buffers())) - set(state))
    if missing:
        raise UserError(
            f"checkpoint {path} does not match the model ({len(missing)} missing entries, e.g. {missing[0]}); "
            f"delete {path.parent} to start the run afresh"
        )
    with torch.no_grad():
        for name, value in state.items():
            target = own[name]
            if tuple(target.shape) != tuple(value.shape):
                raise UserError(
                    f"checkpoint {path}: {name} has shape {tuple(value.shape)}, the model {tuple(target.shape)}; "
                    f"delete {path.parent} to start the run afresh"
                )
            target.copy_(value.to(target.device, target.dtype))


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing and reading --------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file in the same folder, fsynced, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        needed = payload_bytes(obj)
        if is_out_of_space(err, path, needed):
            raise out_of_space_error(path, needed, "the checkpoint", "the previous checkpoint, if any, is kept and the "
                                     "run resumes from it") from None
        raise


def payload_bytes(obj: Any) -> int:
    """The bytes of the tensors in a (nested) checkpoint payload: what saving it needs on disk."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def save_checkpoint(
    result_path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: Any,
    method_state: dict[str, Any],
    config_hash: str,
    world_size: int,
    rng_states: list[dict[str, Any]],
    provenance: dict[str, Any] | None = None,
    with_optimizer_state: bool = True,
    code: dict[str, Any] | None = None,
) -> Path:
    """`with_optimizer_state=False` after the last iteration: nothing is optimised again, and AdamW's two
    moments would double a fully fine-tuned model's checkpoint (3.6 GB rather than 1.2 for ViT-L)."""
    path = checkpoint_file(result_path)
    payload = {
        "format": FORMAT_VERSION,
        "config_hash": config_hash,
        "world_size": world_size,
        "model": trainable_state(model, optimizer),
        "optimizer": optimizer.state_dict() if with_optimizer_state else None,
        "train_state": asdict(train_state),
        "method": method_state,
        "rng": rng_states,
        "provenance": provenance,  # the weights and data trained on: a resume onto other files is refused
        "code": code,  # the code that trained it: a resume by other code is recorded (`runner`)
    }
    atomic_torch_save(payload, path)
    log.info("checkpoint at iteration %d: %s", train_state.step, path)
    return path


def load_plain(path: Path, what: str, remove: Path) -> Any:
    """`torch.load` with `weights_only=True`: a file with pickled objects is refused without running any of it.
    Either failure is one line naming the file (`what` it is) and `remove`, what the user deletes to start afresh."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not_a_pickle(err):
            raise UserError(f"{what} {path} is unreadable (not a PyTorch checkpoint: a damaged file); delete "
                            f"{remove} to start afresh") from None
        raise UserError(
            f"{what} {path} refused: it holds pickled Python objects, not plain tensors ({refused_pickle(err)}); "
            f"delete {remove} if you did not write it"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"{what} {path} is unreadable ({type(err).__name__}: {err}); delete {remove} to start afresh") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's payload; a file with pickled objects is refused without running any of it."""
    payload = load_plain(path, "checkpoint", path.parent)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} is not a DGSS-Bench checkpoint (format {FORMAT_VERSION}); delete {path.parent}")
    return payload


def find_checkpoint(result_path: Path, config_hash: str, world_size: int) -> dict[str, Any] | None:
    """The run's last checkpoint if it has one, checked against the run; stale temporaries cleared."""
    folder = checkpoint_dir(result_path)
    if not folder.is_dir():
        return None
    for stale in folder.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        stale.unlink(missing_ok=True)  # a write that was killed before its rename
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        return None
    payload = read_checkpoint(path)
    if payload.get("config_hash") != config_hash:
        raise UserError(f"checkpoint {path} belongs to config {payload.get('config_hash')}, not {config_hash}; delete {folder}")
    if payload.get("world_size") != world_size:
        raise UserError(
            f"checkpoint {path} was written by {payload.get('world_size')} process(es), this run has {world_size}; "
            f"resume with the same number of processes or delete {folder}"
        )
    payload["path"] = path
    return payload


def restore(payload: dict[str, Any], model: nn.Module, method: Any, rank: int = 0) -> tuple[Any, dict[str, Any] | None]:
    """Load model and method state and this rank's RNG; returns (TrainState, optimiser state or None)."""
    from benchmarks.protocol import TrainState

    load_trainable_state(model, payload["model"], payload["path"])
    method.load_state_dict(payload["method"])
    rngs = payload["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    try:
        state = TrainState(**payload["train_state"])
    except TypeError as err:  # a field this code does not know, or lacks one it needs: other code wrote it
        raise UserError(f"checkpoint {payload['path']} holds a training state of other code ({err}); delete "
                        f"{payload['path'].parent} to start the run afresh") from None
    if rank != 0:  # the checkpoint's count is the whole group's, which the result sums over the ranks
        state.stray_label_pixels = 0
    log.info("resuming from %s at iteration %d", payload["path"], state.step)
    return state, payload["optimizer"]


def remove_checkpoint(result_path: Path) -> None:
    shutil.rmtree(checkpoint_dir(result_path), ignore_errors=True)
