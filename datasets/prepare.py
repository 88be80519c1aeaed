"""From checked archive plans (`datasets.archives`) to dataset folders under a data root, never half-written.

Each dataset is extracted into a private staging folder, ``ROOT/.prepare-XXXX/<folder>``, converted as
the protocol needs, its pairs counted back through its adapter, and only then renamed to
``ROOT/<folder>``. The staging folder lives inside ROOT rather than beside it so the rename never crosses
a file system (a data root is often a mount point whose parent is another disk or read-only), and it is
hidden, so adapters and `data check` never see it. Any failure or interrupt removes the staging folder;
a dataset already renamed into place is complete and stays.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from benchmarks.errors import UserError
from benchmarks.storage import free_bytes, is_out_of_space, mount_point
from datasets.archives import MEMBER_DAMAGE, DatasetPlan, PlannedFile, damaged_member
from datasets.convert import mapillary_half_resolution
from datasets.mapillary import Mapillary
from datasets.registry import ADAPTERS

log = logging.getLogger(__name__)

STAGING_PREFIX = ".prepare-"
REPLACED_PREFIX = "replaced-"  # a dataset folder --overwrite has set aside in the staging folder
# The protocol evaluates Mapillary val at half resolution; halving it once here is what `data convert
# mapillary-half` does. Mapillary train is no part of any setting, so it is left to that command.
CONVERSIONS: dict[str, tuple[str, Callable[[Path], dict[str, int]]]] = {
    "mapillary": ("mapillary-half (val)", lambda root: mapillary_half_resolution(root, splits=("val",))),
}
# Half-resolution PNGs made from JPEGs take several times the JPEGs' bytes; a generous estimate, so the
# space check up front errs on the safe side.
_CONVERSION_BYTES_PER_SOURCE_BYTE = {"mapillary": 5.0}
_SPACE_MARGIN = 1.05


def conversion_bytes(plan: DatasetPlan) -> int:
    """About how many bytes the dataset's conversions add to its extracted files."""
    factor = _CONVERSION_BYTES_PER_SOURCE_BYTE.get(plan.spec.dataset, 0.0)
    converted = sum(f.member.file_size for f in plan.files if f.target.startswith("validation/images/"))
    return int(factor * converted)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.1f} MB"


def space_needed(plans: list[DatasetPlan]) -> int:
    return int(_SPACE_MARGIN * sum(plan.bytes + conversion_bytes(plan) for plan in plans))


def require_space(plans: list[DatasetPlan], root: Path) -> None:
    """Refuse before writing anything when the data root's disk cannot hold the extracted datasets."""
    needed = space_needed(plans)
    free = free_bytes(root)
    if free is not None and free < needed:
        names = ", ".join(plan.spec.dataset for plan in plans)
        raise UserError(f"{root}: preparing {names} needs about {_size(needed)}, {mount_point(root)} has "
                        f"{_size(free)} free; free some space, or prepare fewer datasets at a time with --datasets")


@dataclass(frozen=True)
class Prepared:
    """A dataset now in place under the data root."""

    dataset: str
    folder: Path
    pairs: dict[str, int]
    files: int
    conversion: str | None
    replaced: bool


