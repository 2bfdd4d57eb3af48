"""Sphinx configuration for the bitro documentation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("MPLBACKEND", "Agg")

from bitro import __version__

project = "bitro"
author = "bitro developers"
copyright = "2026, bitro developers"
version = release = __version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autosummary_generate = True
templates_path = ["_templates"]  # autosummary/pl_function.rst: the bt.pl pages with their example figure
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
# bitro's Returns sections are prose (often with lists), not "name : type" lines: render them as written
napoleon_custom_sections = ["Returns"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
nb_execution_mode = "off"
# ".rst" first: autosummary writes its stubs with the first suffix it takes for reStructuredText, and
# it takes ".md" for one (the stubs were .md files parsed by MyST, so every API page was empty)
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_templates", "generated/*.md", "generated/*.ipynb", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = f"bitro {__version__}"
html_theme_options = {"show_toc_level": 2}
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]
