"""Bad input to `python -m benchmarks run`: one clear line on stderr, exit code 2, nothing written.

Each case runs twice: through `benchmarks.cli.main` in this process (fast, by default) and as a
real `python -m benchmarks` subprocess (the exit code and stderr the user sees; marked slow, as
eleven interpreters importing torch take minutes on two shared cores). The subprocesses are
started together and awaited together.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import error_line, run_cli

ROOT = Path(__file__).resolve().parent.parent
MARKER_NAME = "pickle-payload-ran"


class _Payload:
    """Unpickling this would create the marker file: proof that code in the file was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_malicious(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump({"format": 1, "model": _Payload(marker)}, handle, protocol=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from datasets.synthetic import generate_world

    root = tmp_path_factory.mktemp("world") / "synthetic"
    generate_world(root, size="tiny")
    return root


def _case_dirs(base: Path, name: str) -> tuple[Path, Path]:
    case = base / name
    case.mkdir(parents=True)
    return case, case / "results"


@pytest.fixture(scope="module", params=["inprocess", pytest.param("subprocess", marks=pytest.mark.slow)])
def outcomes(request, world, tmp_path_factory):
    """Runs every bad-input case; returns {case: (returncode, stderr, results_dir, case_dir)}."""
    from safetensors.torch import save_file

    from benchmarks.config import load_experiment
    from benchmarks.runner import RunSpec, experiment_for

    base = tmp_path_factory.mktemp("bad")
    smoke = ["--preset", "smoke", "--methods", "full", "--data-root", str(world), "--no-progress", "--set", "train.iters=2"]
    cases: dict[str, list[str]] = {}
    dirs: dict[str, tuple[Path, Path]] = {}

    def add(name: str, args: list[str]) -> Path:
        case, results = _case_dirs(base, name)
        dirs[name] = (case, results)
        cases[name] = [*args, "--results-dir", str(results)]
        return case

    add("unknown_method", [*smoke[:2], "--methods", "no_such_method", *smoke[4:]])
    add("unknown_backbone", [*smoke, "--backbones", "no_such_vit"])
    add("unknown_preset", ["--preset", "no_such_preset", "--methods", "full"])
    add("override_without_equals", [*smoke, "--set", "train.iters"])
    add("override_unknown_key", [*smoke, "--set", "train.no_such_key=1"])
    add("override_wrong_type", [*smoke, "--set", "train.iters=many"])
    case = add("missing_weights", [*smoke])
    cases["missing_weights"] += ["--weights", f"proxy_vit={case / 'absent.safetensors'}"]
    case = add("mismatched_weights", [*smoke])
    save_file({"not.a.vit.weight": torch.zeros(3, 3)}, str(case / "other.safetensors"))
    cases["mismatched_weights"] += ["--weights", f"proxy_vit={case / 'other.safetensors'}"]
    case = add("pickled_weights", [*smoke])
    _write_malicious(case / "weights.pt", case / MARKER_NAME)
    cases["pickled_weights"] += ["--weights", f"proxy_vit={case / 'weights.pt'}"]
    case = add("invalid_dataset", [*smoke[:4], "--data-root", "DATA", *smoke[6:]])
    (case / "data" / "gta" / "images").mkdir(parents=True)  # a layout without labels or pairs
    cases["invalid_dataset"][cases["invalid_dataset"].index("DATA")] = str(case / "data")
    # Issue 18: settings out of range, names that would be ignored, a typo'd data root.
    for name, setting in [("zero_iterations", "train.iters=0"), ("negative_iterations", "train.iters=-5"),
                          ("zero_grad_accum", "train.grad_accum=0"), ("zero_batch", "train.batch_size=0"),
                          ("zero_log_interval", "train.log_interval=0"), ("zero_stride", "eval.stride=0"),
                          ("nan_lr", "train.lr=nan"), ("zero_crop", "data.crop_size=0"),
                          ("workers_below_auto", "data.num_workers=-2"), ("bad_device", "train.device=banana"),
                          ("unknown_method_table", "methods.reinn.num_tokens=5"),
                          ("method_value_type", "methods.full.no_such=1"),
                          ("method_value_wrong_type", "methods.rein.num_tokens=abc"),
                          ("head_setting_out_of_range", 'model.head_options={"class_balance": "inverse"}'),
                          ("seed_beyond_32_bits", "run.seeds=[18446744073709551616]"),
                          ("setting_of_a_method_not_run", "methods.lora.rank=4")]:
        add(name, [*smoke[:2], "--methods", "rein", *smoke[4:], "--set", setting])
    case = add("unused_weights", [*smoke])
    save_file({"w": torch.zeros(1)}, str(case / "vit.safetensors"))
    cases["unused_weights"] += ["--weights", f"proxy_vitt={case / 'vit.safetensors'}"]
    case = add("missing_data_root", [*smoke[:4], "--data-root", "DATA", *smoke[6:]])
    cases["missing_data_root"][cases["missing_data_root"].index("DATA")] = str(case / "synthetic-typo")

    case = add("pickled_checkpoint", [*smoke])
    results = dirs["pickled_checkpoint"][1]
    exp = load_experiment("smoke", [f"data.root={str(world)!r}", "train.iters=2"])
    spec = RunSpec("G->CBM", "proxy_vit", "full", 42)
    result_path = spec.path(experiment_for(exp, spec), results)
    from benchmarks.checkpoint import checkpoint_file

    _write_malicious(checkpoint_file(result_path), case / MARKER_NAME)

    if request.param == "inprocess":
        return {name: (*_run_in_process(args, dirs[name][0]), dirs[name][1], dirs[name][0]) for name, args in cases.items()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "benchmarks", "run", *args], cwd=dirs[name][0], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, args in cases.items()
    }
    out = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=600)
        out[name] = (proc.returncode, stderr, dirs[name][1], dirs[name][0])
    return out


