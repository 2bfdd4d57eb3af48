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


#: Which bitro packages each package may import (data flow: io → pp → tl → pl; models is pure torch).
#: Private top-level helpers (``bitro._files``, ``bitro._hashing``, ...) are open to every package
#: except ``models``; the command line (``bitro.cli``, ``bitro._cli_commands``, ``bitro._demo``) to none.
ALLOWED_IMPORTS = {
    "models": set(),
    "io": set(),
    "pp": {"io"},
    "datasets": {"io", "pp"},
    "tl": {"io", "pp", "models"},
    "pl": {"io"},
}


def test_packages_import_only_downstream():
    """A lower package never imports a higher one, and ``bitro.models`` imports nothing from bitro."""
    import ast
    from pathlib import Path

    root = Path(bt.__file__).parent
    entry_points = {"cli", "_cli_commands", "_demo"}
    bad = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            continue
        pkg = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if not name.startswith("bitro."):
                    continue
                target = name.split(".")[1]
                if target == pkg:
                    continue
                private_helper = target.startswith("_") and target not in entry_points and pkg != "models"
                if target == "_lazy" or private_helper or target in ALLOWED_IMPORTS[pkg]:
                    continue
                bad.append(f"{'/'.join(parts)} imports bitro.{target}")
    assert not bad, bad
