"""`run`: train and score the matrix of methods on the preset's protocol, then print the table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from benchmarks.config import Experiment, load_experiment
from benchmarks.errors import UserError
from benchmarks.outputs import require_writable_folder

NAME = "run"
HELP = "train every chosen method on the source and score it on every target; print the leaderboard"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser)
    parser.add_argument("--methods", help="'all' (default: the preset's) or a comma-separated list, e.g. rein,lora")
    add_method_file_argument(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved protocol, the runs and parameter counts; touch no data")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_launcher_arguments(parser)


def add_method_file_argument(parser: argparse.ArgumentParser) -> None:
    """--method-file, on every command that takes --methods; benchmarks.cli loads the files before the command runs."""
    parser.add_argument("--method-file", dest="method_files", action="append", default=[], metavar="PATH.py",
                        help="a Python file registering a method of your own with @register_method (repeatable); "
                             "its methods then run like the built-in ones, 'all' included")


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launching (docs/scaling.md)")
    group.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: run here, one run after another (under torchrun: data-parallel); "
                            "slurm: submit one job per unfinished run through submitit")
    defaults = SLURM_DEFAULTS
    group.add_argument("--slurm-partition", default=defaults["slurm_partition"], help="slurm partition")
    group.add_argument("--slurm-account", default=defaults["slurm_account"], help="slurm account")
    group.add_argument("--slurm-constraint", default=defaults["slurm_constraint"], help="slurm constraint, e.g. a GPU type")
    group.add_argument("--slurm-time", type=int, default=defaults["slurm_time"], metavar="MINUTES",
                       help="time limit per job (default 1440)")
    group.add_argument("--slurm-nodes", type=int, default=defaults["slurm_nodes"], help="nodes per job (default 1)")
    group.add_argument("--slurm-gpus-per-node", type=int, default=defaults["slurm_gpus_per_node"],
                       help="GPUs per node, one task each (default 1)")
    group.add_argument("--slurm-cpus-per-task", type=int, default=defaults["slurm_cpus_per_task"],
                       help="CPU cores per task (default 8)")
    group.add_argument("--slurm-mem-gb", type=int, default=defaults["slurm_mem_gb"],
                       help="memory per node in GB (default: the partition's)")
    group.add_argument("--slurm-array-parallelism", type=int, default=defaults["slurm_array_parallelism"],
                       help="jobs running at once (default 32)")
    group.add_argument("--slurm-folder", default=defaults["slurm_folder"],
                       help="job scripts and logs (default <results dir>/.submitit)")
    group.add_argument("--slurm-cluster", default=defaults["slurm_cluster"], choices=("", "slurm", "local", "debug"),
                       metavar="{slurm,local,debug}",
                       help="where the jobs go: slurm (the default where sbatch exists); local: as processes on this "
                            "machine (submitit's local executor), on purpose, to try the launcher; debug: in this process")
    group.add_argument("--slurm-wait", action="store_true", help="wait for the jobs and print the leaderboard")


SLURM_DEFAULTS = {"slurm_partition": "", "slurm_account": "", "slurm_constraint": "", "slurm_time": 24 * 60,
                  "slurm_nodes": 1, "slurm_gpus_per_node": 1, "slurm_cpus_per_task": 8, "slurm_mem_gb": 0,
                  "slurm_array_parallelism": 32, "slurm_folder": "", "slurm_cluster": "", "slurm_wait": False}
# The least each count may be (memory 0: the partition's default).
SLURM_MINIMA = {"slurm_time": 1, "slurm_nodes": 1, "slurm_gpus_per_node": 1, "slurm_cpus_per_task": 1,
                "slurm_mem_gb": 0, "slurm_array_parallelism": 1}


def check_launch_options(args: argparse.Namespace) -> None:
    """Slurm options mean something only with `--launcher slurm`: given without it, the run would train here
    (on a login node, for an hour) with the options silently dropped. With it, counts must be positive."""
    def option(name: str) -> str:
        return "--" + name.replace("_", "-")

    if getattr(args, "launcher", "local") != "slurm":
        given = [name for name, default in SLURM_DEFAULTS.items() if getattr(args, name, default) != default]
        if given:
            raise UserError(f"{option(given[0])} is an option of --launcher slurm; add --launcher slurm to submit "
                            "the runs as jobs, or drop it to run here")
        return
    for name, least in SLURM_MINIMA.items():
        if getattr(args, name) < least:
            raise UserError(f"{option(name)} {getattr(args, name)}: must be at least {least}")
    if args.slurm_folder:
        require_writable_folder(args.slurm_folder, "--slurm-folder")


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every command that resolves an experiment shares."""
    parser.add_argument("--preset", default="proxy", help="smoke, proxy (default), paper, or a .toml file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set train.iters=2000 (repeatable)")
    parser.add_argument("--data-root", help="folder holding gta/, cityscapes/, bdd100k/, mapillary/ (sets data.root)")
    parser.add_argument("--weights", action="append", default=[], metavar="BACKBONE=PATH",
                        help="local weight file for a backbone, timm or original release format (repeatable)")
    parser.add_argument("--backbones", help="comma-separated backbones of the matrix (sets run.backbones)")
    parser.add_argument("--seeds", help="comma-separated seeds of the matrix (sets run.seeds)")
    parser.add_argument("--results-dir", help="where result files go (sets run.results_dir)")
    parser.add_argument("--num-workers", type=int, help="data-loader workers (sets data.num_workers; default: sized to "
                        "the machine, 1 on a CPU); intra-op threads follow OMP_NUM_THREADS when set")


