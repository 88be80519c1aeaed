"""Methods from outside the repository: `--method-file` and installed plugins (entry points of the
group `dgss_bench.methods`), end to end through the CLI, and each way of getting them wrong.

A method file's successful run is a separate `python -m benchmarks` process (the whole path, as a user
runs it); the other tests run in this process, and `registry_before` puts the registry back afterwards,
so a method one test registered does not stay registered for the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import method as registry_module
from benchmarks import plugins
from benchmarks.backbones import get_spec
from benchmarks.method import resolve_methods
from benchmarks.results import iter_results
from tests.cli_helpers import error_line, run_cli

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--preset", "smoke", "--no-progress", "--set", "train.iters=2", "--set", "data.eval_limit=1"]

LAST_NORM = '''
"""A method of one's own: only the last block's second norm trains."""
from dataclasses import dataclass

from benchmarks.method import Method, register_method


@dataclass
class {cls}Config:
    scale: float = 1.0


@register_method
class {cls}(Method):
    name = "{name}"
    paper = "Last-norm tuning (a test plugin)"
    Config = {cls}Config

    def attach(self, model):
        model.backbone.requires_grad_(False)
        model.backbone.blocks[-1].norm2.requires_grad_(True)
'''


def method_source(name: str = "last_norm", cls: str = "LastNorm") -> str:
    return LAST_NORM.format(name=name, cls=cls)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def install_plugin(site: Path, module_body: str, dist: str = "my-dgss-method", module: str = "my_dgss_method",
                   entry: str = "lastnorm_plugin = my_dgss_method") -> Path:
    """An installed distribution as importlib.metadata reads one: a module plus its dist-info folder."""
    write(site / f"{module}.py", module_body)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    write(info / "entry_points.txt", f"[{plugins.ENTRY_POINT_GROUP}]\n{entry}\n")
    return site


def discover_installed(site: Path, monkeypatch) -> None:
    """Make this process discover the plugins installed under `site` afresh, as a new interpreter would."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    monkeypatch.setattr(plugins, "_loaded_entry_points", set())
    monkeypatch.delitem(sys.modules, "my_dgss_method", raising=False)


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def only_result(results: Path) -> dict:
    (result,) = iter_results([results])
    return result


@pytest.fixture
def registry_before():
    """The registry as discovered before the test (returned); afterwards it and the plugin bookkeeping are
    restored, so a method a test registered does not join other tests' `--methods all`."""
    methods_before = dict(registry_module.available_methods())
    origins, files = dict(plugins._origins), dict(plugins._method_files)
    modules = {name for name in sys.modules if name.startswith(plugins.MODULE_PREFIX)}
    yield methods_before
    registry_module.METHODS.clear()
    registry_module.METHODS.update(methods_before)
    plugins._origins.clear()
    plugins._origins.update(origins)
    plugins._method_files.clear()
    plugins._method_files.update(files)
    for name in [n for n in sys.modules if n.startswith(plugins.MODULE_PREFIX) and n not in modules]:
        del sys.modules[name]


