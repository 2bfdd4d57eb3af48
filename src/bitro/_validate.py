"""Shared input checks that produce errors naming the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_key(key: str, available: Iterable[str], *, what: str, hint: str | None = None) -> str:
    """Raise a :class:`KeyError` listing the existing keys when ``key`` is absent.

    Parameters
    ----------
    key
        The requested key.
    available
        The keys that exist.
    what
        What kind of key this is (e.g. ``"image"``), used in the message.
    hint
        Optional advice, e.g. which function creates the element.
    """
    available = list(available)
    if key not in available:
        msg = f"{what} {key!r} not found; available {what}s: {sorted(map(str, available))}."
        if hint:
            msg += f" {hint}"
        raise KeyError(msg)
    return key


def check_not_exists(key: str, container: Any, *, what: str, overwrite: bool) -> None:
    """Refuse to overwrite an existing element or key unless ``overwrite=True``."""
    if key in container and not overwrite:
        msg = (
            f"{what} {key!r} already exists; pass overwrite=True to replace it, or choose another key_added."
        )
        raise ValueError(msg)
