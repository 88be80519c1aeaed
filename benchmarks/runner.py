"""The matrix: methods × backbones × seeds × settings, one result file per run.

Each run builds its model from the experiment (backbone ← method → head), trains on the source,
scores every target and writes one self-describing JSON atomically. A finished run is never run
again: its file is found by the run's identity (setting, backbone, method, seed, config hash).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import platform
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import plugins, provenance, resources
from benchmarks.config import (
    PROJECT_ROOT,
    SETTINGS,
    EvalConfig,
    Experiment,
    load_experiment,
    source_families,
    trained_precision,
)
from benchmarks.errors import JobCannotGoOn, UserError, user_line
from benchmarks.method import (
    Method,
    build_method,
    canonical_overrides,
    check_method_overrides,
    resolve_methods,
)
from benchmarks.model import NUM_CLASSES, build_model, effective_weights, weights_for
from benchmarks.results import (
    SCHEMA_VERSION,
    BadResultFile,
    load_result,
    read_result,
    set_aside,
    write_result,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    setting: str
    backbone: str
    method: str
    seed: int

    def run_id(self, exp: Experiment) -> str:
        return f"{exp.preset}/{self.setting}/{self.backbone}/{self.method}/seed{self.seed}-{exp.config_hash()}"

    def path(self, exp: Experiment, results_dir: Path) -> Path:
        setting = self.setting.replace("->", "_to_").replace("+", "_")
        return results_dir / exp.preset / setting / self.backbone / self.method / f"seed{self.seed}-{exp.config_hash()}.json"


def plan_runs(exp: Experiment, methods: str | None = None) -> list[RunSpec]:
    """The matrix's runs; refuses a setting, method table or weight file the matrix would not use."""
    names = resolve_methods(methods or exp.run.methods)
    check_method_overrides(exp.methods)
    _check_method_settings_used(exp, names)
    if not exp.run.settings:
        raise UserError(f"run.settings is empty: the matrix would hold no run; give one or more of {', '.join(SETTINGS)}")
    unknown = [s for s in exp.run.settings if s not in SETTINGS]
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r}; valid: {', '.join(SETTINGS)}")
    backbones = exp.run.backbones or (exp.model.backbone,)
    _check_weights_used(exp, backbones)
    seeds = exp.run.seeds or (exp.train.seed,)
    return [RunSpec(s, b, m, seed) for s in exp.run.settings for b in backbones for seed in seeds for m in names]


def _check_method_settings_used(exp: Experiment, names: list[str]) -> None:
    """A `methods.NAME` setting for a method the matrix does not run would be ignored, and would still change
    every run's identity (the experiment is hashed whole): refuse it. A table the preset itself holds (the
    smoke preset's `[methods.fishertune]`) is not the user's setting and stays, as it is."""
    try:
        preset_tables = load_experiment(exp.preset).methods
    except UserError:  # a preset file named by path: its own tables cannot be told apart, so none is refused
        return
    for name in sorted(set(exp.methods) - set(names)):
        if exp.methods[name] != preset_tables.get(name):
            raise UserError(f"methods.{name}: method {name!r} is not in this run (methods: {', '.join(names)}); "
                            "add it with --methods, or drop the setting")


def _check_weights_used(exp: Experiment, backbones: tuple[str, ...]) -> None:
    """A weight file for a backbone the matrix does not run would be silently ignored: refuse it."""
    for entry in exp.model.weights:
        name, sep, path = entry.partition("=")
        if not sep or not path:
            raise UserError(f"model.weights entry {entry!r} must look like BACKBONE=PATH")
        if name not in backbones:
            raise UserError(
                f"--weights {entry}: backbone {name!r} is not in this run (backbones: {', '.join(backbones)}); "
                "name one of them, or add it with --backbones"
            )


def check_weights_given(exp: Experiment, specs: list[RunSpec]) -> None:
    """Training from random initialisation is asked for by name, never fallen into: a backbone with no
    weight file given and none shipped is refused unless given as BACKBONE=random (which the result's
    experiment then records, and the table's title shows)."""
    for backbone in sorted({spec.backbone for spec in specs}):
        if weights_for(exp, backbone) is None and effective_weights(exp, backbone) is None:
            raise UserError(
                f"backbone {backbone} has no weights: pass --weights {backbone}=PATH (its pretrained checkpoint), "
                f"or --weights {backbone}=random to train it from random initialisation on purpose"
            )


