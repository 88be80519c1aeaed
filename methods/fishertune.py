"""FisherTune (CVPR 2025): Fisher-guided selective fine-tuning of the backbone.

No public code exists; this is an implementation from the formulation (see docs/fishertune.md).
Three phases, all driven through the plugin hooks:

1. warm-up: the backbone is frozen (the model then runs it without autograd) and only the head
   trains for T₁ iterations;
2. estimation: the domain-related Fisher (DR-FIM) of every candidate backbone entry is estimated
   from T₂ source batches x and their feature-statistics-perturbed counterparts x′ (DSU-style
   perturbation on the outputs of chosen blocks), either from squared gradients (`empirical`) or
   from a learned diagonal Gaussian posterior precision (`variational`);
3. selective tuning: entries are ranked by DR-FIM (normalised per tensor) and the top δ(t) train,
   δ(t) = δ_max − (δ_max − δ_min)·exp(−t/T), t counted from the end of the warm-up. Unselected
   entries get a zero gradient (tensor hooks), so AdamW leaves their moments at exactly zero and
   its update at exactly zero; the only thing that moves them is decoupled weight decay, which
   `after_optimizer_step` undoes bit-exactly from a pretrained copy (they never moved, so the copy
   is exact, also after a resume).

Every constant the paper's accessible text does not fix is a `FisherTuneConfig` field whose
docstring says "assumption".
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from benchmarks.config import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, Bound
from benchmarks.errors import UserError
from benchmarks.method import Method, TrainContext, no_decay_names, register_method, split_decay_groups
from benchmarks.resources import synchronize

if TYPE_CHECKING:
    from benchmarks.model import SegModel

log = logging.getLogger(__name__)

LossFn = Callable[[Any], torch.Tensor]
#: Below this Spearman ρ between the variational excess precision and the squared gradients, a run warns.
POSTERIOR_AGREEMENT_WARNING = 0.5
ESTIMATORS = ("empirical", "variational")
NORMALISATIONS = ("mean", "max", "none")
CANDIDATE_SETS = ("all", "matrices")
PARAMETER_KINDS = ("q", "k", "v", "proj", "fc1", "fc2", "norms", "other")


@dataclass
class FisherTuneConfig:
    estimator: str = "empirical"
    """"empirical" (squared gradients) or "variational" (learned posterior precision)."""
    warmup_fraction: float = 0.05
    """T₁ as a fraction of the iterations: head-only warm-up. Assumption (not in the paper's text)."""
    estimation_batches: int = 50
    """T₂: source batches used to estimate DR-FIM (each also seen perturbed). Assumption."""
    delta_min: float = 0.01
    """Fraction of candidate entries selected when selective tuning starts. Assumption."""
    delta_max: float = 0.05
    """Fraction the selection grows to; 5% of DINOv2-L's 304.2M ≈ 15.21M, the reported count. Assumption."""
    growth_fraction: float = 0.25
    """T in δ(t) = δ_max − (δ_max − δ_min)·exp(−t/T), as a fraction of the iterations. Assumption."""
    eps_mu: float = 1.0
    """ε_μ: strength of the mean perturbation (DSU) and part of the exp(−(ε_μ+ε_σ)) weight. Assumption."""
    eps_sigma: float = 1.0
    """ε_σ: strength of the std perturbation. Assumption."""
    prior_variance: float = 1e-2
    """τ²: variance of the Gaussian prior N(θ_pretrained, τ²I) (variational estimator). Assumption."""
    gamma: float = 1.0
    """γ: scale of the variational DR-FIM. Assumption."""
    eps: float = 1e-8
    """ε in the denominator min(F, F′) + ε. Assumption."""
    perturb_blocks: str = "taps"
    """Blocks whose outputs are perturbed for x′: "taps" (the feature-tap blocks, e.g. 7,11,15,23 on
    ViT-L), "all", or comma-separated 0-based indices. Assumption: the paper names no positions."""
    dsu_eps: float = 1e-6
    """Added to variances before the square root in the perturbation (DSU's value)."""
    normalise: str = "mean"
    """Per-tensor normalisation before the global ranking: divide by the tensor's mean DR-FIM ("mean"),
    by its max ("max"), or rank raw values ("none"). Assumption: the paper says only "normalised"."""
    candidates: str = "all"
    """Entries that may be selected: "all" backbone parameters (what makes 5% ≈ 15.21M on DINOv2-L)
    or "matrices" (tensors with ≥ 2 dimensions). Assumption."""
    variational_steps: int = 0
    """ELBO steps per posterior (one source batch each); 0 = estimation_batches. Assumption."""
    variational_lr: float = 0.05
    """Adam learning rate on the log excess precision. Assumption."""
    variational_init_std: float = 1e-3
    """Posterior std every entry starts from (small, so early samples leave the network usable). Assumption."""
    variational_data_size: float = 25_000.0
    """Weight of the expected batch loss in the ELBO: the number of source images it stands for
    (GTAV ≈ 25k). Assumption: with the quadratic approximation the optimum is Λ ≈ n·F + τ⁻²."""

    def validate(self) -> None:
        def bad(field: str, why: str) -> UserError:
            return UserError(f"fishertune: {field}={getattr(self, field)!r} {why}")

        if self.estimator not in ESTIMATORS:
            raise bad("estimator", f"is unknown; use one of {', '.join(ESTIMATORS)}")
        if self.normalise not in NORMALISATIONS:
            raise bad("normalise", f"is unknown; use one of {', '.join(NORMALISATIONS)}")
        if self.candidates not in CANDIDATE_SETS:
            raise bad("candidates", f"is unknown; use one of {', '.join(CANDIDATE_SETS)}")
        if not 0.0 < self.delta_min <= self.delta_max <= 1.0:
            raise bad("delta_min", f"must satisfy 0 < delta_min <= delta_max ({self.delta_max}) <= 1")
        # Each number's own range is `FisherTune.hyperparameter_ranges`, checked when the method is built;
        # what is checked here involves several settings, or names.
        positive = self.prior_variance > 0.0 and self.variational_init_std > 0.0
        if positive and self.variational_init_std ** -2 <= 1.0 / self.prior_variance:
            raise bad("variational_init_std", f"must be below the prior std {math.sqrt(self.prior_variance):g}")
        parse_block_spec(self.perturb_blocks, depth=10**6, taps=())


# -- the pieces, usable on their own ---------------------------------------------------------------

def parse_block_spec(spec: str, depth: int, taps: Sequence[int]) -> list[int]:
    spec = spec.strip()
    if spec == "taps":
        return sorted(set(taps))
    if spec == "all":
        return list(range(depth))
    try:
        indices = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"fishertune: perturb_blocks={spec!r} must be 'taps', 'all' or indices like '5,11'") from None
    if not indices or indices[0] < 0 or indices[-1] >= depth:
        raise UserError(f"fishertune: perturb_blocks={spec!r} needs indices in 0..{depth - 1}")
    return indices


