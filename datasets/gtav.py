"""GTAV (Richter et al. 2016): the synthetic source domain.

Layout: ``gta/images/NNNNN.png`` and ``gta/labels/NNNNN.png`` (palette PNG whose index is the
Cityscapes label id), or converted ``gta/labels/NNNNN_labelTrainIds.png`` (preferred when present).
The protocol trains on all pairs, so the only split is "train" (= everything).
"""

from __future__ import annotations

from typing import ClassVar

from datasets.base import Adapter, EvalPreparation, Pair, images_by_name, index_by_name

CONVERTED_SUFFIX = "_labelTrainIds"


class GTAV(Adapter):
    """All GTAV pairs; labels are Cityscapes ids (palette index) or converted train ids."""

    name: ClassVar[str] = "gtav"
    folder: ClassVar[str] = "gta"
    splits: ClassVar[tuple[str, ...]] = ("train", "all")
    default_eval_split: ClassVar[str] = "train"
    eval_preparation = EvalPreparation(resize_to_fit=True, description="source domain; not a target")
    # A handful of the real GTAV pairs have label sizes that differ from the image.
    tolerate_size_mismatch: ClassVar[bool] = True

    def _find_pairs(self) -> list[Pair]:
        image_dir = self._require_dir(self.base / "images", "images", "extract the GTAV image archives into gta/images/")
        label_dir = self._require_dir(self.base / "labels", "labels", "extract the GTAV label archives into gta/labels/")
        images = images_by_name(self.scan(image_dir))
        labels = index_by_name(self.scan(label_dir, (".png",)),
                               [(CONVERTED_SUFFIX, "train_ids"), ("", "cityscapes_ids")])
        return self.match(
            images, labels, image_dir, label_dir, "NNNNN.png (palette of Cityscapes ids) or NNNNN_labelTrainIds.png",
            "restore the missing GTAV labels or remove those images",
        )
