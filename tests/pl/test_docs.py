"""The shared parameter texts are injected into every ``bt.pl`` docstring."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

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


# ---------------------------------------------------------------------------- reference pages
DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("name", PUBLIC)
def test_every_plot_function_has_a_reference_page_and_example_figure(name):
    """Each bt.pl function is listed in docs/api.md and has its example snippet and a small committed PNG."""
    api = (DOCS_DIR / "api.md").read_text()
    section = api.split("## Plotting: `bt.pl`", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"^\s+pl\.{name}$", section, flags=re.MULTILINE), f"pl.{name} is not in docs/api.md"
    snippet = DOCS_DIR / "pl_examples" / f"{name}.py"
    assert f"bt.pl.{name}(" in snippet.read_text()
    figure = DOCS_DIR / "figures" / "pl" / f"{name}.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size < 150_000, f"{figure.name} is {figure.stat().st_size} bytes"
    template = DOCS_DIR / "_templates" / "autosummary" / "pl_function.rst"
    assert "/figures/pl/{{ objname }}.png" in template.read_text()


def test_api_pages_are_generated_as_restructuredtext():
    """autosummary writes its stubs with the first suffix of ``source_suffix`` it takes for reST.

    It takes ".md" for one (the MyST parser is registered under another name), and MyST then shows
    the stub's directives as text: every API page was empty. ".rst" must come first.
    """
    import runpy

    conf = runpy.run_path(str(DOCS_DIR / "conf.py"))
    assert next(iter(conf["source_suffix"])) == ".rst"
    assert "generated/*.md" in conf["exclude_patterns"]  # stale stubs of the old setup are ignored
    assert "Returns" in conf["napoleon_custom_sections"]  # prose Returns sections render as written