def perturb_feature_statistics(
    tokens: torch.Tensor, num_prefix: int, eps_mu: float, eps_sigma: float, var_eps: float = 1e-6
) -> torch.Tensor:
    """DSU on a block output [B, prefix+N, C]: per image and channel, re-normalise the patch tokens
    from (μ, σ) to μ′ = μ + ε_μ·n₁·σ_μ, σ′ = σ + ε_σ·n₂·σ_σ, with σ_μ, σ_σ the batch std of μ and σ
    and n ~ N(0, 1) per image and channel. Prefix tokens pass through untouched."""
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    mean = patches.mean(dim=1, keepdim=True)
    std = (patches.var(dim=1, keepdim=True) + var_eps).sqrt()  # DSU's: torch's default, unbiased
    # Unbiased over the batch as DSU's `sqrtvar`; a batch of one, whose unbiased variance is NaN, gets none.
    unbiased = tokens.shape[0] > 1
    std_of_mean = (mean.var(dim=0, keepdim=True, unbiased=unbiased) + var_eps).sqrt()
    std_of_std = (std.var(dim=0, keepdim=True, unbiased=unbiased) + var_eps).sqrt()
    new_mean = mean + eps_mu * torch.randn_like(mean) * std_of_mean
    new_std = std + eps_sigma * torch.randn_like(std) * std_of_std
    return torch.cat([prefix, (patches - mean) / std * new_std + new_mean], dim=1)


