"""The product path end to end: matrix → model → train → evaluate → result file → table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import runner
from benchmarks.config import PROJECT_ROOT, apply_override
from benchmarks.locking import RunLock
from benchmarks.method import available_methods
from benchmarks.results import SCHEMA_VERSION, iter_results
from datasets.labels import CLASSES
from tests.cli_helpers import error_line, run_cli


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_smoke_run_of_each_method_writes_a_valid_result(method, smoke_experiment, monkeypatch):
    from benchmarks import protocol
    from benchmarks.model import reported_parameter_counts

    labelled: dict[str, set[int]] = {}  # the class ids in each scored set's labels, seen as they are scored
    scoring = protocol.evaluate

    def evaluate_seeing_labels(model, dataset, *args, desc="eval", **kwargs):
        labelled[desc] = set().union(*(set(dataset[i]["label"].unique().tolist()) for i in range(len(dataset))))
        return scoring(model, dataset, *args, desc=desc, **kwargs)

    monkeypatch.setattr(protocol, "evaluate", evaluate_seeing_labels)
    (result,) = runner.run_matrix(smoke_experiment, method, progress=False)
    assert result["status"] == "finished", result.get("failure")
    assert result["schema"] == SCHEMA_VERSION and result["method"]["name"] == method
    assert set(result["targets"]) == {"cityscapes", "bdd100k", "mapillary"}
    for name, target in result["targets"].items():
        assert 0.0 <= target["miou"] <= 100.0
        assert list(target["per_class_iou"]) == list(CLASSES)
        # a class scored above 0 is one the target's labels hold: the IoUs carry their own classes' names
        scored = {c for c, iou in target["per_class_iou"].items() if iou}
        assert scored and scored <= {CLASSES[i] for i in labelled[name] if i < len(CLASSES)}, (name, scored)
        assert target["num_images"] == 3
    spec = runner.plan_runs(smoke_experiment, method)[0]
    # what the table's Params column shows: the method's own count (FisherTune's budget, not all it can reach)
    assert result["params"] == reported_parameter_counts(runner.experiment_for(smoke_experiment, spec), method)
    expected_mean = sum(t["miou"] for t in result["targets"].values()) / 3
    assert result["average_miou"] == pytest.approx(expected_mean)
    assert result["experiment"]["train"]["iters"] == smoke_experiment.train.iters
    assert len(result["history"]) >= 1 and all(h["loss"] == h["loss"] for h in result["history"])  # finite
    on_disk = json.loads(open(result_path(smoke_experiment, method)).read())
    assert on_disk["run_id"] == result["run_id"]


def result_path(exp, method):
    spec = runner.plan_runs(exp, method)[0]
    return spec.path(runner.experiment_for(exp, spec), exp.resolve_path(exp.run.results_dir))


def test_freeze_trains_only_the_head_and_full_everything(smoke_experiment):
    results = {r["method"]["name"]: r for r in runner.run_matrix(smoke_experiment, "freeze,full", progress=False)}
    assert results["freeze"]["params"]["backbone_trainable"] == 0
    assert results["full"]["params"]["backbone_trainable"] == results["full"]["params"]["backbone_pretrained"] > 0


def test_finished_runs_are_skipped(smoke_experiment, monkeypatch):
    first = runner.run_matrix(smoke_experiment, "freeze", progress=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was executed again")

    monkeypatch.setattr(runner, "execute_run", must_not_run)
    again = runner.run_matrix(smoke_experiment, "freeze", progress=False)
    assert again[0]["run_id"] == first[0]["run_id"] and again[0]["average_miou"] == first[0]["average_miou"]
    # a changed protocol is a different run, not a skip
    changed = apply_override(smoke_experiment, "train.iters=3")
    with pytest.raises(AssertionError, match="executed again"):
        runner.run_matrix(changed, "freeze", progress=False)


def test_a_method_that_fails_to_attach_on_the_device_is_that_run_s_failure_not_the_matrix_s_end(
        smoke_experiment, monkeypatch):
    # The pre-flight builds every model on the meta device; a method that fails only on real weights (an
    # SVD that does not converge) ended the whole matrix with a traceback and no failure record.
    from methods.freeze import Freeze

    attach = Freeze.attach

    def fails_on_real_weights(self, model):
        if next(model.backbone.parameters()).device.type != "meta":
            raise RuntimeError("SVD did not converge")
        attach(self, model)

    monkeypatch.setattr(Freeze, "attach", fails_on_real_weights)
    failed, finished = runner.run_matrix(smoke_experiment, "freeze,lora", progress=False)
    assert (failed["status"], failed["failure"]) == ("failed", "RuntimeError: SVD did not converge")
    assert finished["status"] == "finished" and finished["method"]["name"] == "lora"
    assert json.loads(open(result_path(smoke_experiment, "freeze")).read())["status"] == "failed"


def test_a_finished_run_s_leftover_checkpoint_is_removed_when_it_is_skipped(smoke_experiment):
    # Killed between writing its result and removing its checkpoint: the checkpoint stayed for ever.
    from benchmarks import checkpoint

    (first,) = runner.run_matrix(smoke_experiment, "freeze", progress=False)
    leftover = checkpoint.checkpoint_dir(result_path(smoke_experiment, "freeze"))
    leftover.mkdir()
    (leftover / "last.pt").write_bytes(b"a checkpoint nothing will resume from")
    (again,) = runner.run_matrix(smoke_experiment, "freeze", progress=False)
    assert (again["run_id"], again["average_miou"]) == (first["run_id"], first["average_miou"]) and not leftover.exists()
    assert not RunLock(result_path(smoke_experiment, "freeze")).path.exists()


def test_same_seed_same_numbers(smoke_experiment, tmp_path):
    first = runner.run_matrix(smoke_experiment, "full", progress=False)[0]
    other_dir = apply_override(smoke_experiment, f'run.results_dir="{tmp_path / "again"}"')
    second = runner.run_matrix(other_dir, "full", progress=False)[0]
    assert first["targets"] == second["targets"]
    assert first["history"] == second["history"]


def test_matrix_expands_methods_backbones_seeds(smoke_experiment):
    exp = apply_override(smoke_experiment, "run.seeds=1,2")
    specs = runner.plan_runs(exp, "freeze,full")
    assert [(s.method, s.seed) for s in specs] == [("freeze", 1), ("full", 1), ("freeze", 2), ("full", 2)]
    assert len({s.path(runner.experiment_for(exp, s), PROJECT_ROOT) for s in specs}) == 4


def test_cli_run_prints_the_leaderboard(tiny_world, tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--preset", "smoke", "--methods", "freeze,full", "--no-progress",
         "--data-root", str(tiny_world), "--results-dir", str(runs), "--set", "train.iters=2", "--set", "data.eval_limit=1"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "freeze" in proc.stdout and "full" in proc.stdout and "Citys." in proc.stdout
    assert len(iter_results([runs])) == 2


def test_cli_unknown_method_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--preset", "smoke", "--methods", "nope", "--results-dir", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown method 'nope'; valid: all,")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_held_out_source_pairs_are_scored_apart_and_never_trained_on(smoke_experiment, tiny_world):
    from benchmarks.data import source_dataset, source_heldout_dataset
    from benchmarks.reports.tables import leaderboard

    exp = apply_override(smoke_experiment, "data.source_holdout=2")
    trained = [pair.name for pair in source_dataset(exp, "gtav", tiny_world).pairs]
    held_out = [pair.name for pair in source_heldout_dataset(exp, "gtav", tiny_world).pairs]
    everything = [pair.name for pair in source_dataset(smoke_experiment, "gtav", tiny_world).pairs]
    assert held_out == everything[-2:] and trained == everything[:-2]
    assert source_heldout_dataset(smoke_experiment, "gtav", tiny_world) is None  # the protocol's default

    (result,) = runner.run_matrix(exp, "freeze", progress=False)
    source = result["source_heldout"]
    assert source["num_images"] == 2 and 0.0 <= source["miou"] <= 100.0
    assert set(source["per_class_iou"]) == set(CLASSES)
    assert result["average_miou"] == pytest.approx(sum(t["miou"] for t in result["targets"].values()) / 3)
    table = leaderboard([result])
    assert "| GTAV (src.) | Citys. |" in table and "2 held-out source images" in table


def test_gtav_and_synthia_train_together_and_gtav_gives_the_held_out_pairs(smoke_experiment, tiny_world, tmp_path):
    # The spec's G+S->CBM: one stream over the union of GTAV's and SYNTHIA's pairs (mmseg's ConcatDataset).
    import shutil

    from benchmarks.data import JointSource, source_dataset, source_heldout_dataset
    from benchmarks.reports.tables import leaderboard
    from tests.test_datasets_adapters import build_synthia

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    build_synthia(world)  # two SYNTHIA pairs in its own format (16-bit labels)
    exp = apply_override(apply_override(apply_override(smoke_experiment, f'data.root="{world}"'),
                                        'run.settings=["G+S->CBM"]'), "data.source_holdout=2")
    joint = source_dataset(exp, "gtav+synthia", world)
    gtav = [pair.name for pair in source_dataset(smoke_experiment, "gtav", world).pairs]
    assert isinstance(joint, JointSource) and list(joint.parts) == ["gtav", "synthia"]
    assert [pair.name for pair in joint.pairs] == gtav[:-2] + ["0000000", "0000001"]
    assert joint[(len(joint) - 1, 7)]["name"] == "0000001"  # an index past GTAV's reads SYNTHIA
    assert [pair.name for pair in source_heldout_dataset(exp, "gtav+synthia", world).pairs] == gtav[-2:]

    (result,) = runner.run_matrix(exp, "freeze", progress=False)
    assert result["status"] == "finished", result.get("failure")
    assert result["setting"] == "G+S->CBM" and result["source"] == "gtav+synthia"
    assert set(result["provenance"]["data"]) == {"gtav (train)", "synthia (train)", "gtav (held out)",
                                                 "cityscapes", "bdd100k", "mapillary"}
    assert result["source_heldout"]["num_images"] == 2
    assert "| GTAV (src.) | Citys. |" in leaderboard([result], setting="G+S->CBM")


def test_holding_out_every_source_pair_is_refused(tmp_path, tiny_world, capsys):
    # In this process: what `python -m benchmarks` adds around main() is checked by the unknown-method test above.
    code, _, err = run_cli(["run", "--preset", "smoke", "--methods", "freeze", "--no-progress", "--data-root",
                            str(tiny_world), "--results-dir", str(tmp_path / "r"), "--set", "data.source_holdout=6"], capsys)
    assert code == 2
    assert error_line(err) == (f"error: data.source_holdout=6 but gtav has 6 pairs at {tiny_world}; "
                               "choose 0 (train on all, the protocol) up to 5")
    assert not (tmp_path / "r").exists()


def test_spellings_of_one_run_name_one_run():
    # Each of these used to give the run another config hash: a finished run trained again, one row split in two.
    from benchmarks.config import load_experiment

    def run_hash(*overrides: str, methods: str = "lora") -> str:
        exp = load_experiment("proxy", list(overrides))
        [spec] = [s for s in runner.plan_runs(exp, methods) if s.method == "lora" and s.backbone == "proxy_vit"]
        return runner.experiment_for(exp, spec).config_hash()

    plain = run_hash()
    assert plain == "2b6c9260"  # the kept proxy results' identity (world v3, seed 42) is unchanged
    assert run_hash("data.root='./data/synthetic-v3/'") == plain
    assert run_hash("data.root=data/synthetic-v2") == "35168abd"  # the v2 table's runs, rerun by naming their world
    assert run_hash("methods.lora.alpha=8") == run_hash("methods.lora.alpha=8.0") == plain  # lora's default
    assert run_hash("methods.lora.alpha=16") != plain
    assert run_hash("methods.rein.num_tokens=50", methods="lora,rein") == plain  # another method's, for its own runs
    assert run_hash("run.backbones=['proxy_vit','dinov2_vits14']",
                    "model.weights=['dinov2_vits14=/elsewhere/dinov2_vits14.pth']") == plain


def test_nothing_is_downloaded(smoke_experiment, monkeypatch, capsys):
    # The README's promise: a run on the embedded world, and the paper preset's models, need no network.
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (result,) = runner.run_matrix(smoke_experiment, "rein", progress=False)
    assert result["status"] == "finished"
    code, out, err = run_cli(["run", "--preset", "paper", "--methods", "rein", "--weights", "dinov2_vitl14=random",
                              "--dry-run"], capsys)
    assert code == 0 and "mask2former" in out, err


def test_a_dry_run_names_each_run_by_the_config_hash_its_result_file_will_carry(capsys, tmp_path):
    # It printed one hash of the whole matrix (every method's settings in it), a hash no result file carries.
    from benchmarks.config import load_experiment
    from benchmarks.runner import RunSpec, experiment_for

    code, out, err = run_cli(["run", "--preset", "smoke", "--methods", "freeze,fishertune", "--dry-run"], capsys)
    assert code == 0, err
    exp = load_experiment("smoke")
    for method in ("freeze", "fishertune"):
        spec = RunSpec("G->CBM", "proxy_vit", method, 42)
        name = spec.path(experiment_for(exp, spec), tmp_path).stem  # seed42-<hash>
        row = next(line for line in out.splitlines() if f" {method} " in line)
        assert row.endswith(name.split("-")[1]), (row, name)
    assert "config hash" not in out
