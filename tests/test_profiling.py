"""Profiles measure what they claim, and the protocol's fast paths are really taken.

Speed itself is never asserted here (the benchmarks in tests/benchmarks and the `profile` command
measure it); these tests check counts, code paths and bookkeeping.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import flops, memory, profiling, synthetic_inputs, timing
from benchmarks.config import load_experiment
from benchmarks.errors import UserError
from benchmarks.method import available_methods, build_method
from benchmarks.model import build_model
from benchmarks.protocol import checkpoint_blocks, slide_logits
from benchmarks.reports import profiles as profile_files

SMOKE = ["model.weights=[]"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores
    yield
    torch.set_num_threads(previous)


def smoke(*overrides: str):
    return load_experiment("smoke", [*SMOKE, *overrides])


def smoke_model(method_name: str, exp=None, seed: int = 0):
    exp = exp or smoke()
    torch.manual_seed(seed)
    method = build_method(method_name)
    return build_model(exp, method), method


def batch(exp, size: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    crop = exp.data.crop_size
    return torch.randn(size, 3, crop, crop, generator=gen), torch.randint(0, 19, (size, crop, crop), generator=gen)


# -- device table, summaries, MFU --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "tflops"),
    [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835.5),
     ("NVIDIA A100-SXM4-80GB", 312),
     ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("NVIDIA A10G", 70), ("NVIDIA GeForce GTX 1080", None)],
)
def test_peak_flops_table_matches_device_names(name, tflops):
    peak = flops.peak_bf16_flops(name, "cuda")
    assert (peak / 1e12 if peak else None) == tflops


def test_summary_is_median_and_interquartile_range():
    summary = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert summary["median"] == 3.0
    assert summary["q1"] == 2.0 and summary["q3"] == 4.0 and summary["iqr"] == 2.0 and summary["n"] == 5


def test_mfu_is_training_flops_rate_over_device_peak():
    row = {"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "flops_train_step_per_image": 2.5e12,
           "train_images_per_s": 40.0, "dtype": "bfloat16"}
    assert flops.model_flops_utilisation(row) == pytest.approx(2.5e12 * 40 / 989e12)
    assert flops.model_flops_utilisation({**row, "dtype": "float16"}) == pytest.approx(2.5e12 * 40 / 989e12)
    # an fp32 run is not scored against the half-precision peak (its own, fp32 or TF32, is not in the table)
    assert flops.model_flops_utilisation({**row, "dtype": "float32"}) is None
    assert flops.model_flops_utilisation({**row, "device": "cpu"}) is None
    assert flops.model_flops_utilisation({**row, "device_name": "Unknown GPU"}) is None
    # a run's images/s are the whole job's: on 4 devices the same rate uses a quarter of their peaks
    assert flops.model_flops_utilisation({**row, "world_size": 4}) == pytest.approx(2.5e12 * 40 / 989e12 / 4)


# -- FLOPs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method_name", ["full", "freeze", "rein", "fada_released"])
def test_fake_tensor_flops_equal_real_tensor_flops(method_name):
    # fada_released refines a training batch at once and an evaluation window by window: counted in
    # eval mode, its step was 4 % high on the smoke preset.
    exp = smoke()
    fake = flops.count_flops(exp, method_name)
    assert fake["flops_counted_with"].startswith("fake")
    model, _ = smoke_model(method_name, exp)
    forward, train = flops._count_model_flops(model, exp, exp.train.batch_size, real_loss=True)
    assert fake["flops_forward_per_image"] == forward
    # The light head's loss (cross-entropy) has no matmul: the surrogate's backward is the same.
    assert fake["flops_train_step_per_image"] == train / exp.train.batch_size


@pytest.mark.parametrize("method_name", ["set", "rein", "fada_released", "lora"])
def test_eval_flops_are_the_windows_run_as_the_evaluation_batches_them(method_name):
    # A window's forward times the windows counted a method's per-batch token work once a window: set's
    # evaluation was 2.5 % high on the proxy.
    from benchmarks.protocol import slide_logits
    from benchmarks.synthetic_inputs import eval_image_size

    exp = smoke()
    counted = flops.count_flops(exp, method_name)["flops_eval_per_image"]
    model, method = smoke_model(method_name, exp)
    model.eval()
    height, width = eval_image_size(exp)
    with torch.no_grad(), flops.flop_counter() as counter:
        slide_logits(model, torch.randn(1, 3, height, width), method.evaluation_settings(exp.eval), flops.NUM_CLASSES)
    assert counted == counter.get_total_flops()


def test_attention_flops_are_counted_on_the_cpu_kernels_too():
    """Fake and real CPU tensors run SDPA's CPU flash kernel; its FLOPs must count as the CUDA kernels' do."""
    from timm.layers import Attention

    tokens, dim = 64, 32
    attention = Attention(dim, num_heads=2, qkv_bias=True)
    attention.fused_attn = True
    x = torch.randn(1, tokens, dim, requires_grad=True)
    with flops.flop_counter() as counter:
        attention(x).sum().backward()
    linear = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim  # qkv and proj
    scores_and_mix = 2 * 2 * tokens * tokens * dim  # q·kᵀ and attn·v over all heads
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention_ops = {op: n for op, n in per_op.items() if "attention" in op}
    assert sum(n for op, n in attention_ops.items() if not op.endswith("backward")) == scores_and_mix
    # the backward's four products (2× the forward), without the kernel's recomputation of q·kᵀ: model FLOPs
    assert sum(n for op, n in attention_ops.items() if op.endswith("backward")) == 2 * scores_and_mix
    assert counter.get_total_flops() == pytest.approx(3 * linear + 3 * scores_and_mix, rel=0.01)


def test_every_fused_attention_backward_is_counted_without_its_recomputation():
    # The CUDA kernels' backward formulas in torch count the recomputed scores too (2.5× the forward).
    from torch.utils import flop_counter

    formulas = flops._attention_formulas()
    query = (2, 4, 100, 16)
    forward = flop_counter.sdpa_flop_count(query, query, query)
    checked = []
    for name in flops.SDPA_BACKWARD_KERNELS:
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            assert formulas[op](query, query, query, query) == 2 * forward, name
            checked.append(name)
    assert "_scaled_dot_product_flash_attention_backward" in checked  # the loop checked the CUDA kernels' too


def test_training_flops_follow_what_trains():
    exp = smoke()
    full, freeze = flops.count_flops(exp, "full"), flops.count_flops(exp, "freeze")
    assert full["flops_forward_per_image"] == freeze["flops_forward_per_image"]
    # Frozen: forward of everything, backward of the head only; full: ~3x forward.
    assert freeze["flops_train_step_per_image"] < full["flops_train_step_per_image"]
    assert full["flops_train_step_per_image"] == pytest.approx(3 * full["flops_forward_per_image"], rel=0.1)
    windows = synthetic_inputs.window_count(*synthetic_inputs.eval_image_size(exp), exp.eval.crop_size, exp.eval.stride)
    assert windows > 1
    assert full["flops_eval_per_image"] == windows * full["flops_forward_per_image"]


def test_flop_counter_accepts_parameter_views_taken_without_grad():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    with flops.flop_counter() as counter:
        with torch.no_grad():
            view = weight.unsqueeze(0).expand(2, -1, -1)
        torch.bmm(view, view)
    assert counter.get_total_flops() == 2 * 2 * 4 * 4 * 4


# -- the protocol's fast paths ---------------------------------------------------------------------------
def _saved_in_backbone(model, images, labels) -> int:
    saved = [0]
    inside = [False]
    model.backbone.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    model.backbone.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(tensor):
        if inside[0]:
            saved[0] += 1
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(images, labels)["loss"].backward()
    return saved[0]


def test_frozen_backbone_saves_no_activations():
    exp = smoke()
    images, labels = batch(exp)
    frozen, _ = smoke_model("freeze", exp)
    trained, _ = smoke_model("full", exp)
    assert _saved_in_backbone(frozen, images, labels) == 0
    assert _saved_in_backbone(trained, images, labels) > 0  # the probe does see saved activations


@pytest.mark.parametrize("method_name", sorted(available_methods()))
def test_every_block_runs_fused_attention(method_name, monkeypatch):
    model, _ = smoke_model(method_name)
    calls = [0]
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls[0] >= model.backbone.tap_indices[-1] + 1


# -- gradient checkpointing keeps methods' hooks exact ----------------------------------------------------
@pytest.mark.parametrize("method_name", ["full", "vpt", "rein", "adaptformer", "lora"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(method_name):
    if method_name not in available_methods():
        pytest.skip(f"{method_name} not registered")
    exp = smoke()
    images, labels = batch(exp)
    results = []
    for checkpointed in (False, True):
        model, _ = smoke_model(method_name, exp, seed=3)
        if checkpointed:
            assert checkpoint_blocks(model.backbone) == len(model.backbone.blocks)
            assert checkpoint_blocks(model.backbone) == 0  # idempotent
        fired = [0]

        def count(*_, fired=fired):
            fired[0] += 1

        model.backbone.blocks[0].register_forward_hook(count)
        model.train()
        loss = model.loss(images, labels)["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, fired[0]))
    (loss_a, grads_a, fired_a), (loss_b, grads_b, fired_b) = results
    assert fired_a == fired_b == 1  # a block hook fires once per forward, not again when recomputed
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and any("backbone" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grad_checkpointing_option_saves_fewer_backbone_activations():
    exp = smoke()
    images, labels = batch(exp)
    plain, _ = smoke_model("full", exp)
    wrapped, _ = smoke_model("full", exp)
    checkpoint_blocks(wrapped.backbone)
    assert _saved_in_backbone(wrapped, images, labels) < _saved_in_backbone(plain, images, labels)


def test_batched_windows_give_the_same_scores_as_one_at_a_time():
    exp = smoke()
    model, _ = smoke_model("freeze", exp)
    model.eval()
    image = torch.randn(1, 3, 64, 150)
    with torch.inference_mode():
        one = slide_logits(model, image, dataclasses.replace(exp.eval, batch_windows=1), 19)
        many = slide_logits(model, image, dataclasses.replace(exp.eval, batch_windows=8), 19)
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-5)


# -- profile_method ------------------------------------------------------------------------------------
SCHEMA_KEYS = ("train_images_per_s", "eval_images_per_s", "peak_memory_mb", "flops_forward_per_image",
               "flops_train_step_per_image", "mfu", "device", "dtype")


def count_optimizer_steps(monkeypatch) -> list[int]:
    """Patches AdamW.step to count its calls; the returned one-element list holds the count."""
    steps = [0]
    original_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps[0] += 1
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    return steps


def test_profile_method_times_the_protocol_step_and_fills_the_schema(monkeypatch):
    import benchmarks.protocol as protocol

    steps = count_optimizer_steps(monkeypatch)
    trained = []
    original_train = protocol.train
    monkeypatch.setattr(protocol, "train", lambda *a, **k: trained.append(1) or original_train(*a, **k))
    settings = profiling.ProfileSettings(warmup=1, repeats=3, eval_warmup=0, eval_repeats=2)
    row = profiling.profile_method(smoke(), "rein", "cpu", settings)
    assert row["status"] == "ok", row["error"]
    assert trained == [1] and steps[0] == settings.warmup + settings.repeats
    for key in SCHEMA_KEYS:
        assert key in row
    assert row["train_step_s"]["n"] == 3 and row["eval_image_s"]["n"] == 2
    assert row["train_images_per_s"] == pytest.approx(row["batch_size"] / row["train_step_s"]["median"])
    assert row["eval_images_per_s"] > 0 and row["peak_memory_mb"] > 0
    assert row["mfu"] is None and row["dtype"] == "float32"
    assert row["trainable_parameters"] > 0 and row["added_parameters"] > 0  # Rein's tokens
    json.dumps(row)


def test_a_profile_times_with_a_run_s_threads_and_records_what_moves_cpu_timings(monkeypatch):
    from benchmarks import resources
    from benchmarks.reports.profiles import environment_summary

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(resources, "available_cpus", lambda: 1)  # a one-core quota: a run would use one thread
    threads = torch.get_num_threads()
    try:
        row = profiling.profile_method(smoke(), "freeze", "cpu", profiling.ProfileSettings(
            warmup=0, repeats=1, eval_warmup=0, eval_repeats=1, count_flops=False))
    finally:
        torch.set_num_threads(threads)
    assert row["status"] == "ok", row["error"]
    assert row["cpu_threads"] == 1 and row["cpu_plan"].startswith("1 threads") and "waits: PASSIVE" in row["cpu_plan"]
    summary = environment_summary(None)
    assert len(summary["git_commit"] or "") == 40 and isinstance(summary["git_dirty_paths"], list)


def test_out_of_memory_is_a_row_not_a_crash(monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("benchmarks.model.build_model", no_memory)
    row = profiling.profile_method(smoke(), "full", "cpu", profiling.ProfileSettings(count_flops=False))
    assert row["status"] == "oom" and "out of memory" in row["error"]
    assert row["train_images_per_s"] is None


def test_peak_memory_sees_an_allocation_after_reset():
    memory.reset_peak_memory("cpu")
    before = memory.peak_memory("cpu")["peak_memory_mb"]
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = memory.peak_memory("cpu")["peak_memory_mb"]
    del block
    assert after - before > 48


def test_peak_memory_on_another_accelerator_says_its_allocator_is_not_measured():
    # The process's resident set, on MPS or XPU, is not what their allocators hold: the kind says so.
    assert memory.peak_memory("cpu")["memory_kind"] == "process peak RSS (VmHWM)"
    kind = memory.peak_memory("mps")["memory_kind"]
    assert kind.startswith("process peak RSS") and "mps allocator's own memory not measured" in kind


def test_flops_only_command_writes_table_and_json(tmp_path, capsys):
    from benchmarks.cli import main

    code = main(["profile", "--preset", "smoke", "--set", "model.weights=[]", "--methods", "full,freeze,fishertune",
                 "--flops-only", "--out", str(tmp_path)])
    assert code == 0
    assert "freeze" in capsys.readouterr().out
    [json_path] = tmp_path.glob("smoke-flops-*.json")
    rows = json.loads(json_path.read_text())["methods"]
    assert [r["method"] for r in rows] == ["full", "freeze", "fishertune"]
    assert rows[1]["trainable_parameters"] == 0 and rows[0]["trainable_parameters"] > 0
    # the method's own report, as in a run's result: FisherTune's δ_max budget of the backbone's entries
    assert rows[2]["trainable_parameters"] == round(0.05 * rows[0]["trainable_parameters"])
    # its FLOPs are its main phase's, which the timed profile measures: every candidate's gradient, then masked
    assert rows[2]["flops_train_step_per_image"] == rows[0]["flops_train_step_per_image"] \
        > rows[1]["flops_train_step_per_image"]
    assert (tmp_path / json_path.name.replace(".json", ".md")).is_file()


def test_the_forward_count_names_the_window_it_was_counted_on():
    # the forward is an evaluation window's; the row's crop_size is the training crop's, which may differ
    from benchmarks.config import load_experiment
    from benchmarks.flops import flops_table

    default, = flops_table(load_experiment("smoke", ["model.weights=[]"]), ["freeze"])
    wider, = flops_table(load_experiment("smoke", ["model.weights=[]", "data.crop_size=128"]), ["freeze"])
    assert (wider["crop_size"], wider["eval_crop_size"]) == (128, 64)
    assert wider["flops_forward_per_image"] == default["flops_forward_per_image"]
    assert wider["flops_train_step_per_image"] > default["flops_train_step_per_image"]


def test_a_second_profile_of_the_day_never_replaces_the_first(tmp_path, capsys):
    from benchmarks.cli import main

    for methods in ("freeze", "full"):
        assert main(["profile", "--preset", "smoke", "--set", "model.weights=[]", "--methods", methods,
                     "--flops-only", "--out", str(tmp_path)]) == 0
    first, second = sorted(tmp_path.glob("smoke-flops-*.json"), key=lambda p: len(p.name))
    assert second.stem == f"{first.stem}-2"
    assert [r["method"] for r in json.loads(first.read_text())["methods"]] == ["freeze"]
    assert [r["method"] for r in json.loads(second.read_text())["methods"]] == ["full"]


def test_two_profiles_started_together_take_different_names(tmp_path):
    # Both chose the free name before either wrote: the second's files replaced the first's.
    from benchmarks.reports.profiles import output_stem

    day = dt.date(2026, 12, 6)
    out = tmp_path / "new" / "profiles"  # a folder the profile makes (the slow plugin test's --out)
    first, second = output_stem("smoke", "cpu", day, out), output_stem("smoke", "cpu", day, out)
    assert (first, second) == ("smoke-cpu-2026-12-06", "smoke-cpu-2026-12-06-2")


def test_write_profiles_draws_speed_and_memory_plots(tmp_path):
    row = {"method": "full", "status": "ok", "batch_size": 2, "train_images_per_s": 4.0, "eval_images_per_s": 2.0,
           "peak_memory_mb": 900.0, "train_step_s": timing.summarize([0.4, 0.5, 0.6]),
           "eval_image_s": timing.summarize([0.5, 0.5]), "flops_forward_per_image": 1e9}
    paths = profile_files.write_profiles([row, {"method": "rein", "status": "oom", "error": "x", "train_images_per_s": None}],
                                     smoke(), tmp_path, "smoke-cpu-test", {"device_name": "cpu"})
    names = sorted(p.name for p in paths)
    assert names == ["smoke-cpu-test-memory.png", "smoke-cpu-test-speed.png", "smoke-cpu-test.json", "smoke-cpu-test.md"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in paths)  # shareable, not mkstemp's 0600
    assert "oom" in (tmp_path / "smoke-cpu-test.md").read_text()


def test_a_profile_says_what_its_columns_count():
    from benchmarks.config import load_experiment

    exp = load_experiment("paper")
    row = {"method": "full", "status": "ok", "train_images_per_s": 20.0}
    text = "\n".join(profile_files.conventions([row], exp))
    # the paper's evaluation: 1024×512 in 3 windows of 512 at stride 341; BDD100K's 1280×720 takes 8
    assert "1024×512" in text and "3 window(s) of 512 at stride 341" in text
    assert "1280×720 in the real release: 8 window(s), 2.67×" in text
    assert "MiB" in text and "2 per multiply-add" in text and "none for a run in fp32" in text
    assert "MiB" not in "\n".join(profile_files.conventions([{"method": "full"}], exp))  # a FLOPs-only table
    # the proxy scores its synthetic world's BDD100K, 160×90: two windows of 128, not the real release's 40
    proxy = "\n".join(profile_files.conventions([row], load_experiment("proxy")))
    assert "160×90 in the synthetic world `small`: 2 window(s)" in proxy and "1280×720" not in proxy


@pytest.mark.parametrize(("returncode", "status"), [(-9, "oom"), (-15, "failed"), (1, "failed")])
def test_subprocess_deaths_become_rows(monkeypatch, returncode, status):
    import subprocess

    def dead(*args, **kwargs):
        return subprocess.CompletedProcess(args, returncode, stdout="", stderr="WARNING x\nRuntimeError: boom\n")

    monkeypatch.setattr(subprocess, "run", dead)
    row = profiling.profile_in_subprocess(smoke(), "full", "cpu", profiling.ProfileSettings())
    assert row["method"] == "full" and row["status"] == status
    if returncode == 1:
        assert row["error"] == "RuntimeError: boom"


@pytest.mark.slow
def test_profile_in_a_fresh_process_reports_its_own_peak():
    settings = profiling.ProfileSettings(warmup=1, repeats=2, eval_warmup=0, eval_repeats=1, count_flops=False)
    row = profiling.profile_in_subprocess(smoke(), "freeze", "cpu", settings, timeout_s=600)
    assert row["status"] == "ok", row.get("error")
    assert row["peak_memory_mb"] > row["baseline_memory_mb"] > 0


# -- where the time goes --------------------------------------------------------------------------------
def test_breakdown_profiles_extra_protocol_steps_and_accounts_for_their_operators(monkeypatch, tmp_path):
    steps = count_optimizer_steps(monkeypatch)
    settings = profiling.ProfileSettings(warmup=1, repeats=2, eval_warmup=0, eval_repeats=1, count_flops=False,
                                         breakdown="all", breakdown_steps=2)
    row = profiling.profile_method(smoke(), "full", "cpu", settings)
    assert row["status"] == "ok", row["error"]
    # timed steps, then the breakdown's own: one warm-up and the profiled ones
    assert steps[0] == settings.warmup + settings.repeats + 1 + settings.breakdown_steps
    info = row["time_breakdown"]
    assert info["steps"] == 2 and info["clock"].startswith("host")
    assert sum(c["share"] for c in info["categories"]) == pytest.approx(1.0)
    by_category = {c["category"]: c["s_per_step"] for c in info["categories"]}
    assert by_category["matmul"] > 0 and by_category["optimizer"] > 0
    assert "aten::mm" in [o["name"] for o in info["top_operators"]]  # full fine-tuning's weight gradients
    json.dumps(row)
    paths = profile_files.write_profiles([row], smoke(), tmp_path, "smoke-cpu-test", {"device_name": "cpu"})
    text = (tmp_path / "smoke-cpu-test-breakdown.md").read_text()
    assert tmp_path / "smoke-cpu-test-breakdown.md" in paths and "## full" in text and "`aten::mm`" in text


def test_breakdown_auto_follows_the_mfu_threshold():
    auto = profiling.ProfileSettings()
    assert auto.wants_breakdown(0.12) and not auto.wants_breakdown(0.45)
    assert not auto.wants_breakdown(None)  # CPU: no MFU, no automatic breakdown
    assert profiling.ProfileSettings(breakdown="all").wants_breakdown(None)
    assert not profiling.ProfileSettings(breakdown="none").wants_breakdown(0.01)
    with pytest.raises(UserError, match="auto, all or none"):
        profiling.ProfileSettings(breakdown="sometimes")


def test_breakdown_on_a_gpu_counts_kernel_time_once_and_against_the_wall():
    """Kernels once (not again through their operators, nor through the annotated ranges around them)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.breakdown import summarize_events

    def event(key, device_type, self_device_us, self_cpu_us=0.0, count=2, annotation=False):
        return SimpleNamespace(key=key, count=count, device_type=device_type, self_cpu_time_total=self_cpu_us,
                               self_device_time_total=self_device_us, is_user_annotation=annotation)

    events = [  # two steps: operators carry their kernels' device time, kernels carry it again
        event("aten::mm", DeviceType.CPU, 600.0, 50.0), event("aten::add", DeviceType.CPU, 200.0, 30.0),
        event("ProfilerStep*", DeviceType.CPU, 0.0, 900.0),
        event("sm90_xmma_gemm_bf16", DeviceType.CUDA, 600.0), event("elementwise_kernel", DeviceType.CUDA, 200.0),
        # what torch 2.11 on an H200 recorded beside the kernels: the annotated ranges on the GPU's timeline
        event("ProfilerStep*", DeviceType.CUDA, 3000.0, annotation=True),
        event("Optimizer.step#AdamW.step", DeviceType.CUDA, 100.0, annotation=True),
    ]
    info = summarize_events(events, on_device=True, wall_s=0.004, steps=2)
    assert info["device_busy_s_per_step"] == pytest.approx(400e-6)  # (600 + 200) µs over 2 steps, counted once
    assert info["device_busy_share"] == pytest.approx(0.2)  # of 2 ms wall per step: the GPU waits 80 %
    assert {c["category"]: c["share"] for c in info["categories"]} == pytest.approx(
        {"matmul": 0.75, "elementwise & other": 0.25, "host outside operators": 0.0})
    assert [k["name"] for k in info["top_kernels"]] == ["sm90_xmma_gemm_bf16", "elementwise_kernel"]


