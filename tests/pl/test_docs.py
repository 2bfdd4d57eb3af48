"""The shared parameter texts are injected into every ``bt.pl`` docstring."""

from __future__ import annotations

import inspect
import re

import pytest

import bitro as bt
from bitro.pl._docs import DOCS, doc_params, format_docstring

PUBLIC = sorted(bt.pl.__all__)


def _documented_params(doc: str) -> set[str]:
    """Names documented in the Parameters section (``a, b`` lines count for both)."""
    section = doc.split("Parameters\n----------\n", 1)[1].split("\n\nReturns\n", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line and not line[0].isspace():
            names.update(name.strip() for name in line.split(","))
    return names


@pytest.mark.parametrize("name", PUBLIC)
def test_no_unformatted_placeholder(name):
    doc = getattr(bt.pl, name).__doc__
    assert doc
    assert "{doc_" not in doc, f"bt.pl.{name} has an unformatted placeholder; decorate it with @doc_params."


@pytest.mark.parametrize("name", PUBLIC)
def test_plot_conventions_documented(name):
    func = getattr(bt.pl, name)
    params = inspect.signature(func).parameters
    documented = _documented_params(inspect.getdoc(func))
    for convention in ("ax", "show", "return_fig"):
        assert convention in params, f"bt.pl.{name} lacks the scanpy parameter {convention!r}"
        assert convention in documented, f"bt.pl.{name} does not document {convention!r}"
    # and every parameter of the signature is documented
    assert set(params) <= documented, f"bt.pl.{name} does not document {sorted(set(params) - documented)}"


def test_format_docstring_indents_and_keeps_other_braces():
    doc = 'Title.\n\n    Parameters\n    ----------\n    key\n        Column ``uns[f"{key}_colors"]``.\n    {doc_ax}\n'
    out = format_docstring(doc)
    assert "    ax\n        Axes to draw into.\n" in out
    assert '``uns[f"{key}_colors"]``' in out
    assert re.search(r"\{doc_", out) is None


def test_doc_params_unknown_placeholder():
    def f():
        """Title.

        {doc_nonexistent}
        """

    with pytest.raises(KeyError, match="doc_nonexistent"):
        doc_params(f)


def test_shared_texts_are_numpydoc_entries():
    for name, text in DOCS.items():
        if name.startswith("doc_returns"):
            continue
        lines = text.splitlines()
        assert not lines[0].startswith(" "), name
        for line, after in zip(lines, [*lines[1:], ""]):
            if not line.startswith(" "):  # a parameter name is followed by its indented description
                assert after.startswith("    "), (name, line)
