"""The official downloads of each dataset: archive names, what inside them the adapters read, pair counts.

`python -m benchmarks data prepare` recognises a dataset's archives by their official file names, reads
their listings (zip central directories, cheap even for 60 GB archives) and plans which members become
which files of the dataset's real layout under the data root. Only the members the adapters read are
planned (images and the id labels of train/val); colour maps, instance maps, test splits and other
releases' labels stay in the archive. `write_official_archives` does the reverse for the synthetic world,
so the tests run the same recognition and extraction on small archives with the official names and inner
layouts.

Layouts inside the archives (a single wrapping folder, as some re-packers add, is tolerated):

- GTAV ``NN_images.zip`` / ``NN_labels.zip`` (NN = 01..10): ``images/NNNNN.png``, ``labels/NNNNN.png``;
- Cityscapes: ``leftImg8bit/{split}/<city>/<stem>_leftImg8bit.png``,
  ``gtFine/{split}/<city>/<stem>_gtFine_labelIds.png``;
- BDD100K: ``bdd100k/images/10k/{split}/<stem>.jpg``, ``bdd100k/labels/sem_seg/masks/{split}/<stem>.png``;
- Mapillary Vistas: the v1.2 archive holds ``{training,validation}/labels/<stem>.png``; the v2.0 archive
  holds the same v1.2 labels under ``{split}/v1.2/labels/`` (its ``v2.0/labels`` are another class set and
  are never read); images ``{split}/images/<stem>.jpg``;
- ACDC: ``rgb_anon/<cond>/{split}/<seq>/<stem>_rgb_anon.png``,
  ``gt/<cond>/{split}/<seq>/<stem>_gt_label{Train,}Ids.png``;
- SYNTHIA ``SYNTHIA_RAND_CITYSCAPES.rar`` is a RAR archive, which Python's standard library cannot read:
  it is recognised only to say how to extract it by hand.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.errors import UserError
from datasets.registry import ADAPTERS

log = logging.getLogger(__name__)

# Some re-packed archives put everything under one folder (e.g. the archive's own name): tolerated.
_WRAPPER = r"(?:[^/]+/)?"
# A file or folder name that is not hidden: skips macOS's `__MACOSX/._name` and `.DS_Store` entries.
_NAME = r"[^/.][^/]*"
_CONDITIONS = "fog|night|rain|snow"
# Compression methods Python's zipfile decompresses; Deflate64 (9), which some tools use above 4 GB, is not.
_READABLE_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
# What reading a damaged member raises: a CRC mismatch, a broken deflate stream, data cut short.
MEMBER_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, ValueError)


@dataclass(frozen=True)
class MemberRule:
    """Which members of an archive are images or labels of a dataset, and where they go.

    The pattern's group ``path`` is the file's path inside the dataset folder; ``split`` (absent: the
    dataset's only split), ``key`` and, for ACDC, ``cond`` name the pair the file belongs to.
    """

    role: str  # "image" or "label"
    pattern: re.Pattern[str]

    @classmethod
    def of(cls, role: str, path_pattern: str) -> MemberRule:
        return cls(role, re.compile(f"^{_WRAPPER}(?P<path>{path_pattern})$"))


@dataclass(frozen=True)
class ArchiveSlot:
    """One archive a dataset needs; ``names`` are the file names accepted for it, the official one first."""

    names: tuple[str, ...]
    rules: tuple[MemberRule, ...]
    # How a file of the dataset folder is named inside this archive (`write_official_archives`).
    inner_prefix: str = ""
    inner_path: Callable[[str], str] = field(default=lambda path: path)

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class DatasetArchives:
    """A dataset family's official downloads."""

    dataset: str
    slots: tuple[ArchiveSlot, ...]
    official_pairs: dict[str, int]  # split -> pairs in the official release
    required_splits: tuple[str, ...]  # splits that must hold pairs, also with --expect listing
    source: str  # where the archives are downloaded
    split_names: dict[str, str] = field(default_factory=dict)  # folder name in the archive -> split
    default_split: str = "train"

    @property
    def folder(self) -> str:
        """The dataset's folder under the data root (the adapter's)."""
        return ADAPTERS[self.dataset].folder

    @property
    def archive_names(self) -> list[str]:
        return [slot.name for slot in self.slots]


def _gtav() -> DatasetArchives:
    parts = range(1, 11)
    images = tuple(ArchiveSlot((f"{i:02d}_images.zip",), (MemberRule.of("image", r"images/(?P<key>\d{5})\.png"),))
                   for i in parts)
    labels = tuple(ArchiveSlot((f"{i:02d}_labels.zip",), (MemberRule.of("label", r"labels/(?P<key>\d{5})\.png"),))
                   for i in parts)
    return DatasetArchives(
        "gtav", images + labels, official_pairs={"train": 24_966}, required_splits=("train",),
        source="https://download.visinf.tu-darmstadt.de/data/from_games/",
    )


def _mapillary_inner_path(path: str) -> str:
    """The v1.2 archive keeps v1.2 labels in ``{split}/labels/``; the synthetic world in ``{split}/v1.2/labels/``."""
    return re.sub(r"^(training|validation)/v1\.2/labels/", r"\1/labels/", path)


OFFICIAL_ARCHIVES: dict[str, DatasetArchives] = {
    "gtav": _gtav(),
    "cityscapes": DatasetArchives(
        "cityscapes",
        (
            ArchiveSlot(("leftImg8bit_trainvaltest.zip",), (MemberRule.of(
                "image", rf"leftImg8bit/(?P<split>train|val)/{_NAME}/(?P<key>{_NAME})_leftImg8bit\.png"),)),
            ArchiveSlot(("gtFine_trainvaltest.zip",), (MemberRule.of(
                "label", rf"gtFine/(?P<split>train|val)/{_NAME}/(?P<key>{_NAME})_gtFine_labelIds\.png"),)),
        ),
        official_pairs={"train": 2_975, "val": 500}, required_splits=("train", "val"),
        source="https://www.cityscapes-dataset.com/downloads/",
    ),
    "bdd100k": DatasetArchives(
        "bdd100k",
        (
            ArchiveSlot(("bdd100k_images_10k.zip",), (MemberRule.of(
                "image", rf"images/10k/(?P<split>train|val)/(?P<key>{_NAME})\.jpg"),), inner_prefix="bdd100k/"),
            ArchiveSlot(("bdd100k_sem_seg_labels_trainval.zip",), (MemberRule.of(
                "label", rf"labels/sem_seg/masks/(?P<split>train|val)/(?P<key>{_NAME}?)(?:_train_id)?\.png"),),
                inner_prefix="bdd100k/"),
        ),
        official_pairs={"train": 7_000, "val": 1_000}, required_splits=("val",),
        source="https://dl.cv.ethz.ch/bdd100k/data/",
    ),
    "mapillary": DatasetArchives(
        "mapillary",
        (
            ArchiveSlot(
                ("mapillary-vistas-dataset_public_v1.2.zip", "mapillary-vistas-dataset_public_v2.0.zip"),
                (MemberRule.of("image", rf"(?P<split>training|validation)/images/(?P<key>{_NAME})\.jpg"),
                 MemberRule.of("label", rf"(?P<split>training|validation)/(?:v1\.2/)?labels/(?P<key>{_NAME})\.png")),
                inner_path=_mapillary_inner_path,
            ),
        ),
        official_pairs={"train": 18_000, "val": 2_000}, required_splits=("val",),
        source="https://www.mapillary.com/dataset/vistas",
        split_names={"training": "train", "validation": "val"},
    ),
    "acdc": DatasetArchives(
        "acdc",
        (
            ArchiveSlot(("rgb_anon_trainvaltest.zip",), (MemberRule.of(
                "image", rf"rgb_anon/(?P<cond>{_CONDITIONS})/(?P<split>train|val)/{_NAME}/(?P<key>{_NAME})_rgb_anon\.png"),)),
            ArchiveSlot(("gt_trainval.zip",), (MemberRule.of(
                "label",
                rf"gt/(?P<cond>{_CONDITIONS})/(?P<split>train|val)/{_NAME}/(?P<key>{_NAME})_gt_label(?:Train)?Ids\.png"),)),
        ),
        # From the ACDC paper (the protocol spec gives none): 400 per condition for train; 100 per
        # condition for val, 106 for night.
        official_pairs={"train": 1_600, "val": 406}, required_splits=("val",),
        source="https://acdc.vision.ee.ethz.ch/download",
    ),
}

# Downloads recognised by name that `data prepare` cannot use, and what to do instead.
MANUAL_ARCHIVES: dict[str, tuple[str, str]] = {
    "SYNTHIA_RAND_CITYSCAPES.rar": (
        "synthia",
        "a RAR archive, which Python's standard library cannot read; extract it yourself "
        "(unrar x SYNTHIA_RAND_CITYSCAPES.rar) and move its RAND_CITYSCAPES folder to ROOT/synthia",
    ),
    "mapillary-vistas-dataset_public_v1.1.zip": (
        "mapillary",
        "an older Vistas release; the protocol scores v1.2 labels: download v1.2 (or v2.0, which holds them)",
    ),
}
MANUAL_DATASETS = {"synthia": "SYNTHIA_RAND_CITYSCAPES.rar"}


# --------------------------------------------------------------------------------------------------
# What is in DOWNLOADS
# --------------------------------------------------------------------------------------------------


@dataclass
class DatasetDownloads:
    """Which of a dataset's archives are in the downloads folder."""

    spec: DatasetArchives
    found: dict[str, Path]  # official name of the slot -> file found (under the official or another accepted name)
    missing: list[str]  # official names

    @property
    def state(self) -> str:
        if not self.missing:
            return "complete"
        return "partial" if self.found else "absent"


def find_downloads(downloads: Path) -> tuple[dict[str, DatasetDownloads], dict[str, Path]]:
    """The archives of every dataset found in ``downloads`` (top level, by official name), and the
    recognised files `data prepare` cannot use (name -> path)."""
    present = {p.name: p for p in downloads.iterdir() if p.is_file()}
    found: dict[str, DatasetDownloads] = {}
    for name, spec in OFFICIAL_ARCHIVES.items():
        slots: dict[str, Path] = {}
        missing = []
        for slot in spec.slots:
            hit = next((present[n] for n in slot.names if n in present), None)
            if hit is None:
                missing.append(slot.name)
            else:
                slots[slot.name] = hit
        found[name] = DatasetDownloads(spec, slots, missing)
    manual = {n: present[n] for n in MANUAL_ARCHIVES if n in present}
    return found, manual


# --------------------------------------------------------------------------------------------------
# Reading an archive's listing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFile:
    """One archive member and the path it gets inside the dataset folder."""

    archive: Path
    member: zipfile.ZipInfo
    target: str


@dataclass
class DatasetPlan:
    """What preparing one dataset extracts, and the pairs its archives' listings hold per split."""

    spec: DatasetArchives
    archives: list[Path]
    files: list[PlannedFile]
    pairs: dict[str, int]
    empty_archives: list[Path] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(f.member.file_size for f in self.files)


def _redownload(path: Path) -> str:
    return f"download {path.name} again"


def open_archive(path: Path) -> zipfile.ZipFile:
    """The archive's central directory, checked for what can be checked without reading the data.

    A cut download loses the end-of-central-directory record (BadZipFile); a damaged one may point its
    members outside the file or at something that is no local header. Each is one line naming the file.
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{path}: not a complete zip archive ({exc}); the download was cut short or is "
                        f"damaged: {_redownload(path)}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the archive ({exc.strerror or exc}); check its permissions "
                        "or download it again") from None
    try:
        members = archive.infolist()
        directory_start = getattr(archive, "start_dir", path.stat().st_size)
        for info in members:
            if info.header_offset + info.compress_size > directory_start:
                raise UserError(f"{path}: member {info.filename} lies beyond the archive's data (the archive "
                                f"is damaged); {_redownload(path)}")
        if members:
            # Opening a member reads and checks its local header: the last one proves the offsets hold.
            last = max(members, key=lambda info: info.header_offset)
            if not last.is_dir() and not last.flag_bits & 0x1 and last.compress_type in _READABLE_COMPRESSION:
                archive.open(last).close()
    except UserError:
        archive.close()
        raise
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        archive.close()
        raise UserError(f"{path}: the archive's directory does not match its data ({exc}); "
                        f"{_redownload(path)}") from None
    return archive


def plan_dataset(downloads: DatasetDownloads, expect: str) -> DatasetPlan:
    """Read the listings of a complete dataset's archives: which members to extract and where, checked.

    ``expect="official"``: the pairs per split must be the official release's; ``"listing"``: whatever
    the archives hold is accepted (the small synthetic archives), as long as every image has its label
    and every required split holds pairs. Raises a one-line UserError on the first problem.
    """
    spec = downloads.spec
    files: list[PlannedFile] = []
    targets: dict[str, PlannedFile] = {}
    entries: dict[str, dict[tuple[str, str], PlannedFile]] = {"image": {}, "label": {}}
    archives = [downloads.found[slot.name] for slot in spec.slots]
    empty: list[Path] = []
    for slot, path in zip(spec.slots, archives, strict=True):
        matched = 0
        with open_archive(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                for rule in slot.rules:
                    found = rule.pattern.match(info.filename)
                    if found:
                        break
                else:
                    continue
                if info.flag_bits & 0x1:
                    raise UserError(f"{path}: member {info.filename} is encrypted; this is not the official "
                                    f"archive: {_redownload(path)}")
                if info.compress_type not in _READABLE_COMPRESSION:
                    raise UserError(f"{path}: member {info.filename} uses compression method {info.compress_type} "
                                    "(e.g. Deflate64), which Python cannot read; extract the archive with unzip or "
                                    "7z into the layout of docs/datasets.md, or download the original archive again")
                groups = found.groupdict()
                planned = PlannedFile(path, info, groups["path"])
                earlier = targets.get(planned.target)
                if earlier is not None:
                    raise UserError(f"{path}: holds {planned.target} twice (as {earlier.member.filename} in "
                                    f"{earlier.archive.name} and {info.filename}); the archives are not the "
                                    "official ones: download them again")
                targets[planned.target] = planned
                files.append(planned)
                matched += 1
                split = spec.split_names.get(groups.get("split") or "", groups.get("split") or spec.default_split)
                key = f"{groups['cond']}/{groups['key']}" if groups.get("cond") else groups["key"]
                entries[rule.role].setdefault((split, key), planned)
        if not matched:
            empty.append(path)
    _check_pairs(spec, entries)
    pairs = _count_pairs(entries)
    _check_counts(spec, pairs, expect, empty)
    return DatasetPlan(spec, archives, files, pairs, empty)


def _check_pairs(spec: DatasetArchives, entries: dict[str, dict[tuple[str, str], PlannedFile]]) -> None:
    """Every image must have its label and the reverse (the adapters refuse orphans)."""
    images, labels = entries["image"], entries["label"]
    for have, lack, kind, missing in ((images, labels, "image", "label"), (labels, images, "label", "image")):
        orphans = sorted(set(have) - set(lack))
        if orphans:
            first = have[orphans[0]]
            raise UserError(
                f"{first.archive}: {len(orphans):,} {kind}(s) of {spec.dataset} have no {missing} in its archives "
                f"(first: {first.member.filename}, split {orphans[0][0]!r}); the archives are incomplete or of "
                f"different releases: download the {spec.dataset} archives again from {spec.source}"
            )


def _count_pairs(entries: dict[str, dict[tuple[str, str], PlannedFile]]) -> dict[str, int]:
    pairs: dict[str, int] = {}
    for split, _key in entries["image"]:
        pairs[split] = pairs.get(split, 0) + 1
    return dict(sorted(pairs.items(), key=lambda item: (item[0] != "train", item[0])))


def _check_counts(spec: DatasetArchives, pairs: dict[str, int], expect: str, empty: list[Path]) -> None:
    """Pairs per split against what the protocol needs (every mode) and the official release (official)."""
    for split in spec.required_splits:
        if not pairs.get(split):
            raise UserError(f"{spec.dataset}: the archives ({', '.join(spec.archive_names[:2])}"
                            f"{' ...' if len(spec.slots) > 2 else ''}) hold no pairs of split {split!r}; they are "
                            f"not the official archives: download them again from {spec.source}")
    if expect != "official":
        return
    for split, official in spec.official_pairs.items():
        held = pairs.get(split, 0)
        if held != official:
            # an archive holding none of its files is the likeliest culprit (a wrong file under its name)
            culprit = (f" ({', '.join(p.name for p in empty[:3])}{' ...' if len(empty) > 3 else ''} hold none of "
                       "their expected files)") if empty else ""
            raise UserError(
                f"{spec.dataset}: the archives hold {held:,} pairs of split {split!r}, the official release "
                f"{official:,}{culprit}; download them again from {spec.source}, or pass --expect listing to "
                "prepare what they hold"
            )


def verify_crc(plan: DatasetPlan) -> None:
    """Read every planned member through zipfile, which checks each one's CRC-32 at its end (a full read)."""
    by_archive: dict[Path, list[PlannedFile]] = {}
    for planned in plan.files:
        by_archive.setdefault(planned.archive, []).append(planned)
    for path, planned_files in by_archive.items():
        with zipfile.ZipFile(path) as archive:
            for planned in sorted(planned_files, key=lambda f: f.member.header_offset):
                try:
                    with archive.open(planned.member) as member:
                        while member.read(1 << 20):
                            pass
                except MEMBER_DAMAGE as exc:
                    raise UserError(damaged_member(path, planned.member.filename, exc)) from None
                except OSError as exc:
                    raise UserError(f"{path}: cannot read member {planned.member.filename} ({exc.strerror or exc}); "
                                    "check the disk holding the downloads, or download the archive again") from None


def damaged_member(path: Path, member: str, exc: BaseException) -> str:
    return (f"{path}: member {member} is damaged ({type(exc).__name__}: {exc}); the download is corrupt: "
            f"{_redownload(path)}")


# --------------------------------------------------------------------------------------------------
# The synthetic world as official archives
# --------------------------------------------------------------------------------------------------


def _zip_atomically(out: Path, members: list[tuple[str, Path]], readme: str) -> None:
    """Write a zip archive (temporary file, then rename), deflated like the official ones."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            # a file no rule reads, as the official archives hold (README, license): it must be skipped
            archive.writestr("README", readme)
            for name, source in members:
                archive.write(source, name)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_member(slot: ArchiveSlot, path: str) -> bool:
    """Whether a file of the dataset folder belongs in this archive (without a wrapping folder: a
    prepared ``mapillary/half/validation/labels`` is no Vistas label)."""
    for rule in slot.rules:
        found = rule.pattern.match(path)
        if found and found.start("path") == 0:
            return True
    return False


def refuse_to_replace_archives(out_dir: Path | str) -> None:
    """A synthetic stand-in never replaces a file with an official archive's name: it may be the download."""
    names = {slot.name for spec in OFFICIAL_ARCHIVES.values() for slot in spec.slots}
    existing = sorted(Path(out_dir) / name for name in names if (Path(out_dir) / name).exists())
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} exists{more}, perhaps the real download; pass an empty or new --archives "
                        "folder for the synthetic stand-ins")


