"""Tables, plots and the HTML report against hand-made result files with known numbers."""

from __future__ import annotations

import base64
import copy
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.errors import UserError
from benchmarks.reports import plots as plots_module
from benchmarks.reports.frames import (
    PUBLISHED_CSV,
    comparison_frame,
    load_published,
    per_class_frame,
    summary_frame,
)
from benchmarks.reports.html import render_report, write_report
from benchmarks.reports.render import render_latex, render_markdown
from benchmarks.reports.tables import (
    build_tables,
    leaderboard,
    main_tables,
    per_class_tables,
    published_tables,
)
from benchmarks.results import iter_results, write_result

CLASSES = ("road", "sidewalk", "car")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result(method: str, seed: int, miou: dict[str, float], *, backbone: str = "proxy_vit",
                preset: str = "proxy", head: str = "light", setting: str = "G->CBM", params: int = 1_000_000,
                status: str = "finished", failure: str | None = None, per_class: dict[str, dict] | None = None,
                experiment: dict | None = None, curves: bool = False) -> dict:
    targets = {}
    for target, value in miou.items():
        ious = (per_class or {}).get(target) or {cls: value for cls in CLASSES}
        targets[target] = {"miou": value, "per_class_iou": ious, "num_images": 4}
    result = {
        "schema": 1,
        "run_id": f"{preset}/{setting}/{backbone}/{method}/seed{seed}",
        "status": status, "failure": failure, "preset": preset, "setting": setting, "source": "gtav",
        "method": {"name": method, "paper": "", "hyperparameters": {}},
        "backbone": backbone, "head": head, "seed": seed,
        "experiment": experiment or {"preset": preset, "train": {"seed": seed}, "model": {"backbone": backbone}},
        "params": {"backbone_trainable": params, "backbone_added": 0, "backbone_pretrained": 5_000_000,
                   "head_total": 10_000, "head_trainable": 10_000},
        "targets": targets if status == "finished" else {},
        "average_miou": sum(miou.values()) / len(miou) if status == "finished" and miou else None,
        "environment": {"torch": "2.x", "device_name": "cpu", "git_commit": "abc", "git_dirty": False},
        "timings": {"started": "2025-01-01T00:00:00", "finished": "2025-01-01T00:01:00"},
    }
    if curves:
        result["history"] = [{"iter": i, "loss": 2.0 / (i + 1), "lr": 1e-4} for i in (0, 10, 20)]
        result["evaluations"] = [{"iter": i, "targets": {t: v * i / 20 for t, v in miou.items()}} for i in (10, 20)]
        result["profile"] = {"train_images_per_s": 10.0, "eval_images_per_s": 30.0, "peak_memory_mb": 400.0,
                             "device": "cpu", "dtype": "float32"}
    return result


CBM = ("cityscapes", "bdd100k", "mapillary")


def cbm(c: float, b: float, m: float) -> dict[str, float]:
    return dict(zip(CBM, (c, b, m), strict=True))


@pytest.fixture
def runs() -> list[dict]:
    return [
        make_result("rein", 1, cbm(40.0, 30.0, 20.0), params=2_990_081),
        make_result("rein", 2, cbm(44.0, 34.0, 26.0), params=2_990_081),
        make_result("full", 1, cbm(50.0, 20.0, 30.0), params=304_200_000),
        make_result("freeze", 1, cbm(30.0, 25.0, 22.0), params=0),
        make_result("vpt", 1, {}, status="failed", failure="loss diverged (NaN) at iteration 12"),
    ]


# -- numbers ---------------------------------------------------------------------------------------
def test_summary_mean_and_sample_std_over_seeds(runs):
    summary = summary_frame(runs).set_index("method")
    rein = summary.loc["rein"]
    assert rein["seeds"] == 2
    assert rein["cityscapes"] == pytest.approx(42.0)
    assert rein["cityscapes_std"] == pytest.approx(math.sqrt(8.0))  # sample std of 40, 44
    assert rein["mapillary_std"] == pytest.approx(math.sqrt(18.0))
    assert rein["average"] == pytest.approx((30.0 + (34 + 44 + 26) / 3) / 2)
    assert rein["trainable_params_m"] == pytest.approx(2.990081)
    assert math.isnan(summary.loc["full", "cityscapes_std"])  # one seed: no spread
    assert "vpt" not in summary.index  # failed runs are not in the numbers
    # ranked by average, best first
    assert list(summary.index) == ["full", "rein", "freeze"]  # 33.3, 32.3, 25.7


def test_markdown_table_bold_best_per_column_and_failed_listed(runs):
    text = leaderboard(runs)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    cells = {name: [c.strip() for c in line.strip("|").split("|")] for name, line in lines.items()}
    header = cells["Method"]
    assert header[:6] == ["Method", "Params (M)", "Citys.", "BDD", "Map.", "Avg."]
    # rein (two seeds) is best on BDD; full is best on Cityscapes, Mapillary and the average
    assert cells["rein"][2] == "42.0 ± 2.8"
    assert cells["rein"][3] == "**32.0 ± 2.8**"
    assert cells["rein"][4] == "23.0 ± 4.2"
    assert cells["full"][2] == "**50.0**"
    assert cells["full"][3] == "20.0"
    assert cells["full"][4] == "**30.0**"
    assert cells["full"][5] == "**33.3**"
    assert cells["rein"][5] == "32.3 ± 3.3"  # averages 30.0 and 34.7
    assert cells["rein"][6] == "2" and cells["full"][6] == "1"  # the seeds column
    assert cells["full"][1] == "304.2"
    assert cells["freeze"][1] == "0"
    assert cells["rein"][1] == "2.99"
    averages = {name: cells[name][5] for name in ("rein", "full", "freeze")}
    assert sum(v.startswith("**") for v in averages.values()) == 1
    assert list(cells)[1:] == ["full", "rein", "freeze"]  # ranked by average
    assert "failed: vpt seed 1 — loss diverged (NaN) at iteration 12" in text


def test_ties_are_all_bold_at_display_precision():
    runs = [make_result("a", 1, cbm(50.01, 10, 10)), make_result("b", 1, cbm(49.99, 10, 10)),
            make_result("c", 1, cbm(40.0, 10, 10))]
    table = main_tables(runs)[0]
    assert [row[2].bold for row in table.rows] == [True, True, False]


def test_a_column_where_every_method_ties_has_no_best():
    """A class every method misses (0.0 everywhere) or the same figure in every row is left plain."""
    runs = [make_result("a", 1, cbm(50.0, 10, 0)), make_result("b", 1, cbm(40.0, 10, 0))]
    table = main_tables(runs)[0]
    assert [row[2].bold for row in table.rows] == [True, False]
    assert not any(row[3].bold or row[4].bold for row in table.rows)


def test_stale_failure_of_a_rerun_is_not_listed():
    failed = make_result("rein", 1, {}, status="failed", failure="out of memory")
    failed["timings"]["finished"] = "2024-12-31T00:00:00"
    text = leaderboard([failed, make_result("rein", 1, cbm(40, 30, 20))])
    assert "out of memory" not in text
    assert "| rein |" in text


