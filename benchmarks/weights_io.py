"""Reading backbone checkpoints safely and converting them to the protocol's timm model.

Why a module of its own: the protocol's numbers depend on *how* a 14-patch VFM is turned into the
16-patch, 32×32-grid model (plain bicubic resize of the patch kernel, bicubic resize of the patch
part of the position grid, cls position kept), and users bring weights in several layouts (timm,
DINOv2's original release, OpenAI/OpenCLIP, EVA, SAM). Everything here is pure tensor work on a
state dict so it can be tested against an independent computation.

Safety: files are read with ``torch.load(..., weights_only=True)`` or safetensors; a pickle that
carries Python objects is refused by PyTorch *before* anything runs, and we turn that refusal into a
one-line `UserError`.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.errors import UserError, not_a_pickle, refused_pickle

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

#: Containers some trainers wrap a state dict in (checked in this order, repeatedly). "model" before "model_ema":
#: the reference's conversion of a release that holds both (Rein's EVA-02 script) reads "model".
_WRAPPER_KEYS = ("model", "model_ema", "state_dict", "module", "teacher", "student")
#: Key prefixes left by DDP / wrappers that never belong to the backbone's own names.
_STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.")


# -- reading -----------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> StateDict:
    """Read a checkpoint file into a flat {name: tensor} dict without executing any pickled code."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"weights file {path} is a folder; pass --weights NAME=PATH with the checkpoint file in it")
    if not path.is_file():
        raise UserError(f"weights file {path} not found; pass --weights NAME=PATH with an existing checkpoint file")
    if path.suffix == ".safetensors" or _has_safetensors_header(path):
        try:
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for malformed headers
            raise UserError(f"weights file {path} is not a readable safetensors file ({exc}); re-export it") from exc
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not_a_pickle(exc):
                raise UserError(
                    f"weights file {path} is not a PyTorch checkpoint (no pickle starts with its bytes: a damaged or "
                    "incomplete download, or another format); download the checkpoint again") from None
            # weights_only refuses unknown globals before constructing them: nothing was executed.
            raise UserError(
                f"weights file {path} refused: it contains pickled Python objects, not just tensors "
                f"({refused_pickle(exc)}); re-save it as a plain state dict (torch.save(model.state_dict())) or safetensors"
            ) from exc
        except Exception as exc:
            if _is_torchscript(path):
                raise UserError(
                    f"weights file {path} is a TorchScript archive (as OpenAI's CLIP release is), which is not read "
                    "here; save its weights as a state dict once: torch.save(torch.jit.load(PATH, map_location='cpu')"
                    ".state_dict(), 'weights.pth'), and pass that file") from exc
            raise UserError(f"weights file {path} could not be read as a PyTorch checkpoint ({type(exc).__name__}: {exc}); check the file is complete") from exc
    return _flatten(raw, path)