def empirical_fisher(
    params: Sequence[torch.Tensor], batches: Iterable[Any], loss_fns: dict[str, LossFn]
) -> dict[str, list[torch.Tensor]]:
    """Diagonal empirical Fisher E[(∂L/∂θ)²] of each loss, averaged over the batches.

    Every batch goes through every loss (clean and perturbed see the same images and labels); one
    backward per batch and loss, gradients taken with `autograd.grad` so no `.grad` is touched.
    """
    fisher = {key: [torch.zeros_like(p, dtype=torch.float32) for p in params] for key in loss_fns}
    count = 0
    for batch in batches:
        for key, loss_fn in loss_fns.items():
            grads = torch.autograd.grad(loss_fn(batch), list(params), allow_unused=True)
            for acc, grad in zip(fisher[key], grads, strict=True):
                if grad is not None:
                    acc.addcmul_(grad.float(), grad.float())
        count += 1
    if count == 0:
        raise ValueError("empirical_fisher needs at least one batch")
    for accs in fisher.values():
        for acc in accs:
            acc.div_(count)
    return fisher


class VariationalEstimate(NamedTuple):
    excess: dict[str, list[torch.Tensor]]
    """Λ − τ⁻² per loss and candidate tensor."""
    agreement: dict[str, float]
    """Per loss, Spearman ρ between the excess precision and the mean squared gradient the ELBO steps saw, on
    a fixed sample of entries: near 1 where the posterior found the Fisher's order, near 0 where it did not
    move from its start (where the ranking is then noise)."""


#: Entries per tensor whose squared gradients `variational_excess_precision` keeps to measure its agreement.
AGREEMENT_ENTRIES_PER_TENSOR = 256


def variational_excess_precision(
    params: Sequence[torch.Tensor],
    batches: Iterable[Any],
    loss_fns: dict[str, LossFn],
    prior_variance: float,
    data_size: float,
    lr: float,
    init_std: float,
) -> VariationalEstimate:
    """Learn a diagonal Gaussian posterior q = N(θ̂, Λ⁻¹) per loss and return Λ − τ⁻² per entry.

    Prior N(θ_pretrained, τ²I) with θ̂ = θ_pretrained = the current values (the backbone has not
    moved yet), so only Λ is learned. Λ is parametrised as τ⁻² + exp(φ): the excess over the prior
    precision, which DR-FIM needs, is then exact instead of a cancellation of two close floats, and
    Λ ≥ τ⁻² as the quadratic optimum Λ = n·F + τ⁻² implies for a PSD Fisher. Each step minimises
    n·L(θ̂ + ε/√Λ) + KL(q‖p) with one reparameterised sample ε ~ N(0, I) and one backward; the
    gradient of the sample with respect to φ is applied by hand (chain rule through σ = Λ^{-1/2}),
    so `loss_fn` may use the model as it is.

    Where n·F is far below τ⁻² (a real network at the default constants), the posterior is the prior's
    almost everywhere, a reparameterised gradient cannot resolve n·F against τ⁻² within a few steps, and the
    excess stays near its start: `agreement` says so (docs/fishertune.md, "Known limitation").
    """
    prior_precision = 1.0 / prior_variance
    init = math.log(init_std ** -2 - prior_precision)
    log_excess = {key: [torch.full_like(p, init, dtype=torch.float32) for p in params] for key in loss_fns}
    optimisers = {key: torch.optim.Adam(phis, lr=lr) for key, phis in log_excess.items()}
    mean = [p.detach().clone() for p in params]
    picker = torch.Generator().manual_seed(0)
    # Drawn with replacement: a permutation of every tensor would allocate 8 bytes an entry (2.4 GB for
    # DINOv2-L), and a slice of it would keep all of that alive.
    watched = [torch.randint(p.numel(), (AGREEMENT_ENTRIES_PER_TENSOR,), generator=picker).to(p.device)
               for p in params]
    squared = {key: [torch.zeros(len(w), device=w.device) for w in watched] for key in loss_fns}
    steps = 0
    try:
        for batch in batches:
            for key, loss_fn in loss_fns.items():
                phis, noises = log_excess[key], []
                with torch.no_grad():
                    for p, phi, theta in zip(params, phis, mean, strict=True):
                        noise = torch.randn_like(phi)
                        p.copy_(theta + noise * (prior_precision + phi.exp()).rsqrt())
                        noises.append(noise)
                grads = torch.autograd.grad(loss_fn(batch), list(params), allow_unused=True)
                with torch.no_grad():
                    for p, theta in zip(params, mean, strict=True):
                        p.copy_(theta)
                    for seen, entries, grad in zip(squared[key], watched, grads, strict=True):
                        if grad is not None:
                            seen.add_(grad.detach().flatten()[entries].float().square())
                    for phi, noise, grad in zip(phis, noises, grads, strict=True):
                        excess = phi.exp()
                        precision = prior_precision + excess
                        # KL(N(θ̂, Λ⁻¹) ‖ N(θ̂, τ²)) = ½(1/(Λτ²) − 1 + log(τ²Λ)); d/dφ = ½·e^φ·(1/Λ − 1/(Λ²τ²)).
                        phi_grad = 0.5 * excess * (1.0 / precision - prior_precision / precision.square())
                        if grad is not None:
                            # d sample/dφ = ε·dσ/dφ, σ = Λ^{-1/2}: dσ/dφ = −½·e^φ·Λ^{-3/2}.
                            phi_grad -= data_size * 0.5 * grad.float() * noise * excess * precision.pow(-1.5)
                        phi.grad = phi_grad
                optimisers[key].step()
            steps += 1
    finally:
        with torch.no_grad():
            for p, theta in zip(params, mean, strict=True):
                p.copy_(theta)
    if steps == 0:
        raise ValueError("variational_excess_precision needs at least one batch")
    excess = {key: [phi.detach().exp_() for phi in phis] for key, phis in log_excess.items()}
    agreement = {
        key: rank_correlation(torch.cat([e.flatten()[w] for e, w in zip(excess[key], watched, strict=True)]),
                              torch.cat(squared[key]))
        for key in loss_fns
    }
    return VariationalEstimate(excess, agreement)


