"""FisherTune: estimators against hand computations, masks that hold through AdamW, the schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

import methods.fishertune as fishertune_module
from benchmarks.backbones import BackboneSpec, build_backbone
from benchmarks.config import load_experiment
from benchmarks.errors import UserError
from benchmarks.heads import build_head
from benchmarks.method import TrainContext, build_method
from benchmarks.model import SegModel
from benchmarks.protocol import train
from methods.fishertune import (
    FisherTune,
    FisherTuneConfig,
    domain_related_fisher,
    empirical_fisher,
    kind_of,
    kind_sums,
    perturb_feature_statistics,
    selected_count,
    selection_fraction,
    variational_excess_precision,
)

NUM_CLASSES = 5
TINY_VIT = BackboneSpec(
    timm_name="vit_tiny_patch16_224", family="vit", native_patch=8, native_img_size=32, embed_dim=32, depth=4,
    timm_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0,
                 "init_values": 1e-5, "class_token": True, "reg_tokens": 0, "qkv_bias": True},
)
# Small enough to run in seconds, large enough that every phase does something.
FAST = dict(warmup_fraction=0.2, estimation_batches=2, delta_min=0.05, delta_max=0.2, growth_fraction=0.25)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def tiny_model(seed: int = 0) -> SegModel:
    torch.manual_seed(seed)
    backbone = build_backbone(TINY_VIT, img_size=32, weights="random")
    head = build_head("light", backbone.embed_dim, NUM_CLASSES, channels=16, dropout=0.0)
    return SegModel(backbone, head)


class RandomScenes(Dataset):
    def __init__(self, count: int = 8, size: int = 32):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(count, 3, size, size, generator=generator)
        self.labels = torch.randint(0, NUM_CLASSES, (count, size, size), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, _augmentation_seed = item  # the protocol's stream yields (index, seed)
        return {"image": self.images[index], "label": self.labels[index]}


def manual_context(model: SegModel, total_iters: int, optimizer=None) -> TrainContext:
    data = RandomScenes()
    position = [0]

    def next_batch() -> dict[str, torch.Tensor]:
        start = (2 * position[0]) % len(data)
        position[0] += 1
        return {"image": data.images[start:start + 2], "label": data.labels[start:start + 2]}

    return TrainContext(
        model=model, total_iters=total_iters, device=torch.device("cpu"), next_batch=next_batch,
        loss=lambda batch: model.loss(batch["image"], batch["label"])["loss"], optimizer=optimizer,
    )


def run_protocol(method: FisherTune, iters: int, lr: float = 1e-2) -> SegModel:
    exp = load_experiment("smoke", [f"train.iters={iters}", "train.batch_size=2", f"train.lr={lr}",
                                    "train.weight_decay=0.05", "data.num_workers=0"])
    model = tiny_model()
    method.attach(model)
    train(model, method, RandomScenes(), exp, torch.device("cpu"), progress=False)
    return model


# -- the estimators against hand computations ---------------------------------------------------------
def test_empirical_drf_equals_hand_computation():
    a = torch.tensor([1.0, -1.0], requires_grad=True)
    b = torch.tensor([2.0], requires_grad=True)
    batches = [(torch.tensor([1.0, 2.0]), 3.0), (torch.tensor([3.0, -1.0]), 1.0)]

    def clean(batch):  # L = (a·x)² + b·y  →  ∂L/∂a = 2(a·x)x, ∂L/∂b = y
        x, y = batch
        return (a * x).sum() ** 2 + b.sum() * y

    def perturbed(batch):  # the same at 2x: ∂L/∂a = 8(a·x)x, ∂L/∂b = y
        x, y = batch
        return (a * 2 * x).sum() ** 2 + b.sum() * y

    fisher = empirical_fisher([a, b], batches, {"clean": clean, "perturbed": perturbed})
    # batch 1: a·x = −1 → ∂a = [−2, −4]; batch 2: a·x = 4 → ∂a = [24, −8]
    f_a = torch.tensor([(4 + 576) / 2, (16 + 64) / 2])
    f_b = torch.tensor([(9 + 1) / 2])
    torch.testing.assert_close(fisher["clean"][0], f_a)
    torch.testing.assert_close(fisher["clean"][1], f_b)
    torch.testing.assert_close(fisher["perturbed"][0], 16 * f_a)
    torch.testing.assert_close(fisher["perturbed"][1], f_b)

    drf_a = domain_related_fisher(fisher["clean"][0], fisher["perturbed"][0], 1.0, 1.0, 1e-8)
    drf_b = domain_related_fisher(fisher["clean"][1], fisher["perturbed"][1], 1.0, 1.0, 1e-8)
    # F + e^{−2}·|F − 16F| / F = F + 15·e^{−2} for a; b is domain-invariant: DRF = F
    torch.testing.assert_close(drf_a, f_a + 15 * math.exp(-2.0))
    torch.testing.assert_close(drf_b, f_b)
    assert a.grad is None and b.grad is None


def test_variational_drf_uses_excess_precision_and_prior_offset():
    excess_x, excess_xp = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 1.0])
    tau_inv2 = 100.0
    drf = domain_related_fisher(excess_x, excess_xp, 0.5, 0.5, 1e-8, gamma=2.0, offset=tau_inv2)
    lam_x, lam_xp = excess_x + tau_inv2, excess_xp + tau_inv2
    expected = 2.0 * (lam_x - tau_inv2) + math.exp(-1.0) * 2.0 * (lam_x - lam_xp).abs() / (torch.minimum(lam_x, lam_xp) + 1e-8)
    torch.testing.assert_close(drf, expected)


def test_variational_precision_reaches_the_quadratic_optimum():
    # For L(θ) = ½·h·(θ − θ̂)², maximising the ELBO gives Λ = n·h + τ⁻² exactly: excess = n·h.
    torch.manual_seed(0)
    theta = torch.zeros(400, requires_grad=True)
    curvature = torch.linspace(1.0, 10.0, 400)

    def loss(_):
        return 0.5 * (curvature * theta.square()).sum()

    estimate = variational_excess_precision(
        [theta], range(600), {"clean": loss}, prior_variance=1.0, data_size=2.0, lr=0.05, init_std=0.1,
    )
    excess = estimate.excess["clean"][0]
    log_ratio = (excess / (2.0 * curvature)).log()
    assert abs(float(log_ratio.mean())) < 0.15
    assert float(torch.corrcoef(torch.stack([excess.log(), curvature.log()]))[0, 1]) > 0.8
    assert torch.equal(theta, torch.zeros(400))  # the mean is put back exactly
    # The squared gradients at the samples, h²/Λ, follow h: the converged posterior agrees with them.
    assert estimate.agreement["clean"] > 0.8


def test_a_posterior_that_stays_at_its_start_says_so_and_the_method_warns(caplog):
    # The default constants on a real network, in small: n·h far below τ⁻², few steps, every entry
    # moves alike, and the order of the excess has nothing to do with the curvature's.
    torch.manual_seed(0)
    theta = torch.zeros(400, requires_grad=True)
    curvature = torch.linspace(1e-6, 1e-5, 400)[torch.randperm(400)]

    def loss(_):
        return 0.5 * (curvature * theta.square()).sum() + (curvature * theta).sum()

    estimate = variational_excess_precision(
        [theta], range(20), {"clean": loss}, prior_variance=1e-2, data_size=1.0, lr=0.05, init_std=1e-3,
    )
    assert abs(estimate.agreement["clean"]) < 0.3
    with caplog.at_level("WARNING", logger="methods.fishertune"):
        fishertune_module._warn_if_the_posterior_did_not_find_the_fisher(estimate.agreement)
    assert "selection is close to random" in caplog.text
    caplog.clear()
    fishertune_module._warn_if_the_posterior_did_not_find_the_fisher({"clean": 0.9, "perturbed": 0.8})
    assert not caplog.text


def test_feature_perturbation_follows_dsu_and_spares_prefix_tokens():
    """DSU's recipe (lixiaotong97/DSU): torch's default (unbiased) variances, over positions per image and
    channel and over the batch, with 1e-6 inside each square root."""
    torch.manual_seed(3)
    tokens = torch.randn(4, 1 + 9, 6) * 2 + 1
    torch.manual_seed(7)
    out = perturb_feature_statistics(tokens, num_prefix=1, eps_mu=1.0, eps_sigma=1.0, var_eps=1e-6)
    torch.manual_seed(7)
    patches = tokens[:, 1:]
    mean, std = patches.mean(1, keepdim=True), (patches.var(1, keepdim=True) + 1e-6).sqrt()
    n1, n2 = torch.randn_like(mean), torch.randn_like(std)
    new_mean = mean + n1 * (mean.var(0, keepdim=True) + 1e-6).sqrt()
    new_std = std + n2 * (std.var(0, keepdim=True) + 1e-6).sqrt()
    assert torch.equal(out[:, :1], tokens[:, :1])
    torch.testing.assert_close(out[:, 1:], (patches - mean) / std * new_std + new_mean)
    assert not torch.allclose(out[:, 1:], patches)


def test_a_batch_of_one_is_not_perturbed_rather_than_nan():
    tokens = torch.randn(1, 1 + 9, 6)
    out = perturb_feature_statistics(tokens, num_prefix=1, eps_mu=1.0, eps_sigma=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, tokens, atol=1e-2, rtol=0)  # moved only by n·√1e-6, DSU's epsilon


# -- selection, masks, schedule ------------------------------------------------------------------------
def test_unselected_entries_stay_bit_identical_through_adamw_with_weight_decay():
    torch.manual_seed(0)
    method = FisherTune(**FAST)
    model_before = tiny_model()
    model = run_protocol(method, iters=10)
    pretrained = dict(model_before.backbone.named_parameters())
    masks = method.masks()
    moved_selected = 0
    for name, param in model.backbone.named_parameters():
        mask = masks[name]
        assert torch.equal(param[~mask], pretrained[name][~mask]), name
        moved_selected += int((param[mask] != pretrained[name][mask]).sum())
    assert method.selected == selected_count(selection_fraction(10 - 1 - 2, 0.05, 0.2, 2.5), method.candidate_count)
    assert moved_selected > 0.5 * method.selected  # the selection really trains


def test_without_the_restore_weight_decay_would_move_unselected_entries(monkeypatch):
    # Guards the test above: AdamW's decoupled decay does move zero-gradient entries.
    monkeypatch.setattr(FisherTune, "after_optimizer_step", lambda self, step, ctx: None)
    method = FisherTune(**FAST)
    model_before = tiny_model()
    model = run_protocol(method, iters=6)
    pretrained = dict(model_before.backbone.named_parameters())
    masks = method.masks()
    moved = sum(int((p[~masks[n]] != pretrained[n][~masks[n]]).sum()) for n, p in model.backbone.named_parameters())
    assert moved > 0


def test_selected_fraction_follows_the_schedule_and_masks_are_nested():
    torch.manual_seed(0)
    model = tiny_model()
    method = FisherTune(**FAST)
    method.attach(model)
    ctx = manual_context(model, total_iters=40)
    warmup, horizon = method.schedule(40)
    assert (warmup, horizon) == (8, 10.0)
    previous = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.backbone.named_parameters()}
    for step in range(40):
        method.on_step(step, ctx)
        if step < warmup:
            assert method.selected == 0 and not model.backbone_trainable()
            continue
        expected = round((0.2 - 0.15 * math.exp(-(step - warmup) / 10.0)) * method.candidate_count)
        assert method.selected == expected
        masks = method.masks()
        assert sum(int(m.sum()) for m in masks.values()) == expected
        assert all(bool((masks[n] | ~previous[n]).all()) for n in masks)  # nothing deselected
        previous = {n: m.clone() for n, m in masks.items()}
    assert method.selected == round((0.2 - 0.15 * math.exp(-3.1)) * method.candidate_count)


def test_gradients_of_unselected_entries_are_zero():
    torch.manual_seed(0)
    model = tiny_model()
    method = FisherTune(**FAST)
    method.attach(model)
    ctx = manual_context(model, total_iters=10)
    method.on_step(2, ctx)
    model.train()
    batch = ctx.next_batch()
    ctx.loss(batch).backward()
    for name, param in model.backbone.named_parameters():
        mask = method.masks()[name]
        assert param.grad is not None
        assert bool((param.grad[~mask] == 0).all()), name
    assert any(bool((p.grad != 0).any()) for p in model.backbone.parameters())


def test_resume_rebuilds_the_same_selection():
    torch.manual_seed(0)
    model = tiny_model()
    method = FisherTune(**FAST)
    method.attach(model)
    ctx = manual_context(model, total_iters=20)
    for step in range(9):
        method.on_step(step, ctx)
    resumed = FisherTune(**FAST)
    resumed.attach(model)
    resumed.load_state_dict(method.state_dict())
    resumed.on_step(8, manual_context(model, total_iters=20))
    assert resumed.selected == method.selected
    for name, mask in method.masks().items():
        assert torch.equal(resumed.masks()[name], mask)


@pytest.mark.parametrize("estimator", ["empirical", "variational"])
def test_both_estimators_run_through_the_protocol_with_diagnostics(estimator):
    torch.manual_seed(0)
    method = build_method("fishertune", {"estimator": estimator, "variational_steps": 2, **FAST})
    run_protocol(method, iters=5)
    info = method.diagnostics()
    assert info["estimator"] == estimator and info["estimation_seconds"] >= 0
    assert info["perturbed_blocks"] == [0, 1, 2, 3]  # the tap blocks of a depth-4 ViT
    assert math.isclose(sum(info["drf_mass_by_block"].values()), 1.0, abs_tol=1e-4)
    assert math.isclose(sum(info["drf_mass_by_kind"].values()), 1.0, abs_tol=1e-4)
    assert math.isclose(sum(info["fisher_mass_by_block"].values()), 1.0, abs_tol=1e-4)
    assert math.isclose(sum(info["drf_mass_by_block_and_kind"]["3"].values()), info["drf_mass_by_block"]["3"], abs_tol=1e-5)
    assert set(info["drf_mass_by_block"]) == {"0", "1", "2", "3", "outside"}
    assert sum(info["selected_by_kind"].values()) == info["selected_budget"] == method.budget()
    assert sum(info["selected_by_block"].values()) == method.budget()
    assert 0.0 <= info["domain_term_share"] <= 1.0
    assert info["selected_at_last_step"] == method.selected
    if estimator == "variational":
        assert set(info["variational_fisher_agreement"]) == {"clean", "perturbed"}
        assert all(-1.0 <= v <= 1.0 for v in info["variational_fisher_agreement"].values())
    else:
        assert "variational_fisher_agreement" not in info


def test_parameter_kinds_split_the_fused_qkv_into_thirds():
    values = torch.cat([torch.full((4, 4), 1.0), torch.full((4, 4), 2.0), torch.full((4, 4), 3.0)])
    assert kind_sums("vit.blocks.3.attn.qkv.weight", values) == {"q": 16.0, "k": 32.0, "v": 48.0}
    assert kind_sums("vit.blocks.3.attn.qkv.bias", torch.tensor([1.0, 1, 2, 2, 3, 3])) == {"q": 2.0, "k": 4.0, "v": 6.0}
    assert kind_of("vit.blocks.0.attn.proj.weight") == "proj"
    assert kind_of("vit.blocks.0.mlp.fc1.bias") == "fc1"
    assert kind_of("vit.blocks.0.mlp.fc2.weight") == "fc2"
    assert kind_of("vit.blocks.0.norm1.weight") == "norms"
    assert kind_of("vit.blocks.0.ls1.gamma") == "other"
    assert kind_of("vit.patch_embed.proj.weight") == "other"


def test_dinov2_large_budget_matches_the_reported_count():
    # Built on the meta device (no memory); the budget is the selection rule applied to the count.
    with torch.device("meta"):
        backbone = build_backbone("dinov2_vitl14", img_size=512, weights="random")
        model = SegModel(backbone, torch.nn.Identity())
    method = FisherTune()
    method.attach(model)
    assert 304_000_000 < method.candidate_count < 304_400_000
    assert method.budget() == round(0.05 * method.candidate_count)
    assert method.budget() == 15_209_830  # the paper reports 15.21M
    assert method.parameter_counts(model)["backbone_trainable"] == method.budget()


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="estimator"):
        FisherTune(estimator="laplace")
    with pytest.raises(UserError, match="delta_min"):
        FisherTune(delta_min=0.1, delta_max=0.05)
    with pytest.raises(UserError, match="perturb_blocks"):
        FisherTune(perturb_blocks="first")
    assert FisherTuneConfig().delta_max == 0.05