class Staging:
    """The private folder datasets are built in; ``with Staging(root) as staging: staging.build(plan)``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder: Path | None = None
        self.created: list[Path] = []
        self.ready: list[str] = []

    def __enter__(self) -> Staging:
        self.created = [folder for folder in (self.root, *self.root.parents) if not folder.exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.folder is not None:
            self._restore_what_was_replaced()
            shutil.rmtree(self.folder, ignore_errors=True)
        for folder in self.created:  # the root first, then the parents made for it, each while empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def _restore_what_was_replaced(self) -> None:
        """A folder `--overwrite` set aside whose replacement did not get into place (an interrupt between
        the two renames) goes back where it was, rather than out with the staging folder."""
        assert self.folder is not None
        for aside in self.folder.glob(f"{REPLACED_PREFIX}*"):
            target = self.root / aside.name[len(REPLACED_PREFIX):]
            if not (target.exists() or target.is_symlink()):
                os.rename(aside, target)

    def build(self, plan: DatasetPlan, overwrite: bool = False,
              check: Callable[[Path, str], list[str]] | None = None) -> Prepared:
        """Extract, convert and count back one dataset in the staging folder, then rename it into place.
        `check(staging_root, dataset)` lists the problems a sample of its pairs has when decoded, before the
        rename: a dataset whose files cannot be read is not put in place (it was, and said "ready")."""
        assert self.folder is not None, "use Staging as a context manager"
        name = plan.spec.dataset
        staged = self.folder / plan.spec.folder
        try:
            _extract(plan, staged)
            conversion = None
            if name in CONVERSIONS:
                conversion, convert = CONVERSIONS[name]
                stats = convert(self.folder)
                conversion = f"{conversion}: {stats.get('written', 0):,} pairs written"
            _count_back(plan, self.folder)
            if check is not None and (problems := check(self.folder, name)):
                raise UserError(problems[0])
            replaced = self._move_into_place(staged, self.root / plan.spec.folder, overwrite)
        except UserError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            before = f" ({', '.join(self.ready)}, prepared before it, complete and in place)" if self.ready else ""
            raise UserError(f"{_named_by_its_archive(str(exc), plan, staged)}; nothing of {name} was written"
                            f"{before}") from None
        self.ready.append(name)
        return Prepared(name, self.root / plan.spec.folder, plan.pairs, len(plan.files), conversion, replaced)

    def _move_into_place(self, staged: Path, target: Path, overwrite: bool) -> bool:
        assert self.folder is not None
        exists = target.exists() or target.is_symlink()
        if exists and not overwrite:
            raise UserError(f"{target}: appeared while the dataset was being prepared (another prepare?); it is "
                            "left as it is: check it with `python -m benchmarks data check`")
        if not exists:
            os.rename(staged, target)
            return False
        aside = self.folder / f"{REPLACED_PREFIX}{target.name}"
        os.rename(target, aside)
        try:
            os.rename(staged, target)
        except OSError:
            os.rename(aside, target)
            raise
        if aside.is_symlink():
            aside.unlink()
        else:
            shutil.rmtree(aside, ignore_errors=True)
        return True


def _named_by_its_archive(message: str, plan: DatasetPlan, staged: Path) -> str:
    """A problem the conversion or the count-back found in an extracted file, said of the archive member it
    came from: the staged file is gone when the command ends, and the adapters' fixes (re-extract, delete the
    pair, convert) do not apply to a download; getting the archive again does."""
    for planned in plan.files:
        path = str(staged / planned.target)
        if message.startswith(f"{path}: "):
            problem = message[len(path) + 2:].split("; ")[0].replace(path, planned.member.filename)
            return (f"{planned.archive}: member {planned.member.filename}: {problem}; the archive holds a file the "
                    f"dataset cannot use: download {planned.archive.name} again")
    return message


def _extract(plan: DatasetPlan, dest: Path) -> None:
    """Copy every planned member to its place under ``dest``; zipfile checks each member's CRC as it ends."""
    try:
        from tqdm import tqdm

        progress = tqdm(total=plan.bytes, unit="B", unit_scale=True, desc=f"extracting {plan.spec.dataset}",
                        leave=False, disable=None)
    except ImportError:  # pragma: no cover
        progress = None
    by_archive: dict[Path, list[PlannedFile]] = {}
    for planned in plan.files:
        by_archive.setdefault(planned.archive, []).append(planned)
    made: set[Path] = set()
    try:
        for path, planned_files in by_archive.items():
            with zipfile.ZipFile(path) as archive:
                # in the archive's order: one sequential read of a large archive
                for planned in sorted(planned_files, key=lambda f: f.member.header_offset):
                    target = dest / planned.target
                    if target.parent not in made:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        made.add(target.parent)
                    _extract_member(archive, path, planned, target)
                    if progress is not None:
                        progress.update(planned.member.file_size)
    finally:
        if progress is not None:
            progress.close()


def _extract_member(archive: zipfile.ZipFile, path: Path, planned: PlannedFile, target: Path) -> None:
    try:
        with archive.open(planned.member) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    except MEMBER_DAMAGE as exc:
        raise UserError(damaged_member(path, planned.member.filename, exc)) from None
    except OSError as exc:
        if is_out_of_space(exc, target, planned.member.file_size):
            free = free_bytes(target.parent)
            shown = f" ({_size(free)} free)" if free is not None else ""
            raise UserError(f"{mount_point(target.parent)}: no space left extracting {path.name} ({planned.member.filename})"
                            f"{shown}; free some space and run the same command again") from None
        raise UserError(f"{path}: extracting {planned.member.filename} failed ({exc.strerror or exc}); check the "
                        "disks holding the downloads and the data root, then run the same command again") from None


def _count_back(plan: DatasetPlan, staging_root: Path) -> None:
    """The adapter must find, in the staged folder, the pairs the archives' listings hold."""
    adapter_class = ADAPTERS[plan.spec.dataset]
    for split, expected in plan.pairs.items():
        found = len(adapter_class(staging_root, split).pairs())
        if found != expected:
            raise UserError(f"{plan.spec.dataset}: the adapter finds {found:,} pairs of split {split!r} in the "
                            f"extracted files, the archives list {expected:,}; please report this with the "
                            "archive names (a layout the adapter does not read)")
    if plan.spec.dataset == "mapillary" and "val" in plan.pairs:
        halved = Mapillary(staging_root, "val", half_resolution=True)
        if not halved.uses_prepared or len(halved.pairs()) != plan.pairs["val"]:
            raise UserError("mapillary: the half-resolution val split was not written completely; run the same "
                            "command again")


def stale_staging(root: Path) -> list[Path]:
    """Staging folders an interrupted or killed prepare left under the data root."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir())
