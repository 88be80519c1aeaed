"""Presets, overrides and their errors: the first thing every run resolves."""

import dataclasses
import json

import pytest

from benchmarks.config import apply_override, available_presets, experiment_from_dict, load_experiment
from benchmarks.errors import UserError


def test_presets_exist_and_resolve():
    assert {"smoke", "proxy", "paper"} <= set(available_presets())
    paper = load_experiment("paper")
    # The protocol's values (specs/protocol.md), not just any numbers.
    assert (paper.model.backbone, paper.model.head, paper.model.img_size, paper.model.patch_size) == ("dinov2_vitl14", "mask2former", 512, 16)
    assert (paper.train.iters, paper.train.batch_size, paper.train.lr, paper.train.weight_decay) == (40000, 4, 1e-4, 0.05)
    assert (paper.train.poly_power, paper.train.warmup_iters, paper.train.seed) == (0.9, 0, 42)
    assert (paper.eval.crop_size, paper.eval.stride, paper.eval.fit_size) == (512, 341, (1024, 512))
    assert (paper.data.crop_size, paper.data.scale_base, paper.data.max_long_edge, paper.data.cat_max_ratio) == (512, 512, 2048, 0.75)


def test_overrides_are_typed():
    exp = load_experiment("proxy", ["train.iters=7", "train.warmup_iters=1", "train.lr=3e-4", "eval.fit_size=[64, 32]", "run.seeds=1,2",
                                    "model.head=mask2former", "data.photometric=false", "methods.rein.num_tokens=5"])
    assert exp.train.iters == 7 and isinstance(exp.train.iters, int)
    assert exp.train.lr == 3e-4
    assert exp.eval.fit_size == (64, 32)
    assert exp.run.seeds == (1, 2)
    assert exp.model.head == "mask2former"
    assert exp.data.photometric is False
    assert exp.methods == {"rein": {"num_tokens": 5}}
    # an int where a float is expected is accepted as that float
    assert apply_override(exp, "train.lr=1").train.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.iters=abc", "iters must be int"),
        ("train.iters=1.5", "iters must be int"),
        ("train.nope=1", "unknown key train.nope"),
        ("nosection.x=1", "section one of"),
        ("train.iters", "must look like section.key=value"),
        ("eval.fit_size=[1,2,3]", "fit_size must be tuple"),
        ("data.photometric=maybe", "photometric must be bool"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        load_experiment("smoke", [override])


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError, match="valid: .*paper.*proxy.*smoke"):
        load_experiment("nope")


def test_unknown_section_in_a_preset_file_is_refused():
    with pytest.raises(UserError, match="unknown section"):
        experiment_from_dict({"trian": {"iters": 1}})


def test_config_hash_ignores_the_matrix_but_not_the_protocol():
    exp = load_experiment("smoke")
    same = dataclasses.replace(exp, run=dataclasses.replace(exp.run, methods="full"))
    assert same.config_hash() == exp.config_hash()
    assert apply_override(exp, "train.iters=99").config_hash() != exp.config_hash()


def test_experiment_round_trips_through_its_dict():
    exp = load_experiment("paper", ["methods.lora.rank=4"])
    raw = exp.to_dict()
    raw.pop("preset")
    again = experiment_from_dict(raw, name="paper")
    assert again == exp


@pytest.mark.parametrize("name, old, new", [("resize", "pillow", "cv2"), ("hsv", "numpy", "cv2")])
def test_a_setting_added_later_keeps_the_identity_of_runs_at_its_old_behaviour(name, old, new):
    """Results written before `data.resize` (`data.hsv`) existed resized with Pillow (converted HSV in NumPy):
    at that value a configuration hashes as it did without the setting (so those results still count as
    finished), at "cv2" it is another one."""
    from benchmarks.config import ADDED_SETTINGS, without_added_settings_at_their_old_behaviour

    assert ADDED_SETTINGS[("data", name)] == old
    as_before = load_experiment("proxy", [f"data.{name}={old}"])
    changed = load_experiment("proxy", [f"data.{name}={new}"])
    before = json.loads(json.dumps(as_before.to_dict()))
    for section, setting in ADDED_SETTINGS:
        del before[section][setting]
    assert without_added_settings_at_their_old_behaviour(as_before.to_dict()) == before
    assert as_before.config_hash() == load_experiment("proxy").config_hash() == "2b6c9260"  # the stored runs'
    assert changed.config_hash() != as_before.config_hash()
    assert name in without_added_settings_at_their_old_behaviour(changed.to_dict())["data"]


def test_a_run_at_an_added_settings_old_behaviour_departs_from_a_preset_that_reads_otherwise():
    # A paper run with data.resize=pillow records the setting by leaving it out; its table was titled as the
    # paper preset's own, whose resize is cv2 since the setting was added.
    from benchmarks.reports.grouping import preset_departures

    def result(preset: str, *overrides: str) -> dict:
        return {"preset": preset, "experiment": load_experiment(preset, list(overrides)).to_dict()}

    assert preset_departures(result("paper", "data.resize=pillow")) == "data.resize=pillow"
    assert preset_departures(result("paper")) == ""
    assert preset_departures(result("proxy")) == ""  # the proxy preset's own resize is pillow
    assert preset_departures(result("proxy", "data.resize=cv2")) == "data.resize=cv2"


@pytest.mark.parametrize("line", ["preset = 5", 'preset = ""', "preset = [1]"])
def test_a_preset_file_whose_name_is_not_a_string_is_one_line(tmp_path, line):
    (tmp_path / "mine.toml").write_text(line + "\n")
    with pytest.raises(UserError, match=r"mine\.toml: `preset` must be a name in quotes"):
        load_experiment(str(tmp_path / "mine.toml"))


@pytest.mark.parametrize("key", ["run.results_dir", "data.root"])
def test_an_empty_path_setting_is_refused_not_taken_for_the_current_folder(key):
    # `--set run.results_dir=` wrote results into the folder the command ran from (`--results-dir ""` was refused).
    from benchmarks.config import load_experiment

    with pytest.raises(UserError, match=rf"{key} is empty; give it a folder"):
        load_experiment("smoke", [f"{key}="])


def test_one_weight_file_written_two_ways_is_one_config():
    # "./w.pth" and "w.pth" named two result files, and the second trained the run again.
    hashes = {load_experiment("smoke", [f"model.weights={entry}"]).config_hash()
              for entry in ("proxy_vit=ckpt/w.pth", "proxy_vit=./ckpt/w.pth", "proxy_vit=ckpt/x/../w.pth")}
    assert len(hashes) == 1
    assert load_experiment("smoke", ["model.weights=proxy_vit=ckpt/v.pth"]).config_hash() not in hashes
    assert load_experiment("smoke", ["model.weights=proxy_vit=random"]).model.weights == ("proxy_vit=random",)


def test_evaluations_windows_a_forward_leave_a_runs_identity_as_it_was():
    # It changes speed, not scores, yet it was hashed: lowering it to fit a GPU's memory trained finished runs again.
    for preset in ("proxy", "paper", "smoke"):
        hashes = {load_experiment(preset, [f"eval.batch_windows={n}"]).config_hash() for n in (1, 4, 8, 16)}
        assert len(hashes) == 1, preset
    assert load_experiment("proxy").config_hash() == "2b6c9260"  # at the stored results' 8, their identity kept
    assert load_experiment("proxy", ["data.root=data/synthetic-v2"]).config_hash() == "35168abd"  # world v2's