def _has_safetensors_header(path: Path) -> bool:
    """A safetensors file under another name (`.pth`, `.bin`): an 8-byte little-endian header length, then
    that many bytes of JSON object."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
            size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= header_length <= size - 8


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip whose record holds compiled code beside the tensors."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _flatten(raw: object, path: Path) -> StateDict:
    """Unwrap trainer containers ({'model': ...}) and drop DDP prefixes; refuse non-tensor payloads."""
    while isinstance(raw, Mapping):
        wrappers = [k for k in _WRAPPER_KEYS if k in raw and isinstance(raw[k], Mapping)]
        if not wrappers:
            break
        if len(wrappers) > 1:
            why = " (what the reference's conversion reads)" if wrappers[:2] == ["model", "model_ema"] else ""
            log.warning("weights file %s holds %s: reading %r%s", path, " and ".join(repr(k) for k in wrappers),
                        wrappers[0], why)
        raw = raw[wrappers[0]]
    if not isinstance(raw, Mapping):
        raise UserError(f"weights file {path} holds a {type(raw).__name__}, not a state dict; save model.state_dict()")
    out: StateDict = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue  # metadata such as epoch counters or config strings
        name = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        out[name] = value
    if not out:
        raise UserError(f"weights file {path} contains no tensors; pass a model checkpoint")
    return out


# -- layout detection and key conversion --------------------------------------------------------------
def is_dinov2_original(sd: Mapping[str, torch.Tensor]) -> bool:
    """The facebookresearch/dinov2 release layout (mask_token, register_tokens, chunked blocks, w12/w3)."""
    return (
        "mask_token" in sd
        or "register_tokens" in sd
        or any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd)
        or any(".mlp.w12." in k for k in sd)
    )


def convert_dinov2_original(sd: Mapping[str, torch.Tensor], *, model_has_reg_tokens: bool) -> StateDict:
    """DINOv2 release keys → timm VisionTransformer keys (native patch and grid kept).

    - ``blocks.<chunk>.<i>.`` (block_chunks > 0 in the release) → ``blocks.<i>.``;
    - SwiGLU ``mlp.w12`` / ``mlp.w3`` (ViT-G) → timm's packed ``mlp.fc1`` / ``mlp.fc2``;
    - ``mask_token`` (only used by the iBOT masked-image loss) is dropped;
    - with registers, timm's model is ``no_embed_class``: the cls position is folded into the cls token
      and the position embedding keeps only the patch grid, which is exactly what DINOv2 computes
      (registers are inserted after the position embedding is added).
    """
    out: StateDict = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        out[key] = value
    if "register_tokens" in out:
        if not model_has_reg_tokens:
            raise UserError("checkpoint has DINOv2 register tokens but the backbone has none; use the *_reg backbone name")
        out["reg_token"] = out.pop("register_tokens")
        pos = out.pop("pos_embed")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


# -- the protocol's resampling -------------------------------------------------------------------------
def resize_patch_kernel(weight: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Patch-embedding kernel [O, I, p, p] → [O, I, size, size].

    ``"bicubic"`` is the reference's conversion: a plain ``F.interpolate(..., mode="bicubic",
    align_corners=False)`` with no magnitude rescale (the DGSS papers' numbers come from it).
    ``"timm"`` is timm's ``resample_patch_embed`` (FlexiViT pseudo-inverse, preserves the response
    to resized patches); it gives different features and is offered for comparison only.
    """
    if weight.shape[-2:] == (size, size):
        return weight
    if mode == "bicubic":
        out = F.interpolate(weight.float(), size=(size, size), mode="bicubic", align_corners=False)
    elif mode == "timm":
        from timm.layers import resample_patch_embed

        out = resample_patch_embed(weight.float(), [size, size], interpolation="bicubic", antialias=True)
    else:
        raise UserError(f"unknown patch-kernel resample mode {mode!r}; valid: bicubic, timm")
    return out  # fp32, as the reference's `.float()` leaves it: a half-precision file is not rounded twice


def resize_pos_embed(
    pos: torch.Tensor, new_grid: tuple[int, int], num_prefix: int, mode: str = "bicubic"
) -> torch.Tensor:
    """Position embedding [1, prefix + h*w, C] → [1, prefix + H*W, C]; prefix entries (cls) kept as is.

    ``"bicubic"``: ``F.interpolate(mode="bicubic", align_corners=False)`` without antialias, the
    reference's 37×37 → 32×32; ``"timm"``: timm's ``resample_abs_pos_embed`` (antialiased).
    The stored grid must be square (every supported release is).
    """
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise UserError(f"position embedding with {grid.shape[1]} patch positions is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos
    if mode == "timm":
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos.float(), list(new_grid), (old, old), num_prefix_tokens=num_prefix)
    if mode != "bicubic":
        raise UserError(f"unknown position-grid resample mode {mode!r}; valid: bicubic, timm")
    c = grid.shape[-1]
    g = grid.float().reshape(1, old, old, c).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=tuple(new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c)
    return torch.cat([prefix.float(), g], dim=1)