def _run_in_process(args: list[str], cwd: Path) -> tuple[int, str]:
    from benchmarks.cli import main

    stderr = io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(stderr):
            try:
                code = main(["run", *args])
            except SystemExit as exit_:  # argparse's own usage errors
                code = int(exit_.code or 0)
    finally:
        os.chdir(previous)
    return code, stderr.getvalue()


EXPECTED = {
    "unknown_method": "unknown method 'no_such_method'",
    "unknown_backbone": "no_such_vit",
    "unknown_preset": "unknown preset 'no_such_preset'",
    "override_without_equals": "must look like section.key=value",
    "override_unknown_key": "unknown key train.no_such_key",
    "override_wrong_type": "iters must be int",
    "missing_weights": "not found",
    "mismatched_weights": "unexpected entries",
    "pickled_weights": "refused",
    "invalid_dataset": "gta",
    "pickled_checkpoint": "refused",
    "zero_iterations": "train.iters=0 is out of range: it must be ≥ 1",
    "negative_iterations": "train.iters=-5 is out of range",
    "zero_grad_accum": "train.grad_accum=0 is out of range",
    "zero_batch": "train.batch_size=0 is out of range",
    "zero_log_interval": "train.log_interval=0 is out of range",
    "zero_stride": "eval.stride=0 is out of range",
    "nan_lr": "train.lr=nan is out of range: it must be > 0",
    "zero_crop": "data.crop_size=0 is out of range",
    "workers_below_auto": "data.num_workers=-2 is out of range: it must be ≥ -1",
    "bad_device": "train.device='banana' is not a device",
    "unknown_method_table": "methods.reinn: unknown method 'reinn'",
    "method_value_type": "method 'full' has no hyperparameter no_such",
    "method_value_wrong_type": "methods.rein.num_tokens must be int, got 'abc'",
    "head_setting_out_of_range": "head 'light': class_balance must be one of none, median_frequency",
    "unused_weights": "backbone 'proxy_vitt' is not in this run",
    "missing_data_root": "synthetic-typo does not exist",
    "seed_beyond_32_bits": "run.seeds=(18446744073709551616,) is out of range: it must be ≥ 0 and ≤ 4294967295",
    "setting_of_a_method_not_run": "methods.lora: method 'lora' is not in this run (methods: rein)",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(outcomes, case):
    returncode, stderr, results_dir, _ = outcomes[case]
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(error_lines) == 1, stderr[-2000:]
    assert EXPECTED[case] in error_lines[0], error_lines[0]
    if case == "pickled_checkpoint":  # the refused file itself stays for the user to inspect
        written = [p for p in results_dir.rglob("*") if p.is_file() and p.name != "last.pt"]
        assert written == []
        assert not list(results_dir.rglob("*.json")) and not list(results_dir.rglob("*.lock"))
    else:
        assert not results_dir.exists() or not any(results_dir.iterdir()), sorted(results_dir.rglob("*"))
    if case == "missing_data_root":  # a typo'd root is reported, never filled with a generated world
        assert not (outcomes[case][3] / "synthetic-typo").exists()


@pytest.mark.parametrize("case", ["pickled_weights", "pickled_checkpoint"])
def test_pickle_payload_is_refused_without_running(outcomes, case):
    _, _, _, case_dir = outcomes[case]
    assert not (case_dir / MARKER_NAME).exists()


def test_payload_would_run_if_unpickled_unsafely(tmp_path):
    """Guards the two tests above: the payload is live, so its marker's absence means something."""
    path, marker = tmp_path / "p.pt", tmp_path / MARKER_NAME
    _write_malicious(path, marker)
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


@pytest.mark.parametrize("option", ["--seeds", "--backbones", "--results-dir", "--data-root"])
def test_a_shorthand_given_with_no_value_is_refused_not_dropped(option, tmp_path, capsys, monkeypatch):
    # `--seeds "$SEEDS"` with the variable unset used to run the preset's seeds without a word.
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", "--preset", "smoke", "--methods", "freeze", option, ""], capsys)
    line = error_line(err)
    assert code == 2 and option in line and "no value" in line, line
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("setting", "said"), [
    ("eval.crop_size=60", "eval.crop_size=60 is not a multiple of proxy_vit's patch size 8"),  # was: after training
    ("methods.rein.num_tokens=-3", "methods.rein.num_tokens=-3 is out of range"),  # was: torch's traceback
    ("methods.rein.rank=0", "methods.rein.rank=0 is out of range"),  # was: an empty module trained to the end
    ("""model.head_options='{"channels": 0}'""", "cannot be built (ZeroDivisionError"),  # was: a traceback
])
@pytest.mark.parametrize("command", ["run", "profile"])
def test_a_setting_the_model_cannot_take_is_refused_before_any_work(command, setting, said, tmp_path, capsys,
                                                                      monkeypatch):
    from benchmarks import protocol

    monkeypatch.setattr(protocol, "train", lambda *a, **k: pytest.fail("training started"))
    out = ["--results-dir", str(tmp_path / "runs")] if command == "run" else ["--out", str(tmp_path / "profiles"),
                                                                             "--in-process"]
    code, printed, err = run_cli([command, "--preset", "smoke", "--methods", "rein", "--set", setting, *out], capsys)
    line = error_line(err)
    assert code == 2 and said in line, line
    assert printed == "" and list(tmp_path.iterdir()) == []


