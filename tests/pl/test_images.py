"""Image comparison against reference PNGs in tests/pl/_images (scanpy style).

Regenerate a reference by deleting it and running the test once (it is written and the
test is skipped); look at the new PNG before keeping it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _plot_data import make_slide
from matplotlib.testing.compare import compare_images

import bitro as bt

IMAGES = Path(__file__).parent / "_images"
SIZE = (4.0, 3.0)
DPI = 60
SIZES = {"spatial": (7.0, 2.6)}
TOL = 8.0  # RMS over 0-255; reruns give 0, changed figures 10-65 (see test_tolerance_catches_changes)


@pytest.fixture
def slide():
    return make_slide(0)


@pytest.fixture(autouse=True)
def _mpl_defaults():
    plt.rcdefaults()
    yield
    plt.close("all")


def save(fig, path: Path) -> None:
    fig.set_size_inches(*SIZES.get(path.stem.removesuffix("_changed"), SIZE))
    fig.savefig(path, dpi=DPI)


def check(fig, name: str, tmp_path: Path, tol: float = TOL) -> None:
    expected = IMAGES / f"{name}.png"
    actual = tmp_path / f"{name}.png"
    save(fig, actual)
    if not expected.exists():
        IMAGES.mkdir(exist_ok=True)
        shutil.copyfile(actual, expected)
        pytest.skip(f"reference {expected.name} written; check it by eye and rerun")
    result = compare_images(str(expected), str(actual), tol=tol)
    assert result is None, result


def pcc_series() -> pd.Series:
    rng = np.random.default_rng(0)
    return pd.Series(np.tanh(rng.normal(0.3, 0.3, 40)), index=[f"GENE{i}" for i in range(40)])


HISTORY = {
    "epoch": [1, 2, 3, 4, 5, 6],
    "train_loss": [1.0, 0.7, 0.52, 0.43, 0.38, 0.35],
    "val_loss": [1.1, 0.82, 0.63, 0.6, 0.66, float("nan")],
}

PLOTS = {
    "spatial": lambda s: bt.pl.spatial(s, genes="ERBB2", return_fig=True, scale_bar_um=200),
    "cells_phenotype": lambda s: bt.pl.cells(s, color="phenotype", return_fig=True),
    "cells_gene": lambda s: bt.pl.cells(s, color="ERBB2", crop=(30, 30, 210, 165), return_fig=True),
    "segmentation": lambda s: bt.pl.segmentation(s, crop=(30, 30, 130, 110), return_fig=True),
    "attention": lambda s: bt.pl.attention(s, spot="spot5", gene="ERBB2", return_fig=True),
    "scatter_pred": lambda s: bt.pl.scatter_pred(s, gene="ERBB2", return_fig=True),
    "gene_correlations": lambda s: bt.pl.gene_correlations(pcc_series(), n_top=5, return_fig=True),
    "history": lambda s: bt.pl.history(HISTORY, return_fig=True),
}


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_matches_reference(name, slide, tmp_path):
    check(PLOTS[name](slide), name, tmp_path)


@pytest.mark.parametrize(
    ("name", "changed"),
    [
        (
            "spatial",
            lambda s: bt.pl.spatial(s, genes="ERBB2", cmap="magma", return_fig=True, scale_bar_um=200),
        ),
        ("cells_phenotype", lambda s: bt.pl.cells(s, color="phenotype", palette="Set1", return_fig=True)),
        ("cells_gene", lambda s: bt.pl.cells(s, color="GNAS", crop=(30, 30, 210, 165), return_fig=True)),
        ("attention", lambda s: bt.pl.attention(s, spot="spot6", gene="ERBB2", return_fig=True)),
        (
            "segmentation",
            lambda s: bt.pl.segmentation(s, crop=(30, 30, 130, 110), edgecolor="yellow", return_fig=True),
        ),
        ("scatter_pred", lambda s: bt.pl.scatter_pred(s, gene="GNAS", return_fig=True)),
        (
            "history",
            lambda s: bt.pl.history(
                {**HISTORY, "val_loss": [1.1, 0.82, 0.63, 0.7, 0.66, None]}, return_fig=True
            ),
        ),
    ],
)
def test_tolerance_catches_changes(name, changed, slide, tmp_path):
    """A visibly different figure (other cmap, palette, gene or spot) fails the comparison at TOL."""
    expected = IMAGES / f"{name}.png"
    if not expected.exists():
        pytest.skip("reference not generated yet")
    actual = tmp_path / f"{name}_changed.png"
    save(changed(slide), actual)
    result = compare_images(str(expected), str(actual), tol=TOL)
    assert result is not None, f"{name}: a changed figure passed the comparison at tol={TOL}"
