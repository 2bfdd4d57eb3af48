"""Lazy attribute loading for sub-packages (keeps ``import bitro`` light)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(
    package: str, mapping: dict[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """Return ``__getattr__`` and ``__dir__`` that import ``name`` from ``package + mapping[name]``."""

    def __getattr__(name: str) -> object:
        if name in mapping:
            module = importlib.import_module(mapping[name], package)
            return getattr(module, name)
        msg = f"module {package!r} has no attribute {name!r}"
        raise AttributeError(msg)

    def __dir__() -> list[str]:
        return sorted(mapping)

    return __getattr__, __dir__
