"""The package logger (``logging.getLogger("bitro")``)."""

from __future__ import annotations

import logging

logger = logging.getLogger("bitro")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s [bitro] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
