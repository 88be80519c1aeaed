"""What a result can be traced to: the weight files a run loaded and the data it read.

A result, a checkpoint and a regression baseline carry the same provenance record:

    {"weights": {"backbone": "proxy_vit", "file": ".../proxy_vit.safetensors", "sha256": "…", "bytes": N},
     "data": {"gtav (train)": {"pairs": 350, "bytes": N, "sha256": "…"}, "cityscapes": {...}, ...},
     "method": {"file": ".../my_method.py", "sha256": "…", "bytes": N}}

"method" is there only for a method from outside the repository (`benchmarks.plugins.method_origin`:
a `--method-file`'s content hash, or an installed plugin's entry point, distribution and version);
a built-in method is traced by the git commit in the result's environment (`git_state`: the commit and
the paths that differed from it) and by "method_source", the content hash of the file that defines it
(`methods/<family>.py`), which a finished run is held against (a warning, not a refusal: the method
also runs the shared code the commit names, and an edit of a comment changes no number).

Weights are fingerprinted by content (sha256). Hashing a 1.2 GB DINOv2-L file takes seconds, so the
digest is cached by (path, size, modification time) in the user's cache folder: a file is hashed once
until it changes. A data split is fingerprinted by its pair list (names relative to the data root, in
order) and each file's size, which a stat gives without reading the images; content hashing is left
out as too slow for 25k-pair datasets and rarely telling where sizes and names agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dgss-bench" / "sha256.json"


def file_sha256(path: Path | str) -> str:
    """The file's sha256, from the cache when its path, size and modification time are unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = _read_cache()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    # Entries of an older version of this file are dropped: the cache holds what exists now.
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
    cache[key] = value
    _write_cache(cache)
    return value


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict[str, str]) -> None:
    """Best effort: a read-only or full home folder only costs re-hashing next time."""
    from benchmarks.errors import UserError
    from benchmarks.results import atomic_write_text

    try:
        atomic_write_text(cache_file(), json.dumps(cache, indent=0, sort_keys=True))
    except (OSError, UserError) as err:
        log.debug("fingerprint cache not written: %s", err)