def test_an_interrupted_profile_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    from benchmarks.cli import main

    def one_then_interrupt(exp, name, device, settings, timeout_s=None):
        if name == "freeze":
            raise KeyboardInterrupt  # a time limit's SIGINT, or Ctrl-C, during the second method
        return {"method": name, "status": "ok", "batch_size": 2, "train_images_per_s": 3.0, "peak_memory_mb": 800.0}

    import signal

    monkeypatch.setattr(profiling, "profile_in_subprocess", one_then_interrupt)
    handler = signal.getsignal(signal.SIGTERM)
    code = main(["profile", "--preset", "smoke", "--methods", "full,freeze", "--out", str(tmp_path)])
    assert code == 130
    assert signal.getsignal(signal.SIGTERM) is handler  # the profile's SIGTERM handling ends with it
    [json_path] = tmp_path.glob("smoke-cpu-*.json")
    saved = json.loads(json_path.read_text())
    assert [r["method"] for r in saved["methods"]] == ["full"] and saved["meta"]["finished"] == "1 of 2 methods"
    assert "| full " in json_path.with_suffix(".md").read_text()


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            found.add(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_sigterm_stops_a_profile_with_its_child_and_keeps_finished_rows(tmp_path):
    """What `timeout` or a scheduler does to a long profile: exit 143, no orphaned method process, rows kept."""
    import signal
    import subprocess
    import sys
    import time

    from benchmarks.config import PROJECT_ROOT

    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "profile", "--preset", "smoke", "--set", "model.weights=[]",
                             "--methods", "freeze,full,rein,lora,vpt", "--no-flops", "--out", str(tmp_path)],
                            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    saved = None
    while time.monotonic() < deadline and proc.poll() is None:
        saved = next(tmp_path.glob("smoke-cpu-*.json"), None)
        if saved is not None and _children(proc.pid):  # one method written, the next one's process running
            break
        time.sleep(0.2)
    assert saved is not None and proc.poll() is None, "the profile finished before it could be interrupted"
    children = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, proc.stderr.read()
    time.sleep(0.5)
    alive = {pid: Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") for pid in children if Path(f"/proc/{pid}").exists()}
    assert not alive, f"a method's process outlived the profile: {alive}"
    rows = json.loads(saved.read_text())["methods"]
    assert rows and rows[0]["method"] == "freeze" and len(rows) < 5


@pytest.mark.parametrize(("name", "windows"), [("set_released", 1), ("set", None)])
def test_the_profile_times_inference_as_a_run_scores_the_method(name, windows, monkeypatch):
    """A method whose batch members interact is scored one window per forward; its profile must time that."""
    seen = []

    def record_eval_settings(model, exp, device, warmup, repeats):
        seen.append(exp.eval.batch_windows)
        return [0.1] * repeats

    monkeypatch.setattr(profiling, "time_inference", record_eval_settings)
    exp = smoke()
    settings = profiling.ProfileSettings(warmup=0, repeats=1, eval_warmup=0, eval_repeats=1, count_flops=False,
                                         breakdown="none")
    row = profiling.profile_method(exp, name, "cpu", settings)
    assert row["status"] == "ok", row.get("error")
    expected = windows or exp.eval.batch_windows
    assert seen == [expected] and row["eval_batch_windows"] == expected


def test_a_cpu_never_borrows_a_gpu_peak_by_its_model_name(monkeypatch):
    import torch

    from benchmarks.reports import profiles as profile_module

    monkeypatch.setattr(profile_module, "device_name", lambda device: "AMD A10-7850K APU (AVX2)")
    assert profile_module.environment_summary(torch.device("cpu"))["peak_bf16_tflops"] is None
    monkeypatch.setattr(profile_module, "device_name", lambda device: "NVIDIA H200")
    assert profile_module.environment_summary(torch.device("cuda"))["peak_bf16_tflops"] == 989.0


def test_a_profile_interrupted_before_its_first_row_leaves_no_empty_table_behind(tmp_path, monkeypatch):
    # The name reserved for it (an empty .md) pushed the next profile of the day to `-2`.
    from benchmarks.cli import main

    def interrupt(exp, name, device, settings, timeout_s=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(profiling, "profile_in_subprocess", interrupt)
    assert main(["profile", "--preset", "smoke", "--methods", "full", "--out", str(tmp_path)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_a_pipe_in_a_profile_rows_error_stays_inside_its_markdown_cell():
    from benchmarks.reports.profiles import format_table

    table = format_table([{"method": "lora", "status": "failed", "error": "unsupported operand type(s) for |: dict"}])
    header, _, row = table.splitlines()
    unescaped = row.replace("\\|", "")
    assert unescaped.count("|") == header.count("|"), table
