"""Regression checks: fresh smoke-preset results compared with a stored baseline.

Baseline file (results/baselines/smoke.json):

    {"preset": "smoke", "tolerance_miou": 0.5,
     "runs": {"<method>/<backbone>/seed<N>": {"targets": {"cityscapes": 12.34, ...},
                                              "average_miou": 11.1, "params": {...}}},
     "environment": {...where and with what the baseline was made...}}

(a run of a setting other than G->CBM gets "/<setting>" appended to its key).

What fails the check (`compare` marks these `failing`):
- a target's mIoU or the average that moved by more than the tolerance, up or down: a smoke run is
  deterministic, so a move means the code changed behaviour; if intended, update the baseline;
- any change of a parameter count (exact: counts do not depend on floating point);
- a baseline run that is missing from the fresh results, did not finish, or lost a target.
A run that the baseline does not know (a new method) is reported, not failed.

Why 0.5 mIoU points (absolute): smoke runs on a CPU repeat bit for bit on one machine, but another
CPU, BLAS or torch version sums in another order, which flips a few pixels of the tiny smoke
targets (a fraction of a point at most); a real change of behaviour (a broken freeze, a wrong
learning-rate group, a label-mapping bug) moves smoke mIoU by points, and changes parameter counts
exactly.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.config import PROJECT_ROOT
from benchmarks.errors import UserError
from benchmarks.results import atomic_write_text

DEFAULT_TOLERANCE_MIOU = 0.5
# The project's own file, wherever the command runs from (a relative default would, outside the checkout,
# find none and suggest writing a new one there).
DEFAULT_BASELINE = PROJECT_ROOT / "results" / "baselines" / "smoke.json"
DEFAULT_SETTING = "G->CBM"


@dataclass(frozen=True)
class Difference:
    run: str
    """Baseline key: "<method>/<backbone>/seed<N>"."""
    kind: str
    """"miou", "params", "missing", "failed", "new" or "target_missing"."""
    field: str
    """What differs: a target name, "average", a parameter-count name, or ""."""
    baseline: Any
    current: Any
    failing: bool
    message: str


def run_key(result: dict[str, Any]) -> str:
    method = result.get("method")
    name = method.get("name") if isinstance(method, dict) else method
    key = f"{name}/{result.get('backbone')}/seed{result.get('seed')}"
    setting = result.get("setting") or DEFAULT_SETTING
    return key if setting == DEFAULT_SETTING else f"{key}/{setting}"


def baseline_entry(result: dict[str, Any]) -> dict[str, Any]:
    targets = {name: metrics.get("miou") for name, metrics in (result.get("targets") or {}).items()}
    entry = {"targets": targets, "average_miou": result.get("average_miou"), "params": dict(result.get("params") or {})}
    inputs = inputs_of(result)
    if inputs is not None:
        entry["inputs"] = inputs
    return entry


def inputs_of(result: dict[str, Any]) -> dict[str, Any] | None:
    """What a run's numbers were computed from, as far as it holds across machines: the backbone
    weights' sha256, each split's pair count (PNG bytes depend on the zlib that wrote the world) and,
    for a `--method-file` method, its file's sha256."""
    record = result.get("provenance")
    if not isinstance(record, dict):
        return None
    inputs = {"weights_sha256": (record.get("weights") or {}).get("sha256"),
              "pairs": {split: fp.get("pairs") for split, fp in sorted((record.get("data") or {}).items())}}
    if method_sha := (record.get("method") or {}).get("sha256"):
        inputs["method_sha256"] = method_sha
    return inputs


def make_baseline(results: Iterable[dict[str, Any]], preset: str = "smoke",
                  tolerance: float = DEFAULT_TOLERANCE_MIOU) -> dict[str, Any]:
    """A baseline from finished runs; refuses to store a failed run as the expected behaviour."""
    results = list(results)
    failed = [r for r in results if r.get("status") != "finished"]
    if failed:
        names = ", ".join(f"{run_key(r)} ({r.get('failure') or r.get('status')})" for r in failed)
        raise UserError(f"cannot store a baseline while runs did not finish: {names}; fix them first")
    environment = next((r.get("environment") for r in results if r.get("environment")), None) or {
        "python": platform.python_version()}
    return {
        "preset": preset,
        "tolerance_miou": tolerance,
        "runs": {run_key(r): baseline_entry(r) for r in sorted(results, key=run_key)},
        "environment": {k: v for k, v in environment.items() if k != "hostname"},
    }


