"""Every promise on docs/guarantees.md names a test that exists (so the page cannot outlive its checks)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_named_test_exists():
    text = (ROOT / "docs" / "guarantees.md").read_text()
    named = re.findall(r"`([\w/]+\.py)::(\w+)`", text)
    assert len(named) >= 15  # the page names its tests
    missing = []
    for file, test in named:
        path = ROOT / "tests" / file
        defined = set()
        if path.is_file():
            defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        if test not in defined:
            missing.append(f"{file}::{test}")
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