def test_a_warm_up_longer_than_the_schedule_is_refused(tmp_path, capsys):
    # The proxy preset's warm-up is 120 iterations: `--set train.iters=100` alone trained at a learning rate
    # that never reached train.lr and never decayed, as if it were the preset's schedule.
    code, out, err = run_cli(["run", "--methods", "freeze", "--set", "train.iters=100", "--results-dir",
                              str(tmp_path / "runs")], capsys)
    line = error_line(err)
    assert code == 2 and "train.warmup_iters=120 exceeds train.iters=100" in line and "warmup_iters=10" in line, line
    assert out == "" and not (tmp_path / "runs").exists()


def test_switching_the_proxy_to_mask2former_as_the_readme_writes_it(capsys):
    # The README's and the error's spelling, as a shell passes it (quotes stripped): it was refused as "must be str".
    code, out, err = run_cli(["run", "--preset", "smoke", "--methods", "rein", "--set", "model.head=mask2former",
                              "--set", "model.head_options={}", "--dry-run"], capsys)
    assert code == 0, err
    assert '"head": "mask2former"' in out and '"head_options": "{}"' in out


@pytest.mark.parametrize(("content", "said"), [
    (b"<html>404</html>", "is not a PyTorch checkpoint"),
    (None, "entries missing"),  # a truncated file
    ("narrower", "the checkpoint is of another model size"),  # every name right, the width half: found after the data
])
def test_a_weights_file_the_backbone_cannot_take_is_refused_before_any_data_is_read_or_generated(
        content, said, tmp_path, capsys, monkeypatch):
    """Was: found when the model was built, after the data was checked (or a synthetic world generated: 84 s)."""
    import datasets.synthetic as synthetic

    monkeypatch.setattr(synthetic, "generate_world", lambda *a, **k: pytest.fail("the world was generated"))
    weights = tmp_path / "weights.pth"
    if content is None:
        torch.save({"blocks.0.ls1.gamma": torch.zeros(4), "cls_token": torch.zeros(1, 1, 4)}, weights)
    elif content == "narrower":
        from safetensors.torch import load_file

        from benchmarks.backbones import get_spec

        shipped = load_file(get_spec("proxy_vit").default_weights)
        width = shipped["cls_token"].shape[-1]
        torch.save({key: torch.zeros([n // 2 if n % width == 0 else n for n in value.shape])
                    for key, value in shipped.items()}, weights)
    else:
        weights.write_bytes(content)
    code, printed, err = run_cli(["run", "--preset", "smoke", "--methods", "freeze", "--data-root",
                                  str(tmp_path / "world"), "--weights", f"proxy_vit={weights}", "--results-dir",
                                  str(tmp_path / "runs")], capsys)
    line = error_line(err)
    assert code == 2 and str(weights) in line and said in line, line
    assert printed == "" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]


@pytest.mark.parametrize(("argv", "said"), [
    (["table", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["run", "--methods"], "argument --methods: expected one argument"),
    (["--bogus"], "the following arguments are required: COMMAND"),
    (["data", "synth"], "the following arguments are required: --out"),
    # an option the command does not know: the line names that command's help, not the top level's
    (["run", "--bogus"], "run: unrecognized arguments: --bogus; `python -m benchmarks run --help`"),
    (["data", "check", "--root", ".", "--bogus"], "`python -m benchmarks data check --help` lists its options"),
])
def test_a_malformed_command_line_is_one_line_naming_the_problem_and_where_the_options_are(argv, said, capsys):
    # argparse printed its usage block (up to 20 lines for `run`) before the error.
    with pytest.raises(SystemExit) as refused:
        run_cli(argv, capsys)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1 and err.startswith("error: python -m benchmarks"), err
    assert said in err and "--help` lists its options" in err


@pytest.mark.parametrize("argv", [
    ["report", "--out", ""], ["profile", "--out", "", "--methods", "freeze"], ["table", "--runs", ""],
    ["table", "--output", ""], ["check", "--keep-runs", ""], ["data", "synth", "--out", ""],
])
def test_an_output_or_input_path_given_empty_is_refused_not_taken_for_the_current_folder(argv, tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as refused:  # argparse's refusal: one `error:` line
        run_cli(argv, capsys)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert refused.value.code == 2 and len(errors) == 1 and "given with no value" in errors[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("given", "said"), [
    (["--methods", ""], "--methods is given with no value"),
    (["--methods", ","], "--methods is given with no value"),
    (["--seeds", ","], "--seeds is given with no value"),
    (["--backbones", " , "], "--backbones is given with no value"),
    (["--set", "run.settings="], "run.settings is empty"),
])
def test_a_matrix_axis_given_empty_is_refused_not_read_as_the_presets(given, said, tmp_path, capsys, monkeypatch):
    # `--methods "$METHODS"` with the variable unset trained all 18 methods (an hour on the proxy preset).
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", "--preset", "smoke", *given, "--dry-run"], capsys)
    line = error_line(err)
    assert code == 2 and said in line, line
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--baseline", "--keep-runs"])
def test_check_refuses_a_place_it_cannot_write_before_running_the_matrix(option, tmp_path, capsys, monkeypatch):
    import benchmarks.runner as runner

    monkeypatch.setattr(runner, "run_matrix", lambda *a, **k: pytest.fail("the matrix ran"))
    (tmp_path / "afile").write_text("a file, not a folder")
    code, _, err = run_cli(["check", "--methods", "freeze", "--update-baseline", option,
                            str(tmp_path / "afile" / "inside")], capsys)
    line = error_line(err)
    assert code == 2 and f"{option} {tmp_path / 'afile' / 'inside'}" in line and "is a file" in line, line


@pytest.mark.parametrize(("given", "said"), [
    (["--slurm-wait"], "--slurm-wait is an option of --launcher slurm"),  # trained here for an hour, exit 0
    (["--slurm-partition", "gpu"], "--slurm-partition is an option of --launcher slurm"),
    (["--launcher", "slurm", "--slurm-time", "-5"], "--slurm-time -5: must be at least 1"),  # a job that never ran
    (["--launcher", "slurm", "--slurm-nodes", "0"], "--slurm-nodes 0: must be at least 1"),
    (["--launcher", "slurm", "--slurm-cluster", "local", "--slurm-nodes", "2"],  # submitit's ValueError traceback
     "--slurm-nodes 2: --slurm-cluster local runs each job on this one machine; pass --slurm-nodes 1"),
])
def test_launch_options_that_cannot_be_meant_are_refused_before_any_work(given, said, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", "--preset", "smoke", "--methods", "freeze", *given], capsys)
    line = error_line(err)
    assert code == 2 and said in line, line
    assert out == "" and list(tmp_path.iterdir()) == []


def test_profile_flops_only_and_no_flops_together_are_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        run_cli(["profile", "--flops-only", "--no-flops"], capsys)
    assert refused.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(("setting", "said"), [
    ('model.head_options={"channels": 0}', "cannot be built"),  # a ZeroDivisionError traceback, exit 1
    ("eval.crop_size=60", "eval.crop_size=60 is not a multiple"),  # exit 0, the reason dropped from the row
])
def test_profile_flops_only_refuses_a_setting_the_model_cannot_take_as_profiling_does(setting, said, tmp_path, capsys):
    code, out, err = run_cli(["profile", "--preset", "smoke", "--methods", "freeze", "--flops-only",
                              "--out", str(tmp_path), "--set", setting], capsys)
    line = error_line(err)
    assert code == 2 and said in line, line
    assert out == "" and list(tmp_path.iterdir()) == []