def experiment_for(exp: Experiment, spec: RunSpec) -> Experiment:
    """The experiment one run executes: the matrix coordinates written into the config it saves, with only
    what this run uses of the matrix's per-method and per-backbone settings (another method's table or another
    backbone's weight file, there for its own runs, would change this run's identity), its method's settings
    as the code reads them (typed, a value equal to its default left out, as if not given)."""
    weights = tuple(entry for entry in exp.model.weights if entry.partition("=")[0] == spec.backbone)
    own = canonical_overrides(spec.method, exp.methods.get(spec.method) or {})
    return dataclasses.replace(
        exp,
        model=dataclasses.replace(exp.model, backbone=spec.backbone, weights=weights),
        train=dataclasses.replace(exp.train, seed=spec.seed),
        methods={spec.method: own} if own else {},
    )


# -- environment ------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        **resources.package_versions(),
        "device": str(device),
        "device_name": resources.device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        **provenance.code_state(PROJECT_ROOT),
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- one run: the protocol's stages ------------------------------------------------------------------
@dataclass
class RunData:
    """What a run reads: the source stream, the targets, the held-out source pairs (or None)."""

    root: Path
    source: Any
    targets: dict[str, Any]
    heldout: Any | None
    read: dict[str, Any]
    """Every split by role, as read from disk (before any sharding): what the provenance names."""


@dataclass
class RunContext:
    """Where and how one run executes."""

    spec: RunSpec
    exp: Experiment
    path: Path
    world: Any
    device: torch.device
    progress: bool
    evaluation: EvalConfig
    """`exp.eval` as the method is scored with it (`Method.evaluation_settings`)."""


def execute_run(spec: RunSpec, exp: Experiment, results_dir: Path, progress: bool = True) -> dict[str, Any]:
    """One run, stage by stage: data → model → train → evaluate → result file."""
    from benchmarks import distributed
    from benchmarks.protocol import TrainingDiverged, autocast_dtype, select_device

    exp = experiment_for(exp, spec)
    world = distributed.current()
    method = build_method(spec.method, exp.methods.get(spec.method))
    if world.is_main and (split := split_batch_warning(method, exp.train.batch_size, world.world_size,
                                                       exp.train.grad_accum)):
        log.warning("%s: %s", spec.run_id(exp), split)
    run = RunContext(spec, exp, spec.path(exp, results_dir), world,
                     distributed.device_for(world, select_device(exp.train.device)), progress and world.is_main,
                     method.evaluation_settings(exp.eval))
    cpu_plan = resources.plan(exp.data.num_workers, run.device.type)
    resources.apply(cpu_plan)
    result = _new_result(run, method, cpu_plan)
    data = _read_data(run)
    amp = autocast_dtype(exp.train.amp, run.device)
    try:
        # Inside: a method that fails to attach on the real device (the pre-flight built it on the meta
        # device) is this run's failure, not the matrix's end.
        model, state, optimizer_state = _build_and_resume(run, method, data, result)
        state = _train(run, model, method, data, amp, result, state, optimizer_state, cpu_plan.workers)
        scores, source_score, eval_seconds = _score(run, model, data, amp)
    except UserError as err:
        if world.world_size > 1:  # its peers fail next, in a collective: the record must name this cause
            result.update(status="failed", failure=next(iter(user_line(err).splitlines()), "UserError"))
            result["timings"]["finished"] = _now()
            _record_the_crash_of_one_process(run, result)
        raise
    except Exception as err:  # recorded as failed so the rest of the matrix runs and the table says why
        reason = str(err) if isinstance(err, TrainingDiverged) else f"{type(err).__name__}: {err}"
        if not isinstance(err, TrainingDiverged):
            log.error("run %s crashed:\n%s", result["run_id"], traceback.format_exc())
        result.update(status="failed", failure=reason.splitlines()[0] if reason else type(err).__name__)
        result["timings"]["finished"] = _now()
        if world.world_size > 1 and not isinstance(err, TrainingDiverged):  # divergence is seen by every rank
            _record_the_crash_of_one_process(run, result)
            raise JobCannotGoOn(
                f"{result['run_id']} crashed in process {world.rank} of {world.world_size} ({result['failure']}); "
                f"the other processes cannot go on with the matrix, so the job ends here (recorded in {run.path}); "
                "run the same command again to resume from the last checkpoint") from err
        if world.is_main:  # the last good checkpoint is kept: a re-run resumes from it
            write_result(run.path, result)
        return result
    _record(run, method, model, amp, state, scores, source_score, eval_seconds, result)
    return result


