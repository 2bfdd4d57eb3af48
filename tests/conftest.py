"""Shared fixtures: the real-data kit path and small synthetic SpatialData objects."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BITRO_DATA_DIR", ROOT.parent / "shared" / "data"))

# Prepared sections (bt.datasets.her2st(..., prepared=True)) go to one cache folder per test session,
# shared with the notebook kernels the tutorial tests start; scripts/test.sh sets BITRO_CACHE_DIR so
# that its two pytest runs share it. The user's own cache (~/.cache/bitro) is never written by tests.
_OWN_CACHE = None
if not os.environ.get("BITRO_CACHE_DIR"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="bitro-test-cache-")
    os.environ["BITRO_CACHE_DIR"] = _OWN_CACHE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if DATA_DIR.is_dir():
        return
    if os.environ.get("CI") and any("realdata" in item.keywords for item in items):
        msg = f"CI must run the real-data tests, but the data kit is missing at {DATA_DIR} (set BITRO_DATA_DIR)."
        raise pytest.UsageError(msg)
    skip = pytest.mark.skip(reason=f"real-data kit not found at {DATA_DIR} (set BITRO_DATA_DIR)")
    for item in items:
        if "realdata" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(autouse=True)
def _quiet_progress():
    import bitro as bt

    old = bt.settings.progress
    bt.settings.progress = False
    yield
    bt.settings.progress = old


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread (and the suite runs beside other work)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
