"""Machinery shared by the dataset adapters: pairs, decoding, validation, atomic writes, the torch Dataset.

An adapter knows one dataset family's on-disk layout; everything here is layout-agnostic. Each error a
user can cause (missing folder, orphan files, wrong label encoding, corrupt file) is raised as a
one-line `UserError` naming the path, what was expected and how to fix it, because a 40k-iteration
run should fail at start-up with a sentence, not an hour later with a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmarks.errors import UserError
from benchmarks.storage import walk_following_links
from datasets.labels import ENCODINGS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL modes of a label PNG that holds one class id per pixel (palette index, 8- or 16-bit grey).
CLASS_ID_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")


# A whole PNG ends with its IEND chunk; a whole JPEG has its end-of-image marker at its end, or shortly before
# data some cameras append. A file cut short (an interrupted copy or download) has neither in its last bytes.
_END_MARKERS = {".png": (b"IEND\xaeB`\x82", 1024), ".jpg": (b"\xff\xd9", 64 * 1024), ".jpeg": (b"\xff\xd9", 64 * 1024)}


def ends_complete(path: Path) -> bool:
    """Whether a PNG or JPEG file has its end marker among its last bytes (other formats are not judged): what
    the header check reads besides the header, so a truncated file is found without decoding every file."""
    marker, tail = _END_MARKERS.get(path.suffix.lower(), (b"", 0))
    if not marker:
        return True
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - tail))
        return marker in handle.read()

@dataclass(frozen=True, order=True)
class Pair:
    """One image and its label file. ``encoding`` names the label's value space (see labels.ENCODINGS)."""

    name: str
    image: Path
    label: Path
    encoding: str = "train_ids"


@dataclass(frozen=True)
class EvalPreparation:
    """How a target is prepared for evaluation (protocol.md, "Evaluation").

    resize_to_fit: resize the image (keep aspect) to fit the eval box before inference;
    fit_scale: this target's box relative to the preset's `eval.fit_size` (the paper's 1024×512), per side,
    for a target the reference fits to a box of its own;
    half_resolution: halve images (bicubic) and labels (nearest) first and score at half resolution;
    the label is otherwise scored at the resolution it is stored at.
    """

    resize_to_fit: bool
    half_resolution: bool = False
    fit_scale: tuple[float, float] = (1.0, 1.0)
    description: str = ""

    def fit_box(self, preset_box: tuple[int, int]) -> tuple[int, int] | None:
        """The (long, short) box this target's images are fitted to, or None when they run native."""
        if not self.resize_to_fit:
            return None
        return round(preset_box[0] * self.fit_scale[0]), round(preset_box[1] * self.fit_scale[1])


# --------------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------------


def rel(path: Path, root: Path | None = None) -> str:
    """A short path for messages (relative to root where possible)."""
    if root is not None:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return str(path)


def broken_link(path: Path) -> str | None:
    """Why `path` is a symbolic link that leads nowhere (dangling, or a loop), as a message; else None."""
    if not path.is_symlink():
        return None
    fix = "point it at the data or remove it"
    try:
        path.stat()
    except FileNotFoundError:
        return f"{path}: symbolic link to {os.readlink(path)}, which does not exist; {fix}"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symbolic link loop (it leads back to itself through {os.readlink(path)}); {fix}"
    return None  # leads somewhere (or cannot be followed for another reason, which reading it will report)


def broken_link_on_the_way(path: Path, start: Path) -> str | None:
    """The first link that leads nowhere from `start` (not included) down to `path`, as a message."""
    try:
        below = path.relative_to(start).parts
    except ValueError:
        return broken_link(path)
    for depth in range(1, len(below) + 1):
        problem = broken_link(start.joinpath(*below[:depth]))
        if problem:
            return problem
    return None


def label_mode_problem(path: Path, mode: str) -> str:
    """The message for a label whose PIL mode cannot hold one class id per pixel."""
    return (f"{path}: label PNG has mode {mode}, expected a single-channel or palette PNG of class ids "
            "(an RGB colour label is not usable); use the id/trainId label files of the dataset")


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB; a corrupt/unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found; re-extract the dataset archive") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(
            f"{path}: cannot decode the image ({type(exc).__name__}: {exc}); the file is truncated or "
            "not an image; re-extract or re-download it (or delete the pair)"
        ) from None


