"""Plotting (``bt.pl``), scanpy conventions: ``ax=``, ``show=``, ``return_fig=``."""

from bitro._lazy import lazy_exports

_EXPORTS: dict[str, str] = {}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
