"""From the data config to datasets: the source stream with train transforms, the targets as scored.

The adapters in `datasets/` read each dataset's real layout; this module only chooses them by
setting and applies the protocol's transforms with the preset's sizes. The embedded synthetic
world is generated on first use when its own folder (the default data root) is missing.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from torch.utils.data import Dataset

from benchmarks.config import DataConfig, EvalConfig, Experiment
from benchmarks.errors import UserError

log = logging.getLogger(__name__)


def ensure_data_root(exp: Experiment) -> Path:
    """The data root; generates the synthetic world there if it is missing and the preset allows it.

    The world is written to a private folder and renamed into place, so an interrupted generation
    leaves nothing half-written and two runners starting together do not mix their files.
    """
    cfg: DataConfig = exp.data
    root = exp.resolve_path(cfg.root)
    if root.is_dir():
        return root
    from datasets.base import broken_link

    link = broken_link(root)
    if link:  # generating the world there would fail after minutes of work, at the rename
        raise UserError(f"data root {link}")
    # Only the world's own folder is generated on demand: any other missing root is a typo to report,
    # not a place to train on a freshly generated world.
    if not cfg.synthetic or cfg.root != DataConfig.root:
        raise UserError(
            f"data root {root} does not exist; pass --data-root DIR (the folder holding gta/, cityscapes/, "
            f"bdd100k/, mapillary/) or generate the synthetic world with `python -m benchmarks data synth --out {root}`"
        )
    from datasets.synthetic import generate_world

    log.info("generating the synthetic world (%s) at %s — first run only", cfg.synthetic, root)
    partial = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        generate_world(partial, size=cfg.synthetic, workers=max(1, min(os.cpu_count() or 1, 4)))
    except BaseException:  # Ctrl-C, a full disk: the next run starts afresh under its own pid, so none is kept
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        partial.rename(root)
    except OSError:
        if not root.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another runner finished first; its world is identical
    return root


def _source_split(exp: Experiment, source: str, root: Path):
    """The source adapter and the slices of its sorted pairs used for training and held out."""
    from datasets.registry import get_adapter

    adapter = get_adapter(source)(root, "train")
    holdout = exp.data.source_holdout
    total = len(adapter.pairs())
    if holdout < 0 or holdout >= total:
        raise UserError(
            f"data.source_holdout={holdout} but {source} has {total} pairs at {root}; "
            f"choose 0 (train on all, the protocol) up to {total - 1}"
        )
    return adapter, slice(0, total - holdout), slice(total - holdout, total)


def source_dataset(exp: Experiment, source: str, root: Path) -> Dataset:
    """The source as the protocol trains on it (minus any held-out pairs), with the train transform."""
    from datasets.base import SegmentationDataset
    from datasets.transforms import TrainTransform

    cfg = exp.data
    adapter, train_pairs, _ = _source_split(exp, source, root)
    transform = TrainTransform(
        crop_size=cfg.crop_size,
        scale_base=cfg.scale_base,
        max_long_edge=cfg.max_long_edge,
        cat_max_ratio=cfg.cat_max_ratio,
        photometric=cfg.photometric,
        resize=cfg.resize,
    )
    return SegmentationDataset(_lenient(adapter), transform, limit=cfg.train_limit or None, pairs=train_pairs)


def source_heldout_dataset(exp: Experiment, source: str, root: Path) -> Dataset | None:
    """The held-out source pairs scored like a target (None when the preset holds none out)."""
    from datasets.base import SegmentationDataset
    from datasets.transforms import eval_transform_for

    if not exp.data.source_holdout:
        return None
    adapter, _, heldout_pairs = _source_split(exp, source, root)
    transform = eval_transform_for(adapter, tuple(exp.eval.fit_size), resize=exp.data.resize)
    return SegmentationDataset(_lenient(adapter), transform, pairs=heldout_pairs)


def target_dataset(exp: Experiment, target: str, root: Path) -> Dataset:
    """A target as the protocol scores it: resized for inference, labels at their scoring resolution."""
    from datasets.base import SegmentationDataset
    from datasets.registry import get_target
    from datasets.transforms import eval_transform_for

    cls, options = get_target(target)
    prep = cls.eval_preparation
    adapter = cls(root, cls.default_eval_split, **options,
                  **({"half_resolution": True} if prep.half_resolution else {}))
    eval_cfg: EvalConfig = exp.eval
    transform = eval_transform_for(adapter, tuple(eval_cfg.fit_size), resize=exp.data.resize)
    return SegmentationDataset(_lenient(adapter), transform, limit=exp.data.eval_limit or None)


def _lenient(adapter):
    """A run ignores (255) label values outside their encoding, with a warning and a count in the
    result, where `data check` refuses them: one stray value must not end a 40k-iteration run."""
    adapter.strict_labels = False
    return adapter


def preflight(exp: Experiment, splits: dict[str, Dataset]) -> None:
    """Checks every split a run reads before its first step, so a bad target file fails the run at
    start-up instead of after the training it would throw away.

    "sample" (default) reads every pair's existence and header sizes and decodes a few labels per
    split; "full" decodes every label; "off" skips it. Only the pairs the run reads are checked.
    """
    if exp.data.preflight == "off":
        return
    for role, dataset in splits.items():
        problems = dataset.adapter.check(full=exp.data.preflight == "full", pairs=dataset.pairs)
        if problems:
            more = f" (and {len(problems) - 1} more; `python -m benchmarks data check` lists them)" if len(problems) > 1 else ""
            raise UserError(f"preflight of {role}: {problems[0]}{more}; or skip this check with --set data.preflight=off")
