"""From the data config to datasets: the source stream with train transforms, the targets as scored.

The adapters in `datasets/` read each dataset's real layout; this module only chooses them by
setting and applies the protocol's transforms with the preset's sizes. The embedded synthetic
world is generated on first use when its own folder (`data/synthetic-v<N>`, as the presets name it) is
missing.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import shutil
from pathlib import Path

from torch.utils.data import Dataset

from benchmarks.config import DataConfig, EvalConfig, Experiment, source_families
from benchmarks.errors import UserError

log = logging.getLogger(__name__)


def synthetic_world_version(root: str) -> int | None:
    """The synthetic world version whose own folder the `data.root` setting names (`data/synthetic-v3`), or
    None for any other folder."""
    from datasets.synthetic import WORLD_VERSIONS, world_version_named_by

    version = world_version_named_by(root)
    in_place = os.path.normpath(root) == os.path.join("data", f"synthetic-v{version}")
    return version if version in WORLD_VERSIONS and in_place else None


def _refuse_another_world_version(root: Path) -> None:
    """A world folder named for one version and holding another (`data synth --out data/synthetic-v3` before
    the generator drew version 3 wrote version 2 there) would be trained on as the version its name says."""
    from datasets.synthetic import WORLD_RECORD, world_record, world_version_named_by

    named, record = world_version_named_by(root), world_record(root)
    if named is None or record is None:
        return
    held = record.get("world_version")
    if held == named:
        return
    aside = f"move it aside, and the next run generates version {named} there"
    if not isinstance(held, int):
        raise UserError(f"data root {root} is named for synthetic world version {named} but its {WORLD_RECORD} is "
                        f"unreadable; {aside}")
    raise UserError(f"data root {root} is named for synthetic world version {named} but holds version {held}; rename "
                    f"it synthetic-v{held} and pass that as --data-root, or {aside}")


def ensure_data_root(exp: Experiment) -> Path:
    """The data root; generates the synthetic world there if it is missing and the preset allows it.

    The world is written to a private folder and renamed into place, so an interrupted generation
    leaves nothing half-written and two runners starting together do not mix their files.
    """
    cfg: DataConfig = exp.data
    root = exp.resolve_path(cfg.root)
    if root.is_dir():
        _refuse_another_world_version(root)
        return root
    from datasets.base import broken_link

    link = broken_link(root)
    if link:  # generating the world there would fail after minutes of work, at the rename
        raise UserError(f"data root {link}")
    # Only a world's own folder is generated on demand: any other missing root is a typo to report,
    # not a place to train on a freshly generated world.
    version = synthetic_world_version(cfg.root)
    if not cfg.synthetic or version is None:
        raise UserError(
            f"data root {root} does not exist; pass --data-root DIR (the folder holding gta/, cityscapes/, "
            f"bdd100k/, mapillary/) or generate the synthetic world with `python -m benchmarks data synth --out {root}`"
        )
    from datasets.synthetic import generate_world

    log.info("generating the synthetic world (%s, version %d) at %s — first run only", cfg.synthetic, version, root)
    partial = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        generate_world(partial, size=cfg.synthetic, workers=max(1, min(os.cpu_count() or 1, 4)), version=version)
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


def _source_split(exp: Experiment, source: str, root: Path, holds_out: bool = True):
    """The source adapter and the slices of its sorted pairs used for training and held out (`holds_out`:
    this dataset gives the held-out pairs, the first of a joint source)."""
    from datasets.registry import get_adapter

    adapter = get_adapter(source)(root, "train")
    holdout = exp.data.source_holdout if holds_out else 0
    total = len(adapter.pairs())
    if holdout < 0 or holdout >= total:
        raise UserError(
            f"data.source_holdout={holdout} but {source} has {total} pairs at {root}; "
            f"choose 0 (train on all, the protocol) up to {total - 1}"
        )
    return adapter, slice(0, total - holdout), slice(total - holdout, total)


class JointSource(Dataset):
    """Several sources trained on together (G+S: GTAV and SYNTHIA), one index space over their pairs in
    order, as mmseg's ConcatDataset: the stream draws from the union, so each dataset by its size."""

    def __init__(self, parts: dict[str, Dataset]) -> None:
        self.parts = parts
        self._datasets = list(parts.values())
        self._ends = list(itertools.accumulate(len(part) for part in self._datasets))

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, item)
        part = bisect.bisect_right(self._ends, int(index))
        start = self._ends[part - 1] if part else 0
        return self._datasets[part][(int(index) - start, seed)]

    @property
    def pairs(self) -> list:
        return [pair for part in self._datasets for pair in part.pairs]


def training_splits(source: str, dataset: Dataset) -> dict[str, Dataset]:
    """The source's training split(s) by name, as the pre-flight checks them and a result records them."""
    if isinstance(dataset, JointSource):
        return {f"{family} (train)": part for family, part in dataset.parts.items()}
    return {f"{source} (train)": dataset}


def source_dataset(exp: Experiment, source: str, root: Path) -> Dataset:
    """The source as the protocol trains on it (minus any held-out pairs), with the train transform; a joint
    source ("gtav+synthia") is the union of its datasets, the held-out pairs taken from the first."""
    families = source_families(source)
    if len(families) > 1:
        return JointSource({family: _one_source(exp, family, root, holds_out=family == families[0])
                            for family in families})
    return _one_source(exp, source, root)


def _one_source(exp: Experiment, source: str, root: Path, holds_out: bool = True) -> Dataset:
    from datasets.base import SegmentationDataset
    from datasets.transforms import TrainTransform

    cfg = exp.data
    adapter, train_pairs, _ = _source_split(exp, source, root, holds_out)
    transform = TrainTransform(
        crop_size=cfg.crop_size,
        scale_base=cfg.scale_base,
        max_long_edge=cfg.max_long_edge,
        cat_max_ratio=cfg.cat_max_ratio,
        photometric=cfg.photometric,
        resize=cfg.resize,
        hsv=cfg.hsv,
    )
    return SegmentationDataset(_lenient(adapter), transform, limit=cfg.train_limit or None, pairs=train_pairs)


def source_heldout_dataset(exp: Experiment, source: str, root: Path) -> Dataset | None:
    """The held-out source pairs scored like a target (None when the preset holds none out)."""
    from datasets.base import SegmentationDataset
    from datasets.transforms import eval_transform_for

    if not exp.data.source_holdout:
        return None
    adapter, _, heldout_pairs = _source_split(exp, source_families(source)[0], root)
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
