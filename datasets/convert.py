"""Conversion commands the DGSS field runs once before training/evaluation.

- GTAV ids → ``NNNNN_labelTrainIds.png``; Cityscapes ``_gtFine_labelIds`` → ``_gtFine_labelTrainIds``;
- SYNTHIA 16-bit ids → ``NNNNNNN_labelTrainIds.png``;
- Mapillary → 19 classes at half resolution in ``mapillary/half/{split}/{images,labels}``.

Each is idempotent and safe to interrupt and re-run: outputs already present are skipped and every
file is written atomically (temp file + os.replace), so a partial run never leaves a torn file.
The adapters prefer converted files when they exist. A label value outside its dataset's encoding
becomes 255 (ignored), as the reference converters map it and as a run reads it, each file named in a
warning and the pixels counted in the summary (`data check` refuses such files; it stopped a
conversion half-way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.errors import UserError
from datasets.base import Pair, atomic_save, read_image, resize_half
from datasets.cityscapes import IDS_SUFFIX, TRAIN_IDS_SUFFIX, Cityscapes
from datasets.gtav import CONVERTED_SUFFIX as GTAV_SUFFIX
from datasets.gtav import GTAV
from datasets.mapillary import SPLIT_FOLDERS as MAPILLARY_SPLIT_FOLDERS
from datasets.mapillary import Mapillary
from datasets.synthia import CONVERTED_SUFFIX as SYNTHIA_SUFFIX
from datasets.synthia import SYNTHIA

log = logging.getLogger(__name__)


def _lenient(adapter):
    """The adapter reading labels as a run does: values outside the encoding become 255, counted."""
    adapter.strict_labels = False
    return adapter


def _with_ignored(stats: dict[str, int], adapters) -> dict[str, int]:
    ignored = sum(adapter.stray_label_pixels for adapter in adapters)
    return {**stats, "ignored_label_pixels": ignored} if ignored else stats


def _convert_pairs(pairs: list[Pair], out_path: Callable[[Pair], Path], load: Callable[[Pair], np.ndarray]) -> dict[str, int]:
    written = skipped = 0
    for pair in pairs:
        out = out_path(pair)
        if out.exists():
            skipped += 1
            continue
        atomic_save(Image.fromarray(np.ascontiguousarray(load(pair), dtype=np.uint8)), out)
        written += 1
    return {"written": written, "skipped": skipped}


def gtav_to_train_ids(root: Path | str) -> dict[str, int]:
    """Write ``gta/labels/NNNNN_labelTrainIds.png`` next to every palette label (ids → train ids)."""
    adapter = _lenient(GTAV(root, "train"))
    pairs = [p for p in adapter.pairs() if p.encoding == "cityscapes_ids"]
    stats = _convert_pairs(pairs, lambda p: p.label.with_name(p.label.stem + GTAV_SUFFIX + ".png"), adapter.load_label)
    stats["already_converted"] = len(adapter.pairs()) - len(pairs)
    stats = _with_ignored(stats, [adapter])
    log.info("gtav: %s", stats)
    return stats


def cityscapes_to_train_ids(root: Path | str) -> dict[str, int]:
    """Write ``<stem>_gtFine_labelTrainIds.png`` beside every ``_gtFine_labelIds.png`` (all splits found)."""
    total = {"written": 0, "skipped": 0}
    adapters = []
    base = Path(root) / "cityscapes" / "gtFine"
    if not base.is_dir():
        raise UserError(f"{base}: Cityscapes gtFine folder not found; extract gtFine_trainvaltest.zip into cityscapes/")
    for split in ("train", "val", "test"):
        if not (base / split).is_dir():
            continue
        adapter = _lenient(Cityscapes(root, split))
        adapters.append(adapter)
        # every _labelIds file, also where a train-id file already exists (then it is skipped); the adapter's
        # scan, so that a linked city folder is converted as it is read
        ids_files = sorted(f for f in adapter.scan(base / split, (".png",), recursive=True)
                           if f.name.endswith(IDS_SUFFIX + ".png"))
        pairs = [Pair(name=f.stem, image=f, label=f, encoding="cityscapes_ids") for f in ids_files]
        stats = _convert_pairs(
            pairs,
            lambda p: p.label.with_name(p.label.name.replace(IDS_SUFFIX + ".png", TRAIN_IDS_SUFFIX + ".png")),
            adapter.load_label,
        )
        for k in total:
            total[k] += stats[k]
    total = _with_ignored(total, adapters)
    log.info("cityscapes: %s", total)
    return total


def synthia_to_train_ids(root: Path | str) -> dict[str, int]:
    """Write ``synthia/GT/LABELS/NNNNNNN_labelTrainIds.png`` (8-bit train ids) for every 16-bit label."""
    adapter = _lenient(SYNTHIA(root, "train"))
    pairs = [p for p in adapter.pairs() if p.encoding == "synthia_ids"]
    stats = _with_ignored(_convert_pairs(pairs, lambda p: p.label.with_name(p.label.stem + SYNTHIA_SUFFIX + ".png"),
                                         adapter.load_label), [adapter])
    log.info("synthia: %s", stats)
    return stats


def mapillary_half_resolution(root: Path | str, splits: tuple[str, ...] = ("val",)) -> dict[str, int]:
    """Write ``mapillary/half/{split}/images/<stem>.png`` (bicubic ½) and ``labels/<stem>.png`` (nearest ½,
    train ids) for each of `splits` present: by default val, the split the protocol scores (train is in no
    setting, and halving its 18,000 images would cost hours and disk for nothing). Images are stored as PNG
    so the halving adds no JPEG loss.
    """
    total = {"written": 0, "skipped": 0}
    adapters = []
    found = False
    for split in splits:
        adapter = _lenient(Mapillary(root, split, half_resolution=False))
        adapters.append(adapter)
        if not (adapter.base / adapter.split_folder).is_dir():
            continue
        found = True
        out_dir = adapter.prepared_dir
        for pair in adapter.pairs():
            img_out = out_dir / "images" / f"{pair.name}.png"
            lbl_out = out_dir / "labels" / f"{pair.name}.png"
            if img_out.exists() and lbl_out.exists():
                total["skipped"] += 1
                continue
            image, label = resize_half(read_image(pair.image), adapter.load_label(pair))
            # label first: the adapter pairs by both, and a crash between the two leaves an orphan
            # label that the next run completes (images are checked for existence above).
            atomic_save(Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)), lbl_out)
            atomic_save(Image.fromarray(image), img_out)
            total["written"] += 1
    if not found:
        folders = " or ".join(f"{MAPILLARY_SPLIT_FOLDERS[split]}/" for split in splits)
        raise UserError(f"{Path(root) / 'mapillary'}: no Mapillary {folders} folder found; "
                        "extract the Vistas v1.2 archive into mapillary/")
    total = _with_ignored(total, adapters)
    log.info("mapillary-half: %s", total)
    return total


CONVERTERS: dict[str, Callable[[Path | str], dict[str, int]]] = {
    "gtav": gtav_to_train_ids,
    "cityscapes": cityscapes_to_train_ids,
    "synthia": synthia_to_train_ids,
    "mapillary-half": mapillary_half_resolution,
}
