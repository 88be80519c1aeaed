"""Result files: one self-describing JSON per run, written atomically, read back with pandas.

Schema (version 1), the only thing reports and regression checks read:

    {
      "schema": 1,
      "run_id": "proxy/G->CBM/proxy_vit/rein/seed42-1a2b3c4d",
      "status": "finished" | "failed" | "running",
      "failure": null | "one line: why it stopped",
      "preset": "proxy", "setting": "G->CBM", "source": "gtav",
      "method": {"name": "rein", "paper": "...", "hyperparameters": {...}},
      "backbone": "proxy_vit", "head": "light", "seed": 42,
      "experiment": {... the full resolved config ...},
      "config_hash": "1a2b3c4d",
      "params": {"backbone_trainable": int, "backbone_added": int, "backbone_pretrained": int,
                 "head_total": int, "head_trainable": int},
      "targets": {"cityscapes": {"miou": float, "per_class_iou": {"road": float | null, ...},
                                 "num_images": int, "scored_pixels": int}, ...},
      "average_miou": float,                 # unweighted mean over targets, percent
      "source_heldout": null | {"miou": float, "per_class_iou": {...}, "num_images": int},
                                             # held-out source pairs (data.source_holdout > 0); not averaged
      "history": [{"iter": int, "loss": float, "lr": float, ...}, ...],
      "evaluations": [{"iter": int, "source_heldout": float}],   # during training: held-out source only
      "model_selection": "final" | "ema",    # the last iteration's weights, or the average a method declares
                                             # (`Method.ema`); targets scored once, after training
      "eval_batch_windows": int,             # windows per forward in evaluation (1 for a method whose batch
                                             # members interact, `Method.couples_batch`)
      "profile": {"train_images_per_s": float, "eval_images_per_s": float, "peak_memory_mb": float,
                  "device": str, "dtype": str, "device_name": str,
                  "flops_forward_per_image": float | null, "flops_train_step_per_image": float | null,
                  "flops_eval_per_image": float | null, "flops_counted_with": str,
                  "mfu": float | null,          # mfu only where the device's peak is known (CUDA)
                  "eval_seconds_per_image": {"cityscapes": float, ...}},  # per target, as scored
      "diagnostics": {...},                  # the method's own (e.g. FisherTune's selection)
      "environment": {"python": str, "torch": str, ...,
                      "device_name": str,            # a GPU's name; a CPU's model, vector level, AMX
                      "git_commit": str,
                      "git_dirty": bool, "git_dirty_paths": [str, ...],  # what `git status` listed
                      "git_dirty_sha256": str | null,  # digest of the uncommitted code (.py, .toml) itself
                      "earlier_code": [{"git_commit", "git_dirty_sha256", "packages", "from_iter",
                                        "until_iter"}, ...],  # only in a run resumed by other code,
                      "code_since_iter": int,        # from where the code above trained it
                      "hostname": str},
      "timings": {"started": iso, "finished": iso, "train_s": float, "eval_s": float,
                  "data_wait_s": float}     # the part of train_s spent waiting for batches
    }

mIoU and IoU values are percentages (0–100) as the papers print them; an IoU is null when a class
is absent from both prediction and ground truth of the whole target set (excluded from the mean).

Reading is tolerant of what else lies in a results folder: a JSON object without "schema" is not a
result (a profile, a note) and is passed over silently; a file that is not UTF-8 JSON, or a result
with missing or malformed fields, is skipped with one warning naming the file and what is wrong, so
one damaged file never hides the others or stops a matrix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.storage import is_out_of_space, out_of_space_error, walk_following_links

SCHEMA_VERSION = 1
STATUSES = ("finished", "failed", "running")
# What every reader relies on: the run's identity (tables group by it) and its status.
REQUIRED_FIELDS = ("run_id", "status", "preset", "setting", "method", "backbone", "head", "seed")

log = logging.getLogger(__name__)


class BadResultFile(Exception):
    """A file that should be a result and cannot be used as one; the message says what is wrong."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    write_files_together(path.parent, {path.name: data})


