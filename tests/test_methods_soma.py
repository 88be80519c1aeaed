"""SoMA, and the protocol features it declares (which any method may declare): a group's lr multiplier,
a cosine weight-decay schedule and an EMA of the weights that is evaluated and survives a resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from benchmarks import checkpoint
from benchmarks.config import load_experiment
from benchmarks.errors import UserError
from benchmarks.method import EMA, CosineWeightDecay, Method, build_method, scale_lr
from benchmarks.protocol import ParameterEMA, poly_lr_factor, train
from methods.soma import SeparateQKV, minor_components
from tests.test_methods_common import TINY_EVA, images, tiny_model
from tests.test_methods_counts import meta_model

SOMA_DINOV2_L_ADDED = 16 * (4 * 16 * (1024 + 1024) + 2 * 16 * (1024 + 4096))  # LoRA A and B, blocks 8–23
SOMA_DINOV2_L_BIASES = 16 * (3 * 1024 + 1024 + 4096 + 1024)  # q, k, v, proj, fc1, fc2 biases, blocks 8–23


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def wrapped_layers(model) -> set[str]:
    return {n.rsplit(".base_layer", 1)[0] for n, _ in model.backbone.vit.named_modules() if n.endswith("base_layer")}


# -- the minor-component initialisation -------------------------------------------------------------------
@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_factors_are_the_smallest_singular_triplets_and_the_residual_completes_the_weight(scaling):
    weight = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b, residual = minor_components(weight, 3, scaling)
    assert a.shape == (3, 7) and b.shape == (12, 3)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    torch.testing.assert_close(scaling * b @ a, u[:, -3:] @ torch.diag(s[-3:]) @ vh[-3:])
    torch.testing.assert_close(residual + scaling * b @ a, weight)
    # what is left has the major spectrum only: the minor singular values are removed
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:4], s[:4])
    assert torch.linalg.svdvals(residual)[4:].abs().max() < 1e-10
    # A and B share sqrt(S_r / scaling): A Aᵀ = Bᵀ B = diag(S_r / scaling)
    torch.testing.assert_close(a @ a.T, torch.diag(s[-3:] / scaling))
    torch.testing.assert_close(b.T @ b, torch.diag(s[-3:] / scaling))


@pytest.mark.parametrize(("spec", "overrides"), [(None, {}), (None, {"alpha": 8.0}), (TINY_EVA, {})])
def test_step_zero_output_equals_the_unadapted_model(spec, overrides):
    kwargs = {"spec": spec} if spec is not None else {}
    base, adapted = tiny_model(**kwargs).eval(), tiny_model("soma", **kwargs, **overrides).eval()
    with torch.no_grad():
        for a, b in zip(base.backbone(images()), adapted.backbone(images()), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    layer = adapted.backbone.vit.blocks[1].attn.proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # the adapters are not zero: the base absorbs them


def test_separate_qkv_computes_what_the_fused_layer_did():
    fused = nn.Linear(8, 24)
    split = SeparateQKV(fused)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(split(x), fused(x))
    assert split.q.weight.shape == (8, 8) and not any(p.is_meta for p in split.parameters())


# -- targets, blocks and counts ---------------------------------------------------------------------------
def test_targets_are_the_attention_and_mlp_layers_of_the_last_two_thirds_of_the_blocks():
    base, model = tiny_model(), tiny_model("soma")
    layers = ("attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert wrapped_layers(model) == {f"blocks.{i}.{name}" for i in (1, 2, 3) for name in layers}  # round(4/3) = 1
    vit = model.backbone.vit
    assert isinstance(vit.blocks[0].attn.qkv, nn.Linear) and isinstance(vit.blocks[1].attn.qkv, SeparateQKV)
    assert vit.blocks[1].attn.qkv.q.lora_A["default"].weight.shape == (16, 32)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vit.blocks.0.") for n in trainable)
    assert "vit.blocks.1.attn.qkv.q.base_layer.bias" in trainable and "vit.blocks.1.mlp.fc2.base_layer.bias" in trainable
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    # the split q/k/v tensors are the pretrained ones re-laid out: counted as pretrained, never as added
    counts, before = model.parameter_counts(), base.parameter_counts()
    assert counts["backbone_pretrained"] == before["backbone_pretrained"]
    assert counts["backbone_added"] == 3 * (4 * 16 * 64 + 2 * 16 * (32 + 128))
    assert counts["backbone_trainable"] == counts["backbone_added"] + 3 * (3 * 32 + 32 + 128 + 32)
    # checkpoints keep the trained biases and adapters, not the frozen (recomputed) residual weights
    saved = checkpoint.trainable_state(model)
    assert "backbone.vit.blocks.1.attn.qkv.q.base_layer.bias" in saved
    assert not any(k.endswith("base_layer.weight") for k in saved)


def test_dinov2_l_adapts_blocks_8_to_23_with_the_released_count():
    model = meta_model("soma")
    layers = wrapped_layers(model)
    assert {int(name.split(".")[1]) for name in layers} == set(range(8, 24)) and len(layers) == 16 * 6
    counts = model.parameter_counts()
    assert counts["backbone_added"] == SOMA_DINOV2_L_ADDED == 4_718_592
    assert counts["backbone_trainable"] == SOMA_DINOV2_L_ADDED + SOMA_DINOV2_L_BIASES == 4_866_048
    assert counts["backbone_pretrained"] == 304_196_608
    assert counts["head_total"] == meta_model("freeze").parameter_counts()["head_total"]


def test_without_biases_only_the_adapters_train():
    with torch.device("meta"):
        model = tiny_model("soma", head="light", train_biases=False)
    counts = model.parameter_counts()
    assert counts["backbone_trainable"] == counts["backbone_added"]


@pytest.mark.parametrize(("depth", "first"), [(24, 8), (12, 4), (40, 13), (6, 2), (32, 11)])
def test_the_frozen_third_scales_with_depth(depth, first):
    assert build_method("soma").adapted_blocks(depth) == range(first, depth)


@pytest.mark.parametrize(("key", "value"), [("ema_decay", 1.5), ("rank", 0), ("targets", "q,qkv"),
                                            ("frozen_fraction", 1.0), ("backbone_lr_mult", 0.0)])
def test_bad_hyperparameters_are_one_line_user_errors(key, value):
    with pytest.raises(UserError, match=f"methods.soma.{key}"):
        build_method("soma", {key: value})


def test_a_rank_larger_than_a_layer_is_refused():
    with pytest.raises(UserError, match="exceeds the size"):
        tiny_model("soma", rank=64)


def test_the_recipe_is_declared_with_the_released_numbers():
    method = build_method("soma")
    assert method.weight_decay_schedule() == CosineWeightDecay(end=1e-5)
    ema = method.ema()
    assert ema.decay_for(40_000) == 0.9998 and ema.start_iter(40_000) == 12_000
    assert ema.start_iter(400) == 120 and ema.decay_for(400) == pytest.approx(0.9998**100)
    model = tiny_model("soma")
    groups = method.param_groups(model, 0.05)
    backbone = {id(p) for p in model.backbone.parameters()}
    for group in groups:
        on_backbone = {id(p) in backbone for p in group["params"]}
        assert len(on_backbone) == 1  # a group is all backbone or all head
        assert group.get("lr_mult", 1.0) == (0.5 if on_backbone == {True} else 1.0)
    assert sum(p.numel() for g in groups if g.get("lr_mult") == 0.5 for p in g["params"]) == \
        model.parameter_counts()["backbone_trainable"]
    assert build_method("soma", {"use_ema": False}).ema() is None


def test_soma_also_exempts_the_query_content_from_weight_decay_as_its_config_does():
    def undecayed(method_name: str) -> set[str]:
        model = tiny_model(method_name, head="mask2former")
        names = {id(p): name for name, p in model.named_parameters()}
        groups = build_method(method_name).param_groups(model, 0.05)
        return {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}

    query_content = "head.transformer.queries_features.weight"
    assert query_content in undecayed("soma") and query_content not in undecayed("lora")
    assert undecayed("soma") - undecayed("lora") == {query_content}


# -- the protocol features, for any method that declares them ---------------------------------------------
class RandomScenes(Dataset):
    def __init__(self, count: int = 8, size: int = 32):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(count, 3, size, size, generator=generator)
        self.labels = torch.randint(0, 19, (count, size, size), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, _augmentation_seed = item
        return {"image": self.images[index], "label": self.labels[index]}


class Probe(Method):
    """Not SoMA: full fine-tuning that declares the three features and records what the optimiser holds."""

    name = "probe"

    def __init__(self, ema: EMA | None):
        super().__init__()
        self._ema = ema
        self.seen: list[list[dict]] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def param_groups(self, model, weight_decay):
        backbone = {id(p) for p in model.backbone.parameters()}
        return scale_lr(super().param_groups(model, weight_decay), backbone, 0.5)

    def weight_decay_schedule(self):
        return CosineWeightDecay(end=1e-3)

    def ema(self):
        return self._ema

    def after_optimizer_step(self, step, ctx):
        backbone = {id(p) for p in ctx.model.backbone.parameters()}
        self.seen.append([{"lr": g["lr"], "lr_mult": g["lr_mult"], "weight_decay": g["weight_decay"],
                           "backbone": id(g["params"][0]) in backbone} for g in ctx.optimizer.param_groups])
        self.weights.append({n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad})


def run_probe(ema: EMA | None, iters: int = 4):
    exp = load_experiment("smoke", [f"train.iters={iters}", "train.batch_size=2", "train.lr=1e-2",
                                    "train.weight_decay=0.05", "data.num_workers=0"])
    model = tiny_model()
    method = Probe(ema)
    method.attach(model)
    state = train(model, method, RandomScenes(), exp, torch.device("cpu"), progress=False)
    return exp, model, method, state


def test_lr_multiplier_and_weight_decay_schedule_reach_the_optimiser_every_step():
    exp, _, method, state = run_probe(ema=None)
    assert len(method.seen) == 4 and state.model_selection == "final"
    for step, groups in enumerate(method.seen):
        assert {g["backbone"] for g in groups} == {True, False}
        for group in groups:
            mult = 0.5 if group["backbone"] else 1.0
            assert group["lr_mult"] == mult
            assert group["lr"] == pytest.approx(exp.train.lr * mult * poly_lr_factor(step, exp.train))
        decayed = [g["weight_decay"] for g in groups if g["weight_decay"] > 0]
        assert decayed and all(wd == pytest.approx(1e-3 + (0.05 - 1e-3) * 0.5 * (1 + math.cos(math.pi * step / 4)))
                               for wd in decayed)
        assert any(g["weight_decay"] == 0.0 for g in groups)  # norms stay undecayed, not raised towards 1e-3


def test_cosine_weight_decay_runs_from_each_groups_value_to_the_end():
    schedule = CosineWeightDecay(end=1e-5)
    assert schedule.value(0.05, 0, 100) == 0.05
    assert schedule.value(0.05, 50, 100) == pytest.approx((0.05 + 1e-5) / 2)
    assert schedule.value(0.05, 100, 100) == pytest.approx(1e-5)
    assert schedule.value(0.0, 50, 100) == 0.0


def test_the_ema_starts_at_its_iteration_and_is_what_training_leaves_in_the_model():
    _, model, method, state = run_probe(ema=EMA(decay=0.5, start_fraction=0.5))  # starts after iteration 2 of 4
    expected = {n: w.clone() for n, w in method.weights[1].items()}  # seeded by a copy after iteration 2
    for later in method.weights[2:]:
        expected = {n: 0.5 * expected[n] + 0.5 * later[n] for n in expected}
    final = method.weights[-1]
    assert state.model_selection == "ema"
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.detach(), expected[name])
    assert any(not torch.equal(expected[n], final[n]) for n in expected)  # not the last iteration's weights


def test_the_average_is_swapped_in_and_out_around_an_evaluation():
    param = nn.Parameter(torch.zeros(3))
    ema = ParameterEMA(EMA(decay=0.5, start_fraction=0.0), {"p": param}, total_iters=4)
    with ema.swapped_in():
        pass  # nothing averaged yet: nothing to swap
    ema.update(1)
    with torch.no_grad():
        param.fill_(2.0)
    ema.update(2)
    with ema.swapped_in():
        assert torch.equal(param.detach(), torch.ones(3))
    assert torch.equal(param.detach(), torch.full((3,), 2.0))
    restored = ParameterEMA(EMA(decay=0.5, start_fraction=0.0), {"p": param}, total_iters=4)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.average["p"], torch.ones(3))


# -- end to end: the smoke preset, and a resume with the EMA -----------------------------------------------
@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _smoke(world, *extra: str):
    return load_experiment("smoke", [f"data.root={str(world)!r}", "data.eval_limit=1", *extra])


def test_soma_runs_end_to_end_on_the_smoke_preset_and_scores_the_ema(tiny_world, tmp_path, private_cache):
    from benchmarks.runner import RunSpec, execute_run

    result = execute_run(RunSpec("G->CBM", "proxy_vit", "soma", 42), _smoke(tiny_world), tmp_path, progress=False)
    assert result["status"] == "finished", result["failure"]
    assert result["model_selection"] == "ema"
    assert result["method"]["hyperparameters"]["backbone_lr_mult"] == 0.5
    assert result["diagnostics"]["adapted_layers"] == 4 * 6  # blocks 2–5 of the proxy ViT's 6
    assert result["params"]["backbone_trainable"] > result["params"]["backbone_added"] > 0
    assert all(0.0 <= t["miou"] <= 100.0 for t in result["targets"].values())


def test_an_interrupted_run_resumes_its_ema_to_the_same_evaluated_weights(tiny_world, tmp_path, monkeypatch,
                                                                           private_cache):
    """Checkpointed after iteration 2 with the average already formed (from iteration 1), killed, resumed:
    the weights the targets are scored with equal an uninterrupted run's, and they are the average."""
    from benchmarks import protocol
    from benchmarks.runner import RunSpec, execute_run, experiment_for

    exp = _smoke(tiny_world, "train.iters=4", "train.checkpoint_interval=2", "train.log_interval=1",
                 "methods.soma.ema_decay=0.5", "methods.soma.ema_start_fraction=0.25",
                 "methods.soma.ema_reference_iters=0")
    spec = RunSpec("G->CBM", "proxy_vit", "soma", 42)
    scored: list[dict[str, torch.Tensor]] = []  # the trained tensors at each target's scoring
    last_iteration: list[dict[str, torch.Tensor]] = []  # the same tensors just before the average replaced them
    real_evaluate, real_apply = protocol.evaluate, protocol.ParameterEMA.apply

    def trained(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def recording_evaluate(model, *args, **kwargs):
        scored.append(trained(model))
        return real_evaluate(model, *args, **kwargs)

    def recording_apply(ema):
        last_iteration.append({n: p.detach().clone() for n, p in ema.named.items()})
        real_apply(ema)

    monkeypatch.setattr(protocol, "evaluate", recording_evaluate)
    monkeypatch.setattr(protocol.ParameterEMA, "apply", recording_apply)
    reference = execute_run(spec, exp, tmp_path / "reference", progress=False)
    assert reference["status"] == "finished" and reference["model_selection"] == "ema"
    reference_weights = scored[0]
    assert len(scored) == 3 and all(all(torch.equal(s[n], reference_weights[n]) for n in s) for s in scored)
    raw = last_iteration.pop()
    assert any(not torch.equal(reference_weights[n], raw[n]) for n in raw)  # the average, not the last weights

    real_save = checkpoint.save_checkpoint
    saved = []

    def save_then_die(result_path, **kwargs):
        real_save(result_path, **kwargs)
        saved.append(kwargs["train_state"])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    results = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, exp, results, progress=False)
    path = spec.path(experiment_for(exp, spec), results)
    stored = checkpoint.read_checkpoint(checkpoint.checkpoint_file(path))
    assert stored["train_state"]["step"] == 2 and stored["train_state"]["ema"]  # the average is in the checkpoint

    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    scored.clear()
    resumed = execute_run(spec, exp, results, progress=False)
    assert resumed["resumed_from_iter"] == 2 and resumed["model_selection"] == "ema"
    assert resumed["history"] == reference["history"] and resumed["targets"] == reference["targets"]
    resumed_weights = scored[0]
    assert resumed_weights.keys() == reference_weights.keys()
    assert all(torch.equal(resumed_weights[n], reference_weights[n]) for n in reference_weights)
