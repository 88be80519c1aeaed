"""Peak memory of a phase: the allocator's on CUDA, the process's high-water resident set on a CPU.

On CPU the peak is Linux's VmHWM, reset before the phase (`reset_peak_memory`), so a run or a
profiled method measures its own peak, not an earlier one's in the same process.
"""

from __future__ import annotations

import contextlib
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def _proc_status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def current_rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak: the allocator's on CUDA, the process's high-water RSS mark on Linux."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device | str) -> dict[str, Any]:
    """Peak since the last `reset_peak_memory`: {"peak_memory_mb", "peak_memory_reserved_mb", "memory_kind"}."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_memory_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
            "memory_kind": "cuda max allocated (reserved beside it)",
        }
    # Another accelerator's (mps, xpu) allocator has no peak counter measured here: the process's is given,
    # and named as such, rather than none.
    unmeasured = [] if device.type == "cpu" else [f"the {device.type} allocator's own memory not measured"]
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return {"peak_memory_mb": hwm, "peak_memory_reserved_mb": None,
                "memory_kind": f"process peak RSS ({'; '.join(['VmHWM', *unmeasured])})"}
    # Without /proc the lifetime maximum is all there is (KiB on Linux, bytes on macOS).
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return {"peak_memory_mb": maxrss / scale, "peak_memory_reserved_mb": None,
            "memory_kind": " ".join(["process lifetime max RSS", *(f"({note})" for note in unmeasured)])}


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
