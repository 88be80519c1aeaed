"""SYNTHIA RAND-CITYSCAPES (Ros et al. 2016): a second synthetic source (G+S setting).

Layout: ``synthia/RGB/NNNNNNN.png`` and ``synthia/GT/LABELS/NNNNNNN.png``: 16-bit PNGs whose first
channel is the SYNTHIA class id (second: instance). PIL cannot read 16-bit multi-channel PNGs, so they
are decoded with torchvision; converted ``NNNNNNN_labelTrainIds.png`` files (8-bit train ids) are
preferred when present. SYNTHIA shares 16 classes in practice; the benchmark keeps 19 (protocol.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmarks.errors import UserError
from datasets.base import (
    CLASS_ID_MODES,
    Adapter,
    EvalPreparation,
    Pair,
    images_by_name,
    index_by_name,
    read_label_raw,
)

CONVERTED_SUFFIX = "_labelTrainIds"


def read_synthia_label(path: Path) -> np.ndarray:
    """Raw SYNTHIA class ids (HxW uint8) from a 16-bit multi-channel or an 8-bit PNG."""
    try:
        with Image.open(path) as im:
            mode = im.mode
    except FileNotFoundError:
        raise UserError(f"{path}: label file not found; re-extract the SYNTHIA archive") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: cannot decode the SYNTHIA label ({exc}); re-extract the archive") from None
    if mode in CLASS_ID_MODES:
        return read_label_raw(path)
    try:
        import warnings

        import torch

        with warnings.catch_warnings():  # torchvision>=0.29 flags its decoders as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_png, read_file

            data = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
        arr = data[0].to(torch.int32).numpy()  # first channel = class id
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file for the user
        raise UserError(f"{path}: cannot decode the SYNTHIA label ({exc}); re-extract the archive") from None
    if arr.max(initial=0) > 255:
        raise UserError(f"{path}: SYNTHIA class ids above 255; expected class ids 0..22 in the first channel")
    return arr.astype(np.uint8)


class SYNTHIA(Adapter):
    """All SYNTHIA RAND-CITYSCAPES pairs (a source; split "train" = everything)."""

    name: ClassVar[str] = "synthia"
    folder: ClassVar[str] = "synthia"
    splits: ClassVar[tuple[str, ...]] = ("train", "all")
    default_eval_split: ClassVar[str] = "train"
    eval_preparation = EvalPreparation(resize_to_fit=True, description="source domain; not a target")

    def _find_pairs(self) -> list[Pair]:
        image_dir = self._require_dir(self.base / "RGB", "RGB", "extract RAND_CITYSCAPES into synthia/")
        label_dir = self._require_dir(self.base / "GT" / "LABELS", "GT/LABELS", "extract RAND_CITYSCAPES into synthia/")
        images = images_by_name(self.scan(image_dir))
        labels = index_by_name(self.scan(label_dir, (".png",)), [(CONVERTED_SUFFIX, "train_ids"), ("", "synthia_ids")])
        return self.match(images, labels, image_dir, label_dir, "NNNNNNN.png (16-bit, class in channel 1)",
                          "restore the SYNTHIA GT/LABELS files for those images")

    def label_header_problem(self, pair: Pair, mode: str) -> str | None:
        if pair.encoding == "synthia_ids":
            return None  # 16-bit with several channels (class, instance): any mode; decoding checks it
        return super().label_header_problem(pair, mode)

    def load_label(self, pair: Pair) -> np.ndarray:
        if pair.encoding == "train_ids":
            return super().load_label(pair)
        return self.map_raw_label(read_synthia_label(pair.label), pair)
