"""Fixtures for the model tests (builders in ``_toy.py``)."""

from __future__ import annotations

import pytest
from _toy import make_toy_slide


@pytest.fixture
def toy_slides():
    return [make_toy_slide(s) for s in range(3)]


@pytest.fixture
def toy_bulk_slides():
    return [make_toy_slide(s, with_bulk=True) for s in range(4)]
