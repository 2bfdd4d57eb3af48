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
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
nb_execution_mode = "off"
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "generated/*.ipynb", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = f"bitro {__version__}"
html_theme_options = {"show_toc_level": 2}
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]