def split_batch_warning(method: Method, batch_size: int, world_size: int, grad_accum: int) -> str | None:
    """What a step split over processes or micro-batches changes for a method whose images interact, or whose
    output depends on the batch's layout: each forward pass holds `batch_size` images, so such a method
    computes something else than one process with the whole step's batch (elsewhere only the loss's
    weighing differs, docs/scaling.md)."""
    if not (method.couples_batch or method.depends_on_batch_layout) or world_size * grad_accum == 1:
        return None
    how = ("couples the images of one forward pass" if method.couples_batch else
           "computes an image's output by the batch's size and the image's place in it")
    return (f"{method.name} {how}, and this step is split over {world_size} "
            f"process(es) × grad_accum {grad_accum}: each forward holds {batch_size} image(s), not the step's "
            f"{batch_size * world_size * grad_accum}, which changes what it computes (not only the loss's weighing); "
            f"for the method as released, give the whole batch to one forward (train.batch_size, one process)")


def _record_the_crash_of_one_process(run: RunContext, result: dict[str, Any]) -> None:
    """Write a multi-process run's failure from whichever process crashed, unless another process of this
    attempt recorded it first: a process whose peer crashed fails next, in a collective, with a broken
    connection for a reason, and must not overwrite the crash that caused it. (The crashing process writes
    before it exits, and its peers see the broken connection only once it has exited.)"""
    result["failure_rank"] = run.world.rank
    earlier = read_result(run.path)  # None where there is none, or a damaged one (replaced)
    recorded_this_attempt = (earlier is not None and earlier.get("status") == "failed"
                             and "failure_rank" in earlier
                             and str(earlier.get("timings", {}).get("finished", "")) >= result["timings"]["started"])
    if not recorded_this_attempt:
        write_result(run.path, result)


def _new_result(run: RunContext, method: Method, cpu_plan: Any) -> dict[str, Any]:
    exp, spec, world = run.exp, run.spec, run.world
    return {
        "schema": SCHEMA_VERSION,
        "run_id": spec.run_id(exp),
        "status": "running",
        "failure": None,
        "preset": exp.preset,
        "setting": spec.setting,
        "source": SETTINGS[spec.setting][0],
        "method": {"name": method.name, "paper": method.paper, "role": method.role,
                   "hyperparameters": method.hyperparameters()},
        "backbone": spec.backbone,
        "head": exp.model.head,
        "seed": spec.seed,
        "experiment": exp.to_dict(),
        "config_hash": exp.config_hash(),
        # The learning rate is not scaled with the world size (the reference recipe is single-GPU).
        "batch": {
            "per_device": exp.train.batch_size,
            "world_size": world.world_size,
            "grad_accum": exp.train.grad_accum,
            "effective": exp.train.batch_size * world.world_size * exp.train.grad_accum,
            "lr": exp.train.lr,
            "lr_scaled_with_batch": False,
        },
        "environment": {**environment(run.device), "loader_workers": cpu_plan.workers, "cpu_plan": cpu_plan.reason},
        "timings": {"started": _now()},
        # What the numbers are of: the model after the last iteration ("final"), or the average of its
        # weights a method declares ("ema", set once training has formed it); the targets are scored once,
        # after training; no checkpoint is chosen by any score (evaluations during training are source-only).
        "model_selection": "final",
        # Windows per forward pass in evaluation: the protocol's, or 1 for a method whose batch members interact.
        "eval_batch_windows": run.evaluation.batch_windows,
    }


