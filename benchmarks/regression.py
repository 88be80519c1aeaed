"""Regression checks: fresh smoke-preset results compared with a stored baseline.

Baseline file (results/baselines/smoke.json):

    {"preset": "smoke", "tolerance_miou": 0.05, "tolerance_loss_relative": 1e-4,
     "runs": {"<method>/<backbone>/seed<N>": {"targets": {"cityscapes": 0.51, ...}, "average_miou": 0.4,
                                              "per_class": {"cityscapes": {"road": 0.7, ...}, ...},
                                              "source_heldout": 0.6, "final_loss": 2.95, "params": {...},
                                              "protocol": "<hash>", "inputs": {...}, "code": {...}}},
     "environment": {...where and with what the last update was made...}}

(a run of a setting other than G->CBM gets "/<setting>" appended to its key; entries written before a field
existed lack it, and a field a baseline lacks is not compared).

What fails the check (`compare` marks these `failing`):
- a run of another protocol than the baseline's (its configuration hash without the data folder's path), or on
  other inputs (weights, pair counts, a method file): numbers not compared, the baseline no longer describes it;
- a target's mIoU, the average, a class's IoU or the held-out source mIoU that moved by more than
  `tolerance_miou` points, up or down, or the last logged training loss by more than `tolerance_loss_relative`
  of itself: a smoke run is deterministic, so a move means the code changed behaviour; if intended, update;
- any change of a parameter count (exact: counts do not depend on floating point);
- a baseline run that is missing from the fresh results, did not finish, or lost a target.
A run that the baseline does not know (a new method) is reported, not failed.

Why these tolerances (measured 2026-12-06 on the 2-core Intel Xeon box, all 18 methods): the same command twice
gives the same bits; one thread against two moves a target's mIoU by at most 4e-7 points, a class's IoU by 1e-5,
the final loss by 1.6e-7 of itself; this box against the AMD EPYC box that made the previous baseline (other
SIMD kernels, code 182 commits older) moved a target's mIoU by at most 0.00045. The smoke models are near chance
(every target under 1 mIoU), so the earlier 0.5 points could not fail most entries whatever the code did: a
review's deliberate regressions (a dead VPT prompt, nearest instead of bilinear at evaluation) moved mIoU by 0.03–0.1
and the loss by 1e-3 of itself. 0.05 points is 100× the cross-machine move of a target's mIoU; 1e-4 is 600× the
threads' loss noise. Some changes no 6-iteration smoke run shows (a Rein refinement that does nothing moved the loss
by 6e-6 of itself): the methods' own tests pin those.
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

DEFAULT_TOLERANCE_MIOU = 0.05
DEFAULT_TOLERANCE_LOSS = 1e-4
"""Relative: |new − old| / |old| of the last logged training loss."""
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
    scored = result.get("targets") or {}
    entry: dict[str, Any] = {
        "targets": {name: metrics.get("miou") for name, metrics in scored.items()},
        "average_miou": result.get("average_miou"),
        "per_class": {name: dict(metrics.get("per_class_iou") or {}) for name, metrics in scored.items()},
        "params": dict(result.get("params") or {}),
    }
    if isinstance(result.get("source_heldout"), dict):
        entry["source_heldout"] = result["source_heldout"].get("miou")
    history = result.get("history") or []
    if history and isinstance(history[-1], dict) and _number(history[-1].get("loss")) is not None:
        entry["final_loss"] = history[-1]["loss"]
    if (protocol := protocol_hash(result)) is not None:
        entry["protocol"] = protocol
    inputs = inputs_of(result)
    if inputs is not None:
        entry["inputs"] = inputs
    environment = result.get("environment") or {}
    if "git_commit" in environment:  # each entry says which code made it (an update may refresh a few runs)
        entry["code"] = {"git_commit": environment.get("git_commit"), "git_dirty": environment.get("git_dirty")}
    return entry


def protocol_hash(result: dict[str, Any]) -> str | None:
    """The run's protocol as the tables tell protocols apart (`reports.grouping.protocol_of`: the configuration
    without what cannot change the numbers, such as the data folder's path, whose pairs `inputs` checks)."""
    from benchmarks.reports.grouping import protocol_of

    return protocol_of(result).fingerprint or None


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


