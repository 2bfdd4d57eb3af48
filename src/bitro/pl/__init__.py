"""Plotting (``bt.pl``), scanpy conventions: ``ax=``, ``show=``, ``return_fig=``."""

from bitro._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "spatial": "._spatial",
    "cells": "._cells",
    "segmentation": "._cells",
    "gene_correlations": "._model",
    "scatter_pred": "._model",
    "attention": "._model",
    "history": "._model",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