def read_label_raw(path: Path) -> np.ndarray:
    """Decode a label PNG to its raw HxW uint8 values.

    Palette ('P') PNGs give their palette INDEX (the class id) - never converted to RGB. Colour label
    files (RGB) are refused: they are the wrong file of the archive (e.g. ``_gtFine_color.png``).
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L"):
                return np.asarray(im, dtype=np.uint8).copy()
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.asarray(im)
                if arr.max(initial=0) > 255:
                    raise UserError(
                        f"{path}: 16-bit label holds values above 255; expected a single-channel "
                        "8-bit class-id PNG; convert the labels with `python -m benchmarks data convert`"
                    )
                return arr.astype(np.uint8)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: label file not found; re-extract the dataset archive") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(
            f"{path}: cannot decode the label ({type(exc).__name__}: {exc}); the file is truncated or "
            "not a PNG; re-extract or re-download it"
        ) from None
    raise UserError(label_mode_problem(path, mode))


def map_label(raw: np.ndarray, encoding: str, path: Path, strict: bool = True) -> np.ndarray:
    """Validate raw label values against their encoding and map them to train ids (one lookup)."""
    return map_label_counting(raw, encoding, path, strict)[0]


def map_label_counting(raw: np.ndarray, encoding: str, path: Path, strict: bool = True) -> tuple[np.ndarray, int]:
    """`map_label` and the number of pixels it ignored for values outside the encoding.

    Such values are an error when ``strict`` (`data check`); otherwise they become 255, ignored as the
    protocol ignores every class it does not score, with a warning naming the file, so a long run does
    not die on one stray value. One validity lookup serves the check and the count.
    """
    table, valid, description = ENCODINGS[encoding]
    ok = valid[raw]
    if not ok.all():
        bad = np.unique(raw[~ok])
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        if not strict:
            stray = int((~ok).sum())
            log.warning("%s: %d pixel(s) with label values {%s} outside the expected encoding (%s) are ignored (255); "
                        "`python -m benchmarks data check` lists every such file", path, stray, shown,
                        description)
            mapped = table[raw]
            mapped[~ok] = 255
            return mapped, stray
        raise UserError(
            f"{path}: label values {{{shown}}} are outside the expected encoding ({description}); "
            "this is the wrong label file (colour/instance map or another release) - use the "
            "dataset's id labels or run `python -m benchmarks data convert`"
        )
    return table[raw], 0


def atomic_save(image: Image.Image, path: Path, **save_kwargs: Any) -> None:
    """Write a PIL image atomically (temp file in the same folder, then os.replace).

    Readers (a concurrent training run, a re-run after a crash) never see a half-written file. A full disk
    is one line naming it (the commands that write images skip the files already written when run again).
    """
    from benchmarks.storage import is_out_of_space, out_of_space_error

    path = Path(path)
    try:
        _save_replacing(image, path, **save_kwargs)
    except OSError as err:
        if not is_out_of_space(err, path, 0):
            raise
        uncompressed = image.width * image.height * len(image.getbands())
        raise out_of_space_error(path, uncompressed, "", "the files written before it are kept and skipped") from None


def _save_replacing(image: Image.Image, path: Path, **save_kwargs: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = save_kwargs.pop("format", None) or {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format=fmt, **save_kwargs)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; dataset files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def index_by_name(paths: Iterable[Path], kinds: Sequence[tuple[str, str]], prefix: str = "") -> dict[str, tuple[Path, str]]:
    """Pair name → (file, kind) for one side of a split. A file's kind is the first of `kinds` (stem suffix,
    kind) whose suffix its stem ends with ("" takes any stem); its name is `prefix` plus the stem without that
    suffix; files of no kind are left out. Where files of several kinds give one name, the earlier kind wins
    (a converted label over the raw one). Two files of one kind that give one name are an error: which of them
    the pair would read would depend on the order the file system lists them in."""
    named: list[dict[str, Path]] = [{} for _ in kinds]
    for path in paths:
        for index, (suffix, _) in enumerate(kinds):
            if path.stem.endswith(suffix):
                name = prefix + (path.stem[: -len(suffix)] if suffix else path.stem)
                if name in named[index]:
                    first, second = sorted((named[index][name], path))
                    raise UserError(f"{second}: gives the same pair name {name!r} as {first}; remove or rename "
                                    "one of them (pairs are matched by name)")
                named[index][name] = path
                break
    found: dict[str, tuple[Path, str]] = {}
    for files, (_, kind) in reversed(list(zip(named, kinds, strict=True))):
        found.update({name: (path, kind) for name, path in files.items()})
    return found


def images_by_name(paths: Iterable[Path], suffix: str = "", prefix: str = "") -> dict[str, Path]:
    """Pair name → image file (`index_by_name` with one kind: stems ending with `suffix`)."""
    return {name: path for name, (path, _) in index_by_name(paths, [(suffix, "image")], prefix).items()}


def resize_half(image: np.ndarray | None, label: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Halve an image (bicubic) and/or a label (nearest), rounding sizes as mmcv.imrescale does."""
    out_img = out_lbl = None
    if image is not None:
        h, w = image.shape[:2]
        size = (max(1, int(w * 0.5 + 0.5)), max(1, int(h * 0.5 + 0.5)))
        out_img = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    if label is not None:
        h, w = label.shape[:2]
        size = (max(1, int(w * 0.5 + 0.5)), max(1, int(h * 0.5 + 0.5)))
        out_lbl = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return out_img, out_lbl