def _warn_if_the_posterior_did_not_find_the_fisher(agreement: dict[str, float]) -> None:
    worst = min(agreement.values())
    if not worst >= POSTERIOR_AGREEMENT_WARNING:  # NaN warns too
        log.warning(
            "fishertune: the variational posterior ranks the entries with Spearman ρ %.2f against the squared "
            "gradients its steps saw (1 = their order): it stayed near its start, so the selection is close to "
            "random. Use estimator=empirical (the default), or more variational_steps / a larger variational_lr "
            "(docs/fishertune.md, \"Known limitation\")", worst)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ of two 1-D tensors (ties broken by position: the values are continuous)."""
    ranks = [v.double().argsort().argsort().double() for v in (a.cpu(), b.cpu())]
    if len(ranks[0]) < 2:
        return math.nan
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def domain_related_fisher(
    clean: torch.Tensor,
    perturbed: torch.Tensor,
    eps_mu: float,
    eps_sigma: float,
    eps: float,
    gamma: float = 1.0,
    offset: float = 0.0,
) -> torch.Tensor:
    """γ·clean + exp(−(ε_μ+ε_σ))·γ·|clean − perturbed| / (min(clean, perturbed) + offset + ε).

    Empirical: clean = F(x), perturbed = F(x′), γ = 1, offset = 0. Variational: clean and perturbed
    are the excess precisions Λ − τ⁻² (so the first term is γ(Λ_x − τ⁻²)), offset = τ⁻² turns the
    denominator into min(Λ_x, Λ_x′) + ε, and |Λ_x − Λ_x′| equals the difference of the excesses.
    """
    shift = math.exp(-(eps_mu + eps_sigma)) * gamma
    return gamma * clean + shift * (clean - perturbed).abs() / (torch.minimum(clean, perturbed) + offset + eps)


def normalise_per_tensor(score: torch.Tensor, how: str) -> torch.Tensor:
    if how == "none":
        return score
    scale = score.mean() if how == "mean" else score.max()
    return score / scale if scale > 0 else torch.zeros_like(score)


def rank_entries(scores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Flat indices (into the concatenation of `scores`) of the k largest entries, largest first.

    One ranking serves the whole schedule: the selection at any δ is a prefix of it, so selections
    are nested and an entry, once selected, stays selected.
    """
    flat = torch.cat([s.detach().flatten().float() for s in scores])
    k = min(max(k, 0), flat.numel())
    return flat.topk(k, sorted=True).indices


