"""Methods from outside the repository: installed plugins (entry points) and `--method-file` files.

A researcher's own repository declares its methods as entry points of the group `dgss_bench.methods`
(each names a module, or a Method class, whose import registers them with `@register_method`); a
single file is named with `--method-file path.py`. Both are imported after the built-in `methods/`
package, so a name clash always names the plugin. Whatever goes wrong while loading one (it does not
import, it registers nothing, it takes a name already taken) is a `UserError` naming the plugin, and
the registry is left as it was.

This module knows the registry only as a dict of name → class, which `benchmarks.method` passes in
(the registry imports this module, not the other way round). Processes the harness starts (profile's
one per method, slurm jobs) get the files from `loaded_method_files()` and load them again; where
each method came from is kept for the result's provenance (`method_origin`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.errors import UserError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dgss_bench.methods"
MODULE_PREFIX = "dgss_bench_method_file_"


class MethodNameTaken(TypeError):
    """A second class registered under a name the registry already holds (raised by `register_method`)."""

    def __init__(self, name: str, registered: type, newcomer: type):
        super().__init__(f"method name {name!r} registered twice ({registered.__module__}, {newcomer.__module__})")
        self.name = name
        self.registered = registered


_origins: dict[str, dict[str, Any]] = {}
"""Method name → where it was loaded from, for the methods not in `methods/`."""
_method_files: dict[Path, list[str]] = {}
"""Each loaded method file (resolved) → the names it registered, in loading order."""
_entry_points_loaded = False
_loaded_entry_points: set[str] = set()
"""The entry points loaded so far: after a broken one, the next discovery does not load the others twice."""


def method_origin(name: str) -> dict[str, Any] | None:
    """Where a plugin method came from (its file and sha256, or its entry point and distribution);
    None for a built-in method."""
    return _origins.get(name)


def loaded_method_files() -> list[str]:
    """The method files this process loaded, for a process it starts to load again."""
    return [str(path) for path in _method_files]


def load_method_files(paths: Iterable[str | Path], registry: dict[str, type]) -> list[str]:
    """Import each file as a module of its own, registering its methods; the names registered."""
    names: list[str] = []
    for given in paths:
        path = _checked_file(given)
        if path not in _method_files:
            _method_files[path] = _load_file(path, given, registry)
        names += _method_files[path]
    return names


def _checked_file(given: str | Path) -> Path:
    path = Path(given).expanduser()
    if path.is_dir():
        raise UserError(f"--method-file {given}: is a folder; pass the path of the Python file in it that defines "
                        "the method")
    if not path.is_file():
        raise UserError(f"--method-file {given}: no such file; pass the path of a Python file defining a method")
    if path.suffix != ".py":
        raise UserError(f"--method-file {given}: not a Python file (.py); pass the file defining the method")
    return path.resolve()


def _load_file(path: Path, given: str | Path, registry: dict[str, type]) -> list[str]:
    # The bytes hashed are the bytes run: the provenance names exactly the code that trained.
    source = path.read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    # One module name per file path, so two files called method.py do not replace each other.
    module_name = MODULE_PREFIX + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None  # a .py path always has a spec
    module = importlib.util.module_from_spec(spec)

    def execute() -> None:
        exec(compile(source, str(path), "exec"), module.__dict__)

    where = f"--method-file {given}"
    sys.modules[module_name] = module  # dataclasses and typing look a class's module up there
    try:
        _, names = _registering(where, registry, execute)
        if not names:
            raise UserError(f"{where} registers no method; decorate its Method subclass with @register_method "
                            "(from benchmarks.method import Method, register_method)")
    except UserError:
        del sys.modules[module_name]
        raise
    for name in names:
        _origins[name] = {"file": str(path), "sha256": digest, "bytes": len(source)}
    log.debug("%s registered %s", where, ", ".join(names))
    return names


def load_entry_points(registry: dict[str, type]) -> None:
    """Load every installed plugin of the group once per process; a broken one stops discovery, naming
    itself: skipping it would make `--methods all` quietly run without it."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry, "dist", None)
        origin = {"entry_point": f"{entry.name} = {entry.value}",
                  "distribution": dist.name if dist else None, "version": dist.version if dist else None}
        key = f"{origin['distribution']}:{origin['entry_point']}"
        if key in _loaded_entry_points:
            continue
        where = (f"method plugin {entry.name!r} ({entry.value}) of "
                 f"{f'{dist.name} {dist.version}' if dist else 'an unnamed distribution'}")
        loaded, names = _registering(where, registry, entry.load,
                                     fix=f"fix it, or uninstall it (pip uninstall {dist.name})" if dist else "fix or remove it")
        if not names and not _defines_a_method(loaded, registry):
            raise UserError(f"{where} registers no method; its module must decorate a Method subclass with "
                            "@register_method, or the entry point name such a class")
        for name in names:
            _origins[name] = origin
        _loaded_entry_points.add(key)
    _entry_points_loaded = True


def _defines_a_method(loaded: Any, registry: dict[str, type]) -> bool:
    """Whether an entry point's object is a registered method or the module of one (an entry point
    loaded after another naming the same module registers nothing new, and needs not)."""
    return loaded in registry.values() or any(cls.__module__ == getattr(loaded, "__name__", None) for cls in registry.values())


def _registering(where: str, registry: dict[str, type], load: Callable[[], Any],
                 fix: str = "fix the file") -> tuple[Any, list[str]]:
    """Run `load` (an import that registers methods): what it returned and the names it added. On any
    failure the registry is as before and the error is one line naming `where`."""
    before = dict(registry)
    try:
        loaded = load()
    except Exception as err:  # noqa: BLE001  (a third party's import can raise anything; the user sees which)
        _restore(registry, before)
        raise _load_failure(where, err, fix) from None
    return loaded, [name for name in registry if name not in before]


def _load_failure(where: str, err: Exception, fix: str) -> UserError:
    if isinstance(err, MethodNameTaken):
        return UserError(f"{where} registers method {err.name!r}, a name {_describe_owner(err.name, err.registered)} "
                         "already has; give its method another `name`")
    if isinstance(err, SyntaxError):
        return UserError(f"{where}: SyntaxError: {err.msg} ({err.filename}, line {err.lineno}); {fix}")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return UserError(f"{where} failed to import: {type(err).__name__}: {reason}; {fix}")


def _restore(registry: dict[str, type], before: dict[str, type]) -> None:
    registry.clear()
    registry.update(before)


def _describe_owner(name: str, cls: type) -> str:
    origin = _origins.get(name)
    if origin and "file" in origin:
        return f"--method-file {origin['file']}"
    if origin:
        return f"method plugin {origin['entry_point']} ({origin['distribution']})"
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    return f"{cls.__module__} ({file})" if file else cls.__module__