def write_files_together(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name → content) into `folder` so that either all of them are replaced or none: each
    goes to a temporary file first, and only when every one is written are they renamed into place (renames
    need no space). A full disk or any other failure while writing leaves the folder as it was."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, Path]] = []
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            written.append((name, Path(tmp)))
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would make shared result folders unreadable to others
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException as err:
        for _, tmp in written:
            tmp.unlink(missing_ok=True)
        named = folder / next(iter(files)) if len(files) == 1 else folder
        needed = sum(map(len, files.values()))
        if is_out_of_space(err, named, needed):
            raise out_of_space_error(named, needed, "", "what was there before is unchanged") from None
        raise
    try:
        for name, tmp in written:
            os.replace(tmp, folder / name)
    finally:  # a rename that fails (not for want of space) leaves no temporary file behind
        for _, tmp in written:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_result(path: Path, result: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_result(path: Path) -> dict[str, Any] | None:
    """The result in `path`; None when there is no file or it is not a result (a JSON object without
    "schema", e.g. a profile). Raises `BadResultFile` for a damaged or malformed one."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None  # removed since it was listed: nothing to read, nothing wrong
    except OSError as err:
        raise BadResultFile(f"cannot be read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadResultFile(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadResultFile(f"not valid JSON, truncated or malformed ({err})") from None
    if not isinstance(data, dict) or "schema" not in data:
        return None
    problem = result_problem(data)
    if problem:
        raise BadResultFile(problem)
    data["_path"] = str(path)
    return data


def result_problem(data: dict[str, Any]) -> str | None:
    """What makes this object unusable as a result, or None."""
    if data.get("schema") != SCHEMA_VERSION:
        return f"result schema {data.get('schema')!r}; this harness reads schema {SCHEMA_VERSION}"
    missing = sorted(name for name in REQUIRED_FIELDS if data.get(name) is None)
    if missing:
        return f"missing fields {', '.join(missing)}"
    if data["status"] not in STATUSES:
        return f"status {data['status']!r} is not one of {', '.join(STATUSES)}"
    method = data["method"]
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        return 'field "method" is not an object with a "name"'
    targets = data.get("targets")
    if data["status"] == "finished" and not isinstance(targets, dict):
        return 'finished, but has no "targets" object'
    if isinstance(targets, dict):
        odd = sorted(name for name, metrics in targets.items() if not isinstance(metrics, dict))
        if odd:
            return f"targets {', '.join(odd)} are not objects"
        for name, metrics in sorted(targets.items()):
            if problem := _score_problem(metrics):
                return f"targets {name}: {problem}"
    elif targets is not None:
        return 'field "targets" is not an object'
    heldout = data.get("source_heldout")
    if heldout is not None and (not isinstance(heldout, dict) or (problem := _score_problem(heldout))):
        return f"source_heldout: {problem}" if isinstance(heldout, dict) else 'field "source_heldout" is not an object'
    if not _is_score(data.get("average_miou")):
        return "average_miou is not a number"
    # What the tables read from every result (a wrong type there stopped a whole table with a traceback).
    if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
        return f"seed {data['seed']!r} is not a whole number"
    for name in ("experiment", "timings", "params", "environment", "provenance", "profile"):
        if data.get(name) is not None and not isinstance(data[name], dict):
            return f'field "{name}" is not an object'
    return _nested_problem(data)


def _nested_problem(data: dict[str, Any]) -> str | None:
    """What the tables and the report read inside a result's objects, of the wrong type (a parameter count
    that is text, a provenance record that is no object, a history that is no list of records), or None."""
    if not all(_is_score(count) for count in (data.get("params") or {}).values()):
        return 'field "params" holds a count that is not a number'
    provenance = data.get("provenance") or {}
    if not isinstance(provenance.get("weights") or {}, dict):
        return 'field "provenance.weights" is not an object'
    fingerprints = provenance.get("data") or {}
    if not isinstance(fingerprints, dict) or not all(isinstance(fp, dict) for fp in fingerprints.values()):
        return 'field "provenance.data" is not an object of objects'
    for name, scores in (("history", ("iter", "loss")), ("evaluations", ("iter", "source_heldout"))):
        records = data.get(name)
        if records is None:
            continue
        if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
            return f'field "{name}" is not a list of objects'
        for record in records:
            targets = record.get("targets") or {}
            if not all(_is_score(record.get(key)) for key in scores) or not isinstance(targets, dict) \
                    or not all(_is_score(value) for value in targets.values()):
                return f'field "{name}" holds a record whose {", ".join(scores)} or targets are not numbers'
    return None


def _score_problem(metrics: dict[str, Any]) -> str | None:
    """What makes one scored set's record unreadable by the tables, or None."""
    if not _is_score(metrics.get("miou")):
        return "miou is not a number"
    per_class = metrics.get("per_class_iou")
    if per_class is not None and (not isinstance(per_class, dict) or not all(_is_score(v) for v in per_class.values())):
        return "per_class_iou is not an object of numbers"
    return None


def _is_score(value: Any) -> bool:
    """A score as results hold one: a finite number (JSON's NaN and Infinity are none), or null (not scored)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def read_result(path: Path) -> dict[str, Any] | None:
    """A result, or None: for a file that is not one, and, after one warning naming it and what is
    wrong, for a damaged or malformed one."""
    try:
        return load_result(path)
    except BadResultFile as err:
        log.warning("skipping %s: %s", path, err)
        return None


def set_aside(path: Path) -> Path:
    """Rename a damaged result out of the way (to NAME.broken, NAME.broken-2, ...) so that a re-run
    does not overwrite what the user had; the new name does not end in .json, so readers pass it over."""
    path = Path(path)
    candidate, number = path.with_name(f"{path.name}.broken"), 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.broken-{number}")
    os.replace(path, candidate)
    return candidate


def iter_results(roots: Iterable[Path]) -> list[dict[str, Any]]:
    """Every result under these folders (searched recursively) or files; damaged ones are skipped
    with a warning each."""
    found = []
    seen: set[Path] = set()  # `--runs X --runs X/proxy` names some files twice: each is one run
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in walk_following_links(root)
                                                      if p.suffix == ".json" and p.is_file())
        for path in files:
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            result = read_result(path)
            if result is not None:
                found.append(result)
    return found