def make_baseline(results: Iterable[dict[str, Any]], preset: str = "smoke", tolerance: float = DEFAULT_TOLERANCE_MIOU,
                  tolerance_loss: float = DEFAULT_TOLERANCE_LOSS) -> dict[str, Any]:
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
        "tolerance_loss_relative": tolerance_loss,
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
    if path.is_dir():
        raise UserError(f"baseline {path} is a folder; pass the baseline's .json file")
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
    if not baseline["runs"]:
        return 'no runs in "runs" (a check against it would pass whatever ran)'
    for name in ("tolerance_miou", "tolerance_loss_relative"):
        if name in baseline and not is_tolerance(baseline[name]):
            return f'"{name}" is {_show(baseline[name])}, not a finite number ≥ 0'
    if not isinstance(baseline.get("preset", ""), str):
        return f'"preset" is {_show(baseline["preset"])}, not a string'
    if not isinstance(baseline.get("environment") or {}, dict):
        return f'"environment" is {_show(baseline["environment"])}, not an object'
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
        per_class = entry.get("per_class", {})
        if not isinstance(per_class, dict) or not all(
                isinstance(classes, dict) and all(_is_miou(v) for v in classes.values()) for classes in per_class.values()):
            return f'run "{key}": per_class is not an object of targets holding numbers'
        for name in ("source_heldout", "final_loss"):
            if not _is_miou(entry.get(name)):
                return f'run "{key}": {name} is {_show(entry[name])}, not a number'
        if not isinstance(entry.get("protocol", ""), str):
            return f'run "{key}": protocol is {_show(entry["protocol"])}, not a string'
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
            tolerance: float | None = None, tolerance_loss: float | None = None) -> list[Difference]:
    """Every difference between the baseline and fresh results; `failing` ones are regressions.

    `tolerance` (mIoU points, absolute: targets, average, classes, held-out source) defaults to the baseline's
    "tolerance_miou"; `tolerance_loss` (relative, the last logged loss) to its "tolerance_loss_relative".
    """
    if tolerance is None:
        tolerance = float(baseline.get("tolerance_miou", DEFAULT_TOLERANCE_MIOU))
    if tolerance_loss is None:
        tolerance_loss = float(baseline.get("tolerance_loss_relative", DEFAULT_TOLERANCE_LOSS))
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
        # Fingerprints before numbers: numbers computed by another protocol or from other weights or data are
        # not a regression (nor a pass); they say the baseline no longer describes what ran.
        if want.get("protocol") and got.get("protocol") and want["protocol"] != got["protocol"]:
            diffs.append(Difference(key, "protocol", "", want["protocol"], got["protocol"], True,
                                    f"{key}: ran another protocol than the baseline (configuration {want['protocol']} → "
                                    f"{got['protocol']}: a --set, or a changed preset or default); numbers not compared; "
                                    "if intended, regenerate it with --update-baseline"))
            continue
        if isinstance(want.get("inputs"), dict) and got.get("inputs") and want["inputs"] != got["inputs"]:
            diffs.append(Difference(key, "inputs", "", want["inputs"], got["inputs"], True,
                                    f"{key}: ran on other inputs than the baseline ({_inputs_change(want['inputs'], got['inputs'])}); "
                                    "numbers not compared; if intended, regenerate it with --update-baseline"))
            continue
        # (field, what it is, baseline value, fresh value, whether "absent" is a value of its own)
        metrics = [(name, f"{name} mIoU", value, got["targets"].get(name), False)
                   for name, value in (want.get("targets") or {}).items()]
        metrics.append(("average", "average mIoU", want.get("average_miou"), got["average_miou"], False))
        if "source_heldout" in want:
            metrics.append(("source_heldout", "held-out source mIoU", want["source_heldout"], got.get("source_heldout"), False))
        for target, classes in (want.get("per_class") or {}).items():
            # a class's IoU is null where the class was neither predicted nor labelled: predicting it is a change
            metrics += [(f"{target}/{cls}", f"{target} {cls} IoU", value, (got["per_class"].get(target) or {}).get(cls), True)
                        for cls, value in classes.items()]
        for field, label, old, new, absent_is_value in metrics:
            old_n, new_n = _number(old), _number(new)
            if old_n is None and not (absent_is_value and new_n is not None):
                continue
            if old_n is None or new_n is None:
                kind = "miou" if absent_is_value else "target_missing"
                diffs.append(Difference(key, kind, field, old, new, True,
                                        f"{key}: {label} {_iou(old_n)} → {_iou(new_n)}"))
                continue
            delta = new_n - old_n
            if abs(delta) > tolerance:
                direction = "dropped" if delta < 0 else "rose"
                diffs.append(Difference(key, "miou", field, old_n, new_n, True,
                                        f"{key}: {label} {direction} {_iou(old_n)} → {_iou(new_n)} ({_iou(delta, signed=True)}, "
                                        f"tolerance ±{tolerance:g})"))
        old_loss, new_loss = _number(want.get("final_loss")), _number(got.get("final_loss"))
        if old_loss is not None and (new_loss is None or abs(new_loss - old_loss) > tolerance_loss * abs(old_loss)):
            shown = "missing" if new_loss is None else f"{new_loss:.6f} ({(new_loss - old_loss) / abs(old_loss):+.1e} of it)"
            diffs.append(Difference(key, "loss", "final", old_loss, new_loss, True,
                                    f"{key}: last logged training loss {old_loss:.6f} → {shown}, tolerance "
                                    f"±{tolerance_loss:g} of it"))
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


def _iou(value: float | None, signed: bool = False) -> str:
    """Two decimals from 1 point up; four below, where the smoke runs' near-chance scores lie."""
    if value is None:
        return "absent"
    if signed and 0 < abs(value) < 1e-3:  # a move below the shown digits (an exact comparison's) still shows
        return f"{value:+.1e}"
    return f"{value:{'+' if signed else ''}.{4 if abs(value) < 1 else 2}f}"


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
                  environment: dict[str, Any] | None = None,
                  update_command: str = "python -m benchmarks check --update-baseline") -> str:
    """The readable verdict: what failed, what is only noted, and environment drift as context."""
    failing = [d for d in diffs if d.failing]
    notes = [d for d in diffs if not d.failing]
    tolerance = baseline.get("tolerance_miou", DEFAULT_TOLERANCE_MIOU)
    tolerance_loss = baseline.get("tolerance_loss_relative", DEFAULT_TOLERANCE_LOSS)
    lines = [f"compared {compared} run(s) with {len(baseline.get('runs', {}))} baseline run(s) "
             f"(IoU tolerance ±{tolerance:g} points, final loss ±{tolerance_loss:g} of itself, parameter counts exact)"]
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
        lines.append(f"if the change is intended, rewrite the baseline: {update_command}")
    else:
        lines.append("OK: no regression")
    return "\n".join(lines)


ENVIRONMENT_KEYS = ("python", "torch", "timm", "transformers", "peft", "numpy", "device_name")


def environment_drift(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)} → {new.get(k)}" for k in ENVIRONMENT_KEYS
            if k in old and k in new and old.get(k) != new.get(k)]
