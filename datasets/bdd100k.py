"""BDD100K 10k semantic segmentation (Yu et al. 2020): a real target.

Layout: ``bdd100k/images/10k/{train,val}/<stem>.jpg`` with masks in
``bdd100k/labels/sem_seg/masks/{split}/<stem>.png``; some downloads name them ``<stem>_train_id.png``
(both accepted). The older 2018 release layout ``bdd100k/seg/images/{split}`` +
``bdd100k/seg/labels/{split}/<stem>_train_id.png`` is accepted too. Masks are train ids already.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from benchmarks.errors import UserError
from datasets.base import (
    Adapter,
    EvalPreparation,
    Pair,
    broken_link_on_the_way,
    images_by_name,
    index_by_name,
)

TRAIN_ID_SUFFIX = "_train_id"


class BDD100K(Adapter):
    """BDD100K 10k; evaluated at its native resolution."""

    name: ClassVar[str] = "bdd100k"
    folder: ClassVar[str] = "bdd100k"
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    default_eval_split: ClassVar[str] = "val"
    eval_preparation = EvalPreparation(resize_to_fit=False, description="native resolution (1280x720)")

    def _layout(self) -> tuple[Path, Path]:
        candidates = [
            (self.base / "images" / "10k" / self.split, self.base / "labels" / "sem_seg" / "masks" / self.split),
            (self.base / "seg" / "images" / self.split, self.base / "seg" / "labels" / self.split),
        ]
        for image_dir, label_dir in candidates:
            link = broken_link_on_the_way(image_dir, self.root)
            if link:
                raise UserError(link)
            if image_dir.is_dir():
                link = broken_link_on_the_way(label_dir, self.root)
                if link:
                    raise UserError(link)
                if not label_dir.is_dir():
                    raise UserError(
                        f"{label_dir}: missing mask folder for bdd100k split {self.split!r}; extract "
                        "bdd100k_sem_seg_labels_trainval.zip into bdd100k/"
                    )
                return image_dir, label_dir
        raise UserError(
            f"{candidates[0][0]}: missing image folder for bdd100k split {self.split!r}; extract "
            "bdd100k_images_10k.zip into bdd100k/ (expected images/10k/{train,val}/<stem>.jpg)"
        )

    def _find_pairs(self) -> list[Pair]:
        image_dir, label_dir = self._layout()
        images = images_by_name(self.scan(image_dir))
        labels = index_by_name(self.scan(label_dir, (".png",)), [(TRAIN_ID_SUFFIX, "train_ids"), ("", "train_ids")])
        return self.match(
            images, labels, image_dir, label_dir, "<stem>.png or <stem>_train_id.png",
            "extract bdd100k_sem_seg_labels_trainval.zip (masks) into bdd100k/labels/sem_seg/",
        )
