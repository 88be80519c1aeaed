"""Cityscapes (Cordts et al. 2016): a real target (and the source of the C→{B,M} and C→ACDC settings).

Layout: ``cityscapes/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`` with
``cityscapes/gtFine/{split}/<city>/<stem>_gtFine_labelIds.png`` (Cityscapes ids) or the converted
``_gtFine_labelTrainIds.png`` (preferred when present).
"""

from __future__ import annotations

from typing import ClassVar

from datasets.base import Adapter, EvalPreparation, Pair, images_by_name, index_by_name

IMAGE_SUFFIX = "_leftImg8bit"
IDS_SUFFIX = "_gtFine_labelIds"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds"


class Cityscapes(Adapter):
    """Cityscapes fine annotations; eval images are fitted to the eval box, scored on full labels."""

    name: ClassVar[str] = "cityscapes"
    folder: ClassVar[str] = "cityscapes"
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    default_eval_split: ClassVar[str] = "val"
    eval_preparation = EvalPreparation(
        resize_to_fit=True, description="resize to fit the eval box (1024x512), score against full labels"
    )

    def _find_pairs(self) -> list[Pair]:
        image_dir = self._require_dir(
            self.base / "leftImg8bit" / self.split, "leftImg8bit",
            "extract leftImg8bit_trainvaltest.zip into cityscapes/",
        )
        label_dir = self._require_dir(
            self.base / "gtFine" / self.split, "gtFine", "extract gtFine_trainvaltest.zip into cityscapes/"
        )
        images = images_by_name(self.scan(image_dir, recursive=True), IMAGE_SUFFIX)
        labels = index_by_name(self.scan(label_dir, (".png",), recursive=True),
                               [(TRAIN_IDS_SUFFIX, "train_ids"), (IDS_SUFFIX, "cityscapes_ids")])
        return self.match(
            images, labels, image_dir, label_dir,
            "<city>/<stem>_gtFine_labelIds.png or _gtFine_labelTrainIds.png",
            "extract gtFine_trainvaltest.zip (it holds the _labelIds.png files) into cityscapes/",
        )
