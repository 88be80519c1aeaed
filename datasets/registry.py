"""The registry of dataset adapters by family name, and discovery of the families under a data root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.errors import UserError
from datasets.acdc import ACDC
from datasets.base import Adapter
from datasets.bdd100k import BDD100K
from datasets.cityscapes import Cityscapes
from datasets.gtav import GTAV
from datasets.mapillary import Mapillary
from datasets.synthia import SYNTHIA

ADAPTERS: dict[str, type[Adapter]] = {
    "gtav": GTAV,
    "cityscapes": Cityscapes,
    "bdd100k": BDD100K,
    "mapillary": Mapillary,
    "synthia": SYNTHIA,
    "acdc": ACDC,
}


# Target name → (adapter, constructor options): every family, and the views a family scores apart.
TARGETS: dict[str, tuple[type[Adapter], dict[str, Any]]] = {
    **{name: (cls, {}) for name, cls in ADAPTERS.items()},
    **{view: (cls, options) for cls in ADAPTERS.values() for view, options in cls.target_views.items()},
}


def get_target(name: str) -> tuple[type[Adapter], dict[str, Any]]:
    """The adapter and its options for a target name (a family, or a view such as `acdc_night`)."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"unknown target {name!r}; expected one of: {', '.join(TARGETS)}") from None


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class for a family name; an unknown name is a UserError listing the valid ones."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; expected one of: {', '.join(ADAPTERS)}") from None


def find_datasets(root: Path | str) -> list[str]:
    """Names of the families whose folder exists under the data root (registry order).

    A family folder that is a link leading nowhere counts: its adapter then names the broken link.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: data root not found; pass an existing --data-root/--root folder "
                        "(or write the synthetic world: python -m benchmarks data synth --out DIR)")
    return [name for name, cls in ADAPTERS.items()
            if (root / cls.folder).is_dir() or (root / cls.folder).is_symlink()]
