"""Pretraining the proxy VFM: a small ViT that plays DINOv2's role on a CPU.

A vision foundation model brings general features learned on broad data, never on the benchmark.
The proxy gets the same standing: it is trained on procedurally generated street scenes drawn in
*random* styles (palettes, lighting, textures — `datasets.synthetic.random_style`, not the four
benchmark styles) from a seed space disjoint from the benchmark world's, and never sees the 19
semantic labels. Its objectives:

- masked image modelling (SimMIM-style): 40% of the patches are replaced by a learned mask token
  and their pixels (normalised per patch, as MAE's norm_pix_loss) are regressed with L1;
- a different label space, geometric rather than semantic: per pixel, the surface kind
  (ground / vertical / sky, the classic geometric-context classes) and relative depth, both known to
  the renderer. Foundation models are known to encode both; neither is a benchmark label.

The checkpoint is the timm state dict of `proxy_vit`, stored fp16 as safetensors with its recipe
in the metadata. `python -m benchmarks pretrain` reproduces it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from benchmarks.backbones import BACKBONES, build_backbone

log = logging.getLogger(__name__)

# Seeds of pretraining scenes start here; the benchmark world uses small seeds, so the two never meet.
PRETRAIN_SEED_BASE = 1_000_000_007
GROUND_TRAIN_IDS = (0, 1, 9)  # road, sidewalk, terrain: supporting surfaces
SKY_TRAIN_ID = 10
GEOMETRY_CLASSES = ("ground", "vertical", "sky")


@dataclass(frozen=True)
class PretrainConfig:
    scenes: int = 4000
    """Distinct generated scenes in the pool (each seen under new crops and flips every epoch)."""
    scene_height: int = 128
    scene_width: int = 224
    crop_size: int = 64
    """Training resolution; crops of `source_crop` pixels are resized to it (objects at 1/2–1× the
    benchmark's pixel scale: small inputs keep pretraining affordable on a CPU)."""
    source_crop: tuple[int, int] = (64, 128)
    steps: int = 3000
    batch_size: int = 48
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 150
    mask_ratio: float = 0.4
    loss_weights: tuple[float, float, float] = (1.0, 0.5, 0.5)
    """Weights of (masked pixels, geometry classes, depth)."""
    seed: int = 0
    workers: int = 2


def render_pool(cfg: PretrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images [N,H,W,3] uint8, geometry classes [N,H,W] uint8 (255 = unknown), log-depth [N,H,W] fp16."""
    seeds = [PRETRAIN_SEED_BASE + cfg.seed * 10_000_000 + i for i in range(cfg.scenes)]
    chunks = [seeds[i : i + 200] for i in range(0, len(seeds), 200)]
    job = (cfg.scene_height, cfg.scene_width)
    images, geometry, depth = [], [], []
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        for im, geo, dep in tqdm(pool.map(_render_chunk, chunks, [job] * len(chunks)), total=len(chunks), desc="render", unit="chunk"):
            images.append(im)
            geometry.append(geo)
            depth.append(dep)
    return np.concatenate(images), np.concatenate(geometry), np.concatenate(depth)


def _render_chunk(seeds: list[int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from datasets.synthetic import random_style, render_scene

    height, width = size
    images, geometry, depths = [], [], []
    lut = np.ones(256, dtype=np.uint8)  # vertical by default
    lut[list(GROUND_TRAIN_IDS)] = 0
    lut[SKY_TRAIN_ID] = 2
    lut[255] = 255
    for seed in seeds:
        rng = np.random.default_rng(seed)
        image, label, depth = render_scene(rng, random_style(rng), height, width)
        images.append(image)
        geometry.append(lut[label])
        depths.append(np.log1p(np.maximum(depth, 0)).astype(np.float16))
    return np.stack(images), np.stack(geometry), np.stack(depths)


class PretrainHeads(nn.Module):
    """Per-token linear predictions unshuffled to the token's p×p pixels (as SimMIM's decoder)."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.norm = nn.LayerNorm(dim)
        self.pixels = nn.Linear(dim, patch * patch * 3)
        self.geometry = nn.Linear(dim, patch * patch * len(GEOMETRY_CLASSES))
        self.depth = nn.Linear(dim, patch * patch)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        tokens = self.norm(tokens)
        return tuple(self._unshuffle(head(tokens), grid) for head in (self.pixels, self.geometry, self.depth))

    def _unshuffle(self, values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, d = values.shape
        h, w = grid
        channels = d // (self.patch * self.patch)
        values = values.transpose(1, 2).reshape(b, d, h, w)
        return F.pixel_shuffle(values, self.patch) if channels else values  # [B, channels, H·p, W·p]


def _batch(pool, rng: np.random.Generator, cfg: PretrainConfig):
    images, geometry, depth = pool
    idx = rng.integers(0, len(images), cfg.batch_size)
    crop = int(rng.integers(cfg.source_crop[0], cfg.source_crop[1] + 1))
    top = rng.integers(0, images.shape[1] - crop + 1, cfg.batch_size)
    left = rng.integers(0, images.shape[2] - crop + 1, cfg.batch_size)
    flip = rng.random(cfg.batch_size) < 0.5
    ims, geos, deps = [], [], []
    for i, y, x, f in zip(idx, top, left, flip, strict=True):
        sl = (i, slice(y, y + crop), slice(x, x + crop))
        im, geo, dep = images[sl], geometry[sl], depth[sl]
        if f:
            im, geo, dep = im[:, ::-1], geo[:, ::-1], dep[:, ::-1]
        ims.append(im)
        geos.append(geo)
        deps.append(dep)
    mean = torch.tensor((123.675, 116.28, 103.53)).view(1, 3, 1, 1)
    std = torch.tensor((58.395, 57.12, 57.375)).view(1, 3, 1, 1)
    image = (torch.from_numpy(np.stack(ims).copy()).permute(0, 3, 1, 2).float() - mean) / std
    geometry = torch.from_numpy(np.stack(geos).copy()).unsqueeze(1).float()
    depth = torch.from_numpy(np.stack(deps).astype(np.float32)).unsqueeze(1)
    if crop != cfg.crop_size:
        size = (cfg.crop_size, cfg.crop_size)
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        geometry = F.interpolate(geometry, size=size, mode="nearest")
        depth = F.interpolate(depth, size=size, mode="nearest")
    return image, geometry[:, 0].long(), depth[:, 0]


def pretrain(cfg: PretrainConfig, out: Path, device: str = "cpu") -> dict:
    """Train the proxy ViT and write its safetensors checkpoint; returns the measured costs."""
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    pool = render_pool(cfg)
    render_seconds = time.perf_counter() - started
    log.info("rendered %d scenes in %.0f s", cfg.scenes, render_seconds)

    # Built at the benchmark's input size so the position grid is the one fine-tuning uses; the
    # smaller pretraining inputs see it interpolated.
    backbone = build_backbone("proxy_vit", img_size=BACKBONES["proxy_vit"].native_img_size, weights="random").to(device)
    vit = backbone.vit
    patch = backbone.patch_size
    heads = PretrainHeads(backbone.embed_dim, patch).to(device)
    mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim, device=device))
    nn.init.normal_(mask_token, std=0.02)
    params = list(backbone.parameters()) + list(heads.parameters()) + [mask_token]
    decay = [p for p in params if p.ndim > 1 and p is not mask_token]
    no_decay = [p for p in params if p.ndim <= 1 or p is mask_token]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    grid = (cfg.crop_size // patch, cfg.crop_size // patch)
    num_patches = grid[0] * grid[1]
    history = []
    train_started = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="it")
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        image, geometry, depth = (t.to(device) for t in _batch(pool, rng, cfg))
        masked = torch.rand(image.shape[0], num_patches, device=device).argsort(1) < int(cfg.mask_ratio * num_patches)

        x = vit.patch_embed(image)  # NHWC: the backbone is built for dynamic input sizes
        x = torch.where(masked.view(-1, *grid, 1), mask_token.to(x.dtype).expand_as(x), x)
        x = vit.norm_pre(vit._pos_embed(x))
        for block in backbone.blocks:
            x = block(x)
        pixels, geo_logits, depth_pred = heads(x[:, backbone.num_prefix_tokens :], grid)

        target = F.unfold(image, patch, stride=patch)  # [B, 3·p·p, N]
        target = (target - target.mean(1, keepdim=True)) / (target.var(1, keepdim=True) + 1e-6).sqrt()
        predicted = F.unfold(pixels, patch, stride=patch)
        pixel_loss = ((predicted - target).abs().mean(1) * masked).sum() / masked.sum()
        geometry_loss = F.cross_entropy(geo_logits, geometry, ignore_index=255)
        depth_loss = F.l1_loss(depth_pred[:, 0], depth)
        w = cfg.loss_weights
        loss = w[0] * pixel_loss + w[1] * geometry_loss + w[2] * depth_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            record = {"step": step, "loss": loss.item(), "pixels": pixel_loss.item(), "geometry": geometry_loss.item(), "depth": depth_loss.item()}
            history.append(record)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "step"})
    train_seconds = time.perf_counter() - train_started

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in vit.state_dict().items()}
    report = {
        "backbone": "proxy_vit",
        "timm_kwargs": BACKBONES["proxy_vit"].timm_kwargs,
        "recipe": asdict(cfg),
        "objectives": "SimMIM masked pixels + geometric classes (ground/vertical/sky) + log-depth; no semantic labels",
        "render_seconds": round(render_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "device": device if device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "final": history[-1],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={"dgss_bench": json.dumps(report)})
    os.replace(tmp, out)
    (out.with_suffix(".json")).write_text(json.dumps({**report, "history": history}, indent=2) + "\n")
    return report