def test_protocols_never_mix_in_one_table():
    base = {"preset": "proxy", "train": {"iters": 300}, "model": {"backbone": "proxy_vit"}}
    longer = copy.deepcopy(base)
    longer["train"]["iters"] = 2000
    runs = [
        make_result("rein", 1, cbm(40, 30, 20), experiment=base),
        make_result("rein", 1, cbm(60, 50, 40), experiment=longer),
        make_result("rein", 1, cbm(10, 10, 10), preset="smoke"),
        make_result("rein", 1, cbm(10, 10, 10), head="mask2former"),
        make_result("rein", 1, cbm(10, 10, 10), backbone="dinov2_vitl14"),
    ]
    tables = main_tables(runs)
    assert len(tables) == 5
    assert all(len(t.rows) == 1 for t in tables)
    # the two proxy/light/proxy_vit configurations are told apart by their config fingerprint
    fingerprinted = [t.title for t in tables if "config" in t.title]
    assert len(fingerprinted) == 2 and fingerprinted[0] != fingerprinted[1]
    # ... and named by the setting in which they differ
    assert sorted(title.split(" · ")[4].split(" (config")[0] for title in fingerprinted) == ["train.iters=2000", "train.iters=300"]


def test_seed_and_paths_do_not_split_a_protocol():
    experiments = [{"train": {"seed": s}, "data": {"root": f"/mnt/{s}"}, "run": {"results_dir": str(s)}}
                   for s in (1, 2)]
    runs = [make_result("rein", s, cbm(40 + s, 30, 20), experiment=e) for s, e in zip((1, 2), experiments, strict=True)]
    tables = main_tables(runs)
    assert len(tables) == 1 and "config" not in tables[0].title
    assert tables[0].rows[0][2].plain() == "41.5 ± 0.7"


def test_a_table_of_runs_that_depart_from_their_preset_says_how_even_alone():
    from benchmarks.config import load_experiment

    preset = json.loads(json.dumps(load_experiment("proxy").to_dict()))
    cropped = copy.deepcopy(preset)
    cropped["data"]["crop_size"] = cropped["model"]["img_size"] = cropped["eval"]["crop_size"] = 96
    cropped["data"]["root"] = "/elsewhere"  # where the files live is no departure
    [as_preset] = main_tables([make_result("lora", 42, cbm(40, 30, 20), experiment=preset)])
    [departed] = main_tables([make_result("lora", 42, cbm(40, 30, 20), experiment=cropped)])
    assert as_preset.title == "G->CBM · proxy_vit · light head · preset proxy: mIoU (%)"
    assert departed.title.startswith("G->CBM · proxy_vit · light head · preset proxy · "
                                      "data.crop_size=96, eval.crop_size=96, model.img_size=96 (config ")
    retuned = copy.deepcopy(preset)
    retuned["methods"] = {"lora": {"rank": 4}}
    [retuned_table] = main_tables([make_result("lora", 42, cbm(40, 30, 20), experiment=retuned)])
    assert "· methods.lora.rank=4 (config " in retuned_table.title
    older = {"preset": "proxy", "train": {"seed": 42}, "model": {"backbone": "proxy_vit"}}  # records fewer settings
    assert main_tables([make_result("lora", 42, cbm(40, 30, 20), experiment=older)])[0].title == as_preset.title
    [published] = published_tables([make_result("lora", 42, cbm(40, 30, 20), experiment=cropped)])
    assert "· config " in published.title  # the fingerprint travels to every table of those runs



def test_configurations_sharing_a_table_title_lead_with_where_each_departs_from_the_preset():
    # Titles listed the differing keys alphabetically, three of them: the shipped preset's table and P27's
    # (other weights) read the same, the key that told them apart in "+3 more".
    from benchmarks.config import load_experiment

    preset = json.loads(json.dumps(load_experiment("proxy").to_dict()))
    longer, cropped = copy.deepcopy(preset), copy.deepcopy(preset)
    longer["train"]["iters"] = 2000
    cropped["data"]["crop_size"] = cropped["model"]["img_size"] = cropped["eval"]["crop_size"] = 96
    titles = [t.title for t in main_tables([make_result("lora", 42, cbm(40, 30, 20), experiment=e)
                                            for e in (preset, longer, cropped)])]
    labels = {title.split(" · ")[4].split(" (config")[0] for title in titles}
    assert "train.iters=2000, data.crop_size=128, eval.crop_size=128, +1 more" in labels
    assert "data.crop_size=96, eval.crop_size=96, model.img_size=96, +1 more" in labels
    assert "the preset's settings; data.crop_size=128, eval.crop_size=128, model.img_size=128, +1 more" in labels
    # Two configurations that both depart from the preset (lr), one of them also in its batch: neither is the preset's.
    slower, bigger = copy.deepcopy(preset), copy.deepcopy(preset)
    slower["train"]["lr"] = bigger["train"]["lr"] = 5e-4
    bigger["train"]["batch_size"] = 8
    titles = [t.title for t in main_tables([make_result("lora", 42, cbm(40, 30, 20), experiment=e) for e in (slower, bigger)])]
    assert not any("the preset's settings" in title for title in titles), titles


def test_a_method_variants_table_and_the_presets_name_the_hyperparameter_with_both_values():
    # Read "methods.vpt.num_prompts=38, methods=unset" and "the preset's settings; methods={},
    # methods.vpt.num_prompts=unset": the emptied section counted as a setting, the default as no value.
    from benchmarks.config import load_experiment

    preset = json.loads(json.dumps(load_experiment("proxy").to_dict()))
    preset["methods"] = {}
    fewer = copy.deepcopy(preset)
    fewer["methods"] = {"vpt": {"num_prompts": 38}}
    titles = sorted(t.title for t in main_tables([make_result("vpt", 42, cbm(40, 30, 20), experiment=e)
                                                  for e in (preset, fewer)]))
    labels = [title.split(" · ")[4].split(" (config")[0] for title in titles]
    assert labels == ["methods.vpt.num_prompts=38", "the preset's settings; methods.vpt.num_prompts=150"], labels
    # An emptied section beside none at all: two fingerprints, no setting between them, and no dangling "; ".
    bare = copy.deepcopy(preset)
    del bare["methods"]
    titles = [t.title for t in main_tables([make_result("vpt", 42, cbm(40, 30, 20), experiment=e) for e in (preset, bare)])]
    assert len(titles) == 2 and all(" · the preset's settings (config " in title for title in titles), titles


def test_a_table_of_runs_on_other_weights_than_their_preset_says_so_even_alone():
    """Weights count by content: the shipped checkpoint under any file name is the preset's, another file
    or random initialisation is a departure that a table of those runs alone names."""
    from benchmarks.backbones import get_spec
    from benchmarks.provenance import file_sha256

    shipped = file_sha256(get_spec("proxy_vit").default_weights)

    def run(weights, sha256):
        res = make_result("lora", 42, cbm(40, 30, 20), experiment={
            "preset": "proxy", "train": {"seed": 42}, "model": {"backbone": "proxy_vit", "weights": weights}})
        res["provenance"] = {"weights": {"backbone": "proxy_vit", "file": "/x/vit.safetensors" if sha256 else None,
                                         "sha256": sha256, "bytes": 1}}
        return res

    [as_preset] = main_tables([run([], shipped)])
    assert as_preset.title == "G->CBM · proxy_vit · light head · preset proxy: mIoU (%)"
    assert main_tables([run(["proxy_vit=/copy/of/shipped.safetensors"], shipped)])[0].title == as_preset.title
    [other] = main_tables([run(["proxy_vit=/x/vit.safetensors"], "cd" * 32)])
    assert "· preset proxy · model.weights=[proxy_vit=sha256:cdcdcdcdcdcd] (config " in other.title
    [random_init] = main_tables([run(["proxy_vit=random"], None)])
    assert "· preset proxy · model.weights=[proxy_vit=random] (config " in random_init.title