def experiment_from_args(args: argparse.Namespace) -> Experiment:
    exp = load_experiment(args.preset, job_overrides(args))
    if getattr(args, "weights", None):
        exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, weights=tuple(exp.model.weights) + tuple(args.weights)))
    return exp


def run(args: argparse.Namespace) -> int:
    from benchmarks.runner import plan_runs, run_matrix

    check_launch_options(args)
    refuse_no_value("methods", args.methods)
    exp = experiment_from_args(args)
    if args.dry_run:
        print(describe(exp, args.methods))
        return 0
    specs = plan_runs(exp, args.methods)
    from benchmarks.model import check_buildable

    check_buildable(exp, tuple(dict.fromkeys(s.backbone for s in specs)), list(dict.fromkeys(s.method for s in specs)))
    results_dir = exp.resolve_path(exp.run.results_dir)
    # Before the data (maybe generated first) and any training: the first write is the first run's lock.
    require_writable_folder(results_dir, "--results-dir")
    log.info("preset %s: %d run(s), results under %s", exp.preset, len(specs), results_dir)
    if getattr(args, "launcher", "local") == "slurm":
        return submit(exp, args)
    from benchmarks import distributed

    world = distributed.init_distributed(exp.train.device)
    try:
        results = run_matrix(exp, args.methods, progress=not args.no_progress)
    finally:
        distributed.shutdown()
    if not world.is_main:
        return 0
    from benchmarks.reports.tables import leaderboard

    print(leaderboard(results, setting=None))
    failed = [r for r in results if r.get("status") != "finished"]
    return 1 if failed else 0


def submit(exp: Experiment, args: argparse.Namespace) -> int:
    from benchmarks.launchers import SlurmOptions, submit_matrix

    options = SlurmOptions(
        partition=args.slurm_partition, time_minutes=args.slurm_time, nodes=args.slurm_nodes,
        gpus_per_node=args.slurm_gpus_per_node, cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb,
        account=args.slurm_account, constraint=args.slurm_constraint, array_parallelism=args.slurm_array_parallelism,
        folder=args.slurm_folder, cluster=args.slurm_cluster,
    )
    overrides = job_overrides(args)
    jobs = submit_matrix(exp, args.preset, overrides, list(args.weights), args.methods, options, wait=args.slurm_wait)
    for job in jobs:
        print(job.job_id)
    if not args.slurm_wait:
        return 0
    from benchmarks.launchers import collect_results
    from benchmarks.reports.tables import leaderboard

    results, missing = collect_results(exp, args.methods)
    print(leaderboard(results, setting=None))
    if missing:
        log.error("%d run(s) have no result: %s", len(missing), ", ".join(
            f"{spec.method} {spec.backbone} seed {spec.seed}" for spec in missing))
    return 1 if missing or any(r.get("status") != "finished" for r in results) else 0


SHORTHAND_EXAMPLES = {"data_root": "data/", "backbones": "dinov2_vitl14", "seeds": "42,43,44",
                      "results_dir": "results/runs", "num_workers": "2", "methods": "rein,lora"}


def refuse_no_value(attr: str, value: object) -> None:
    """A matrix option given as nothing but commas and spaces is an unset shell variable, not a request for the
    preset's values (`--methods "$METHODS"` with the variable unset trained all 18 methods): one line."""
    if isinstance(value, str) and not value.replace(",", "").strip():
        option = "--" + attr.replace("_", "-")
        raise UserError(f"{option} is given with no value; give it one (e.g. {option} {SHORTHAND_EXAMPLES[attr]}) "
                        "or leave it out for the preset's")


def job_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides a job re-resolves the experiment from: --set plus the shorthands, as given."""
    overrides = list(args.overrides)
    shorthands = {"data_root": "data.root", "backbones": "run.backbones", "seeds": "run.seeds",
                  "results_dir": "run.results_dir", "num_workers": "data.num_workers"}
    for attr, key in shorthands.items():
        value = getattr(args, attr, None)
        refuse_no_value(attr, value)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}" if attr in ("data_root", "results_dir") else f"{key}={value}")
    return overrides


def describe(exp: Experiment, methods: str | None) -> str:
    """The resolved protocol and, per planned (backbone, method), the parameter counts.

    Models are built on the meta device: counting needs shapes, not memory or weights.
    """
    from benchmarks.model import reported_parameter_counts
    from benchmarks.runner import experiment_for, plan_runs

    lines = [f"# preset {exp.preset}", json.dumps(exp.to_dict(), indent=2), ""]
    specs = plan_runs(exp, methods)
    # Each run's own config hash, the one its result file is named by (the matrix's whole configuration, other
    # methods' settings included, names no file).
    lines.append(f"# {len(specs)} run(s)")
    header = (f"{'setting':8} {'backbone':22} {'method':14} {'seed':>5} {'backbone':>12} {'trainable':>12} {'added':>11} "
              f"{'head':>11}  config")
    lines.append(header)
    seen: dict[tuple[str, str], dict[str, int]] = {}
    for spec in specs:
        key = (spec.backbone, spec.method)
        if key not in seen:
            seen[key] = reported_parameter_counts(experiment_for(exp, spec), spec.method)
        c = seen[key]
        lines.append(
            f"{spec.setting:8} {spec.backbone:22} {spec.method:14} {spec.seed:>5} {c['backbone_pretrained']:>12,} "
            f"{c['backbone_trainable']:>12,} {c['backbone_added']:>11,} {c['head_total']:>11,}  "
            f"{experiment_for(exp, spec).config_hash()}"
        )
    return "\n".join(lines)