# --------------------------------------------------------------------------------------------------
# Adapter base
# --------------------------------------------------------------------------------------------------


class Adapter:
    """Finds and validates the image/label pairs of one dataset family under a data root.

    Subclasses set ``name``, ``folder`` (the family folder under the data root), ``splits`` and
    implement ``_find_pairs``. ``root`` is the DATA ROOT holding the family folders.
    """

    name: ClassVar[str] = ""
    folder: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    default_eval_split: ClassVar[str] = "val"
    eval_preparation: EvalPreparation = EvalPreparation(resize_to_fit=False)
    # Targets scored apart within the family (name → constructor options), where the reference scores
    # parts of one release as separate targets (ACDC's conditions); the family's own name is a target too.
    target_views: ClassVar[dict[str, dict[str, Any]]] = {}
    # GTAV ships a few pairs whose image and label sizes differ; training tolerates it (the label is
    # resized nearest with a warning), other datasets treat it as an error.
    tolerate_size_mismatch: ClassVar[bool] = False

    def __init__(self, root: Path | str, split: str) -> None:
        self.root = Path(root).expanduser()
        if split not in self.splits:
            raise UserError(
                f"{self.name}: unknown split {split!r}; expected one of {', '.join(self.splits)}"
            )
        self.split = split
        self._pairs: list[Pair] | None = None
        self.strict_labels = True
        """False in a run: label values outside the encoding become 255 with a warning (`map_label`)."""
        self.stray_label_pixels = 0
        """Pixels this process ignored that way; `SegmentationDataset` reports them per sample."""

    # -- layout ------------------------------------------------------------------------------------
    @property
    def base(self) -> Path:
        """The family folder (e.g. DATA_ROOT/cityscapes)."""
        return self.root / self.folder

    def _require_dir(self, path: Path, what: str, fix: str) -> Path:
        if not self.root.is_dir():
            raise UserError(f"{self.root}: data root not found; expected a folder holding {self.folder}/; pass "
                            "--data-root DIR (or write the synthetic world: python -m benchmarks data synth --out DIR)")
        link = broken_link_on_the_way(path, self.root)
        if link:
            raise UserError(link)
        if not path.is_dir():
            raise UserError(f"{path}: missing {what} folder for {self.name} split {self.split!r}; {fix}")
        return path

    def _find_pairs(self) -> list[Pair]:  # pragma: no cover - abstract
        raise NotImplementedError

    def pairs(self) -> list[Pair]:
        """All pairs of the split, sorted by name and validated (orphans and empty splits are errors)."""
        if self._pairs is None:
            if not self.root.is_dir():
                raise UserError(
                    f"{self.root}: data root not found; expected a folder holding {self.folder}/; pass "
                    "--data-root DIR (or write the synthetic world: python -m benchmarks data synth --out DIR)"
                )
            link = broken_link(self.base)
            if link:
                raise UserError(link)
            if not self.base.is_dir():
                raise UserError(
                    f"{self.base}: {self.name} folder not found under the data root; expected the "
                    f"layout in docs/datasets.md; link or extract the dataset there"
                )
            pairs = sorted(self._find_pairs())
            if not pairs:
                raise UserError(f"{self.base}: no {self.name} image/label pairs found for split {self.split!r}; "
                                "check the layout against docs/datasets.md")
            self._pairs = pairs
            log.debug("%s/%s: %d pairs", self.name, self.split, len(pairs))
        return list(self._pairs)

    @staticmethod
    def match(
        images: dict[str, Path],
        labels: dict[str, tuple[Path, str]],
        image_dir: Path,
        label_dir: Path,
        expected_label: str,
        fix: str,
    ) -> list[Pair]:
        """Pair images and labels by key; any image without label (or the reverse) is an error.

        ``expected_label`` is a pattern like '<stem>_gtFine_labelIds.png' used in the message.
        """
        missing = sorted(set(images) - set(labels))
        if missing:
            first = images[missing[0]]
            raise UserError(
                f"{first}: {len(missing)} image(s) have no label in {label_dir} (expected {expected_label}); "
                f"{fix}"
            )
        orphans = sorted(set(labels) - set(images))
        if orphans:
            first = labels[orphans[0]][0]
            raise UserError(
                f"{first}: {len(orphans)} label(s) have no image in {image_dir}; restore the images or "
                "remove the stray labels"
            )
        return [Pair(name=k, image=images[k], label=labels[k][0], encoding=labels[k][1]) for k in images]

    @staticmethod
    def scan(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES, recursive: bool = False) -> list[Path]:
        """Files with the given suffixes (case-insensitive), skipping hidden/temporary files.

        A link that leads nowhere is an error: it stands for a file or folder of the dataset that is missing.
        Recursive scans go into linked folders (a city folder linked from elsewhere holds pairs too), each
        real folder once.
        """
        suffixes = tuple(s.lower() for s in suffixes)
        it = walk_following_links(folder) if recursive else folder.iterdir()
        found = []
        for p in it:
            if p.name.startswith("."):
                continue
            if p.is_file():
                if p.suffix.lower() in suffixes:
                    found.append(p)
            elif p.is_symlink():
                link = broken_link(p)
                if link:
                    raise UserError(link)
        return found

    # -- loading -----------------------------------------------------------------------------------
    def load_image(self, pair: Pair) -> np.ndarray:
        """HxWx3 uint8 RGB."""
        return read_image(pair.image)

    def load_label(self, pair: Pair) -> np.ndarray:
        """HxW uint8 train ids (255 = ignore), validated against the pair's encoding."""
        return self.map_raw_label(read_label_raw(pair.label), pair)

    def map_raw_label(self, raw: np.ndarray, pair: Pair) -> np.ndarray:
        """Raw values to train ids, strictly or not as `strict_labels` says; counts what it ignores."""
        mapped, stray = map_label_counting(raw, pair.encoding, pair.label, strict=self.strict_labels)
        self.stray_label_pixels += stray
        return mapped

    def load_pair(self, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
        """Image and label, checked to have the same size."""
        image = self.load_image(pair)
        label = self.load_label(pair)
        if image.shape[:2] != label.shape:
            if not self.tolerate_size_mismatch:
                raise UserError(
                    f"{pair.label}: label size {label.shape[1]}x{label.shape[0]} differs from image "
                    f"{pair.image} size {image.shape[1]}x{image.shape[0]}; the pair is mismatched - replace "
                    "or delete it"
                )
            log.warning("%s: label size differs from the image; resizing the label (nearest)", pair.label)
            label = np.asarray(Image.fromarray(label).resize((image.shape[1], image.shape[0]), Image.NEAREST))
        return image, label

    def check(self, full: bool = False, sample: int = 8, pairs: list[Pair] | None = None) -> list[str]:
        """Problems with this split (or with ``pairs`` of it), as messages (empty = fine), without training.

        Every pair's header is read (size, mode) and its files' ends (a PNG's or JPEG's end marker: a file cut
        short by an interrupted copy is decoded to confirm it); label values are decoded for ``sample`` evenly
        spaced pairs, or all with ``full``.
        """
        problems: list[str] = []
        pairs = self.pairs() if pairs is None else pairs
        idx = set(range(len(pairs))) if full else set(np.linspace(0, len(pairs) - 1, min(sample, len(pairs))).astype(int).tolist())
        for i, pair in enumerate(pairs):
            reading = pair.image  # the file a failed header read names
            try:
                if i in idx:
                    self.load_pair(pair)
                else:
                    with Image.open(pair.image) as a:
                        reading = pair.label
                        with Image.open(pair.label) as b:
                            problem = self.label_header_problem(pair, b.mode)
                            if problem:
                                raise UserError(problem)
                            if a.size != b.size and not self.tolerate_size_mismatch and not self._sizes_may_differ():
                                raise UserError(
                                    f"{pair.label}: label size {b.size[0]}x{b.size[1]} differs from image size "
                                    f"{a.size[0]}x{a.size[1]}; replace or delete the pair"
                                )
                    for reading in (pair.image, pair.label):
                        if not ends_complete(reading):  # decoded to be sure: a JPEG may carry data after its end
                            with Image.open(reading) as whole:
                                whole.load()
            except UserError as exc:
                problems.append(str(exc))
            except (OSError, UnidentifiedImageError, SyntaxError) as exc:
                problems.append(f"{reading}: cannot read ({exc}); re-extract or re-download the file")
            if len(problems) >= 20:
                problems.append("... (stopping after 20 problems)")
                break
        return problems

    def label_header_problem(self, pair: Pair, mode: str) -> str | None:
        """Why a label whose header says `mode` cannot hold the pair's encoding; None when it can.

        Every encoding here is one class id per pixel; adapters whose raw labels hold more override this.
        """
        return None if mode in CLASS_ID_MODES else label_mode_problem(pair.label, mode)

    def _sizes_may_differ(self) -> bool:
        """True where stored image and label sizes legitimately differ (on-the-fly halving)."""
        return False

    def __len__(self) -> int:
        return len(self.pairs())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r})"


