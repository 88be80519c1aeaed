"""Mapillary Vistas v1.2 (Neuhold et al. 2017): a real target with 66 classes mapped to the 19.

Layout: ``mapillary/{training,validation}/images/<stem>.jpg`` with labels in
``mapillary/{split}/v1.2/labels/<stem>.png`` (older releases: ``mapillary/{split}/labels/``), palette
PNGs whose index is the v1.2 class id. The protocol evaluates on images and labels halved first
(images bicubic, labels nearest); ``half_resolution=True`` does that, reading the prepared folder
``mapillary/half/{split}/{images,labels}`` (labels already train ids, written by
``python -m benchmarks data convert mapillary-half``) when present, else halving on the fly.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from benchmarks.errors import UserError
from datasets.base import (
    Adapter,
    EvalPreparation,
    Pair,
    broken_link_on_the_way,
    images_by_name,
    index_by_name,
    resize_half,
)

SPLIT_FOLDERS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


class Mapillary(Adapter):
    """Mapillary Vistas v1.2 mapped to the 19 Cityscapes train classes."""

    name: ClassVar[str] = "mapillary"
    folder: ClassVar[str] = "mapillary"
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "training", "validation")
    default_eval_split: ClassVar[str] = "val"
    eval_preparation = EvalPreparation(
        resize_to_fit=True,
        half_resolution=True,
        description="halve images (bicubic) and labels (nearest), fit the eval box, score on halved labels",
    )

    def __init__(self, root: Path | str, split: str, half_resolution: bool = False) -> None:
        super().__init__(root, split)
        self.split_folder = SPLIT_FOLDERS[split]
        self.half_resolution = half_resolution

    @property
    def prepared_dir(self) -> Path:
        """Where `data convert mapillary-half` writes the half-resolution split."""
        return self.base / "half" / self.split_folder

    @property
    def uses_prepared(self) -> bool:
        """True when half resolution is requested and the prepared folder exists."""
        return self.half_resolution and (self.prepared_dir / "images").is_dir() and (self.prepared_dir / "labels").is_dir()

    def _find_pairs(self) -> list[Pair]:
        if self.uses_prepared:
            image_dir, label_dir = self.prepared_dir / "images", self.prepared_dir / "labels"
            images = images_by_name(self.scan(image_dir))
            labels = index_by_name(self.scan(label_dir, (".png",)), [("", "train_ids")])
            pairs = self.match(
                images, labels, image_dir, label_dir, "<stem>.png (train ids)",
                "delete mapillary/half and re-run `python -m benchmarks data convert mapillary-half`",
            )
            self._require_whole_copy(pairs)
            return pairs
        split_dir = self._require_dir(
            self.base / self.split_folder, self.split_folder,
            f"extract the Mapillary Vistas v1.2 archive so that mapillary/{self.split_folder}/ exists",
        )
        image_dir = self._require_dir(split_dir / "images", "images", f"expected mapillary/{self.split_folder}/images/<stem>.jpg")
        for label_dir in (split_dir / "v1.2" / "labels", split_dir / "labels"):
            link = broken_link_on_the_way(label_dir, self.root)
            if link:
                raise UserError(link)
        label_dir = split_dir / "v1.2" / "labels"
        if not label_dir.is_dir():
            label_dir = split_dir / "labels"
        if not label_dir.is_dir():
            raise UserError(
                f"{split_dir / 'v1.2' / 'labels'}: missing Mapillary labels folder (also looked for "
                f"{split_dir / 'labels'}); extract the v1.2 labels of the Vistas archive"
            )
        images = images_by_name(self.scan(image_dir))
        labels = index_by_name(self.scan(label_dir, (".png",)), [("", "mapillary_v12")])
        return self.match(
            images, labels, image_dir, label_dir, "<stem>.png (palette of v1.2 class ids)",
            "restore the Mapillary v1.2 labels for those images",
        )

    def _require_whole_copy(self, prepared: list[Pair]) -> None:
        """The halved copy holds a pair for every image of the split it was made from: an interrupted convert
        leaves a part of it, which a run would otherwise score as the whole split. Without the originals (deleted
        after the convert to save disk) there is nothing to compare it with, and the copy is the split."""
        original_dir = self.base / self.split_folder / "images"
        if not original_dir.is_dir():
            return
        expected = images_by_name(self.scan(original_dir))
        absent = sorted(set(expected) - {pair.name for pair in prepared})
        if absent:
            raise UserError(
                f"{self.prepared_dir} holds {len(expected) - len(absent)} of the {len(expected)} pairs of "
                f"{self.base / self.split_folder} (not {absent[0]}; an interrupted convert?); complete it with "
                f"`python -m benchmarks data convert mapillary-half --root {self.root}`"
            )

    def halves_on_the_fly(self, pair: Pair) -> bool:
        """Whether `pair` is halved as it loads: at half resolution, unless it was found in the prepared
        (already halved) copy. Decided by where the pair's file is, not by whether that copy exists now: a
        `convert mapillary-half` that starts beside a run must not change what the run's pairs are."""
        return self.half_resolution and not pair.image.is_relative_to(self.prepared_dir)

    def load_image(self, pair: Pair) -> np.ndarray:
        image = super().load_image(pair)
        if self.halves_on_the_fly(pair):
            image, _ = resize_half(image, None)
        return image

    def load_label(self, pair: Pair) -> np.ndarray:
        label = super().load_label(pair)
        if self.halves_on_the_fly(pair):
            _, label = resize_half(None, label)
        return label
