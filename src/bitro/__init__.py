"""bitro — single-cell-resolved gene expression prediction from H&E images.

Sub-packages are imported lazily so that ``import bitro`` stays fast and never
imports torch: ``bt.pp``, ``bt.tl``, ``bt.pl``, ``bt.io``, ``bt.models`` and
``bt.datasets`` load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bitro._logging import logger
from bitro._settings import settings
from bitro._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from bitro import datasets, io, models, pl, pp, tl

_SUBMODULES = ("datasets", "io", "models", "pl", "pp", "tl")

__all__ = ["__version__", "datasets", "io", "logger", "models", "pl", "pp", "settings", "tl"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"bitro.{name}")
        globals()[name] = module
        return module
    msg = f"module 'bitro' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