def resize_pos_embed_nhwc(pos: torch.Tensor, new_grid: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """SAM's [1, H, W, C] absolute position grid, resized like `resize_pos_embed`."""
    if tuple(pos.shape[1:3]) == tuple(new_grid):
        return pos
    g = pos.float().permute(0, 3, 1, 2)
    g = F.interpolate(g, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=(mode == "timm"))
    return g.permute(0, 2, 3, 1)


def resize_rel_pos(rel: torch.Tensor, length: int) -> torch.Tensor:
    """SAM relative position table [2S-1, d] → [length, d], linearly, as SAM itself does at run time."""
    if rel.shape[0] == length:
        return rel
    return F.interpolate(rel.float().t()[None], size=length, mode="linear", align_corners=False)[0].t()


def adapt_to_model(
    sd: StateDict,
    target: Mapping[str, torch.Tensor],
    *,
    num_prefix_in_pos: int,
    patch_key: str = "patch_embed.proj.weight",
    resample: str = "bicubic",
) -> StateDict:
    """Resize the patch kernel, position grid and SAM rel-pos tables of `sd` to `target`'s shapes."""
    out = dict(sd)
    if patch_key in out and patch_key in target:
        w, t = out[patch_key], target[patch_key]
        if w.ndim == 4 and w.shape[-1] != t.shape[-1]:
            out[patch_key] = resize_patch_kernel(w, t.shape[-1], resample)
    if "pos_embed" in out and "pos_embed" in target:
        pos, t = out["pos_embed"], target["pos_embed"]
        if pos.ndim == 2:
            pos = pos[None]
        # A grid of another layout or channel width (another family's or size's file) is left as it is, for
        # `check_shapes_and_cast` to name the file and the NAME to check.
        if pos.ndim != t.ndim or pos.shape[-1] != t.shape[-1]:
            out["pos_embed"] = pos
        elif t.ndim == 4:  # SAM: NHWC grid
            out["pos_embed"] = resize_pos_embed_nhwc(pos, tuple(t.shape[1:3]), resample)
        elif pos.shape != t.shape and _is_square(pos.shape[1] - num_prefix_in_pos):
            new = math.isqrt(t.shape[1] - num_prefix_in_pos)
            out["pos_embed"] = resize_pos_embed(pos, (new, new), num_prefix_in_pos, resample)
        else:
            out["pos_embed"] = pos
    for key, value in list(out.items()):
        if key.endswith((".rel_pos_h", ".rel_pos_w")) and key in target and value.shape != target[key].shape:
            out[key] = resize_rel_pos(value, target[key].shape[0])
    return out


def _is_square(positions: int) -> bool:
    return positions > 0 and math.isqrt(positions) ** 2 == positions


def check_names(
    sd: StateDict,
    target: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    ignorable: Callable[[str], bool],
) -> None:
    """The file holds every entry of `target` and none it cannot use (but `ignorable` ones): checked before
    anything is resized, so another family's file is named as such rather than failing in a resize."""
    dropped = sorted(k for k in sd if k not in target and ignorable(k))
    if dropped:
        log.info("%s: ignoring %d entries the segmentation backbone does not use (%s)", path, len(dropped), ", ".join(dropped[:6]))
    unknown = sorted(k for k in sd if k not in target and not ignorable(k))
    missing = sorted(k for k in target if k not in sd)
    if unknown:
        raise UserError(
            f"weights file {path}: {len(unknown)} unexpected entries (e.g. {', '.join(unknown[:4])}); "
            "it is not a checkpoint of this backbone family — check the NAME in --weights NAME=PATH"
        )
    if missing:
        raise UserError(
            f"weights file {path}: {len(missing)} entries missing (e.g. {', '.join(missing[:4])}); "
            "the checkpoint is truncated or of another architecture — check the NAME in --weights NAME=PATH"
        )


def check_shapes_and_cast(sd: StateDict, target: Mapping[str, torch.Tensor], path: str | Path) -> StateDict:
    """`target`'s entries of `sd` (whose names `check_names` passed), each of `target`'s shape, in its dtype."""
    out: StateDict = {}
    for key, t in target.items():
        value = sd[key]
        if tuple(value.shape) != tuple(t.shape):
            raise UserError(
                f"weights file {path}: {key} has shape {tuple(value.shape)} but the backbone needs {tuple(t.shape)} "
                "after conversion; the checkpoint is of another model size — check the NAME in --weights NAME=PATH"
            )
        out[key] = value.to(dtype=t.dtype) if value.is_floating_point() else value
    return out
