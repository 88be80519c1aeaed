"""Result files as runs of protocols: which runs may share a table, and what their targets are called.

A protocol is (preset, setting, backbone, head) plus a fingerprint of every setting that can change the numbers
(`protocol_fingerprint`); runs of one protocol differ only by method and seed. The frames, tables and plots of
this package all group by it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from benchmarks.config import (
    ADDED_SETTINGS,
    CHOICES,
    HASHED_AT,
    NOT_HASHED,
    SETTINGS,
    available_presets,
    load_experiment,
    source_families,
    trained_precision,
    without_added_settings_at_their_old_behaviour,
)
from benchmarks.errors import UserError

#: Every target a table knows, in column order, with the papers' short header for it.
TARGET_LABELS = {"cityscapes": "Citys.", "bdd100k": "BDD", "mapillary": "Map.",
                 "acdc_fog": "Fog", "acdc_night": "Night", "acdc_rain": "Rain", "acdc_snow": "Snow",
                 "acdc": "ACDC (pooled)"}
#: The numeric frames' columns that name a protocol; grouping a frame by them gives `Protocol(*key)`.
PROTOCOL_COLUMNS = ["preset", "setting", "backbone", "head", "config"]

# Settings that cannot change a run's numbers (where files live, how many loader workers, how often
# to log) or that are a matrix axis the table already shows (seed, backbone). Two runs whose
# experiments differ only here belong to the same protocol. The device changes them through the
# precision `train.amp=auto` means on it, which `protocol_settings` puts in its place.
NON_PROTOCOL_KEYS: tuple[tuple[str, ...], ...] = (
    ("run",),
    ("preset",),
    ("train", "seed"),
    ("train", "device"),
    ("train", "eval_interval"),
    ("model", "backbone"),
    ("data", "root"),
    *NOT_HASHED,  # what leaves the run's own identity (workers, preflight, log and checkpoint cadence)
    *HASHED_AT,  # what is hashed at one value, since it changes no number (evaluation's windows a forward)
)


@dataclass(frozen=True, order=True)
class Protocol:
    """What must be equal for two runs' numbers to be comparable in one table."""

    preset: str
    setting: str
    backbone: str
    head: str
    fingerprint: str = ""
    #: What sets this configuration apart from the others of its base, e.g. "model.weights=[proxy_vit=random]".
    variant: str = field(default="", compare=False)

    @property
    def base(self) -> tuple[str, str, str, str]:
        return (self.preset, self.setting, self.backbone, self.head)

    @property
    def columns(self) -> dict[str, str]:
        """The protocol as the numeric frames' leading columns (`PROTOCOL_COLUMNS`)."""
        return {"preset": self.preset, "setting": self.setting, "backbone": self.backbone, "head": self.head,
                "config": self.fingerprint}

    @property
    def title(self) -> str:
        text = f"{self.setting} · {self.backbone} · {self.head} head · preset {self.preset}"
        if not self.fingerprint:
            return text
        return f"{text} · {self.variant} (config {self.fingerprint})" if self.variant else f"{text} · config {self.fingerprint}"

    @property
    def slug(self) -> str:
        raw = f"{self.preset}_{self.setting}_{self.backbone}_{self.head}_{self.fingerprint}".strip("_")
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in raw.replace("->", "2"))