def _read_data(run: RunContext) -> RunData:
    """The splits the run reads, checked before the first step (`data.preflight`)."""
    from benchmarks import distributed
    from benchmarks.data import ensure_data_root, preflight

    exp, world = run.exp, run.world
    root = ensure_data_root(exp)
    source_set, target_sets, heldout_set, read = _splits_read(exp, run.spec.setting, root)
    preflight(exp, read)
    if world.is_distributed:  # each rank scores its own strided shard; the confusion matrix is summed
        from torch.utils.data import Subset

        target_sets = {name: Subset(ds, distributed.shard_indices(len(ds), world)) for name, ds in target_sets.items()}
        if heldout_set is not None:
            heldout_set = Subset(heldout_set, distributed.shard_indices(len(heldout_set), world))
    return RunData(root, source_set, target_sets, heldout_set, read)


def _splits_read(exp: Experiment, setting: str, root: Path) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """(source, targets, held-out source or None, every split by the role its provenance names it)."""
    from benchmarks.data import source_dataset, source_heldout_dataset, target_dataset, training_splits

    source, targets = SETTINGS[setting]
    source_set = source_dataset(exp, source, root)
    target_sets = {name: target_dataset(exp, name, root) for name in targets}
    heldout_set = source_heldout_dataset(exp, source, root)
    read = {**training_splits(source, source_set), **target_sets,
            **({f"{source_families(source)[0]} (held out)": heldout_set} if heldout_set is not None else {})}
    return source_set, target_sets, heldout_set, read


# The data fingerprints of this matrix, by (root, setting, data settings): a matrix of finished runs lists and
# stats a dataset once, not once per run (2 s a run for a GTAV of the real size). Cleared by `run_matrix`.
_DATA_SEEN: dict[tuple[str, str, str], dict[str, Any] | None] = {}


def _data_now(exp: Experiment, spec: RunSpec) -> dict[str, Any] | None:
    """The fingerprint of the data a run would read now (file names and sizes: no image is decoded), to hold a
    finished result against; None where the data is not there to compare (nothing is generated for a skip)."""
    root = exp.resolve_path(exp.data.root)
    key = (str(root), spec.setting, json.dumps(dataclasses.asdict(exp.data), sort_keys=True, default=str))
    if key not in _DATA_SEEN:
        try:
            read = _splits_read(exp, spec.setting, root)[3] if root.is_dir() else None
        except UserError:
            read = None
        _DATA_SEEN[key] = None if read is None else {role: provenance.split_record(dataset.pairs, root)
                                                     for role, dataset in read.items()}
    return _DATA_SEEN[key]


def _data_changed_since(result: dict[str, Any] | None, exp: Experiment, spec: RunSpec) -> str | None:
    """How the data a finished result read differs from what a run would read now, if it does."""
    data = _data_now(exp, spec)
    recorded = (result or {}).get("provenance") or {}
    if data is None or "data" not in recorded:
        return None
    return "; ".join(provenance.differences({"data": recorded["data"]}, {"data": data})) or None