def test_weights_split_a_protocol_by_file_not_by_folder():
    """Random initialisation and another checkpoint are other protocols; the same file elsewhere is not."""
    def experiment(weights):
        return {"train": {"iters": 300}, "model": {"backbone": "proxy_vit", "weights": weights}}

    shipped = make_result("full", 42, cbm(40, 30, 20), experiment=experiment([]))
    random_init = make_result("full", 42, cbm(10, 10, 10), experiment=experiment(["proxy_vit=random"]))
    here = make_result("full", 1, cbm(40, 30, 20), experiment=experiment(["proxy_vit=/ckpt/a/vit.safetensors"]))
    there = make_result("full", 2, cbm(42, 30, 20), experiment=experiment(["proxy_vit=/mnt/b/vit.safetensors"]))
    tables = main_tables([shipped, random_init, here, there])
    assert len(tables) == 3
    assert sorted(len(t.rows) for t in tables) == [1, 1, 1]
    seeds = [t for t in tables if "±" in t.rows[0][2].plain()]
    assert len(seeds) == 1 and seeds[0].rows[0][2].plain() == "41.0 ± 1.4"  # the two folders: one row
    assert "model.weights=[proxy_vit=random]" in " ".join(t.title for t in tables)


def test_weights_split_a_protocol_by_content_where_the_run_recorded_it():
    """The default checkpoint and the same file passed as model.weights (any name, any folder) are one
    protocol once the results record what they loaded; a file of other content, or random
    initialisation, is another, even under the default's file name."""
    def result(seed, weights, sha256, average):
        res = make_result("full", seed, cbm(average, 30, 20),
                          experiment={"train": {"iters": 300}, "model": {"backbone": "proxy_vit", "weights": weights}})
        res["provenance"] = {"weights": {"backbone": "proxy_vit", "file": "/somewhere/x.safetensors" if sha256 else None,
                                         "sha256": sha256, "bytes": 1}}
        return res

    default = result(42, [], "ab" * 32, 40)
    explicit = result(43, ["proxy_vit=/tmp/copy/v9.safetensors"], "ab" * 32, 42)
    other = result(44, ["proxy_vit=/tmp/proxy_vit.safetensors"], "cd" * 32, 10)
    random_init = result(45, ["proxy_vit=random"], None, 5)
    tables = main_tables([default, explicit, other, random_init])
    assert len(tables) == 3
    rows = {t.title.split(" · ")[4].split(" (config")[0]: t.rows[0][2].plain() for t in tables}
    assert rows == {"model.weights=[proxy_vit=sha256:abababababab]": "41.0 ± 1.4",
                    "model.weights=[proxy_vit=sha256:cdcdcdcdcdcd]": "10.0",
                    "model.weights=[proxy_vit=random]": "5.0"}


def test_setting_filter_and_other_settings_have_their_own_targets():
    runs = [make_result("rein", 1, cbm(40, 30, 20)),
            make_result("rein", 1, {"bdd100k": 50.0, "mapillary": 60.0}, setting="C->BM")]
    text = leaderboard(runs, setting="C->BM")
    assert "C->BM" in text and "G->CBM" not in text
    assert "Citys." not in text and "**" not in text  # a single row has nothing to be best against
    assert "55.0" in text
    assert leaderboard(runs, setting="C->ACDC") == "No results for setting C->ACDC.\n"


def test_latex_is_booktabs_and_escaped(runs):
    text = leaderboard(runs, fmt="latex")
    assert r"\toprule" in text and r"\midrule" in text and r"\bottomrule" in text
    assert r"\begin{tabular}{lrrrrrr}" in text
    assert r"\textbf{50.0}" in text
    assert r"42.0 $\pm$ 2.8" in text
    assert text.startswith("% G->CBM · proxy_vit")  # the title is a comment, free to hold any character
    body = text.split(r"\begin{tabular}")[1].split(r"\end{tabular}")[0]
    assert "±" not in body and "_" not in body


def test_csv_is_the_numbers_at_full_precision(runs, tmp_path):
    frame = pd.read_csv(pd.io.common.StringIO(leaderboard(runs, fmt="csv")))
    rein = frame.set_index("method").loc["rein"]
    assert rein["cityscapes"] == pytest.approx(42.0)
    assert rein["cityscapes_std"] == pytest.approx(math.sqrt(8.0))
    assert set(frame["method"]) == {"rein", "full", "freeze"}


@pytest.mark.parametrize("view", [{}, {"per_class": True}, {"published": True}])
def test_csv_over_failed_runs_only_is_a_header_and_a_warning(view, caplog):
    """Every run failed: the CSV still names its columns (a reader gets a frame, not a parse error) and stderr
    says why it has no rows, instead of a blank line."""
    failed = [make_result("vpt", 1, {}, status="failed", failure="loss diverged")]
    with caplog.at_level("WARNING"):
        text = build_tables(failed, fmt="csv", **view)
    frame = pd.read_csv(pd.io.common.StringIO(text))
    assert frame.empty and {"preset", "setting", "backbone", "method"} <= set(frame.columns)
    assert "no finished run" in caplog.text and "1 failed" in caplog.text


def test_published_view_over_failed_runs_only_says_so():
    failed = [make_result("vpt", 1, {}, status="failed", failure="loss diverged")]
    for fmt in ("markdown", "latex"):
        text = build_tables(failed, fmt=fmt, published=True)
        assert "No finished runs" in text and "failed: vpt seed 1" in text


def test_published_csv_without_a_matching_paper_row_names_its_columns(caplog):
    runs = [make_result("mystery", 1, cbm(1, 2, 3))]
    with caplog.at_level("WARNING"):
        frame = pd.read_csv(pd.io.common.StringIO(build_tables(runs, fmt="csv", published=True)))
    assert frame.empty and {"method", "average_published", "average_harness"} <= set(frame.columns)
    assert "no published numbers" in caplog.text


def test_per_class_table_means_and_best(runs):
    runs = [
        make_result("a", 1, cbm(55, 10, 10), per_class={"cityscapes": {"road": 90.0, "sidewalk": None, "car": 20.0}}),
        make_result("a", 2, cbm(60, 10, 10), per_class={"cityscapes": {"road": 80.0, "sidewalk": None, "car": 40.0}}),
        make_result("b", 1, cbm(125 / 3, 10, 10), per_class={"cityscapes": {"road": 70.0, "sidewalk": 5.0, "car": 50.0}}),
    ]
    frame = per_class_frame(runs).set_index(["method", "target", "class"])
    assert frame.loc[("a", "cityscapes", "road"), "iou"] == pytest.approx(85.0)
    assert math.isnan(frame.loc[("a", "cityscapes", "sidewalk"), "iou"])
    table = next(t for t in per_class_tables(runs) if t.title.endswith("on cityscapes"))
    assert table.header == ["Method", "road", "sidewalk", "car", "mIoU"]
    rows = {row[0].plain(): row for row in table.rows}
    assert rows["a"][1].plain() == "85.0" and rows["a"][1].bold
    assert rows["a"][2].plain() == "—"
    assert rows["b"][3].plain() == "50.0" and rows["b"][3].bold
    assert rows["a"][4].plain() == "57.5"  # the mean of the runs' mIoU: (55 + 60) / 2
    assert len(per_class_tables(runs)) == 3  # one per target


