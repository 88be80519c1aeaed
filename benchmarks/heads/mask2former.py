"""Mask2Former decode head built from transformers' maintained components.

Why transformers' pieces rather than an own copy: the paper preset must match the reference
Mask2Former (mmdet) and a hand-written copy drifts. We use, unchanged:

- `Mask2FormerPixelDecoder` — input projections + GroupNorm(32), 6 multi-scale deformable-attention
  encoder layers over the 3 coarsest levels (8 heads, 4 points, FFN 1024), an FPN step to stride p/4
  and the mask projection;
- `Mask2FormerTransformerModule`'s parts — sine position embedding, level embedding, learned query
  position embedding and query content, and the masked-attention decoder (9 layers, FFN 2048,
  dropout 0) with its mask predictor;
- `Mask2FormerLoss` — Hungarian matching (costs 2/5/5 on 12,544 random points), class CE with
  no-object weight 0.1, mask BCE and dice on 12,544 importance-sampled points (oversample 3.0,
  importance 0.75), deep supervision on every decoder layer's prediction.

What is ours: the semantic targets (one binary mask per class present in an image, ignore pixels
belong to no mask — as mmseg's Mask2Former does), semantic inference (softmax over classes without
no-object × sigmoid masks, summed over queries), the weight initialisation (transformers only applies
its `_init_weights` inside `PreTrainedModel`; we mirror mmdet's: xavier-normal for the transformer
layers with zero attention biases, xavier-uniform for the projections, the deformable-attention offset
grid, unit-normal level embeddings), the query-provider hook, and a
Hungarian solver used when scipy is not installed (transformers' matcher imports scipy's
`linear_sum_assignment` only if scipy exists; without it we supply an exact O(n³) solver).

Query hook (Rein): ``head.set_query_provider(fn)``, where ``fn()`` returns
``(query_pos [Q, D], query_content [Q, D])``. These image-independent vectors replace the learned
query position embedding and initial query content; the number of queries becomes Q. While a
provider is set the head's own query embeddings are frozen (they are unused, and a trainable
unused parameter breaks DDP); ``set_query_provider(None)`` restores them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mask2former import modeling_mask2former as m2f
from transformers.models.mask2former.configuration_mask2former import Mask2FormerConfig

IGNORE_INDEX = 255
QueryProvider = Callable[[], tuple[torch.Tensor, torch.Tensor]]


# -- Hungarian assignment --------------------------------------------------------------------------------
def linear_sum_assignment(cost: object) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment, scipy's contract: (rows sorted, cols); min(n, m) pairs.

    The classic shortest-augmenting-path Hungarian algorithm with potentials, O(n²·m) with the inner
    loop over columns vectorised; exact for finite costs (the matcher replaces NaN/inf by the
    float max before calling).
    """
    c = torch.as_tensor(cost).detach().cpu().double().numpy() if not isinstance(cost, np.ndarray) else cost.astype(np.float64)
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)  # p[j]: row (1-based) matched to column j; p[0]: row being added
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = c[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            used_cols = np.nonzero(used)[0]
            u[p[used_cols]] += delta
            v[used_cols] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:  # augment along the alternating path
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.nonzero(p[1:])[0]
    rows = p[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


if not hasattr(m2f, "linear_sum_assignment"):
    # scipy is absent: transformers' matcher looks the solver up in its module namespace.
    m2f.linear_sum_assignment = linear_sum_assignment


class SemanticMask2FormerLoss(m2f.Mask2FormerLoss):
    """transformers' `Mask2FormerLoss`, constructed without its hard scipy requirement.

    The public attributes set here are exactly those its `__init__` sets (checked by a test), so every
    method of the loss — matching, point sampling, CE, BCE, dice — is transformers' own, but for the
    normaliser of the mask and dice terms (`get_num_masks`).
    """

    def __init__(self, config: Mask2FormerConfig, weight_dict: dict[str, float]):
        nn.Module.__init__(self)
        self.num_labels = config.num_labels
        self.weight_dict = weight_dict
        self.eos_coef = config.no_object_weight
        empty_weight = torch.ones(self.num_labels + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.num_points = config.train_num_points
        self.oversample_ratio = config.oversample_ratio
        self.importance_sample_ratio = config.importance_sample_ratio
        self.matcher = m2f.Mask2FormerHungarianMatcher(
            cost_class=config.class_weight, cost_dice=config.dice_weight, cost_mask=config.mask_weight,
            num_points=self.num_points,
        )
        self._masks_per_micro_batch: float | None = None
        """The mean mask count of an accumulated step's micro-batches while it trains (`Mask2FormerHead.step`)."""

    def get_num_masks(self, class_labels: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """mmdet's normaliser: the masks of the whole step, averaged over the processes (`reduce_mean`).

        transformers' own averages over processes only under an accelerate state, which a run never makes,
        so on 4 GPUs at batch 1 each image's masks were divided by that image's count; likewise each
        micro-batch of an accumulated step by its own.
        """
        local = sum(len(classes) for classes in class_labels)
        count = torch.tensor(float(local if self._masks_per_micro_batch is None else self._masks_per_micro_batch),
                             device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            count = count / torch.distributed.get_world_size()
        return count.clamp(min=1)


# -- the head -------------------------------------------------------------------------------------------
class Mask2FormerHead(nn.Module):
    """Mask2Former over the backbone's 4-level pyramid; defaults are the protocol's settings."""

    supports_queries = True

    def __init__(
        self,
        in_channels: int | list[int],
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        encoder_layers: int = 6,
        encoder_ffn_dim: int = 1024,
        decoder_layers: int = 9,
        decoder_ffn_dim: int = 2048,
        mask_dim: int | None = None,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
    ):
        super().__init__()
        if hidden_dim % 32:
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm(32) in the pixel decoder), got {hidden_dim}")
        channels = [in_channels] * 4 if isinstance(in_channels, int) else list(in_channels)
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.config = Mask2FormerConfig(
            num_labels=num_classes,
            feature_size=hidden_dim,
            mask_feature_size=mask_dim or hidden_dim,
            hidden_dim=hidden_dim,
            num_attention_heads=num_heads,
            encoder_layers=encoder_layers,
            encoder_feedforward_dim=encoder_ffn_dim,
            decoder_layers=decoder_layers + 1,  # transformers counts the initial prediction as a layer
            dim_feedforward=decoder_ffn_dim,
            dropout=0.0,
            pre_norm=False,
            num_queries=num_queries,
            common_stride=4,
            feature_strides=[4, 8, 16, 32],  # relative: the pyramid is p/4, p/2, p, 2p for any p
            class_weight=class_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            no_object_weight=no_object_weight,
            train_num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
        )
        self.pixel_decoder = m2f.Mask2FormerPixelDecoder(self.config, feature_channels=channels)
        self.transformer = m2f.Mask2FormerTransformerModule(in_features=hidden_dim, config=self.config)
        self.class_predictor = nn.Linear(hidden_dim, num_classes + 1)
        self.weight_dict = {"loss_cross_entropy": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.criterion = SemanticMask2FormerLoss(self.config, self.weight_dict)
        self._query_provider: QueryProvider | None = None
        self._reset_parameters()

    # -- initialisation -------------------------------------------------------------------------------
    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """mmdet's Mask2Former initialisation (transformers applies its own only inside PreTrainedModel)."""
        pd = self.pixel_decoder
        for proj in pd.input_projections:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for name, module in pd.named_modules():
            if isinstance(module, nn.Conv2d) and not name.startswith("input_projections"):
                nn.init.kaiming_uniform_(module.weight, a=1)  # caffe2_xavier_init
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for p in pd.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for module in pd.modules():
            if isinstance(module, m2f.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
                self._init_deformable(module)
        nn.init.normal_(pd.level_embed, std=1.0)
        tm = self.transformer  # its input projections are identities: the pixel decoder gives hidden_dim channels
        for layer in tm.decoder.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_normal_(p)
            # mmdet's attentions are torch's MultiheadAttention: q, k and v one [3D, D] matrix (xavier's std
            # √(2/4D), not the √(2/2D) of three [D, D] layers drawn alone) and projection biases at 0;
            # transformers' self-attention is four Linear layers with torch's uniform bias init.
            self_attn = layer.self_attn
            in_projections = (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj)
            fused = nn.init.xavier_normal_(torch.empty(3 * self_attn.q_proj.out_features, self_attn.q_proj.in_features))
            for projection, weight in zip(in_projections, fused.chunk(3), strict=True):
                projection.weight.copy_(weight)
            for projection in (*in_projections, self_attn.out_proj):
                nn.init.zeros_(projection.bias)
            nn.init.zeros_(layer.cross_attn.in_proj_bias)
            nn.init.zeros_(layer.cross_attn.out_proj.bias)
        for emb in (tm.queries_embedder, tm.queries_features, tm.level_embed):
            nn.init.normal_(emb.weight)

    @staticmethod
    def _init_deformable(module: nn.Module) -> None:
        """Deformable DETR's init: zero offsets weights, offset biases on a ring of directions."""
        nn.init.zeros_(module.sampling_offsets.weight)
        thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.n_heads, 1, 1, 2)
        grid = grid.repeat(1, module.n_levels, module.n_points, 1)
        for i in range(module.n_points):
            grid[:, :, i, :] *= i + 1
        module.sampling_offsets.bias.copy_(grid.view(-1).to(module.sampling_offsets.bias.device))
        nn.init.zeros_(module.attention_weights.weight)
        nn.init.zeros_(module.attention_weights.bias)
        nn.init.xavier_uniform_(module.value_proj.weight)
        nn.init.zeros_(module.value_proj.bias)
        nn.init.xavier_uniform_(module.output_proj.weight)
        nn.init.zeros_(module.output_proj.bias)

    # -- method hooks ---------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Rein's optimiser keys `query_embed` and `level_embed` match mmdet's query position embedding and
        the decoder's level embedding; mmdet's query content (`query_feat`) and the pixel decoder's level
        embedding (`level_encoding`) match neither, so the reference decays them, and so do we."""
        return {"transformer.queries_embedder.weight", "transformer.level_embed.weight"}

    def set_query_provider(self, provider: QueryProvider | None) -> None:
        """Replace the learned queries by ``provider() -> (query_pos [Q, D], query_content [Q, D])``."""
        self._query_provider = provider
        trainable = provider is None
        self.transformer.queries_embedder.requires_grad_(trainable)
        self.transformer.queries_features.requires_grad_(trainable)

    # -- compute --------------------------------------------------------------------------------------
    def _queries(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        tm = self.transformer
        if self._query_provider is None:
            pos, content = tm.queries_embedder.weight, tm.queries_features.weight
        else:
            pos, content = self._query_provider()
            d = self.config.hidden_dim
            if pos.ndim != 2 or pos.shape != content.shape or pos.shape[1] != d:
                raise ValueError(f"query provider must return two [Q, {d}] tensors, got {tuple(pos.shape)} and {tuple(content.shape)}")
        # [Q, D] → [Q, B, D], the decoder's sequence-first layout
        return pos.unsqueeze(1).expand(-1, batch, -1), content.unsqueeze(1).expand(-1, batch, -1)

    def forward(self, features: list[torch.Tensor]) -> dict[str, object]:
        """Pyramid → {'pred_logits' [B,Q,K+1], 'pred_masks' [B,Q,h,w] (stride p/4), 'aux_outputs'}."""
        pixel = self.pixel_decoder(list(features), output_attentions=False, output_hidden_states=False, return_dict=True)
        levels, mask_features = pixel.multi_scale_features, pixel.mask_features
        tm = self.transformer
        sizes, pos_embeds, memories = [], [], []
        for i in range(tm.num_feature_levels):  # as Mask2FormerTransformerModule.forward, queries aside
            x = levels[i]
            sizes.append(x.shape[-2:])
            pos_embeds.append(tm.position_embedder(x.shape, x.device, x.dtype, None).flatten(2).permute(2, 0, 1))
            mem = tm.input_projections[i](x).flatten(2) + tm.level_embed.weight[i][None, :, None]
            memories.append(mem.permute(2, 0, 1))
        query_pos, query_content = self._queries(mask_features.shape[0])
        out = tm.decoder(
            inputs_embeds=query_content,
            multi_stage_positional_embeddings=pos_embeds,
            pixel_embeddings=mask_features,
            encoder_hidden_states=memories,
            query_position_embeddings=query_pos,
            feature_size_list=sizes,
            output_attentions=False,
            output_hidden_states=False,
            return_dict=True,
        )
        class_logits = [self.class_predictor(h.transpose(0, 1)) for h in out.intermediate_hidden_states]
        mask_logits = list(out.masks_queries_logits)
        aux = [
            {"class_queries_logits": c, "masks_queries_logits": m} for c, m in zip(class_logits[:-1], mask_logits[:-1], strict=True)
        ]
        return {"pred_logits": class_logits[-1], "pred_masks": mask_logits[-1], "aux_outputs": aux}

    def _classes_present(self, label: torch.Tensor) -> torch.Tensor:
        present = torch.unique(label)
        return present[(present != IGNORE_INDEX) & (present >= 0) & (present < self.num_classes)].long()

    def semantic_targets(self, labels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image: the classes present (ignore excluded) and one binary mask per class."""
        classes, masks = [], []
        for lab in labels:
            present = self._classes_present(lab)
            classes.append(present)
            masks.append((lab[None] == present[:, None, None]).float())
        return classes, masks

    @contextlib.contextmanager
    def step(self, labels_of_micro_batches: Sequence[torch.Tensor]) -> Iterator[None]:
        """The micro-batches of one accumulated optimizer step: their mask and dice terms are divided by
        the step's mean count per micro-batch, so that accumulating B/k images k times weighs every mask
        as one batch of B does (mmdet divides by the batch's count). A step of one batch is its own count, which
        the loss takes as it builds its targets: nothing is counted twice on the default path."""
        if len(labels_of_micro_batches) == 1:
            yield
            return
        counts = [sum(len(self._classes_present(lab)) for lab in labels) for labels in labels_of_micro_batches]
        self.criterion._masks_per_micro_batch = sum(counts) / len(counts)
        try:
            yield
        finally:
            self.criterion._masks_per_micro_batch = None

    def loss(self, outputs: dict[str, object], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        class_labels, mask_labels = self.semantic_targets(labels)
        raw = self.criterion(
            masks_queries_logits=outputs["pred_masks"],
            class_queries_logits=outputs["pred_logits"],
            mask_labels=mask_labels,
            class_labels=class_labels,
            auxiliary_predictions=outputs["aux_outputs"] if self.deep_supervision else None,
        )
        parts = {"loss_cross_entropy": [], "loss_mask": [], "loss_dice": []}
        for key, value in raw.items():
            base = next(b for b in parts if key == b or key.startswith(b + "_"))
            parts[base].append(value * self.weight_dict[base])
        sums = {k: torch.stack(v).sum() for k, v in parts.items()}
        total = sums["loss_cross_entropy"] + sums["loss_mask"] + sums["loss_dice"]
        return {
            "loss": total,
            "loss_cls": sums["loss_cross_entropy"].detach(),
            "loss_mask": sums["loss_mask"].detach(),
            "loss_dice": sums["loss_dice"].detach(),
        }

    def semantic_logits(self, outputs: dict[str, object], size: tuple[int, int]) -> torch.Tensor:
        """mmseg's semantic inference: Σ_q softmax(class)[:K] · sigmoid(mask upsampled to `size`)."""
        cls = F.softmax(outputs["pred_logits"], dim=-1)[..., :-1]
        masks = F.interpolate(outputs["pred_masks"], size=tuple(size), mode="bilinear", align_corners=False).sigmoid()
        return torch.einsum("bqc,bqhw->bchw", cls, masks)