def _build_and_resume(run: RunContext, method: Method, data: RunData, result: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The model (seeded: the same head for every method), its provenance, and the run's checkpoint if
    one exists and was trained on the same files: (model, train state or None, optimiser state or None)."""
    from benchmarks import checkpoint
    from benchmarks.memory import reset_peak_memory
    from benchmarks.protocol import seed_everything

    exp, spec = run.exp, run.spec
    reset_peak_memory(run.device)  # this run's peak, not an earlier run's in the same process
    seed_everything(spec.seed)
    model = build_model(exp, method)
    result["params"] = method.parameter_counts(model)
    result["provenance"] = {  # after the build, which has refused a missing or unusable weight file
        **_model_files(exp, spec, run.world.world_size),
        "data": {role: provenance.split_record(ds.pairs, data.root) for role, ds in data.read.items()},
    }
    # After the build (which draws from the RNG): a resumed run continues the saved RNG streams.
    resumed = checkpoint.find_checkpoint(run.path, exp.config_hash(), run.world.world_size)
    if not resumed:
        return model, None, None
    changed = provenance.differences(resumed.get("provenance"), result["provenance"])
    if changed:
        raise UserError(
            f"cannot resume {resumed['path']}: it was trained with other files or settings ({'; '.join(changed)}); "
            f"restore them, or delete {checkpoint.checkpoint_dir(run.path)} to train afresh with these"
        )
    state, optimizer_state = checkpoint.restore(resumed, model, method, run.world.rank)
    result["resumed_from_iter"] = state.step
    _follow_the_code_across_the_resume(result, resumed.get("code"), state.step, resumed["path"])
    return model, state, optimizer_state


def _follow_the_code_across_the_resume(result: dict[str, Any], saved: dict[str, Any] | None, step: int,
                                       path: Path) -> None:
    """A checkpoint written by other code (another commit, other uncommitted edits, other package versions) is
    resumed, as a fix pulled between two sessions should not cost a run, but said in a warning and recorded
    under the result's `environment.earlier_code`, iterations included: the result named only the code that
    finished it. A checkpoint from before the code was recorded says nothing."""
    if not saved:
        return
    now = provenance.code_identity(result["environment"])
    earlier = list(saved.get("earlier") or [])
    since = int(saved.get("since_iter") or 0)
    if saved.get("identity") != now:
        earlier.append({**(saved.get("identity") or {}), "from_iter": since, "until_iter": step})
        changed = [key for key in ("git_commit", "git_dirty_sha256", "packages")
                   if (saved.get("identity") or {}).get(key) != now[key]]
        log.warning("%s: resuming %s, written by other code (%s differ) at iterations %d-%d; the result records both",
                    result["run_id"], path, ", ".join(changed), since, step)
        since = step
    if earlier:
        result["environment"]["earlier_code"] = earlier
        result["environment"]["code_since_iter"] = since


def _code_record(result: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of the code that trained it (`_follow_the_code_across_the_resume`)."""
    environment = result["environment"]
    return {"identity": provenance.code_identity(environment), "since_iter": environment.get("code_since_iter", 0),
            "earlier": environment.get("earlier_code", [])}


def _train(run: RunContext, model: Any, method: Method, data: RunData, amp: Any, result: dict[str, Any],
           state: Any, optimizer_state: Any, workers: int) -> Any:
    """The protocol's training, with its two hooks: source-only evaluation and checkpoints."""
    from benchmarks import checkpoint, distributed
    from benchmarks.protocol import TrainHooks, evaluate, train

    exp, world = run.exp, run.world

    def score_source_heldout(step: int) -> float:
        """Evaluation during training sees held-out source pairs only: a target scored before the end
        could select the model on the unseen domains, which domain generalisation forbids."""
        return evaluate(model, data.heldout, run.evaluation, run.device, NUM_CLASSES, amp)["miou"]

    def save_checkpoint(train_state, optimizer) -> None:
        rng_states = distributed.gather_objects(checkpoint.rng_state())
        if world.is_main:
            checkpoint.save_checkpoint(
                run.path, model=model, optimizer=optimizer, train_state=train_state, method_state=method.state_dict(),
                config_hash=exp.config_hash(), world_size=world.world_size, rng_states=rng_states,
                provenance=result["provenance"], with_optimizer_state=train_state.step < exp.train.iters,
                code=_code_record(result),
            )
        distributed.barrier()

    watch = resources.wait_policy_watch(run.device.type, world.world_size)

    def restart_if_the_load_changed() -> BaseException | None:
        restart = watch.restart_due()
        if restart is not None and restart.passive:
            log.warning("other work now shares the CPU cores, and this process's OpenMP threads spin (chosen on an "
                        "idle machine): saving %s's checkpoint to go on with passive waiting", result["run_id"])
        elif restart is not None:
            log.warning("the other work this process's OpenMP threads waited passively for has gone: saving %s's "
                        "checkpoint to go on with spinning threads, faster on an idle machine", result["run_id"])
        return restart

    hooks = TrainHooks(evaluate=score_source_heldout if data.heldout is not None else None, checkpoint=save_checkpoint,
                       interrupt=restart_if_the_load_changed if watch is not None else None)
    return train(model, method, data.source, exp, run.device, state=state, optimizer_state=optimizer_state,
                 hooks=hooks, progress=run.progress, num_workers=workers)


def _score(run: RunContext, model: Any, data: RunData, amp: Any) -> tuple[dict[str, Any], dict[str, Any] | None, float]:
    """Every target once, after training; then the held-out source (outside the timed target scoring,
    whose throughput the profile reports)."""
    from benchmarks import distributed
    from benchmarks.protocol import evaluate
    from datasets.labels import CLASSES

    device = run.device
    started = time.perf_counter()
    scores = {name: evaluate(model, ds, run.evaluation, device, NUM_CLASSES, amp, class_names=CLASSES,
                             progress=run.progress, desc=name)
              for name, ds in data.targets.items()}
    for score in scores.values():
        score["num_images"] = int(distributed.all_reduce_sum(score["num_images"], device))
    eval_seconds = time.perf_counter() - started
    source_score = None
    if data.heldout is not None:
        source = source_families(SETTINGS[run.spec.setting][0])[0]
        source_score = evaluate(model, data.heldout, run.evaluation, device, NUM_CLASSES, amp, class_names=CLASSES,
                                progress=run.progress, desc=f"{source} (held out)")
        source_score["num_images"] = int(distributed.all_reduce_sum(source_score["num_images"], device))
        source_score.pop("images_per_s", None)
    return scores, source_score, eval_seconds


def _record(run: RunContext, method: Method, model: Any, amp: Any, state: Any, scores: dict[str, Any],
            source_score: dict[str, Any] | None, eval_seconds: float, result: dict[str, Any]) -> None:
    """The finished result, written atomically; the checkpoint goes once the result holds everything."""
    from benchmarks import checkpoint, distributed
    from benchmarks.flops import run_profile_extras

    exp, world = run.exp, run.world
    images_seen = state.step * exp.train.batch_size * exp.train.grad_accum * world.world_size
    stray = {"train": state.stray_label_pixels, **{name: s.pop("stray_label_pixels") for name, s in scores.items()}}
    if source_score is not None:
        stray["source_heldout"] = source_score.pop("stray_label_pixels")
    # Each process counted its own batches and its shard of each target: the run's count is their sum.
    stray = {name: int(distributed.all_reduce_sum(count, run.device)) for name, count in stray.items()}
    if any(stray.values()):
        log.warning("%s: label pixels outside their encoding were ignored (255): %s; `python -m benchmarks data check` "
                    "names the files", result["run_id"], ", ".join(f"{k} {v:,}" for k, v in stray.items() if v))
    result.update(
        status="finished",
        params=method.parameter_counts(model),  # after training: phased methods may have changed what trains
        model_selection=state.model_selection,
        targets={name: {k: v for k, v in s.items() if k != "images_per_s"} for name, s in scores.items()},
        average_miou=sum(s["miou"] for s in scores.values()) / len(scores),
        source_heldout=source_score,
        history=state.history,
        evaluations=state.evaluations,
        diagnostics=method.diagnostics(),
        stray_label_pixels=stray,
        profile={
            "train_images_per_s": images_seen / state.train_seconds if state.train_seconds else None,
            "eval_images_per_s": sum(s["num_images"] for s in scores.values()) / eval_seconds if eval_seconds else None,
            "peak_memory_mb": _peak_memory_mb(run.device),
            "eval_seconds_per_image": {name: 1.0 / s["images_per_s"] if s.get("images_per_s") else None
                                       for name, s in scores.items()},
            "device": str(run.device),
            "world_size": world.world_size,  # the images/s are the whole job's, over this many devices
            "dtype": str(amp).replace("torch.", "") if amp else "float32",
        },
    )
    result["profile"].update(run_profile_extras(exp, run.spec.method, result["profile"]))
    result["timings"].update(finished=_now(), train_s=state.train_seconds, data_wait_s=state.data_wait_seconds,
                             eval_s=eval_seconds)
    if world.is_main:
        _write_final_result(run.path, result)
        checkpoint.remove_checkpoint(run.path)  # the result holds everything worth keeping
    distributed.barrier()


def _write_final_result(path: Path, result: dict[str, Any]) -> None:
    """The result, or one line saying what survived when it cannot be written (a full disk)."""
    from benchmarks import checkpoint

    try:
        write_result(path, result)
    except UserError as err:
        kept = checkpoint.checkpoint_file(path)
        survives = (f"the re-run resumes from the checkpoint {kept}" if kept.is_file()
                    else "the run trained too briefly to checkpoint, so the re-run trains it again")
        raise UserError(f"{err}; {survives}") from None


def _peak_memory_mb(device: torch.device) -> float:
    from benchmarks.memory import peak_memory

    return peak_memory(device)["peak_memory_mb"]


def run_one(spec: RunSpec, exp: Experiment, results_dir: Path, progress: bool = True) -> dict[str, Any] | None:
    """One run under its lock: the earlier result if finished, None if another live runner holds it.

    Under torchrun rank 0 decides and every rank follows, so all ranks run or skip together.
    """
    from benchmarks import checkpoint, distributed
    from benchmarks.locking import RunLock

    world = distributed.current()
    run_exp = experiment_for(exp, spec)
    path, run_id = spec.path(run_exp, results_dir), spec.run_id(run_exp)
    lock = RunLock(path)
    decision = "run"
    existing = None
    if world.is_main:
        try:
            existing = load_result(path)
        except BadResultFile:
            existing = None  # reported and set aside below, under the lock, once
        if existing and existing["status"] == "finished":
            decision = "finished"
            if checkpoint.checkpoint_dir(path).exists() and lock.acquire():
                # A run killed between writing its result and removing its checkpoint (1.2 GB for a fully
                # fine-tuned ViT-L) left it, and its lock, behind: nothing will resume from them.
                checkpoint.remove_checkpoint(path)
                lock.release()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                acquired = lock.acquire()
            except UserError:
                _prune_empty_dirs(path.parent, results_dir)
                raise
            if not acquired:
                decision = "locked"
            else:
                # Another runner may have finished it between our check and our lock.
                existing = _earlier_result_under_lock(path)
                if existing and existing["status"] == "finished":
                    lock.release()
                    decision = "finished"
    if world.is_main and decision == "finished":  # `existing`: the finished result, as read above
        now = _model_files(run_exp, spec, world.world_size)
        changed = _inputs_changed_since(existing, now)
        decision = f"changed:{changed}" if changed else decision
        if not changed and (other_data := _data_changed_since(existing, run_exp, spec)):
            # Warned, not refused: a Mapillary val halved once (`data convert mapillary-half`) after the run is
            # other files holding the same pixels, and the user knows which it is.
            log.warning("%s: finished earlier on other data files than a run would read now (%s); kept and shown "
                        "as it is: move %s away to run on these", run_id, other_data, path)
        if not changed and (other_code := provenance.source_differences(existing.get("provenance"), now)):
            log.warning("%s: finished earlier by another version of the method's code (%s); kept and shown as it "
                        "is: move %s away to run with this code", run_id, other_code, path)
    decision = distributed.broadcast_object(decision)
    if decision.startswith("changed:"):
        refuse_finished_result_of_other_inputs(path, decision.removeprefix("changed:"))
    if decision == "finished":
        log.info("%s: finished earlier, skipped (%s)", run_id, path)
        return existing if world.is_main else read_result(path)
    if decision == "locked":
        log.warning("%s: locked by %s (%s), skipped", run_id, lock.describe_owner(), lock.path)
        return None
    try:
        return execute_run(spec, exp, results_dir, progress=progress)
    except UserError:
        if world.is_main:
            lock.release()
            _prune_empty_dirs(path.parent, results_dir)
        raise
    finally:
        lock.release()


def _earlier_result_under_lock(path: Path) -> dict[str, Any] | None:
    """The run's earlier result; a damaged one is set aside rather than overwritten by the re-run."""
    try:
        return load_result(path)
    except BadResultFile as err:
        kept = set_aside(path)
        log.warning("%s: %s; kept as %s, running it again", path, err, kept)
        return None


def _inputs_changed_since(result: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """How the backbone's weight file, or the file defining a `--method-file` method, differs from the one
    a finished result was made with, if either does (`now`: `_model_files` of the run; made with
    `processes=None`, on a submitting node, which knows neither the job's device nor its processes, the
    files and hyperparameters alone are compared).

    The config hash names settings, not file contents: without this, a result trained from an older
    checkpoint or an edited method would be skipped as "finished" and shown beside results of the new one.
    (The data is held against the result apart, `_data_changed_since`, and warned of.)
    """
    # Only what both records hold is compared: a result from before provenance was recorded differs in nothing.
    changed = provenance.differences((result or {}).get("provenance"), now)
    return "; ".join(changed) or None


def finished_result_of_other_inputs(result: dict[str, Any], exp: Experiment, spec: RunSpec) -> str | None:
    """For a launcher that skips finished runs before any job runs: how the result's weights, method file or
    method hyperparameters differ from the ones a run would use now (None: they do not)."""
    return _inputs_changed_since(result, _model_files(exp, spec, processes=None))


def refuse_finished_result_of_other_inputs(path: Path, changed: str) -> None:
    raise UserError(f"{path} finished from other files or settings ({changed}); pass another --results-dir to run "
                    "with these, or move the old result away")


def _model_files(exp: Experiment, spec: RunSpec, processes: int | None) -> dict[str, Any]:
    """The provenance of what a run's model is made from: the backbone's weights, for a method from outside
    the repository its file and sha256 or its distribution, and the recipe the config hash leaves to the code
    and the machine."""
    from benchmarks.protocol import select_device

    method = build_method(spec.method, exp.methods.get(spec.method))
    record: dict[str, Any] = {"weights": provenance.weights_record(spec.backbone, effective_weights(exp, spec.backbone))}
    if origin := plugins.method_origin(spec.method):
        record["method"] = origin
    else:  # a built-in method: its file, held against a finished run in a warning (`run_one`)
        record["method_source"] = provenance.source_record(type(method), PROJECT_ROOT)
    # What the config hash does not name but the numbers follow: the method's hyperparameters as its code
    # resolves them (a default changed in the code keeps the hash), the precision `train.amp` means on this
    # machine's device ("auto": bf16 on CUDA, fp32 on a CPU) and the processes, whose count multiplies the batch.
    record["recipe"] = {"hyperparameters": json.loads(json.dumps(method.hyperparameters(), default=str))}
    if processes is not None:
        record["recipe"].update(precision=trained_precision(exp.train.amp, select_device(exp.train.device).type),
                                processes=processes)
    return record


def _prune_empty_dirs(folder: Path, stop: Path) -> None:
    """Remove the folders a refused run created, up to (and including) an empty results dir."""
    folder, stop = folder.resolve(), stop.resolve()
    while folder == stop or stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == stop:
            return
        folder = folder.parent


def run_matrix(
    exp: Experiment, methods: str | None = None, results_dir: Path | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Runs every planned run not already finished; returns all the matrix's results.

    Runs another live runner holds are skipped and listed at the end (their results come from it).
    """
    results_dir = results_dir or exp.resolve_path(exp.run.results_dir)
    specs = plan_runs(exp, methods)
    check_weights_given(exp, specs)
    _DATA_SEEN.clear()  # fingerprints of this matrix's data, not of an earlier matrix's in the same process
    results = []
    skipped = []
    for number, spec in enumerate(specs, 1):
        log.info("[%d/%d] %s %s %s seed %d", number, len(specs), spec.setting, spec.backbone, spec.method, spec.seed)
        result = run_one(spec, exp, results_dir, progress=progress)
        if result is None:
            skipped.append(spec.run_id(experiment_for(exp, spec)))
        else:
            results.append(result)
    if skipped:
        log.warning("%d run(s) skipped, held by other runners: %s", len(skipped), ", ".join(skipped))
    return results
