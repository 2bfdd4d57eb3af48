"""Shared numpydoc text of the ``bt.pl`` parameters, written once and injected with :func:`doc_params`.

A plot function writes ``{doc_ax}`` (etc.) on a line of its own in its docstring and is
decorated with ``@doc_params``; the placeholder is replaced by the text below, indented like
the placeholder line. Only ``{doc_<name>}`` placeholders are touched, so other braces in a
docstring (``uns[f"{color}_colors"]``) stay as they are.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

doc_ax = """\
ax
    Axes to draw into."""

doc_ax_panels = """\
ax
    Axes to draw into, one per panel."""

doc_show_return_fig = """\
show
    Show the figure (default: when matplotlib is interactive and ``return_fig`` is False).
return_fig
    Return the Figure."""

doc_save = """\
save
    Write the figure to this file (format from the suffix: ``.png``, ``.pdf``, ``.svg``…) at
    ``bt.settings.savefig_dpi`` (default 300 dpi) with a tight bounding box; ``None`` writes nothing."""

doc_mpp = """\
mpp
    µm per pixel for the scale bar when ``data`` carries no scale (AnnData)."""

doc_scale_bar_um = """\
scale_bar_um
    Scale bar length in µm (a round shorter length when it is wider than the view), ``"auto"``
    (about a fifth of the view) or ``None`` for no bar."""

doc_returns = """\
The Figure if ``return_fig``; else the Axes unless shown."""

doc_returns_panels = """\
The Figure if ``return_fig``; else the Axes (a list for several panels) unless shown."""

DOCS: dict[str, str] = {name: value for name, value in globals().items() if name.startswith("doc_")}
"""Every shared text by placeholder name."""

_PLACEHOLDER = re.compile(r"^(?P<indent>[ ]*)\{(?P<name>doc_\w+)\}[ ]*$", re.MULTILINE)


def format_docstring(doc: str) -> str:
    """``doc`` with each ``{doc_<name>}`` line replaced by :data:`DOCS` ``[name]``, indented like the line."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in DOCS:
            msg = f"Unknown docstring placeholder {{{name}}}; the shared texts are {sorted(DOCS)}."
            raise KeyError(msg)
        return textwrap.indent(DOCS[name], match["indent"])

    return _PLACEHOLDER.sub(replace, doc)


def doc_params(func: F) -> F:
    """Decorator: fill the ``{doc_<name>}`` placeholders of ``func.__doc__`` (see :func:`format_docstring`)."""
    if func.__doc__:
        func.__doc__ = format_docstring(func.__doc__)
    return func
