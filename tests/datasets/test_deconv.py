"""The HER2ST cell-type proportions reader: the real files, and crafted files refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import bitro as bt

TYPES = ["B-cells", "CAFs", "Endothelial", "Epithelial", "Myeloid", "Plasma Cells", "PVL", "T-cells"]


@pytest.mark.realdata
@pytest.mark.parametrize("section", ["C2", "C6"])
def test_her2st_proportions_align_with_the_spots_table(data_dir, section):
    props = bt.datasets.her2st_proportions(section, data_dir)
    assert list(props.columns) == TYPES and props.index.name == "spot"
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-3)
    spots = bt.datasets.her2st(section, data_dir=data_dir, image=False)["spots"]
    # every spot of the spots table has proportions, under the same "{x}x{y}" id
    assert set(spots.obs_names) <= set(props.index)
    aligned = props.reindex(spots.obs_names)
    assert not aligned.isna().any().any()
    assert (spots.obs["array_x"].astype(str) + "x" + spots.obs["array_y"].astype(str) == aligned.index).all()


def _kit(tmp_path, table: pd.DataFrame, section: str = "Z1"):
    folder = tmp_path / "her2st" / "deconv" / "major"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / f"{section}-proportion.tsv", sep="\t")
    return tmp_path


def test_her2st_proportions_reads_a_small_table(tmp_path):
    table = pd.DataFrame({"A": [0.25, 1.0], "B": [0.75, 0.0]}, index=["3x4", "10x2"])
    props = bt.datasets.her2st_proportions("Z1", _kit(tmp_path, table))
    assert props.index.tolist() == ["3x4", "10x2"] and props.loc["3x4", "B"] == 0.75
    assert (props.dtypes == np.float64).all()


def test_her2st_proportions_refuses_unknown_sections_and_bad_tables(tmp_path):
    root = _kit(tmp_path, pd.DataFrame({"A": [1.0]}, index=["1x1"]))
    with pytest.raises(KeyError, match=r"'Q9' has no cell-type proportions.*available: \['Z1'\]"):
        bt.datasets.her2st_proportions("Q9", root)
    bad = {
        "B1": (pd.DataFrame({"A": [0.5, 0.5]}, index=["1x1", "2x2"]), "do not sum to 1"),
        "B2": (pd.DataFrame({"A": [1.0]}, index=["spot_1"]), "array coordinates"),
        "B3": (pd.DataFrame({"A": [1.5], "B": [-0.5]}, index=["1x1"]), "non-negative"),
        "B4": (pd.DataFrame({"A": ["x"]}, index=["1x1"]), "not numeric"),
        "B5": (pd.DataFrame({"A": [1.0, 1.0]}, index=["1x1", "1x1"]), "repeated spot ids"),
    }
    for section, (table, match) in bad.items():
        _kit(tmp_path, table, section)
        with pytest.raises(ValueError, match=match):
            bt.datasets.her2st_proportions(section, root)