def write_official_archives(world_root: Path | str, out_dir: Path | str) -> list[Path]:
    """Pack a data root (the synthetic world) as the official archives, with their names and inner layouts.

    Every dataset folder found under ``world_root`` with official archives gets them all; GTAV's pairs are
    spread over its ten parts in order, as the real parts are (with few pairs, the last parts hold none).
    Returns the archives written.
    """
    world_root, out_dir = Path(world_root), Path(out_dir)
    refuse_to_replace_archives(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for spec in OFFICIAL_ARCHIVES.values():
        base = world_root / spec.folder
        if not base.is_dir():
            continue
        files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        parts = len(spec.slots) // 2 if spec.dataset == "gtav" else 1
        for index, slot in enumerate(spec.slots):
            members = [(slot.inner_prefix + slot.inner_path(f), base / f) for f in files
                       if _is_member(slot, slot.inner_path(f))]
            if parts > 1:
                part = index % parts
                per_part = -(-len(members) // parts)
                members = members[part * per_part:(part + 1) * per_part]
            out = out_dir / slot.name
            _zip_atomically(out, members, f"Synthetic stand-in for {slot.name} (DGSS-Bench synthetic world).\n")
            written.append(out)
    log.info("wrote %d official-name archives to %s", len(written), out_dir)
    return written
