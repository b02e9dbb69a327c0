"""Modules that moved: their old names forward attribute access to the new module, with a `FutureWarning`."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def forward_to(
    target: str, old: str, fallbacks: tuple[str, ...] = (), renamed: dict[str, str] | None = None
) -> Callable[[str], Any]:
    """
    A module `__getattr__` for `old` that finds names in `target` (then in `fallbacks`), under their new name when
    `renamed` maps the old one, and warns.
    """

    def __getattr__(old_name: str) -> Any:
        name = (renamed or {}).get(old_name, old_name)
        for module_name in (target, *fallbacks):
            module = importlib.import_module(module_name)
            if hasattr(module, name) and not name.startswith("_"):
                value = getattr(module, name)
                home = getattr(value, "__module__", None) or module_name
                warnings.warn(
                    f"`{old}.{old_name}` moved to `{home}.{name}`; the old name will be removed later.",
                    FutureWarning,
                    stacklevel=2,
                )
                return value
        raise AttributeError(f"module {old!r} has no attribute {old_name!r}")

    return __getattr__
