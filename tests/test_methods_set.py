"""SET: spectral decomposition, both branches, recomposition, and the released variant's batch coupling."""

from __future__ import annotations

import math

import pytest
import torch

from methods.rein import TokenRefinement
from methods.set_tokens import (
    amplitude_and_phase,
    batch_channel_spectrum,
    inverse_batch_channel_spectrum,
    inverse_spatial_spectrum,
    recompose,
    released_amplitude_and_phase,
    spatial_spectrum,
)
from tests.test_methods_common import images, tiny_model


def test_spatial_recomposition_of_unrefined_parts_returns_the_input():
    f = torch.randn(2, 12, 5, dtype=torch.float64)  # [B, N=3x4, C]
    amplitude, phase = amplitude_and_phase(spatial_spectrum(f, (3, 4)))
    torch.testing.assert_close(inverse_spatial_spectrum(recompose(amplitude, phase), (3, 4)), f)
    # the transform is over the grid per image and channel: compare with numpy's per-image FFT
    grid = f[1].T.reshape(5, 3, 4)
    torch.testing.assert_close(spatial_spectrum(f, (3, 4))[1], torch.fft.fft2(grid).flatten(1).T)


def test_released_round_trip_is_scaled_by_sqrt_batch_times_channels():
    # fft2 'backward' then irfft2 'ortho' over (B, C): the released code's pair gives sqrt(B·C)·f
    f = torch.randn(3, 7, 6, dtype=torch.float64)
    amplitude, phase = amplitude_and_phase(batch_channel_spectrum(f))
    out = inverse_batch_channel_spectrum(recompose(amplitude, phase))
    torch.testing.assert_close(out, f * math.sqrt(3 * 6))
    # the transform is over (batch, channel) for each token
    torch.testing.assert_close(batch_channel_spectrum(f)[:, 2], torch.fft.fft2(f[:, 2]))


def test_tiny_magnitudes_keep_gradients_finite():
    spectrum = torch.zeros(2, 3, dtype=torch.complex64, requires_grad=True)
    amplitude, phase = amplitude_and_phase(spectrum * 1.0)
    (amplitude.sum() + phase.sum()).backward()
    assert torch.isfinite(spectrum.grad).all()
    assert torch.all(amplitude == 1e-5) and torch.all(phase == 0)


def test_the_released_floors_act_on_the_power_and_on_the_real_part_apart():
    spectrum = torch.tensor([3e-6 + 2e-6j, -4e-6 + 0.5j, -2e-3 + 1e-3j, -3e-6 - 3e-6j, 0j, 0.3 - 0.4j],
                            dtype=torch.complex128)
    amplitude, phase = released_amplitude_and_phase(spectrum)
    floor = math.sqrt(1e-5)  # Re² + Im² below 1e-5 is raised to 1e-5, whatever |F| was
    torch.testing.assert_close(amplitude, torch.tensor([floor, 0.5, floor, floor, floor, 0.5], dtype=torch.float64))
    # a real part below 1e-5 in size becomes +1e-5 (a tiny negative one flips to the right half-plane)
    expected_phase = [math.atan2(2e-6, 1e-5), math.atan2(0.5, 1e-5), math.atan2(1e-3, -2e-3),
                      math.atan2(-3e-6, 1e-5), 0.0, math.atan2(-0.4, 0.3)]
    torch.testing.assert_close(phase, torch.tensor(expected_phase, dtype=torch.float64))
    # not the paper variant's guard, which sets a whole tiny coefficient to 1e-5 + 0i and leaves the rest exact
    paper_amplitude, paper_phase = amplitude_and_phase(spectrum)
    torch.testing.assert_close(paper_amplitude[[0, 3, 4]], torch.full((3,), 1e-5, dtype=torch.float64))
    torch.testing.assert_close(paper_phase[[0, 3, 4]], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(paper_amplitude[2], torch.tensor(math.hypot(2e-3, 1e-3), dtype=torch.float64))
    torch.testing.assert_close(paper_phase[1], torch.tensor(math.atan2(0.5, -4e-6), dtype=torch.float64))


def test_released_floors_keep_gradients_finite():
    spectrum = torch.zeros(2, 3, dtype=torch.complex64, requires_grad=True)
    amplitude, phase = released_amplitude_and_phase(spectrum * 1.0)
    (amplitude.sum() + phase.sum()).backward()
    assert torch.isfinite(spectrum.grad).all()


@pytest.mark.parametrize(("name", "floors"), [("set", amplitude_and_phase), ("set_released", released_amplitude_and_phase)])
def test_each_variant_decomposes_with_its_own_floor(name, floors):
    model = tiny_model(name).eval()
    adapter = model.backbone.set_tokens
    f = torch.zeros(2, 16, 32)  # an all-zero spectrum: only the floors decide A and P
    f[:, :, 0] = 1e-6
    with torch.no_grad():
        _identity_refinements(adapter)
        adapter.grid = (4, 4)
        delta = adapter.feature_delta(0, f)
        spectrum = spatial_spectrum(f, (4, 4)) if name == "set" else batch_channel_spectrum(f)
        combined = recompose(*floors(spectrum)) / math.sqrt(2 * 32)
        expected = inverse_spatial_spectrum(combined, (4, 4)) if name == "set" else inverse_batch_channel_spectrum(combined)
    torch.testing.assert_close(delta, expected)


def test_amplitude_logits_are_standardised_over_tokens():
    torch.manual_seed(0)
    refine = TokenRefinement(8, standardize_logits=True)
    f, tokens = torch.randn(2, 5, 8), torch.randn(6, 8)
    logits = f @ tokens.T
    standard = (logits - logits.mean(-1, keepdim=True)) / torch.sqrt(logits.var(-1, unbiased=False, keepdim=True) + 1e-5)
    weights = torch.softmax(standard / math.sqrt(8), dim=-1)[..., 1:]
    expected = refine.delta(weights @ refine.token2feat(tokens[1:]) + f)
    torch.testing.assert_close(refine(f, tokens), expected)


def _identity_refinements(adapter):
    """token2feat = 0 and delta = identity: each branch returns its input (out_A = A, out_P = P)."""
    for refine in (adapter.refinement, adapter.amplitude_refinement):
        refine.token2feat.weight.zero_()
        refine.token2feat.bias.zero_()
        refine.delta.weight.copy_(torch.eye(refine.dim))
        refine.delta.bias.zero_()


@pytest.mark.parametrize(("name", "factor"), [("set", 1.0), ("set_released", None)])
def test_unrefined_branches_recompose_the_features(name, factor):
    model = tiny_model(name).eval()
    adapter = model.backbone.set_tokens
    f = torch.randn(2, 16, 32)
    with torch.no_grad():
        _identity_refinements(adapter)
        adapter.grid = (4, 4)
        delta = adapter.feature_delta(0, f)
    C = 32
    factor = factor if factor is not None else math.sqrt(2 * C)  # sqrt(B·C) from the released FFT pair, B=2
    torch.testing.assert_close(delta, f * factor / math.sqrt(2 * C), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "coupled"), [("set", False), ("set_released", True)])