def test_the_per_class_miou_is_the_main_tables_where_a_class_is_absent_from_one_seed_only():
    runs = [make_result("a", 1, cbm(80, 10, 10), per_class={"cityscapes": {"road": 80.0, "sidewalk": None}}),
            make_result("a", 2, cbm(40, 10, 10), per_class={"cityscapes": {"road": 80.0, "sidewalk": 0.0}})]
    table = next(t for t in per_class_tables(runs) if t.title.endswith("on cityscapes"))
    main = summary_frame(runs).set_index("method")
    assert main.loc["a", "cityscapes"] == pytest.approx(60.0)
    assert table.rows[0][-1].plain() == "60.0"  # not 40.0, the mean of the classes' seed means (80 and 0)


# -- published numbers ----------------------------------------------------------------------------
def test_published_csv_keeps_sources_and_verification():
    published = load_published()
    assert {"source", "verified", "trainable_params_m", "cityscapes", "bdd100k", "mapillary", "average"} <= set(published.columns)
    rein = published[(published["method"] == "rein") & (published["backbone"] == "dinov2_vitl14")
                     & (published["setting"] == "G->CBM")].iloc[0]
    assert rein["average"] == pytest.approx(64.3)
    assert "Rein" in rein["source"]
    assert published["source"].notna().all() and published["verified"].notna().all()



def test_a_published_file_with_a_row_twice_or_words_in_a_number_is_refused_naming_the_line(tmp_path):
    # A second rein row made rein count twice in ρ ("over the 11 methods"); "66.5 (secondary)" was a traceback.
    lines = PUBLISHED_CSV.read_text().splitlines()
    twice = tmp_path / "twice.csv"
    twice.write_text("\n".join([*lines, lines[5]]) + "\n")
    with pytest.raises(UserError, match=rf"line {len(lines) + 1}: .* is listed twice; keep one row per"):
        load_published(twice)
    header = lines[0].split(",")
    row = lines[5].split(",")
    row[header.index("average")] = "66.5 (secondary)"
    words = tmp_path / "words.csv"
    words.write_text("\n".join([lines[0], *lines[1:5], ",".join(row)]) + "\n")
    with pytest.raises(UserError, match=r"line 6: average='66.5 \(secondary\)' is not a number; leave the cell empty"):
        load_published(words)
    assert load_published()["average"].dtype.kind == "f"

def test_published_side_by_side_with_differences():
    runs = [make_result("rein", s, cbm(c, 60.4, 66.1), backbone="dinov2_vitl14", params=2_990_081, preset="paper",
                        head="mask2former") for s, c in ((1, 65.0), (2, 66.0))]
    runs.append(make_result("mystery", 1, cbm(1, 2, 3), backbone="dinov2_vitl14", preset="paper", head="mask2former"))
    comparison = comparison_frame(summary_frame(runs), load_published()).set_index("method")
    assert list(comparison.index) == ["rein"]  # no published row, no comparison
    row = comparison.loc["rein"]
    assert row["cityscapes_published"] == pytest.approx(66.4)
    assert row["cityscapes_harness"] == pytest.approx(65.5)
    assert row["cityscapes_delta"] == pytest.approx(-0.9)
    assert row["bdd100k_delta"] == pytest.approx(0.0)
    assert row["average_delta"] == pytest.approx((65.5 + 60.4 + 66.1) / 3 - 64.3)
    assert row["params_m_delta"] == pytest.approx(2.990081 - 2.99)
    text = render_markdown(published_tables(runs)[0])
    assert "| rein | 2.99 | 2.99 | +0.00 | 66.4 | 65.5 | -0.9 |" in text
    assert "Rein (CVPR 2024) Table 3" in text


def test_the_published_source_column_is_the_citation_even_when_the_runs_scored_a_held_out_source():
    runs = [with_source(make_result("rein", 1, cbm(65.0, 60.4, 66.1), backbone="dinov2_vitl14", params=2_990_081,
                                    preset="paper", head="mask2former"), 70.0)]
    comparison = comparison_frame(summary_frame(runs), load_published()).set_index("method")
    assert comparison.loc["rein", "citation"] == "Rein (CVPR 2024) Table 3"  # `source` is a score in the main CSV
    assert "source" not in comparison.columns
    row = [c.plain() for c in published_tables(runs)[0].rows[0]]
    assert row[-2:] == ["Rein (CVPR 2024) Table 3", "reprinted by later papers"]


def test_published_missing_values_show_a_dash():
    runs = [make_result("fishertune", 1, cbm(60, 60, 60), backbone="dinov2_vitl14", params=15_210_000)]
    table = published_tables(runs)[0]
    row = [c.plain() for c in table.rows[0]]
    assert row[4:7] == ["—", "60.0", "—"]  # the paper gives no per-target numbers
    assert row[-5:-2] == ["66.5", "60.0", "-6.5"]


def test_published_for_unmatched_backbone_says_so(runs):
    others = [dict(r, backbone="eva02_small") for r in runs]
    text = build_tables(others, published=True)
    assert "No published numbers" in text and "eva02_small" in text


def with_source(result: dict, source: float) -> dict:
    return dict(result, source_heldout={"miou": source, "per_class_iou": {}, "num_images": 4})