def weights_record(backbone: str, path: Path | str | None) -> dict[str, Any]:
    """The fingerprint of the weight file a backbone is built from (None: random initialisation)."""
    if path is None or str(path) == "random":
        return {"backbone": backbone, "file": None, "sha256": None, "bytes": 0}
    path = Path(path).expanduser()
    return {"backbone": backbone, "file": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def source_record(cls: type, root: Path) -> dict[str, Any]:
    """The fingerprint of the file that defines a class (a built-in method's `methods/<family>.py`); none for a
    class defined where no file holds it (an interactive session), which is then compared on nothing."""
    import inspect

    try:
        found = inspect.getsourcefile(cls)
    except TypeError:  # a built-in or C class
        found = None
    if not found or not Path(found).is_file():
        return {"file": None, "sha256": None}
    path = Path(found)
    return {"file": _relative(path, root), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def source_differences(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """How the defining file of a built-in method differs between two provenance records, if both hold it."""
    old, new = (recorded or {}).get("method_source") or {}, current.get("method_source") or {}
    if not old.get("sha256") or not new.get("sha256") or old["sha256"] == new["sha256"]:
        return None
    return f"{new.get('file')} {short(old['sha256'])} then, {short(new['sha256'])} now"


def split_record(pairs: Iterable[Any], root: Path) -> dict[str, Any]:
    """The fingerprint of the image/label pairs a run reads from one split (`datasets.base.Pair`)."""
    digest = hashlib.sha256()
    count = total = 0
    for pair in pairs:
        sizes = []
        for file in (pair.image, pair.label):
            size = Path(file).stat().st_size
            sizes.append(size)
            total += size
        digest.update(f"{_relative(pair.image, root)}\t{sizes[0]}\t{_relative(pair.label, root)}\t{sizes[1]}\n".encode())
        count += 1
    return {"pairs": count, "bytes": total, "sha256": digest.hexdigest()}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "random initialisation"


def differences(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs between two provenance records, as phrases naming both sides (empty: the same).

    Only what both records hold is compared: a record from before provenance existed (None), or one
    of the weights alone, differs in nothing it cannot be compared on.
    """
    if not recorded:
        return []
    found = []
    old_w, new_w = recorded.get("weights") or {}, current.get("weights") or {}
    if "weights" in recorded and "weights" in current and old_w.get("sha256") != new_w.get("sha256"):
        found.append(f"{new_w.get('backbone', 'backbone')} weights {short(old_w.get('sha256'))} "
                     f"({old_w.get('file') or 'none'}) then, {short(new_w.get('sha256'))} ({new_w.get('file') or 'none'}) now")
    old_m, new_m = recorded.get("method") or {}, current.get("method") or {}
    if old_m.get("sha256") and new_m.get("sha256") and old_m["sha256"] != new_m["sha256"]:
        found.append(f"method file {short(old_m['sha256'])} ({old_m.get('file')}) then, "
                     f"{short(new_m['sha256'])} ({new_m.get('file')}) now")
    old_r, new_r = recorded.get("recipe") or {}, current.get("recipe") or {}
    if "hyperparameters" in old_r and "hyperparameters" in new_r:
        old_h, new_h = old_r["hyperparameters"], new_r["hyperparameters"]
        found += [f"hyperparameter {key} {old_h.get(key, 'absent')} then, {new_h.get(key, 'absent')} now"
                  for key in sorted(set(old_h) | set(new_h)) if old_h.get(key) != new_h.get(key)]
    for key, what in (("precision", "precision"), ("processes", "processes (each a batch)")):
        if key in old_r and key in new_r and old_r[key] != new_r[key]:
            found.append(f"{what} {old_r[key]} then, {new_r[key]} now")
    old_d, new_d = recorded.get("data") or {}, current.get("data") or {}
    for split in sorted(set(old_d) | set(new_d)) if "data" in recorded and "data" in current else ():
        a, b = old_d.get(split) or {}, new_d.get(split) or {}
        if a.get("sha256") != b.get("sha256"):
            found.append(f"{split} data {a.get('pairs', 0)} pairs {short(a.get('sha256'))} then, "
                         f"{b.get('pairs', 0)} pairs {short(b.get('sha256'))} now")
    return found


def identity(record: dict[str, Any] | None) -> str:
    """A short digest of a whole provenance record ("" for none): equal digests, same weights and data."""
    if not record:
        return ""
    weights = (record.get("weights") or {}).get("sha256")
    data = {split: fp.get("sha256") for split, fp in (record.get("data") or {}).items()}
    return hashlib.sha256(json.dumps([weights, data], sort_keys=True).encode()).hexdigest()[:8]


# A dirty tree is usually a doc or a note; which paths were dirty tells a reader whether the code the run
# executed is the commit's. Capped so a checkout full of untracked files cannot bloat every result file.
MAX_DIRTY_PATHS = 20

# Files that can change what runs: code and configuration, tracked or not (results, logs, locks, checkpoints and
# notes cannot; a results folder inside the checkout, or a tracked load log appended to beside a run, would
# otherwise change the digest as the run goes, and a resumed run would name its own code as other code).
CODE_SUFFIXES = (".py", ".toml")


def is_code_path(path: str) -> bool:
    """Whether a path of the checkout can change what runs (`CODE_SUFFIXES`)."""
    return path.endswith(CODE_SUFFIXES)


def git_state(root: Path) -> tuple[str | None, list[str] | None]:
    """(HEAD commit, the paths `git status` lists as changed or untracked, code first where they are capped), or
    (None, None) outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        status = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=normal"], cwd=root,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if commit.returncode != 0 or status.returncode != 0:
        return None, None
    paths = []
    entries = iter(status.stdout.split("\0"))
    for entry in entries:
        if not entry:
            continue
        paths.append(entry[3:])
        if {"R", "C"} & set(entry[:2]):  # a rename or copy: -z puts its source path in the next entry
            next(entries, None)
    if len(paths) > MAX_DIRTY_PATHS:
        # the code paths first (stable sort), so that a results folder's many entries never push them out
        paths.sort(key=lambda path: not is_code_path(path))
        paths = paths[:MAX_DIRTY_PATHS] + [f"... and {len(paths) - MAX_DIRTY_PATHS} more"]
    return commit.stdout.strip(), paths


# Untracked code files are read up to these bounds (a stray large file is named, not hashed whole).
MAX_UNTRACKED_FILES = 50
MAX_UNTRACKED_BYTES = 1 << 22
# The diff as no user's git configuration shapes it (prefixes, colour, rename detection, hunk heuristics, drivers).
_PLAIN_DIFF = ["git", "-c", "core.quotepath=off", "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff",
               "--no-textconv", "--no-renames", "--src-prefix=a/", "--dst-prefix=b/", "--diff-algorithm=myers",
               "--no-indent-heuristic", "--unified=3", "--no-relative", "--",
               *(f":(glob)**/*{suffix}" for suffix in CODE_SUFFIXES)]


def working_tree_sha256(root: Path) -> str | None:
    """A digest of the uncommitted changes to the code: `git diff HEAD` of the code files (as no git configuration
    shapes it) and the untracked code files (their names and first 4 MiB). Two trees dirty in the same paths with
    other edits get other digests, where the paths alone said the same (a reviewer's two edits of protocol.py,
    lr ×0.5 and ×2: one record, mIoU 0.18 and 0.95). None for a tree without such changes (one whose only edits
    are to docs, logs or results), or outside a checkout."""
    try:
        diff = subprocess.run(_PLAIN_DIFF, cwd=root, capture_output=True, timeout=30)
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=root,
                                   capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if diff.returncode != 0 or untracked.returncode != 0:
        return None
    names = sorted(name for name in untracked.stdout.decode(errors="replace").split("\0")
                   if is_code_path(name))
    if not diff.stdout and not names:
        return None
    digest = hashlib.sha256(diff.stdout)
    for name in names[:MAX_UNTRACKED_FILES]:
        digest.update(b"\0untracked\0" + name.encode())
        try:
            with open(Path(root) / name, "rb") as handle:
                digest.update(handle.read(MAX_UNTRACKED_BYTES))
        except OSError:
            continue
    digest.update(f"\0{len(names)} untracked".encode())
    return digest.hexdigest()


def code_state(root: Path) -> dict[str, Any]:
    """What a result or a profile records of the checkout it ran from: the commit, whether and where the tree
    was dirty, and the digest of the uncommitted code (`working_tree_sha256`)."""
    commit, dirty_paths = git_state(root)
    return {"git_commit": commit, "git_dirty": None if dirty_paths is None else bool(dirty_paths),
            "git_dirty_paths": dirty_paths,
            "git_dirty_sha256": working_tree_sha256(root) if dirty_paths else None}


def code_identity(environment: dict[str, Any]) -> dict[str, Any]:
    """What a result's environment says of the code that computed it: the commit, the digest of uncommitted
    changes and the versions of the packages that compute numbers (`resources.RECORDED_PACKAGES`)."""
    from benchmarks.resources import RECORDED_PACKAGES

    return {"git_commit": environment.get("git_commit"), "git_dirty_sha256": environment.get("git_dirty_sha256"),
            "packages": {package: environment.get(package) for package in RECORDED_PACKAGES}}