# --------------------------------------------------------------------------------------------------
# torch Dataset
# --------------------------------------------------------------------------------------------------

try:  # torch is a dependency, but keep the label tables importable without it
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object  # type: ignore[assignment,misc]


class SegmentationDataset(_TorchDataset):  # type: ignore[misc,valid-type]
    """A torch Dataset over an adapter's pairs with a protocol transform.

    ``dataset[i]`` uses seed ``i``; ``dataset[(i, seed)]`` uses ``np.random.default_rng(seed)``, so
    the sampler, not worker state, owns the randomness and runs are reproducible and resumable.
    """

    def __init__(self, adapter: Adapter, transform: Any, limit: int | None = None,
                 pairs: slice = slice(None)) -> None:
        """``pairs`` selects from the adapter's sorted pairs; ``limit`` then keeps the first N of those."""
        self.adapter = adapter
        self.transform = transform
        selected = adapter.pairs()[pairs]
        self.pairs = selected[:limit] if limit is not None else selected

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(item, tuple):
            index, seed = item
        else:
            index, seed = item, item
        index = int(index)
        pair = self.pairs[index]
        stray_before = self.adapter.stray_label_pixels
        image, label = self.adapter.load_pair(pair)
        rng = np.random.default_rng(int(seed))
        image_t, label_t = self.transform(image, label, rng)
        return {"image": image_t, "label": label_t, "name": pair.name,
                "stray_label_pixels": self.adapter.stray_label_pixels - stray_before}