def test_the_proxy_beside_the_published_vfm_it_stands_in_for():
    # published DINOv2-L averages: full 61.7, freeze 61.1, lora 62.7, rein 64.3 (results/published.csv)
    proxy = [with_source(make_result("full", 1, cbm(28, 28, 28), params=5_000_000), 60.0),
             with_source(make_result("freeze", 1, cbm(20, 20, 20), params=0), 40.0),
             with_source(make_result("lora", 1, cbm(25, 25, 25), params=40_000), 45.0),
             with_source(make_result("rein", 1, cbm(35, 35, 35), params=100_000), 50.0),
             with_source(make_result("ia3", 1, cbm(10, 10, 10), params=3_000), 30.0)]  # no published row
    (table,) = [t for t in published_tables(proxy) if "beside the published dinov2_vitl14" in t.title]
    assert [row[0].text for row in table.rows] == ["rein", "lora", "full", "freeze"]  # by the published average
    ranks = {row[0].text: (row[2].value, row[4].value) for row in table.rows}
    assert ranks == {"rein": (1, 1), "lora": (2, 3), "full": (3, 2), "freeze": (4, 4)}
    notes = " ".join(table.notes)
    # d² = 0+1+1+0: ρ = 1 − 6·2/(4·15) = 0.8
    assert "Spearman ρ = 0.80 over the 4 methods" in notes
    assert "source 60.0 (best), target average 28.0 vs 35.0 for the best parameter-efficient method (rein): " \
           "shows the inverted U" in notes
    proxy[0] = with_source(make_result("full", 1, cbm(40, 40, 40), params=5_000_000), 60.0)
    (table,) = [t for t in published_tables(proxy) if "beside the published" in t.title]
    # ours: full 1, rein 2, lora 3, freeze 4 against 3, 1, 2, 4: d² = 4+1+1+0, ρ = 1 − 36/60 = 0.4
    assert "Spearman ρ = 0.40" in " ".join(table.notes) and "does not show the inverted U" in " ".join(table.notes)
    text = build_tables(proxy, published=True)
    assert "dinov2_vitl14" in text and "No published numbers" not in text
    # the CSV form of the same table (it was a header only, with a warning, for a proxy backbone)
    frame = pd.read_csv(pd.io.common.StringIO(build_tables(proxy, fmt="csv", published=True))).set_index("method")
    assert list(frame.index) == ["rein", "lora", "full", "freeze"]
    assert frame.loc["full", ["rank_published", "rank_harness"]].tolist() == [3, 1]
    assert frame.loc["lora", "average_published"] == pytest.approx(62.7) and frame.loc["lora", "average_harness"] == 25
    assert frame.loc["full", "source_harness"] == 60 and (frame["compared_with"] == "dinov2_vitl14").all()
    assert frame["spearman_rho"].tolist() == pytest.approx([0.4] * 4)
    assert frame.loc["rein", "citation"].startswith("Rein")
    assert frame.loc["rein", "verified"] == "reprinted by later papers"  # where each published figure was read
    # beside a run on the published backbone itself: one file, the ranks whole numbers, empty on the direct row
    direct = make_result("rein", 1, cbm(64, 60, 66), backbone="dinov2_vitl14", preset="paper", head="mask2former")
    text = build_tables([*proxy, direct], fmt="csv", published=True)
    both = pd.read_csv(pd.io.common.StringIO(text))
    assert len(both) == 5 and both["average_delta"].notna().sum() == 1 and both["rank_harness"].notna().sum() == 4
    as_written = pd.read_csv(pd.io.common.StringIO(text), dtype=str).set_index(["backbone", "method"])
    assert as_written.loc[("proxy_vit", "full"), ["rank_published", "rank_harness"]].tolist() == ["3", "1"]  # not 3.0


def test_the_proxy_table_gives_rho_seed_by_seed_as_a_one_seed_run_would_see_it():
    # published DINOv2-L averages: rein 64.3, lora 62.7, full 61.7, freeze 61.1
    by_seed = {1: {"rein": 35, "lora": 30, "full": 25, "freeze": 20},    # the papers' order: ρ = 1
               2: {"lora": 36, "rein": 30, "full": 25, "freeze": 20},    # rein and lora swapped: ρ = 1 − 6·2/60 = 0.8
               3: {"full": 31, "rein": 30, "lora": 20}}                   # three methods: d² = 1+1+4, ρ = 1 − 36/24
    runs = [make_result(method, seed, cbm(value, value, value)) for seed, methods in by_seed.items()
            for method, value in methods.items()]
    runs.append(make_result("ia3", 1, cbm(50, 50, 50)))  # no published row: in no ρ
    (table,) = [t for t in published_tables(runs) if "beside the published" in t.title]
    notes = " ".join(table.notes)
    assert "ρ of each seed alone: 1.00 (seed 1), 0.80 (seed 2), -0.50 (seed 3, 3 methods)." in notes
    one_seed = [r for r in runs if r["seed"] == 1]
    (table,) = [t for t in published_tables(one_seed) if "beside the published" in t.title]
    assert "Spearman ρ = 1.00 over the 4 methods" in " ".join(table.notes)
    assert "each seed alone" not in " ".join(table.notes)


def with_role(result: dict, role: str) -> dict:
    return dict(result, method=dict(result["method"], role=role))


def test_the_inverted_u_finds_the_baselines_by_the_role_a_result_records_not_by_name():
    from benchmarks.reports.tables import inverted_u_note

    rows = [with_source(with_role(make_result("every_weight", 1, cbm(20, 20, 20), params=5_000_000), "full fine-tuning"), 60.0),
            with_source(with_role(make_result("head_only", 1, cbm(30, 30, 30), params=0), "frozen backbone"), 40.0),
            with_source(with_role(make_result("adapter", 1, cbm(25, 25, 25), params=40_000), "parameter-efficient"), 45.0)]
    note = inverted_u_note(summary_frame(rows))
    # the frozen row scores best on the targets but is no parameter-efficient method: the adapter is compared
    assert note.startswith("every_weight: source 60.0 (best), target average 20.0 vs 25.0") and "(adapter)" in note
    assert "shows the inverted U" in note
    # without a full fine-tuning row there is nothing to say
    assert inverted_u_note(summary_frame(rows[1:])) == ""


def test_a_method_with_an_unknown_role_is_refused_at_registration():
    from benchmarks.method import Method, register_method

    class Sideways(Method):
        name = "sideways_test_method"
        role = "sideways"

    with pytest.raises(TypeError, match="role is 'sideways'; expected one of: full fine-tuning"):
        register_method(Sideways)


def test_the_rein_figure_has_a_source_panel_when_the_source_was_scored():
    finished = [with_source(make_result("full", 1, cbm(30, 30, 30), params=5_000_000), 60.0),
                with_source(make_result("freeze", 1, cbm(20, 20, 20), params=0), 40.0)]
    figure = plots_module.miou_vs_params(finished)
    assert [ax.get_ylabel() for ax in figure.axes] == ["held-out source mIoU (%)", "average target mIoU (%)"]
    assert [ax.get_ylabel() for ax in plots_module.miou_vs_params([make_result("full", 1, cbm(1, 2, 3))]).axes] == [
        "average target mIoU (%)"]


def test_bad_inputs_are_user_errors(tmp_path, runs):
    with pytest.raises(UserError, match="not found"):
        load_published(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("method,average\nrein,1\n")
    with pytest.raises(UserError, match="lacks the column"):
        load_published(tmp_path / "bad.csv")
    with pytest.raises(UserError, match="unknown table format"):
        build_tables(runs, fmt="docx")


# -- plots and the HTML report ---------------------------------------------------------------------
def test_plots_are_pngs_and_skip_missing_data(runs):
    with_curves = [make_result("rein", 1, cbm(40, 30, 20), curves=True), make_result("freeze", 1, cbm(30, 20, 10), params=0)]
    names = [p.name.rsplit("_light_", 1)[1] for p in plots_module.make_plots(with_curves)]
    assert names == ["miou_vs_params", "per_class_iou", "training_curves", "profile"]
    without = plots_module.make_plots(runs)
    assert [p.name.rsplit("_light_", 1)[1] for p in without] == ["miou_vs_params", "per_class_iou"]
    assert all(p.png.startswith(PNG_MAGIC) for p in without)


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tables = 0
        self.headings: list[str] = []
        self.external: list[str] = []
        self._in_h3 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table":
            self.tables += 1
        if tag in ("script", "link", "iframe") or (tag != "a" and attrs.get("src", "data:").split(":")[0] not in ("data",)):
            self.external.append(tag)
        if tag == "a" and not attrs.get("href", "").startswith("#"):
            self.external.append(attrs.get("href", ""))
        self._in_h3 = tag == "h3"

    def handle_data(self, data):
        if self._in_h3:
            self.headings.append(data)

    def handle_endtag(self, tag):
        self._in_h3 = False


def test_report_html_is_self_contained_with_every_table_and_image(tmp_path):
    runs = [
        make_result("rein", 1, cbm(65, 60, 66), backbone="dinov2_vitl14", params=2_990_081, curves=True),
        make_result("freeze", 1, cbm(60, 55, 60), backbone="dinov2_vitl14", params=0, curves=True),
        make_result("rein", 1, cbm(40, 30, 20), curves=True),
        make_result("vpt", 1, {}, status="failed", failure="diverged"),
    ]
    for index, result in enumerate(runs):
        write_result(tmp_path / "runs" / f"{index}.json", result)
    loaded = iter_results([tmp_path / "runs"])
    page = write_report(loaded, tmp_path / "report")
    text = page.read_text(encoding="utf-8")
    parser = _PageParser()
    parser.feed(text)
    # per protocol: main + per-class (3 targets); dinov2_vitl14 also has the published comparison,
    # proxy_vit the published DINOv2-L numbers it stands in for
    assert parser.tables == (1 + 1 + 3) + (1 + 1 + 3)
    assert sum("published vs harness" in h for h in parser.headings) == 1
    assert sum("the proxy beside the published dinov2_vitl14" in h for h in parser.headings) == 1
    assert len(parser.images) == 2 * 4  # two protocols × four figures
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert parser.external == []
    assert "diverged" in text
    assert len(list((tmp_path / "report").glob("*.png"))) == 8
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in (tmp_path / "report").iterdir())  # shareable, not 0600