def selection_fraction(t: int, delta_min: float, delta_max: float, horizon: float) -> float:
    """δ(t) = δ_max − (δ_max − δ_min)·exp(−t/T)."""
    return delta_max - (delta_max - delta_min) * math.exp(-max(t, 0) / horizon)


def selected_count(fraction: float, total: int) -> int:
    return min(total, int(round(fraction * total)))


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def block_of(name: str) -> str:
    match = _BLOCK.search(name)
    return match.group(1) if match else "outside"


def kind_of(name: str) -> str:
    """Parameter type for the diagnostics (the fused qkv is split into thirds by the caller)."""
    parts = name.split(".")
    leaf_module = parts[-2] if len(parts) >= 2 else ""
    if leaf_module in ("q_proj", "q") or parts[-1] == "q_bias":
        return "q"
    if leaf_module in ("k_proj", "k") or parts[-1] == "k_bias":
        return "k"
    if leaf_module in ("v_proj", "v") or parts[-1] == "v_bias":
        return "v"
    if leaf_module == "proj" and "attn" in parts:
        return "proj"
    if leaf_module in ("fc1", "fc1_g", "fc1_x", "w1", "w2", "w12"):
        return "fc1"
    if leaf_module in ("fc2", "w3"):
        return "fc2"
    if any("norm" in part for part in parts[:-1]):
        return "norms"
    return "other"


def kind_sums(name: str, values: torch.Tensor) -> dict[str, float]:
    """Sum of `values` (shaped like the parameter `name`) per parameter type."""
    if name.split(".")[-2:-1] == ["qkv"] and values.shape[0] % 3 == 0:
        return {kind: float(third.sum()) for kind, third in zip("qkv", values.chunk(3, dim=0), strict=True)}
    return {kind_of(name): float(values.sum())}


# -- the plugin ------------------------------------------------------------------------------------

