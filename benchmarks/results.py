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
                                 "num_images": int}, ...},
      "average_miou": float,                 # unweighted mean over targets, percent
      "source_heldout": null | {"miou": float, "per_class_iou": {...}, "num_images": int},
                                             # held-out source pairs (data.source_holdout > 0); not averaged
      "history": [{"iter": int, "loss": float, "lr": float, ...}, ...],
      "evaluations": [{"iter": int, "targets": {"cityscapes": float, ...}}],   # during training
      "profile": {"train_images_per_s": float, "eval_images_per_s": float, "peak_memory_mb": float,
                  "device": str, "dtype": str, "device_name": str,
                  "flops_forward_per_image": float | null, "flops_train_step_per_image": float | null,
                  "flops_eval_per_image": float | null, "flops_counted_with": str,
                  "mfu": float | null},         # mfu only where the device's peak is known (CUDA)
      "diagnostics": {...},                  # the method's own (e.g. FisherTune's selection)
      "environment": {"python": str, "torch": str, ..., "device_name": str, "git_commit": str,
                      "git_dirty": bool, "hostname": str},
      "timings": {"started": iso, "finished": iso, "train_s": float, "eval_s": float}
    }

mIoU and IoU values are percentages (0–100) as the papers print them; an IoU is null when a class
is absent from both prediction and ground truth of the whole target set (excluded from the mean).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.storage import is_out_of_space, out_of_space_error

SCHEMA_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make shared result folders unreadable to others
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_out_of_space(err, path, len(data)):
            raise out_of_space_error(path, len(data), "", "what was there before is unchanged") from None
        raise


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


def read_result(path: Path) -> dict[str, Any] | None:
    """A result, or None for a file that is not one (a stray or foreign JSON)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        return None
    data["_path"] = str(path)
    return data


def iter_results(roots: Iterable[Path]) -> list[dict[str, Any]]:
    found = []
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(root.rglob("*.json"))
        for path in files:
            result = read_result(path)
            if result is not None:
                found.append(result)
    return found


def results_frame(results: list[dict[str, Any]]):
    """One row per run and target: the long table every report is a view of."""
    import pandas as pd

    rows = []
    for res in results:
        base = {
            "run_id": res["run_id"],
            "status": res["status"],
            "preset": res.get("preset"),
            "setting": res.get("setting"),
            "backbone": res.get("backbone"),
            "head": res.get("head"),
            "method": res["method"]["name"],
            "seed": res.get("seed"),
            "trainable_params": res.get("params", {}).get("backbone_trainable"),
            "average_miou": res.get("average_miou"),
        }
        for target, metrics in (res.get("targets") or {}).items():
            rows.append({**base, "target": target, "miou": metrics.get("miou")})
    return pd.DataFrame(rows)