def test_report_of_nothing_is_a_page_not_a_crash():
    assert "No result files found." in render_report([])


# -- commands --------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    from benchmarks.cli import main

    return main(argv)


def test_table_command_formats_and_errors(tmp_path, runs, capsys):
    for index, result in enumerate(runs):
        write_result(tmp_path / f"{index}.json", result)
    (tmp_path / "foreign.json").write_text(json.dumps({"not": "a result"}))
    assert _cli(["table", "--runs", str(tmp_path), "--format", "latex"]) == 0
    assert r"\toprule" in capsys.readouterr().out
    assert _cli(["table", "--runs", str(tmp_path), "--per-class", "--format", "csv", "--output", str(tmp_path / "pc.csv")]) == 0
    frame = pd.read_csv(tmp_path / "pc.csv")
    assert len(frame) == 3 * 3 * 3  # methods × targets × classes
    capsys.readouterr()
    assert _cli(["table", "--runs", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(["table", "--runs", str(empty)]) == 2
    assert "no result files" in capsys.readouterr().err


def test_report_command_writes_index(tmp_path, runs, capsys):
    for index, result in enumerate(runs):
        write_result(tmp_path / "runs" / f"{index}.json", result)
    assert _cli(["report", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "out" / "index.html"
    assert (tmp_path / "out" / "index.html").stat().st_size > 1000


def test_figures_say_what_they_do_not_know_and_draw_names_literally():
    # Drawn at 0 trainable parameters, a run without a count read as frozen; a missing speed as a zero-length
    # bar; a `$` in a method's name started matplotlib's math notation (a balanced pair failed the report).
    uncounted = make_result("rein", 1, cbm(30, 30, 30), curves=True)
    del uncounted["params"]
    uncounted["profile"]["eval_images_per_s"] = None
    dollars = make_result("lora_$\\frac{1}$", 1, cbm(25, 25, 25), curves=True)
    finished = [uncounted, dollars, make_result("freeze", 1, cbm(20, 20, 20), params=0, curves=True)]
    figure = plots_module.miou_vs_params(finished)
    drawn = [text.get_text() for ax in figure.axes for text in ax.texts]
    assert "rein" not in drawn and "freeze" in drawn and "lora_\\$\\frac{1}\\$" in drawn
    assert "not drawn, no parameter count recorded: rein" in figure._suptitle.get_text()
    chart = plots_module.profile_chart(finished)
    assert any(text.get_text() == "n/a" for ax in chart.axes for text in ax.texts)
    assert all(plot.png.startswith(b"\x89PNG") for plot in plots_module.make_plots(finished))  # renders



def test_the_rein_figure_puts_the_labels_of_methods_at_one_point_on_separate_lines():
    # lora and dora (786k and 860k trainable on DINOv2-L), set and set_released: their labels printed over
    # each other.
    runs = [make_result("lora", 1, cbm(30, 30, 30), params=786_432),
            make_result("dora", 1, cbm(30, 30, 30.1), params=860_160),
            make_result("vpt", 1, cbm(20, 20, 20), params=3_686_400)]
    figure = plots_module.miou_vs_params(runs)
    offsets = {text.get_text(): text.xyann for text in figure.axes[0].texts if text.get_text() in ("lora", "dora", "vpt")}
    assert offsets["lora"] != offsets["dora"]
    assert offsets["vpt"] == (6, 4)  # alone where it is: the usual place


def test_the_rein_figure_labels_a_crowded_cluster_without_covering_a_label_or_another_methods_marker():
    # The proxy table's target panel (docs/results.md, world v3: trainable parameters in M, target average): 16
    # methods within two decades and 1.5 points. Labels stepping down a line printed over the markers below them
    # and over each other's leader lines.
    table = {"dora": (0.0403, 33.37), "lora": (0.0369, 33.33), "fishertune": (0.14, 33.17), "loha": (0.0737, 33.14),
             "fada": (0.20, 33.07), "soma": (0.23, 33.04), "oft": (0.0179, 33.00), "fada_released": (0.0872, 32.99),
             "lokr": (0.00365, 32.86), "adaptformer": (0.15, 32.86), "rein": (0.10, 32.85), "ia3": (0.00346, 32.30),
             "set": (0.29, 32.20), "vera": (0.00499, 32.14), "set_released": (0.29, 31.87), "freeze": (0.0, 31.82),
             "vpt": (0.17, 30.87), "full": (2.76, 27.63)}
    runs = [make_result(name, 1, cbm(score, score, score), params=round(params * 1e6))
            for name, (params, score) in table.items()]
    figure = plots_module.miou_vs_params(runs)
    renderer = figure.canvas.get_renderer()
    ax = figure.axes[0]
    labels = {text.get_text(): plots_module._text_extent(text, renderer) for text in ax.texts
              if text.get_text() in table}
    assert len(labels) == len(table)
    markers = {float(line.get_ydata()[0]): ax.transData.transform((line.get_xdata()[0], line.get_ydata()[0]))
               for line in ax.lines if line.get_marker() == "o"}
    inside = ax.get_window_extent(renderer)

    def shared_area(a, b):
        return max(min(a.x1, b.x1) - max(a.x0, b.x0), 0) * max(min(a.y1, b.y1) - max(a.y0, b.y0), 0)

    for name, box in labels.items():
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, name
        assert not [other for other in labels if other != name and shared_area(box, labels[other]) > 0], name
        own = round(table[name][1], 2)
        assert not [y for y, centre in markers.items() if round(y, 2) != own and box.contains(*centre)], name


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_report_removes_the_figures_of_the_earlier_report_and_only_those(tmp_path, capsys):
    out = tmp_path / "out"
    write_report([make_result("full", 1, cbm(30, 30, 30), curves=True, preset="smoke")], out)
    earlier = {p.name for p in out.glob("*.png")}
    assert earlier and all(name.startswith("smoke") for name in earlier)
    (out / "notes.png").write_bytes(b"the user's own picture")
    (out / "draft_profile.png").write_bytes(b"the user's own, named like a figure")
    write_report([make_result("full", 1, cbm(30, 30, 30), curves=True)], out)
    assert not any((out / name).exists() for name in earlier)
    assert (out / "notes.png").exists() and (out / "draft_profile.png").exists()
    blocked = tmp_path / "blocked"
    (blocked / "index.html").mkdir(parents=True)
    runs = tmp_path / "runs"
    write_result(runs / "a.json", make_result("full", 1, cbm(30, 30, 30), curves=True))
    assert _cli(["report", "--runs", str(runs), "--out", str(blocked)]) == 2
    assert "index.html" in capsys.readouterr().err and sorted(p.name for p in blocked.iterdir()) == ["index.html"]


def test_a_page_of_a_report_from_before_pages_named_their_figures_still_has_its_figures_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text('<html><body><h1>x</h1><p class="meta">3 result file(s), 3 finished run(s) in '
                                    '1 protocol(s); generated 2026-12-01T10:00:00. mIoU in %</p></body></html>')
    (out / "proxy_G2CBM_old_miou_vs_params.png").write_bytes(b"that report's figure")
    write_report([make_result("full", 1, cbm(30, 30, 30), curves=True)], out)
    assert not (out / "proxy_G2CBM_old_miou_vs_params.png").exists()


def test_a_folder_whose_index_html_is_someone_elses_is_refused_before_anything_is_drawn(tmp_path, capsys):
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("<html><body>my own page</body></html>")
    (out / "thesis_training_curves.png").write_bytes(b"mine")
    runs = tmp_path / "runs"
    write_result(runs / "a.json", make_result("full", 1, cbm(30, 30, 30), curves=True))
    before = _contents(out)
    assert _cli(["report", "--runs", str(runs), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds an index.html that no DGSS-Bench report wrote" in line and _contents(out) == before


def test_a_report_that_runs_out_of_space_leaves_the_earlier_one_whole(tmp_path, monkeypatch, capsys):
    import errno

    import benchmarks.results as results_module

    out = tmp_path / "out"
    write_report([make_result("full", 1, cbm(30, 30, 30), curves=True, preset="smoke")], out)
    before = _contents(out)
    real_mkstemp, calls = results_module.tempfile.mkstemp, []

    def full_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(results_module.tempfile, "mkstemp", full_after_two)
    with pytest.raises(UserError, match="what was there before is unchanged"):
        write_report([make_result("full", 1, cbm(40, 40, 40), curves=True)], out)
    assert _contents(out) == before  # the earlier page and all its figures, no new one, no temporary file


def test_a_result_named_twice_by_the_runs_given_is_read_once(tmp_path):
    write_result(tmp_path / "proxy" / "a.json", make_result("full", 1, cbm(30, 30, 30)))
    assert len(iter_results([tmp_path, tmp_path / "proxy", tmp_path / "proxy" / "a.json"])) == 1


def test_latex_renderer_escapes_specials():
    from benchmarks.reports.render import Table, text_cell

    out = render_latex(Table("a_b & c", ["x%", "y"], [[text_cell("m_1 #2"), text_cell("$5")]]))
    assert r"m\_1 \#2 & \$5 \\" in out and r"x\% & y \\" in out


def test_published_csv_is_the_shipped_file():
    assert PUBLISHED_CSV.is_file() and PUBLISHED_CSV.parent.name == "results"


def test_settings_that_leave_a_runs_identity_leave_its_protocol_too():
    """A result written before a setting existed (or with another loader or checkpoint cadence) sits
    in the same table as the rest: every NOT_HASHED field is outside the table's fingerprint."""
    from benchmarks.config import NOT_HASHED, load_experiment
    from benchmarks.reports.grouping import protocol_fingerprint

    experiment = load_experiment("smoke", []).to_dict()
    for section, name in NOT_HASHED:
        changed = json.loads(json.dumps(experiment))
        changed[section][name] = "something else"
        without = json.loads(json.dumps(experiment))
        del without[section][name]
        assert protocol_fingerprint(changed) == protocol_fingerprint(experiment) == protocol_fingerprint(without), name
    changed = json.loads(json.dumps(experiment))
    changed["train"]["iters"] += 1
    assert protocol_fingerprint(changed) != protocol_fingerprint(experiment)


def test_the_table_says_how_much_of_the_spread_is_seed_noise():
    from benchmarks.reports.tables import seed_noise_note

    rows = [make_result("a", 1, cbm(30, 30, 30)), make_result("a", 2, cbm(32, 32, 32)),   # mean 31, std √2
            make_result("b", 1, cbm(30, 30, 30)), make_result("b", 2, cbm(31, 31, 31)),   # 30.5, √0.5
            make_result("c", 1, cbm(20, 20, 20)), make_result("c", 2, cbm(22, 22, 22)),   # 21, √2
            make_result("d", 1, cbm(50, 50, 50))]                                         # one seed: left out
    note = seed_noise_note(summary_frame(rows))
    noise = (2 * math.sqrt(2) + math.sqrt(0.5)) / 3
    assert note.startswith(f"Seed noise over the 3 methods with several seeds: mean standard deviation of the "
                           f"average {noise:.2f}, spread of their means 10.00 ({noise / 10:.2f} of it)")
    assert note.endswith("within one standard deviation of the best (a): b.")
    (table,) = main_tables(rows)
    assert note in table.notes
    assert seed_noise_note(summary_frame(rows[:2] + rows[-1:])) == ""  # one method with seeds: no spread to weigh


def test_runs_in_bf16_on_cuda_and_fp32_on_a_cpu_are_two_protocols_one_of_auto_and_none_on_a_cpu_is_one():
    from benchmarks.config import load_experiment

    def run_of(seed: int, device: str, amp: str) -> dict:
        experiment = load_experiment("proxy", [f"train.amp={amp}", f"train.seed={seed}"]).to_dict()
        result = make_result("rein", seed, cbm(40.0 + seed, 30.0, 20.0), experiment=experiment)
        result["environment"] = {**result["environment"], "device": device}
        return result

    mixed = summary_frame([run_of(1, "cpu", "auto"), run_of(2, "cuda:0", "auto")])
    assert len(mixed) == 2 and set(mixed["seeds"]) == {1}
    assert mixed["config"].nunique() == 2
    same = summary_frame([run_of(1, "cpu", "auto"), run_of(2, "cpu", "none")])
    assert len(same) == 1 and same["seeds"].iloc[0] == 2
    assert len(summary_frame([run_of(1, "cuda", "auto"), run_of(2, "cpu", "bf16")])) == 1
    titles = [t.title for t in main_tables([run_of(1, "cpu", "auto"), run_of(2, "cuda:0", "auto")])]
    assert any("train.amp=bfloat16" in t for t in titles) and any("train.amp=float32" in t for t in titles)


def test_a_row_whose_runs_record_different_method_hyperparameters_is_marked():
    def rein(seed: int, rank: int, params: int) -> dict:
        result = make_result("rein", seed, cbm(40.0, 30.0, 20.0), params=params)
        result["method"]["hyperparameters"] = {"num_tokens": 100, "rank": rank}
        return result

    same = render_markdown(main_tables([rein(1, 16, 2_990_081), rein(2, 16, 2_990_081)])[0])
    assert "†" not in same
    for other in (rein(2, 4, 2_990_081), rein(2, 16, 1_000)):  # another default, or another parameter count
        text = render_markdown(main_tables([rein(1, 16, 2_990_081), other])[0])
        assert "| rein † |" in text and "different method hyperparameters" in text


def test_results_from_before_the_resize_setting_share_a_protocol_with_pillow_runs_not_with_cv2_runs():
    from benchmarks.config import load_experiment

    def run_of(seed: int, resize: str | None) -> dict:
        experiment = load_experiment("proxy", [f"train.seed={seed}"]).to_dict()
        if resize is None:  # a result written before the setting existed
            del experiment["data"]["resize"]
        else:
            experiment["data"]["resize"] = resize
        return make_result("rein", seed, cbm(40.0 + seed, 30.0, 20.0), experiment=experiment)

    assert summary_frame([run_of(1, None), run_of(2, "pillow")])["seeds"].tolist() == [2]
    assert summary_frame([run_of(1, None), run_of(2, "cv2")])["seeds"].tolist() == [1, 1]
    assert "config" not in main_tables([run_of(1, None), run_of(2, "pillow")])[0].title  # no variant label


def test_table_output_that_is_a_result_file_is_refused_and_kept(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_result(runs / "a.json", make_result("full", 1, cbm(30, 30, 30)))
    before = (runs / "a.json").read_bytes()
    assert _cli(["table", "--runs", str(runs), "--output", str(runs / "a.json")]) == 2
    assert "is a result file" in capsys.readouterr().err and (runs / "a.json").read_bytes() == before


def test_table_of_a_setting_no_run_has_is_refused_and_leaves_the_output_as_it_was(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_result(runs / "a.json", make_result("full", 1, cbm(30, 30, 30)))
    (tmp_path / "table.md").write_text("the table of yesterday")
    assert _cli(["table", "--runs", str(runs), "--setting", "C->BM", "--output", str(tmp_path / "table.md")]) == 2
    err = capsys.readouterr().err
    assert "--setting C->BM: none of the 1 results read is of that setting (they are of G->CBM)" in err, err
    assert (tmp_path / "table.md").read_text() == "the table of yesterday"


def test_a_table_says_which_rows_ran_on_other_inputs_and_which_runs_a_later_one_replaced():
    # The documented table read 4 folders: 2 methods scored on another world's Cityscapes and Mapillary,
    # and 6 of their results replaced by later runs, without a word in the table.
    def result(method, seed, cityscapes_sha, finished="2025-01-01T00:01:00"):
        res = make_result(method, seed, cbm(40, 30, 20))
        res["provenance"] = {"weights": {"sha256": "ab" * 32},
                             "data": {"cityscapes": {"sha256": cityscapes_sha}, "bdd100k": {"sha256": "b"}}}
        res["timings"]["finished"] = finished
        return res

    runs = [result("rein", 1, "c1"), result("lora", 1, "c1"), result("full", 1, "c1"),
            result("vpt", 1, "c1", "2025-01-01T00:00:30"), result("vpt", 1, "c2", "2025-01-02T00:00:00")]
    notes = " ".join(main_tables(runs)[0].notes)
    assert ("The rows come from 2 sets of inputs (their results' `provenance`; differing: cityscapes): vpt apart "
            "from the other 3 methods") in notes
    assert "Replaced by a later run of the same method and seed, and not in the table: 1 result(s) (vpt seed 1)" in notes
    one_input = " ".join(main_tables([result("rein", 1, "c1"), result("lora", 1, "c1")])[0].notes)
    assert "sets of inputs" not in one_input and "Replaced" not in one_input
    # vpt's two seeds on two sets of inputs: its own row is marked ‡, and it is not one of "the other" methods
    split = [result("rein", 1, "c1"), result("lora", 1, "c1"), result("vpt", 1, "c1"), result("vpt", 2, "c2")]
    notes = " ".join(main_tables(split)[0].notes)
    assert "some runs of vpt apart from the other 2 methods" in notes


def test_an_inverted_u_missed_on_the_source_says_by_how_much_and_whether_inside_the_seed_noise():
    # The documented table said "full: source 48.6 (not the best)" where fishertune's 48.6 was 0.006 above it,
    # with seed stds of 0.34 and 0.50: the verdict stays strict, the reader sees how near it was.
    from benchmarks.reports.tables import inverted_u_note

    def run(method, role, seed, source, average):
        return with_source(with_role(make_result(method, seed, cbm(average, average, average)), role), source)

    rows = [run("full", "full fine-tuning", 1, 48.0, 27.0), run("full", "full fine-tuning", 2, 49.0, 28.0),
            run("tuned", "parameter-efficient", 1, 48.4, 33.0), run("tuned", "parameter-efficient", 2, 48.7, 34.0)]
    note = inverted_u_note(summary_frame(rows))
    assert "source 48.5 (not the best: tuned 48.55, 0.05 above, within the seed std 0.71)" in note
    assert note.endswith("does not show the inverted U.")
    far = inverted_u_note(summary_frame([rows[0], rows[2]]))  # one seed each: no noise to be within
    assert "(not the best: tuned 48.40, 0.4 above)" in far
    farther = inverted_u_note(summary_frame([rows[0], run("tuned", "parameter-efficient", 1, 60.5, 33.0)]))
    assert "(not the best: tuned 60.50, 12.5 above)" in farther


def test_a_method_keeps_its_colour_from_the_rein_figure_to_the_curves_and_the_profile_bars():
    # The Rein figure coloured methods by rank, the curves and the bars alphabetically: `full` was red in one
    # figure of a report and olive in the next.
    from matplotlib.colors import to_hex

    finished = [make_result("zeta", 1, cbm(50, 50, 50), curves=True), make_result("alpha", 1, cbm(10, 10, 10), curves=True),
                make_result("mid", 1, cbm(30, 30, 30), curves=True)]
    rein = {}
    for line in plots_module.miou_vs_params(finished).axes[-1].lines:
        rein[float(line.get_ydata()[0])] = to_hex(line.get_color())
    by_rein = {"zeta": rein[50.0], "alpha": rein[10.0], "mid": rein[30.0]}
    curves = {line.get_label(): to_hex(line.get_color())
              for line in plots_module.training_curves(finished).axes[0].lines if not line.get_label().startswith("_")}
    bars_axis = plots_module.profile_chart(finished).axes[0]
    methods = [tick.get_text() for tick in bars_axis.get_yticklabels()]
    bars = {method: to_hex(patch.get_facecolor()) for method, patch in zip(methods, bars_axis.patches, strict=True)}
    assert len(set(by_rein.values())) == 3
    assert curves == by_rein and bars == by_rein


def test_the_proxy_beside_the_papers_names_the_published_averages_read_second_hand():
    # ρ rests on fishertune's 66.5 ("secondary summary of the paper") with nothing said beside the table.
    proxy = [make_result(method, 1, cbm(value, value, value)) for method, value in
             (("rein", 30), ("fishertune", 31), ("soma", 32), ("freeze", 20))]
    (table,) = [t for t in published_tables(proxy) if "beside the published" in t.title]
    note = next(n for n in table.notes if "second-hand" in n)
    assert "fishertune" in note and "soma" not in note and "rein" not in note  # soma's average: the authors' README