@register_method
class FisherTune(Method):
    name = "fishertune"
    paper = "FisherTune: Fisher-Guided Robust Tuning of Vision Foundation Models for DGSS (CVPR 2025)"
    Config = FisherTuneConfig
    hyperparameter_ranges = {
        "warmup_fraction": Bound(0, 1, high_open=True), "growth_fraction": POSITIVE, "estimation_batches": AT_LEAST_ONE,
        "eps_mu": NOT_NEGATIVE, "eps_sigma": NOT_NEGATIVE, "prior_variance": POSITIVE, "gamma": POSITIVE,
        "eps": POSITIVE, "dsu_eps": POSITIVE, "variational_steps": NOT_NEGATIVE, "variational_lr": POSITIVE,
        "variational_init_std": POSITIVE, "variational_data_size": POSITIVE,
    }

    def __init__(self, config: FisherTuneConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.config.validate()
        self._names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._offsets: torch.Tensor | None = None
        self._order: torch.Tensor | None = None  # ranked flat indices, length k at δ_max
        self._masks: list[torch.Tensor] = []
        self._selected = 0
        self._hooks: list[Any] = []
        self._pretrained: dict[int, torch.Tensor] = {}
        self._diagnostics: dict[str, Any] = {}
        self._model: SegModel | None = None

    # -- building ---------------------------------------------------------------------------------
    def attach(self, model: SegModel) -> None:
        model.backbone.requires_grad_(False)
        self._model = model
        matrices_only = self.config.candidates == "matrices"
        named = [(n, p) for n, p in model.backbone.named_parameters() if not matrices_only or p.ndim >= 2]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        # On the host whatever device the model is built on (a meta build still counts its entries).
        sizes = torch.tensor([0] + [p.numel() for p in self._params], dtype=torch.long, device="cpu")
        self._offsets = sizes.cumsum(0)

    def enter_main_phase(self, model: SegModel) -> None:
        # Selective tuning: every candidate's full gradient is computed, then masked to the selection.
        del model
        for param in self._params:
            param.requires_grad_(True)

    def param_groups(self, model: SegModel, weight_decay: float) -> list[dict[str, Any]]:
        # The backbone is frozen during the warm-up but trains later: it is in the optimiser from
        # the start, where AdamW skips it while its gradients are None.
        return split_decay_groups(model.named_parameters(), weight_decay, no_decay_names(model), include_frozen=True)

    @property
    def candidate_count(self) -> int:
        return int(self._offsets[-1]) if self._offsets is not None else 0

    def schedule(self, total_iters: int) -> tuple[int, float]:
        """(T₁ warm-up iterations, T growth horizon in iterations) for a run of `total_iters`."""
        warmup = int(round(self.config.warmup_fraction * total_iters))
        return warmup, max(self.config.growth_fraction * total_iters, 1e-9)

    def budget(self) -> int:
        """Entries selected at δ_max: what the paper reports as trainable."""
        return selected_count(self.config.delta_max, self.candidate_count)

    # -- phases -----------------------------------------------------------------------------------
    def on_step(self, step: int, ctx: TrainContext) -> None:
        warmup, horizon = self.schedule(ctx.total_iters)
        if step < warmup:
            return
        if self._order is None:
            self.estimate(ctx)
        if not self._masks:
            self._start_selective_tuning(ctx)
        fraction = selection_fraction(step - warmup, self.config.delta_min, self.config.delta_max, horizon)
        self._grow_to(selected_count(fraction, self.candidate_count))

    def after_optimizer_step(self, step: int, ctx: TrainContext) -> None:
        del step, ctx
        if not self._masks:
            return
        with torch.no_grad():
            for param, mask in zip(self._params, self._masks, strict=True):
                pretrained = self._pretrained.get(id(param))
                if pretrained is not None:
                    param.copy_(torch.where(mask, param, pretrained))

    # -- estimation -------------------------------------------------------------------------------
    def estimate(self, ctx: TrainContext) -> None:
        """Phase 2: DR-FIM from T₂ source batches and their perturbed counterparts, then the ranking."""
        cfg, model = self.config, ctx.model
        backbone = model.backbone
        blocks = parse_block_spec(cfg.perturb_blocks, len(backbone.blocks), getattr(backbone, "tap_indices", ()))
        if not blocks:
            raise UserError("fishertune: perturb_blocks='taps' but the backbone has no tap_indices; give indices")
        perturbing = [False]

        def perturb(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            del module, inputs
            if not perturbing[0]:
                return None
            return perturb_feature_statistics(output, backbone.num_prefix_tokens, cfg.eps_mu, cfg.eps_sigma, cfg.dsu_eps)

        def perturbed_loss(batch: Any) -> torch.Tensor:
            perturbing[0] = True
            try:
                return ctx.loss(batch)
            finally:
                perturbing[0] = False

        handles = [backbone.blocks[i].register_forward_hook(perturb) for i in blocks]
        was_training = model.training
        for p in self._params:
            p.requires_grad_(True)
        model.train(True)  # the model runs the backbone with autograd only when training
        losses = {"clean": ctx.loss, "perturbed": perturbed_loss}
        synchronize(ctx.device)
        started = time.perf_counter()
        agreement = None
        try:
            if cfg.estimator == "empirical":
                batches = (ctx.next_batch() for _ in range(cfg.estimation_batches))
                stats = empirical_fisher(self._params, batches, losses)
                offset, gamma = 0.0, 1.0
            else:
                batches = (ctx.next_batch() for _ in range(cfg.variational_steps or cfg.estimation_batches))
                stats, agreement = variational_excess_precision(
                    self._params, batches, losses, cfg.prior_variance, cfg.variational_data_size,
                    cfg.variational_lr, cfg.variational_init_std,
                )
                offset, gamma = 1.0 / cfg.prior_variance, cfg.gamma
                _warn_if_the_posterior_did_not_find_the_fisher(agreement)
            _average_across_processes(stats)
            # Tensor by tensor, freeing the statistics as they are used: peak memory stays near two
            # copies of the backbone (the DR-FIM scores plus the concatenation inside the ranking).
            scores, drf_sums, fisher_sums = [], [], []
            clean_stats, perturbed_stats = stats.pop("clean"), stats.pop("perturbed")
            for i, name in enumerate(self._names):
                clean, perturbed = clean_stats[i], perturbed_stats[i]
                clean_stats[i] = perturbed_stats[i] = None
                score = domain_related_fisher(clean, perturbed, cfg.eps_mu, cfg.eps_sigma, cfg.eps, gamma, offset)
                drf_sums.append(kind_sums(name, score))
                fisher_sums.append(kind_sums(name, gamma * clean))
                del clean, perturbed
                scores.append(normalise_per_tensor(score, cfg.normalise))
                del score
            # On the host: each step reads a short slice of it to grow the masks.
            self._order = rank_entries(scores, self.budget()).cpu()
            _require_same_across_processes(self._order, ctx.device)
            del scores
            synchronize(ctx.device)
            seconds = time.perf_counter() - started
        finally:
            for handle in handles:
                handle.remove()
            for p in self._params:
                p.requires_grad_(False)
            model.train(was_training)
        self._record_estimation(drf_sums, fisher_sums, blocks, seconds, ctx, agreement)

    def _record_estimation(
        self,
        drf_sums: list[dict[str, float]],
        fisher_sums: list[dict[str, float]],
        blocks: list[int],
        seconds: float,
        ctx: TrainContext,
        agreement: dict[str, float] | None,
    ) -> None:
        cfg = self.config
        batches = cfg.estimation_batches if cfg.estimator == "empirical" else cfg.variational_steps or cfg.estimation_batches
        warmup, horizon = self.schedule(ctx.total_iters)
        drf = _mass_shares(self._names, drf_sums)
        fisher = _mass_shares(self._names, fisher_sums)
        drf_total = sum(sum(d.values()) for d in drf_sums)
        fisher_total = sum(sum(d.values()) for d in fisher_sums)
        self._diagnostics = {
            "estimator": cfg.estimator,
            "estimation_seconds": round(seconds, 3),
            "estimation_batches": batches,
            "forward_backward_passes": 2 * batches,
            # Share of DR-FIM mass from the domain term exp(−(ε_μ+ε_σ))·|F − F′|/(min + ε): near 1 when
            # Fisher values are far below ε, where that term behaves like |F − F′|/ε.
            "domain_term_share": round(1.0 - fisher_total / drf_total, 6) if drf_total > 0 else 0.0,
            "warmup_iters": warmup,
            "growth_horizon_iters": horizon,
            "perturbed_blocks": blocks,
            "candidate_entries": self.candidate_count,
            "selected_budget": self.budget(),
            "drf_mass_by_block": drf["block"],
            "drf_mass_by_kind": drf["kind"],
            "drf_mass_by_block_and_kind": drf["block_and_kind"],
            "fisher_mass_by_block": fisher["block"],
            "fisher_mass_by_kind": fisher["kind"],
        }
        if agreement is not None:
            self._diagnostics["variational_fisher_agreement"] = {k: round(v, 4) for k, v in agreement.items()}
        self._diagnostics.update(self._selection_breakdown())
        log.info(
            "fishertune: DR-FIM (%s) over %d candidate entries in %.1fs; top kinds %s",
            cfg.estimator, self.candidate_count, seconds,
            sorted(drf["kind"].items(), key=lambda kv: -kv[1])[:3],
        )

    def _selection_breakdown(self) -> dict[str, Any]:
        """Where the δ_max selection lies, per block and per parameter type (counts of entries)."""
        assert self._order is not None and self._offsets is not None
        ordered = self._order.cpu().sort().values
        bounds = torch.searchsorted(ordered, self._offsets).tolist()
        by_block: dict[str, int] = {}
        by_kind: dict[str, int] = dict.fromkeys(PARAMETER_KINDS, 0)
        for i, (name, param) in enumerate(zip(self._names, self._params, strict=True)):
            if bounds[i] == bounds[i + 1]:
                continue
            indicator = torch.zeros(param.numel(), dtype=torch.float64)
            indicator[ordered[bounds[i]:bounds[i + 1]] - self._offsets[i]] = 1.0
            for kind, count in kind_sums(name, indicator.view(param.shape)).items():
                by_block[block_of(name)] = by_block.get(block_of(name), 0) + int(count)
                by_kind[kind] += int(count)
        return {"selected_by_block": by_block, "selected_by_kind": by_kind}

    # -- selection --------------------------------------------------------------------------------
    def _start_selective_tuning(self, ctx: TrainContext) -> None:
        decayed = _decayed_parameter_ids(ctx.optimizer) if ctx.optimizer is not None else None
        self._masks = [torch.zeros_like(p, dtype=torch.bool) for p in self._params]
        self._selected = 0
        for param, mask in zip(self._params, self._masks, strict=True):
            # Only entries that never moved are restored, so the current values are the pretrained
            # ones, also when a resumed run rebuilds this copy.
            if decayed is None or id(param) in decayed:
                self._pretrained[id(param)] = param.detach().clone()
            param.requires_grad_(True)
            self._hooks.append(param.register_hook(_masker(mask)))
        ctx.model.train(ctx.model.training)  # the backbone leaves eval mode now that it trains
        log.info("fishertune: selective tuning starts; %d of %d entries may train", self.budget(), self.candidate_count)

    def _grow_to(self, count: int) -> None:
        assert self._order is not None and self._offsets is not None
        count = min(count, self._order.numel())
        if count <= self._selected:
            return
        new = self._order[self._selected:count].cpu()
        tensor_index = torch.searchsorted(self._offsets, new, right=True) - 1
        for i in tensor_index.unique().tolist():
            local = new[tensor_index == i] - self._offsets[i]
            self._masks[i].view(-1)[local.to(self._masks[i].device)] = True
        self._selected = count
        self._diagnostics["selected_at_last_step"] = count

    @property
    def selected(self) -> int:
        return self._selected

    def masks(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._names, self._masks, strict=True))

    # -- reporting and resuming -------------------------------------------------------------------
    def parameter_counts(self, model: SegModel) -> dict[str, int]:
        """The model's counts with backbone_trainable = the δ_max budget, as the paper reports it
        (after unfreezing every candidate tensor requires grad, but only selected entries change)."""
        counts = model.parameter_counts()
        counts["backbone_trainable"] = self.budget()
        return counts

    def diagnostics(self) -> dict[str, Any]:
        return dict(self._diagnostics)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self._order.cpu() if self._order is not None else None, "diagnostics": self._diagnostics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = state.get("order")
        self._order = order.to(torch.long) if order is not None else None
        self._diagnostics = dict(state.get("diagnostics", {}))


def _masker(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(grad: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, grad, 0.0)

    return apply


def _decayed_parameter_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups if group.get("weight_decay", 0.0) for p in group["params"]}


def _average_across_processes(stats: dict[str, list[torch.Tensor]]) -> None:
    """Under data parallelism every rank estimated from its own batches: average the statistics so
    all ranks rank the same values and hold the same masks (masks differing across ranks would let
    the all-reduced gradients move entries some ranks keep frozen)."""
    world = _process_count()
    if world == 1:
        return
    for tensors in stats.values():
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)
            tensor.div_(world)


