"""ACDC (Sakaridis et al. 2021): adverse conditions (fog, night, rain, snow), a Cityscapes-style target.

Layout: ``acdc/rgb_anon/<cond>/{train,val,test}/<seq>/<stem>_rgb_anon.png`` with
``acdc/gt/<cond>/<split>/<seq>/<stem>_gt_labelTrainIds.png`` (preferred) or ``_gt_labelIds.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.errors import UserError
from datasets.base import Adapter, EvalPreparation, Pair, images_by_name, index_by_name

CONDITIONS = ("fog", "night", "rain", "snow")
# Rein's ACDC test pipelines resize to fit (960, 540) where Cityscapes fits (1024, 512): the 1920×1080
# frames run at 960×540 (six 512-windows), not 910×512 (three).
REFERENCE_FIT = (960, 540)
CITYSCAPES_FIT = (1024, 512)
IMAGE_SUFFIX = "_rgb_anon"
TRAIN_IDS_SUFFIX = "_gt_labelTrainIds"
IDS_SUFFIX = "_gt_labelIds"


class ACDC(Adapter):
    """ACDC pairs of the chosen conditions (default all four); names are '<cond>/<stem>'.

    As a target each condition is scored on its own (`acdc_fog`, ... : the protocol's "ACDC val per
    condition", Rein's `mean_mIoU` over the four), never as one pooled confusion matrix.
    """

    name: ClassVar[str] = "acdc"
    folder: ClassVar[str] = "acdc"
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    default_eval_split: ClassVar[str] = "val"
    eval_preparation = EvalPreparation(
        resize_to_fit=True,
        fit_scale=(REFERENCE_FIT[0] / CITYSCAPES_FIT[0], REFERENCE_FIT[1] / CITYSCAPES_FIT[1]),
        description="resize to fit the eval box scaled to 960×540 (Cityscapes': 1024×512), score on full labels",
    )
    target_views: ClassVar[dict[str, dict[str, Any]]] = {f"acdc_{c}": {"conditions": (c,)} for c in CONDITIONS}

    def __init__(self, root: Path | str, split: str, conditions: Sequence[str] = CONDITIONS) -> None:
        super().__init__(root, split)
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown:
            raise UserError(f"acdc: unknown condition(s) {', '.join(unknown)}; expected some of {', '.join(CONDITIONS)}")
        self.conditions = tuple(conditions)

    def _find_pairs(self) -> list[Pair]:
        pairs: list[Pair] = []
        for cond in self.conditions:
            image_dir = self._require_dir(
                self.base / "rgb_anon" / cond / self.split, f"rgb_anon/{cond}",
                "extract rgb_anon_trainvaltest.zip into acdc/",
            )
            label_dir = self._require_dir(
                self.base / "gt" / cond / self.split, f"gt/{cond}", "extract gt_trainval.zip into acdc/"
            )
            images = images_by_name(self.scan(image_dir, recursive=True), IMAGE_SUFFIX, prefix=f"{cond}/")
            labels = index_by_name(self.scan(label_dir, (".png",), recursive=True),
                                   [(TRAIN_IDS_SUFFIX, "train_ids"), (IDS_SUFFIX, "cityscapes_ids")], prefix=f"{cond}/")
            pairs += self.match(images, labels, image_dir, label_dir,
                                "<seq>/<stem>_gt_labelTrainIds.png", "extract gt_trainval.zip into acdc/")
        return pairs