def test_only_the_released_variant_couples_images_in_a_batch(name, coupled):
    model = tiny_model(name).eval()
    with torch.no_grad():
        model.backbone.set_tokens.scale.fill_(1.0)
        a, b, c = images(1, seed=1), images(1, seed=2), images(1, seed=3)
        first_with_b = model.backbone(torch.cat([a, b]))[-1][0]
        first_with_c = model.backbone(torch.cat([a, c]))[-1][0]
        alone = model.backbone(a)[-1][0]
    changed = (first_with_b - first_with_c).abs().max().item()
    if coupled:
        assert changed > 1e-3
    else:
        assert changed < 1e-5
        torch.testing.assert_close(first_with_b, alone, rtol=1e-4, atol=1e-5)


def test_both_branches_and_the_queries_use_their_own_parameters():
    model = tiny_model("set", head="mask2former")
    adapter = model.backbone.set_tokens
    assert adapter.amplitude_tokens.tokens.shape == (4, 100, 32)  # full rank
    bound = math.sqrt(6.0 / (3 * 8**2 + 32))
    assert adapter.amplitude_tokens.tokens.abs().max() <= bound
    model.train()
    outputs = model(images(1))  # the head's outputs suffice to reach every parameter (no matching loss)
    (outputs["pred_logits"].square().mean() + outputs["pred_masks"].square().mean()).backward()
    for p in (adapter.tokens.A, adapter.tokens.B, adapter.amplitude_tokens.tokens, adapter.scale,
              adapter.refinement.delta.weight, adapter.amplitude_refinement.delta.weight,
              adapter.transform.weight, adapter.merge.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    pos, _ = model.head._query_provider()
    assert pos.shape == (100, 32)  # queries from the phase tokens only (m of them)


def test_a_run_splitting_the_step_warns_for_set_released_alone(smoke_experiment, tmp_path, caplog):
    # The released SET's FFT runs over the images of one forward: a step split over micro-batches (or
    # processes, docs/scaling.md's 4-GPU recipe) trains another computation, where for `set` it changes
    # only the loss's weighing.
    from benchmarks.config import apply_override
    from benchmarks.method import build_method
    from benchmarks.runner import RunSpec, execute_run, split_batch_warning

    exp = apply_override(apply_override(smoke_experiment, "train.grad_accum=2"), "train.iters=1")
    exp = apply_override(exp, "data.eval_limit=1")
    with caplog.at_level("WARNING", logger="benchmarks.runner"):
        result = execute_run(RunSpec("G->CBM", "proxy_vit", "set_released", 42), exp, tmp_path / "runs", progress=False)
    assert result["status"] == "finished", result.get("failure")
    assert any("set_released couples the images of one forward pass" in r.getMessage()
               and "each forward holds 2 image(s), not the step's 4" in r.getMessage() for r in caplog.records)
    released = build_method("set_released", None)
    assert split_batch_warning(released, 4, 1, 1) is None  # the whole batch in one forward: as released
    assert "4 process(es)" in split_batch_warning(released, 1, 4, 1)
    assert split_batch_warning(build_method("set", None), 1, 4, 1) is None
