from __future__ import annotations

import subprocess
import sys

import pytest

import bitro as bt


def test_import_does_not_load_torch():
    code = "import sys, bitro; bitro.settings; print('torch' in sys.modules, 'spatialdata' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]


def test_settings_validation():
    s = bt.settings
    with pytest.raises(ValueError, match="verbosity"):
        s.verbosity = 7
    with pytest.raises(ValueError, match="device"):
        s.device = "tpu"
    old = s.device
    s.device = "cpu"
    from bitro._settings import resolve_device

    assert str(resolve_device()) == "cpu"
    s.device = old
    assert str(resolve_device("auto")) in {"cpu", "cuda", "mps"}


def test_unknown_attribute():
    with pytest.raises(AttributeError):
        bt.nonexistent  # noqa: B018
    with pytest.raises(AttributeError):
        bt.pp.nonexistent  # noqa: B018


def test_exports_resolve():
    """Every lazily exported public name resolves to an object with a docstring."""
    missing = []
    for sub in ("io", "pp", "tl", "pl", "models", "datasets"):
        mod = getattr(bt, sub)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not (obj.__doc__ or "").strip():
                missing.append(f"{sub}.{name}")
    assert not missing, f"public objects without docstring: {missing}"