def _require_same_across_processes(order: torch.Tensor, device: torch.device) -> None:
    """Every rank must hold the same ranking (the averaged statistics make it so); a rank that
    ranked differently would train entries the others keep frozen, so that stops the run."""
    if _process_count() == 1:
        return
    entries = order.double()
    positions = torch.arange(1, order.numel() + 1, dtype=torch.float64)
    digest = torch.stack([entries.sum(), torch.dot(entries, positions)]).to(device)
    low, high = digest.clone(), digest.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("fishertune: the ranks ranked different entries after averaging the DR-FIM statistics")


def _process_count() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mass_shares(names: Sequence[str], sums: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Per-tensor sums by parameter type → shares of the total by block, by type, by both."""
    total = sum(sum(d.values()) for d in sums) or 1.0
    by_block: dict[str, float] = {}
    by_kind: dict[str, float] = dict.fromkeys(PARAMETER_KINDS, 0.0)
    by_both: dict[str, dict[str, float]] = {}
    for name, kinds in zip(names, sums, strict=True):
        block = block_of(name)
        for kind, mass in kinds.items():
            share = mass / total
            by_block[block] = by_block.get(block, 0.0) + share
            by_kind[kind] += share
            by_both.setdefault(block, dict.fromkeys(PARAMETER_KINDS, 0.0))[kind] += share
    return {"block": _rounded(by_block), "kind": _rounded(by_kind), "block_and_kind": {b: _rounded(k) for b, k in by_both.items()}}


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 6) for key, value in values.items()}