class BadBaseline(UserError):
    """A baseline file that exists but cannot be used: unreadable, not UTF-8 JSON, or a bad entry."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"baseline {path}: {problem}; fix it or regenerate it with --update-baseline")
        self.path, self.problem = path, problem


def load_baseline(path: Path) -> dict[str, Any]:
    """The baseline in `path`, checked entry by entry: a bad one stops the check before anything runs,
    not in the comparison after the whole matrix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"baseline {path} not found; create it with `python -m benchmarks check --update-baseline`")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise BadBaseline(path, f"cannot be read ({err.strerror or err})") from None
    try:
        baseline = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadBaseline(path, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise BadBaseline(path, f"not valid JSON ({err})") from None
    problem = baseline_problem(baseline)
    if problem:
        raise BadBaseline(path, problem)
    return baseline


def baseline_problem(baseline: Any) -> str | None:
    """The first thing in a baseline that `compare` could not use as written by `make_baseline`, or None."""
    if not isinstance(baseline, dict):
        return "not a JSON object"
    if not isinstance(baseline.get("runs"), dict):
        return 'no "runs" object'
    if "tolerance_miou" in baseline and not is_tolerance(baseline["tolerance_miou"]):
        return f'"tolerance_miou" is {_show(baseline["tolerance_miou"])}, not a finite number ≥ 0'
    if not isinstance(baseline.get("preset", ""), str):
        return f'"preset" is {_show(baseline["preset"])}, not a string'
    for key, entry in baseline["runs"].items():
        if not isinstance(entry, dict):
            return f'run "{key}" is {_show(entry)}, not an object'
        for section, valid, kind in (("targets", _is_miou, "a number"), ("params", _is_count, "a whole number")):
            values = entry.get(section)
            if not isinstance(values, dict):
                return f'run "{key}" has no "{section}" object'
            bad = next((name for name, value in values.items() if not valid(value)), None)
            if bad is not None:
                return f'run "{key}": {section}.{bad} is {_show(values[bad])}, not {kind}'
        if not _is_miou(entry.get("average_miou")):
            return f'run "{key}": average_miou is {_show(entry["average_miou"])}, not a number'
    return None


def is_tolerance(value: Any) -> bool:
    """A usable mIoU tolerance: finite and not negative (a negative one would fail every unchanged run)."""
    return _number(value) is not None and value >= 0


def _is_miou(value: Any) -> bool:
    # null: a target without a score when the baseline was made; compare skips it as make_baseline stored it
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _is_count(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _show(value: Any, most: int = 60) -> str:
    """The value as written, shortened: the error must stay one readable line."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def write_baseline(path: Path, baseline: dict[str, Any]) -> None:
    atomic_write_text(Path(path), json.dumps(baseline, indent=2, sort_keys=True) + "\n")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def compare(baseline: dict[str, Any], results: Iterable[dict[str, Any]],
            tolerance: float | None = None) -> list[Difference]:
    """Every difference between the baseline and fresh results; `failing` ones are regressions.

    `tolerance` (mIoU points, absolute) defaults to the baseline's "tolerance_miou", then 0.5.
    """
    if tolerance is None:
        tolerance = float(baseline.get("tolerance_miou", DEFAULT_TOLERANCE_MIOU))
    current = {run_key(r): r for r in results}
    expected: dict[str, dict[str, Any]] = baseline.get("runs", {})
    diffs: list[Difference] = []
    for key in sorted(expected):
        want = expected[key]
        res = current.get(key)
        if res is None:
            diffs.append(Difference(key, "missing", "", "present", None, True,
                                    f"{key}: in the baseline but not run (method removed or renamed?)"))
            continue
        if res.get("status") != "finished":
            reason = res.get("failure") or res.get("status")
            diffs.append(Difference(key, "failed", "", "finished", res.get("status"), True, f"{key}: did not finish: {reason}"))
            continue
        got = baseline_entry(res)
        # Fingerprints before numbers: numbers computed from other weights or data are not a regression
        # (nor a pass); they say the baseline no longer describes what ran.
        if isinstance(want.get("inputs"), dict) and got.get("inputs") and want["inputs"] != got["inputs"]:
            diffs.append(Difference(key, "inputs", "", want["inputs"], got["inputs"], True,
                                    f"{key}: ran on other inputs than the baseline ({_inputs_change(want['inputs'], got['inputs'])}); "
                                    "numbers not compared; if intended, regenerate it with --update-baseline"))
            continue
        metrics = [(name, value, got["targets"].get(name)) for name, value in (want.get("targets") or {}).items()]
        metrics.append(("average", want.get("average_miou"), got["average_miou"]))
        for name, old, new in metrics:
            old_n, new_n = _number(old), _number(new)
            if old_n is None:
                continue
            if new_n is None:
                diffs.append(Difference(key, "target_missing", name, old, new, True, f"{key}: {name} mIoU missing (was {old_n:.2f})"))
                continue
            delta = new_n - old_n
            if abs(delta) > tolerance:
                direction = "dropped" if delta < 0 else "rose"
                diffs.append(Difference(key, "miou", name, old_n, new_n, True,
                                        f"{key}: {name} mIoU {direction} {old_n:.2f} → {new_n:.2f} ({delta:+.2f}, tolerance ±{tolerance:g})"))
        old_params, new_params = want.get("params") or {}, got["params"]
        for name in sorted(set(old_params) | set(new_params)):
            old, new = old_params.get(name), new_params.get(name)
            if old != new:
                change = f" ({new - old:+,})" if isinstance(old, int) and isinstance(new, int) else ""
                diffs.append(Difference(key, "params", name, old, new, True,
                                        f"{key}: {name} parameters {_count(old)} → {_count(new)}{change}"))
    for key in sorted(set(current) - set(expected)):
        res = current[key]
        finished = res.get("status") == "finished"
        detail = f"average {_number(res.get('average_miou')) or 0:.2f}" if finished else f"did not finish: {res.get('failure')}"
        diffs.append(Difference(key, "new", "", None, res.get("status"), False,
                                f"{key}: not in the baseline ({detail}); add it with --update-baseline"))
    return diffs


def _inputs_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    if old.get("weights_sha256") != new.get("weights_sha256"):
        parts.append(f"weights {str(old.get('weights_sha256'))[:12]}… → {str(new.get('weights_sha256'))[:12]}…")
    if old.get("method_sha256") != new.get("method_sha256"):
        parts.append(f"method file {str(old.get('method_sha256'))[:12]}… → {str(new.get('method_sha256'))[:12]}…")
    for split in sorted(set(old.get("pairs") or {}) | set(new.get("pairs") or {})):
        a, b = (old.get("pairs") or {}).get(split), (new.get("pairs") or {}).get(split)
        if a != b:
            parts.append(f"{split} {a} → {b} pairs")
    return ", ".join(parts) or "changed"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "absent" if value is None else str(value)


def format_report(diffs: list[Difference], baseline: dict[str, Any], compared: int,
                  environment: dict[str, Any] | None = None) -> str:
    """The readable verdict: what failed, what is only noted, and environment drift as context."""
    failing = [d for d in diffs if d.failing]
    notes = [d for d in diffs if not d.failing]
    tolerance = baseline.get("tolerance_miou", DEFAULT_TOLERANCE_MIOU)
    lines = [f"compared {compared} run(s) with {len(baseline.get('runs', {}))} baseline run(s) "
             f"(mIoU tolerance ±{tolerance:g} points, parameter counts exact)"]
    if failing:
        lines.append(f"REGRESSION: {len(failing)} difference(s)")
        lines.extend(f"  - {d.message}" for d in failing)
    if notes:
        lines.append("notes:")
        lines.extend(f"  - {d.message}" for d in notes)
    drift = environment_drift(baseline.get("environment") or {}, environment or {})
    if drift and failing:
        lines.append("environment differs from the baseline's (may explain small mIoU moves):")
        lines.extend(f"  - {line}" for line in drift)
    if failing:
        lines.append("if the change is intended, rewrite the baseline: python -m benchmarks check --update-baseline")
    else:
        lines.append("OK: no regression")
    return "\n".join(lines)


ENVIRONMENT_KEYS = ("python", "torch", "timm", "transformers", "peft", "numpy", "device_name")


def environment_drift(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)} → {new.get(k)}" for k in ENVIRONMENT_KEYS
            if k in old and k in new and old.get(k) != new.get(k)]