# -- working plugins ------------------------------------------------------------------------------------
def test_method_file_runs_like_a_builtin_and_its_file_is_in_the_result(tiny_world, tmp_path):
    method_file = write(tmp_path / "mine" / "last_norm.py", method_source())
    results = tmp_path / "results"
    proc = cli(["run", *SMOKE, "--methods", "last_norm", "--method-file", str(method_file),
                "--data-root", str(tiny_world), "--results-dir", str(results)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "last_norm" in proc.stdout  # the leaderboard
    result = only_result(results)
    assert result["status"] == "finished"
    assert result["method"] == {"name": "last_norm", "paper": "Last-norm tuning (a test plugin)", "role": "parameter-efficient",
                                "hyperparameters": {"scale": 1.0}}
    # attach() ran: of the backbone only one LayerNorm (weight and bias) trains
    assert result["params"]["backbone_trainable"] == 2 * get_spec("proxy_vit").embed_dim
    assert result["provenance"]["method"] == {"file": str(method_file.resolve()), "bytes": method_file.stat().st_size,
                                              "sha256": hashlib.sha256(method_file.read_bytes()).hexdigest()}

    # The method edited, the same command again: the finished result is neither skipped as if it were
    # the new method's nor overwritten; the one error names both versions of the file.
    before = method_file.read_bytes()
    method_file.write_text(method_source().replace("norm2.requires_grad_(True)", "norm1.requires_grad_(True)"))
    proc = cli(["run", *SMOKE, "--methods", "last_norm", "--method-file", str(method_file),
                "--data-root", str(tiny_world), "--results-dir", str(results)], cwd=tmp_path)
    line = error_line(proc.stderr)
    assert proc.returncode == 2 and "method file" in line, line
    assert hashlib.sha256(before).hexdigest()[:12] in line
    assert hashlib.sha256(method_file.read_bytes()).hexdigest()[:12] in line
    assert only_result(results) == result


@pytest.mark.slow
def test_the_slurm_launcher_refuses_a_finished_run_of_an_edited_method_file_as_run_does(tiny_world, tmp_path):
    # the launcher decides what to submit on its own: it skipped the result as finished and showed it
    pytest.importorskip("submitit")
    method_file = write(tmp_path / "mine" / "last_norm.py", method_source())
    results = tmp_path / "results"
    command = ["run", *SMOKE, "--methods", "last_norm", "--method-file", str(method_file), "--data-root",
               str(tiny_world), "--results-dir", str(results)]
    assert cli(command, cwd=tmp_path).returncode == 0
    result = only_result(results)
    method_file.write_text(method_source().replace("norm2.requires_grad_(True)", "norm1.requires_grad_(True)"))
    proc = cli([*command, "--launcher", "slurm", "--slurm-cluster", "local"], cwd=tmp_path)
    line = error_line(proc.stderr)
    assert proc.returncode == 2 and "method file" in line, line
    assert only_result(results) == result and not (results / ".submitit").exists()


def test_all_includes_methods_of_every_file_given(tmp_path, registry_before):
    first = write(tmp_path / "a" / "method.py", method_source("last_norm", "LastNorm"))
    second = write(tmp_path / "b" / "method.py", method_source("other_norm", "OtherNorm"))  # same file name
    assert registry_module.use_method_files([str(first), str(second), str(first)]) == ["last_norm", "other_norm", "last_norm"]
    assert resolve_methods("all") == sorted([*registry_before, "last_norm", "other_norm"])
    assert plugins.loaded_method_files()[-2:] == [str(first.resolve()), str(second.resolve())]


def test_profile_hands_the_method_files_to_each_method_process(tmp_path, registry_before, monkeypatch):
    from benchmarks import profiling
    from benchmarks.config import load_experiment

    method_file = write(tmp_path / "last_norm.py", method_source())
    registry_module.use_method_files([str(method_file)])
    jobs = []

    def fake_run(command, input, **kwargs):
        jobs.append(json.loads(input))
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps({"method": "last_norm", "status": "ok"}))

    monkeypatch.setattr(profiling, "subprocess", SimpleNamespace(run=fake_run, TimeoutExpired=subprocess.TimeoutExpired))
    row = profiling.profile_in_subprocess(load_experiment("smoke"), "last_norm", "cpu", profiling.ProfileSettings())
    assert row["status"] == "ok"
    assert str(method_file.resolve()) in jobs[0]["method_files"]


def test_installed_plugin_is_listed_and_runs(tiny_world, tmp_path, monkeypatch, registry_before, capsys):
    # In this process, as if installed into it (the method-file test above runs a separate interpreter):
    # discovery reads the dist-info on sys.path as it reads site-packages.
    discover_installed(install_plugin(tmp_path / "site", method_source("lastnorm_plugin", "LastNormPlugin")), monkeypatch)
    code, out, err = run_cli(["list", "methods", "--backbone", "proxy_vit", "--head", "light", "--img-size", "64"], capsys)
    assert code == 0, err[-3000:]
    (row,) = [line for line in out.splitlines() if line.startswith("lastnorm_plugin")]
    assert "Last-norm tuning" in row and "scale=1.0" in row
    results = tmp_path / "results"
    code, _, err = run_cli(["run", *SMOKE, "--methods", "lastnorm_plugin", "--data-root", str(tiny_world),
                            "--results-dir", str(results)], capsys)
    assert code == 0, err[-3000:]
    result = only_result(results)
    assert result["method"]["name"] == "lastnorm_plugin" and result["status"] == "finished"
    assert result["provenance"]["method"] == {"entry_point": "lastnorm_plugin = my_dgss_method",
                                              "distribution": "my-dgss-method", "version": "0.1"}


@pytest.mark.slow
def test_profile_registers_the_method_file_again_in_each_method_process(tmp_path, registry_before, capsys):
    """profile measures each method in a fresh interpreter, which must load the file too."""
    method_file = write(tmp_path / "last_norm.py", method_source())
    code, out, err = run_cli(["profile", "--preset", "smoke", "--methods", "last_norm", "--method-file", str(method_file),
                              "--warmup", "0", "--repeats", "1", "--eval-repeats", "1", "--no-flops", "--breakdown", "none",
                              "--device", "cpu", "--out", str(tmp_path / "profiles")], capsys)
    (profile,) = (tmp_path / "profiles").glob("*.json")
    rows = json.loads(profile.read_text())["methods"]
    assert code == 0, (out, err, rows)
    assert [row["method"] for row in rows] == ["last_norm"] and rows[0]["status"] == "ok"


@pytest.mark.slow
def test_slurm_jobs_register_the_method_file_again(tiny_world, tmp_path):
    pytest.importorskip("submitit")
    method_file = write(tmp_path / "last_norm.py", method_source())
    results = tmp_path / "results"
    proc = cli(["run", *SMOKE, "--methods", "last_norm", "--method-file", str(method_file), "--data-root", str(tiny_world),
                "--results-dir", str(results), "--launcher", "slurm", "--slurm-cluster", "local", "--slurm-wait"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert only_result(results)["provenance"]["method"]["file"] == str(method_file.resolve())


FAILS_IN_ITS_JOB = '''
from benchmarks.errors import UserError
from benchmarks.method import Method, register_method


@register_method
class FailsInItsJob(Method):
    name = "fails_in_its_job"

    def before_training(self, ctx):
        raise UserError("this method stops its own run")
'''


@pytest.mark.slow
def test_slurm_wait_names_a_failed_job_and_still_waits_for_the_others(tiny_world, tmp_path):
    # A failed job was submitit's FailedJobError traceback, and the jobs after it were not waited for.
    pytest.importorskip("submitit")
    method_file = write(tmp_path / "fails.py", FAILS_IN_ITS_JOB)
    results = tmp_path / "results"
    proc = cli(["run", *SMOKE, "--methods", "fails_in_its_job,freeze", "--method-file", str(method_file),
                "--data-root", str(tiny_world), "--results-dir", str(results), "--launcher", "slurm",
                "--slurm-cluster", "local", "--slurm-wait"], cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "(fails_in_its_job seed 42) failed:" in proc.stderr and "this method stops its own run" in proc.stderr
    assert "1 run(s) have no result: fails_in_its_job proxy_vit seed 42" in proc.stderr
    assert "freeze" in proc.stdout and only_result(results)["method"]["name"] == "freeze"


# -- refusals ---------------------------------------------------------------------------------------------
BAD_FILES = {
    "missing": (None, "no such file"),
    "folder": ("", "is a folder; pass the path of the Python file in it"),
    "not_python": ("notes.txt", "not a Python file (.py)"),
    "syntax_error": ("def broken(:\n", "SyntaxError"),
    "import_error": ("import no_such_package_for_dgss\n", "failed to import: ModuleNotFoundError: No module named"),
    "registers_nothing": ("from benchmarks.method import Method\n\nclass Forgotten(Method):\n    name = 'forgotten'\n",
                          "registers no method; decorate"),
    "shadows_builtin": (method_source("rein", "MyRein"), "registers method 'rein', a name methods.rein"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_method_file_is_one_line_exit_2_and_creates_nothing(case, tiny_world, tmp_path, registry_before, capsys):
    body, expected = BAD_FILES[case]
    if body is None:
        method_file = tmp_path / "absent.py"
    elif body == "":
        method_file = tmp_path / "plugins"
        method_file.mkdir()
    elif body.endswith(".txt"):
        method_file = write(tmp_path / body, method_source())
    else:
        method_file = write(tmp_path / f"{case}.py", body)
    results = tmp_path / "results"
    code, _, err = run_cli(["run", *SMOKE, "--methods", "full", "--method-file", str(method_file),
                            "--data-root", str(tiny_world), "--results-dir", str(results)], capsys)
    assert code == 2
    line = error_line(err)
    assert expected in line and str(method_file.name) in line, line
    assert not results.exists()
    assert registry_module.METHODS == registry_before  # nothing of the refused file stays registered


def test_a_second_file_taking_a_name_names_the_first(tmp_path, registry_before, capsys):
    first = write(tmp_path / "first.py", method_source())
    second = write(tmp_path / "second.py", method_source("last_norm", "Again"))
    code, _, err = run_cli(["run", "--preset", "smoke", "--dry-run", "--methods", "full",
                            "--method-file", str(first), "--method-file", str(second)], capsys)
    assert code == 2
    assert f"a name --method-file {first.resolve()} already has" in error_line(err)
    assert registry_module.METHODS["last_norm"].__name__ == "LastNorm"  # the first file's, kept


BAD_PLUGINS = {
    "does_not_import": ("raise RuntimeError('needs a GPU driver')\n",
                        "method plugin 'broken' (my_dgss_method) of my-dgss-method 0.1 failed to import: RuntimeError: "
                        "needs a GPU driver; fix it, or uninstall it (pip uninstall my-dgss-method)"),
    "shadows_builtin": (method_source("rein", "MyRein"),
                        "method plugin 'broken' (my_dgss_method) of my-dgss-method 0.1 registers method 'rein', a name "
                        "methods.rein"),
    "registers_nothing": ("X = 1\n", "method plugin 'broken' (my_dgss_method) of my-dgss-method 0.1 registers no method"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_broken_installed_plugin_is_named_when_methods_are_discovered(case, tmp_path, monkeypatch, registry_before,
                                                                      capsys):
    body, expected = BAD_PLUGINS[case]
    discover_installed(install_plugin(tmp_path / "site", body, entry="broken = my_dgss_method"), monkeypatch)
    code, _, err = run_cli(["run", *SMOKE, "--methods", "full", "--results-dir", str(tmp_path / "results")], capsys)
    assert code == 2
    assert expected in error_line(err)
    assert not (tmp_path / "results").exists()
    assert registry_module.METHODS == registry_before
    # Commands that need no method are not held up by it.
    code, out, _ = run_cli(["list", "presets"], capsys)
    assert code == 0 and "smoke" in out


def _one() -> int:
    return 1


@pytest.mark.slow
def test_slurm_wait_waits_for_a_job_of_several_tasks(tmp_path):
    # `--slurm-gpus-per-node 2` submits each run as a job of 2 tasks, whose `result()` is submitit's
    # AssertionError ("use results()"): a traceback after the first job, the others not waited for.
    submitit = pytest.importorskip("submitit")
    from types import SimpleNamespace

    from benchmarks.launchers import _wait_for

    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local")
    executor.update_parameters(tasks_per_node=2, timeout_min=2)
    job = executor.submit(_one)
    assert job.num_tasks == 2
    _wait_for([job], [SimpleNamespace(spec=SimpleNamespace(method="freeze", seed=42))])
    assert job.done() and job.results() == [1, 1]
