"""Small file-system helpers shared by the writers (CLI outputs, cohort runs)."""

from __future__ import annotations

import shutil
from pathlib import Path


def remove_path(path: Path) -> None:
    """Remove a folder tree, a file or a symlink (a symlink itself, never its target); absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