def protocol_fingerprint(experiment: dict[str, Any] | None, loaded: dict[str, Any] | None = None,
                         device: str | None = None) -> str:
    """Short hash of the experiment without the settings in NON_PROTOCOL_KEYS ("" when unknown);
    `loaded` is the provenance record of the weights the run loaded, `device` the device it ran on, when the
    result has them."""
    if not experiment:
        return ""
    settings = protocol_settings(experiment, loaded, device)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def protocol_settings(experiment: dict[str, Any], loaded: dict[str, Any] | None = None,
                      device: str | None = None) -> dict[str, Any]:
    """The experiment as the fingerprint sees it: settings that cannot change the numbers removed,
    checkpoints named by content where the run recorded what it loaded, else by file name, settings added
    since results were first written dropped where they do what those results did, and with `device`
    `train.amp` as the precision it meant there ("auto" is bf16 on CUDA and fp32 on a CPU: `train.device` is
    not a protocol setting, the precision is)."""
    payload = without_added_settings_at_their_old_behaviour(experiment)
    train = payload.get("train")
    if device and isinstance(train, dict) and train.get("amp") in CHOICES["train.amp"]:
        train["amp"] = trained_precision(train["amp"], device.split(":")[0])
    model = payload.get("model")
    if isinstance(model, dict) and loaded and "sha256" in loaded:
        # Which checkpoint, not how it was named: the backbone's default file and the same file
        # passed as model.weights (from any folder) are one protocol; another file or random
        # initialisation is not.
        model["weights"] = [f"{loaded.get('backbone')}={_content_name(loaded.get('sha256'))}"]
    elif isinstance(model, dict) and model.get("weights"):
        # A result from before provenance existed: the same file in another folder (or on another
        # machine) is the same protocol.
        model["weights"] = sorted(_weights_identity(str(entry)) for entry in model["weights"])
    for path in NON_PROTOCOL_KEYS:
        node = payload
        for key in path[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return payload


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):  # an empty section sets nothing: no key (titles read "methods={}" beside its keys)
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _variant_labels(results: dict[str, dict[str, Any]], most: int = 3) -> dict[str, str]:
    """fingerprint → "key=value, ..." over the settings in which these configurations differ
    (`results`: one result of each configuration)."""
    flat = {fp: _flatten(protocol_settings(res.get("experiment") or {}, _loaded_weights(res), _device(res)))
            for fp, res in results.items()}
    keys = sorted({k for f in flat.values() for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]
    labels = {}
    for fp, settings in flat.items():
        # Where this configuration departs from its preset comes first: alphabetical order alone showed two
        # configurations the same three keys and hid the one that told them apart in "+3 more".
        departs = set(_departures(results[fp])[1])
        own = [k for k in differing if k in departs] + [k for k in differing if k not in departs]
        label = _settings_label(settings, own, most)
        labels[fp] = label if departs else "; ".join(part for part in ("the preset's settings", label) if part)
    return labels


def preset_departures(result: dict[str, Any], most: int = 3) -> str:
    """"key=value, ..." over the settings in which a run's experiment departs from its preset as the preset
    reads today, so a table of `--set` runs says so even alone; "" where it does not depart, or its preset is
    not one of the project's. A setting the result does not record is not counted (a file older than the
    setting), one the preset does not name is (a method's hyperparameter set for the run). Weights count by
    content, where the run recorded what it loaded and the preset means a file on this machine
    (`_preset_checkpoint`)."""
    ours, differing = _departures(result)
    return _settings_label(ours, sorted(differing), most) if differing else ""


def _departures(result: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the run's flattened settings, the keys in which they depart from its preset): `preset_departures`."""
    experiment, preset = result.get("experiment"), result.get("preset")
    if not experiment or preset not in available_presets():
        return {}, []
    loaded = _loaded_weights(result)
    ours = _flatten(protocol_settings(experiment, loaded))
    theirs = _preset_settings(str(preset))
    differing = [k for k in ours if k != "model.weights"
                 and json.dumps(ours[k], sort_keys=True) != json.dumps(theirs.get(k), sort_keys=True)]
    for (section, name), old in ADDED_SETTINGS.items():
        # A run at an added setting's old behaviour records it by leaving it out: where the preset now reads
        # otherwise (the paper preset's data.resize=cv2), the run departs from it all the same.
        key = f"{section}.{name}"
        if key not in ours and key in theirs and theirs[key] != old:
            ours[key] = old
            differing.append(key)
    if loaded and "sha256" in loaded:
        expected = _preset_checkpoint(str(preset), str(loaded.get("backbone")))
        if expected is not None and expected != _content_name(loaded["sha256"]):
            differing.append("model.weights")
    return ours, differing


@functools.cache
def _preset_settings(preset: str) -> dict[str, Any]:
    return _flatten(protocol_settings(load_experiment(preset).to_dict()))


@functools.cache
def _preset_checkpoint(preset: str, backbone: str) -> str | None:
    """The checkpoint the preset's runs of `backbone` load, named as a configuration label names it ("random"
    where the preset asks for random initialisation); None where the preset leaves the file to the user (a
    backbone that ships none) or the file it means is not on this machine: nothing to compare a run with."""
    from benchmarks.model import effective_weights, weights_for
    from benchmarks.provenance import file_sha256

    exp = load_experiment(preset)
    if weights_for(exp, backbone) == "random":
        return _content_name(None)
    try:
        path = effective_weights(exp, backbone)  # the file given, else the shipped default where it is present
    except UserError:  # a backbone this version does not register: nothing to compare with
        return None
    file = Path(path).expanduser() if path else None
    return _content_name(file_sha256(file)) if file is not None and file.is_file() else None


def _settings_label(settings: dict[str, Any], keys: list[str], most: int) -> str:
    def show(key: str) -> str:
        value = settings.get(key)
        if value is None:  # beside a method's variant, a configuration that left it alone ran the default
            value = _method_default(key)
        if value is None:
            return "unset"
        if isinstance(value, list):
            return "[" + ", ".join(map(str, value)) + "]"
        return str(value)

    parts = [f"{k}={show(k)}" for k in keys[:most]]
    return ", ".join(parts) + (f", +{len(keys) - most} more" if len(keys) > most else "")


def _method_default(key: str) -> Any:
    """The registered default of a method hyperparameter named as a flattened setting ("methods.vpt.num_prompts"
    → 150); None for any other key, an unknown method or a name the method does not have."""
    section, _, rest = key.partition(".")
    name, _, hyperparameter = rest.partition(".")
    if section != "methods":
        return None
    from benchmarks.method import available_methods, build_method

    if name not in available_methods():
        return None
    return build_method(name).hyperparameters().get(hyperparameter)


def _weights_identity(entry: str) -> str:
    """"BACKBONE=/any/folder/file.pth" → "BACKBONE=file.pth"; "BACKBONE=random" stays."""
    name, _, path = entry.partition("=")
    return f"{name}={PurePath(path).name or path}"


def _content_name(sha256: str | None) -> str:
    """A checkpoint as a configuration label names it. Not `provenance.short`: a label is a key (no
    ellipsis), and random initialisation is spelled as `model.weights` spells it, "random"."""
    return f"sha256:{sha256[:12]}" if sha256 else "random"


def _loaded_weights(result: dict[str, Any]) -> dict[str, Any] | None:
    """The provenance record of the weights a run loaded (None for a result written before provenance)."""
    record = result.get("provenance")
    return record.get("weights") if isinstance(record, dict) and isinstance(record.get("weights"), dict) else None


def _device(result: dict[str, Any]) -> str | None:
    """The device a run trained on, as its result records it (None for a result written before it did)."""
    environment = result.get("environment")
    device = environment.get("device") if isinstance(environment, dict) else None
    return str(device) if device else None


def protocol_of(result: dict[str, Any]) -> Protocol:
    return Protocol(
        preset=str(result.get("preset") or "?"),
        setting=str(result.get("setting") or "?"),
        backbone=str(result.get("backbone") or "?"),
        head=str(result.get("head") or "?"),
        fingerprint=protocol_fingerprint(result.get("experiment"), _loaded_weights(result), _device(result)),
    )


def method_name(result: dict[str, Any]) -> str:
    method = result.get("method")
    return str(method.get("name") if isinstance(method, dict) else method)


def method_role(result: dict[str, Any]) -> str:
    """The method's role in the comparison as its result records it; results written before the
    field existed take it from the registered method of that name (empty when none is)."""
    method = result.get("method")
    if isinstance(method, dict) and method.get("role"):
        return str(method["role"])
    from benchmarks.method import available_methods

    registered = available_methods().get(method_name(result))
    return registered.role if registered else ""


def group_results(results: Iterable[dict[str, Any]]) -> dict[Protocol, list[dict[str, Any]]]:
    """Results by protocol; fingerprints are kept only where a (preset, setting, backbone, head) holds more
    than one configuration or its one departs from the preset (`preset_departures`), so ordinary tables get
    short titles."""
    by_exact: dict[Protocol, list[dict[str, Any]]] = {}
    for res in results:
        by_exact.setdefault(protocol_of(res), []).append(res)
    fingerprints: dict[tuple[str, str, str, str], set[str]] = {}
    for proto in by_exact:
        fingerprints.setdefault(proto.base, set()).add(proto.fingerprint)
    labels: dict[str, str] = {}
    for base, prints in fingerprints.items():
        if len(prints) > 1:
            labels.update(_variant_labels({p.fingerprint: members[0]
                                           for p, members in by_exact.items() if p.base == base}))
    grouped: dict[Protocol, list[dict[str, Any]]] = {}
    for proto, members in by_exact.items():
        if len(fingerprints[proto.base]) == 1:
            departures = preset_departures(members[0])
            proto = dataclasses.replace(proto, variant=departures) if departures else Protocol(*proto.base)
        else:
            proto = dataclasses.replace(proto, variant=labels.get(proto.fingerprint, ""))
        grouped.setdefault(proto, []).extend(members)
    return dict(sorted(grouped.items()))


def split_runs(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(finished, unfinished) of one protocol, one result per (method, seed).

    A re-run replaces an earlier attempt: when a (method, seed) finished at least once, its failed
    attempts are stale and not listed; among several finished ones the latest is kept (`latest_runs` also
    gives the others, for the table to say).
    """
    finished, unfinished, _ = latest_runs(results)
    return finished, unfinished


def latest_runs(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], ...]:
    """`split_runs`'s (finished, unfinished), and the finished results a later finished run of the same
    (method, seed) replaces."""
    finished: dict[tuple[str, Any], dict[str, Any]] = {}
    unfinished: dict[tuple[str, Any], dict[str, Any]] = {}
    superseded: list[dict[str, Any]] = []
    for res in results:
        key = (method_name(res), res.get("seed"))
        if res.get("status") == "finished":
            if key not in finished or _finish_time(res) >= _finish_time(finished[key]):
                if key in finished:
                    superseded.append(finished[key])
                finished[key] = res
            else:
                superseded.append(res)
        elif key not in unfinished or _finish_time(res) >= _finish_time(unfinished[key]):
            unfinished[key] = res
    stale = [key for key in unfinished if key in finished]
    for key in stale:
        del unfinished[key]
    return list(finished.values()), list(unfinished.values()), superseded


def _finish_time(result: dict[str, Any]) -> str:
    timings = result.get("timings") or {}
    return str(timings.get("finished") or timings.get("started") or "")


def targets_of(setting: str, results: Iterable[dict[str, Any]]) -> list[str]:
    """The setting's targets in the papers' order, then any other target the runs scored."""
    ordered = list(SETTINGS.get(setting, ("", ()))[1])
    extra = sorted({t for res in results for t in (res.get("targets") or {})} - set(ordered))
    present = {t for res in results for t in (res.get("targets") or {})}
    return [t for t in ordered if t in present] + extra


def has_source_score(results: Iterable[dict[str, Any]]) -> bool:
    """Whether any run scored held-out source pairs (presets with data.source_holdout > 0)."""
    return any(res.get("source_heldout") for res in results)


def target_label(target: str) -> str:
    return TARGET_LABELS.get(target, target)


def source_label(setting: str) -> str:
    """The dataset a setting's held-out source pairs come from: the first of a joint source's."""
    source = source_families(SETTINGS.get(setting, ("source", ()))[0])[0]
    return {"gtav": "GTAV", "synthia": "SYNTHIA"}.get(source, target_label(source))
