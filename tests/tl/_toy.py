"""Toy slides for the model tests: cells whose features determine the spot expression."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import spatialdata as sd
from scipy import sparse

from bitro.io._build import circles_element, set_scale, table_element

N_TYPES, N_FEAT, N_GENES = 3, 12, 10


def make_toy_slide(
    seed: int, *, grid: int = 6, spacing: float = 200.0, diameter: float = 100.0, with_bulk=False
):
    """A slide with ``grid × grid`` spots; each holds 3–25 cells of 3 types; counts = Poisson(sum of type profiles)."""
    rng = np.random.default_rng(seed)
    profiles = np.random.default_rng(123).gamma(2.0, 2.0, size=(N_TYPES, N_GENES))
    type_feat = np.random.default_rng(7).normal(size=(N_TYPES, N_FEAT)) * 2
    xs, ys = np.meshgrid(np.arange(grid), np.arange(grid))
    centres = np.column_stack([xs.ravel(), ys.ravel()]) * spacing + spacing
    spot_ids = [f"s{i}" for i in range(len(centres))]
    cell_xy, cell_type, cell_spot = [], [], []
    for i, c in enumerate(centres):
        n = rng.integers(3, 26)
        dom = rng.integers(N_TYPES)
        types = np.where(rng.random(n) < 0.7, dom, rng.integers(N_TYPES, size=n))
        r = diameter / 2 * np.sqrt(rng.random(n)) * 0.95
        th = rng.uniform(0, 2 * np.pi, n)
        cell_xy.append(c + np.column_stack([r * np.cos(th), r * np.sin(th)]))
        cell_type.append(types)
        cell_spot += [spot_ids[i]] * n
    # a few cells outside every spot
    cell_xy.append(np.array([[5.0, 5.0], [spacing * (grid + 1) - 1, 3.0]]))
    cell_type.append(np.array([0, 1]))
    cell_spot += [None, None]
    xy, types = np.concatenate(cell_xy), np.concatenate(cell_type)
    feats = type_feat[types] + rng.normal(scale=0.5, size=(len(types), N_FEAT))
    spot_of = pd.Series(cell_spot)
    counts = np.zeros((len(centres), N_GENES))
    for i, sid in enumerate(spot_ids):
        members = types[(spot_of == sid).to_numpy()]
        counts[i] = rng.poisson(profiles[members].mean(axis=0) * 8)
    genes = [f"G{i}" for i in range(N_GENES)]
    spots = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=spot_ids),
        var=pd.DataFrame(index=genes),
    )
    spots.layers["counts"] = spots.X.copy()
    spots.obsm["spatial"] = centres.astype(float)
    cell_ids = [f"cell_{i}" for i in range(len(xy))]
    cells = ad.AnnData(
        obs=pd.DataFrame({"spot_id": pd.Categorical(cell_spot, categories=spot_ids)}, index=cell_ids)
    )
    cells.obsm["spatial"] = xy
    cells.obsm["X_bitro"] = feats.astype(np.float32)
    cells.obs["true_type"] = types
    cells.uns["X_bitro"] = {"encoder": "toy", "dim": N_FEAT}
    tables = {
        "spots": table_element(spots, region="spots_shapes"),
        "cells": table_element(cells, region="cells_shapes"),
    }
    if with_bulk:
        bulk = ad.AnnData(
            X=counts.sum(axis=0, keepdims=True) / counts.sum() * 1e6,
            obs=pd.DataFrame(index=[f"slide{seed}"]),
            var=pd.DataFrame(index=genes),
        )
        bulk.layers["counts"] = counts.sum(axis=0, keepdims=True)
        from spatialdata.models import TableModel

        tables["bulk"] = TableModel.parse(bulk)
        # patches = the spot grid (same bags) for a bulk-level test
        patches = spots.copy()
        patches.obs_names = [f"p{i}" for i in range(len(spot_ids))]
        del patches.layers["counts"]
        patches = ad.AnnData(
            obs=pd.DataFrame(index=patches.obs_names), obsm={"spatial": centres.astype(float)}
        )
        tables["patches"] = table_element(patches, region="patches_shapes")
        mapping = dict(zip(spot_ids, patches.obs_names))
        tables["cells"].obs["patch_id"] = pd.Categorical(
            [mapping.get(s) for s in cell_spot], categories=list(patches.obs_names)
        )
    shapes = {
        "spots_shapes": circles_element(centres, diameter / 2, spot_ids),
        "cells_shapes": circles_element(xy, 3.0, cell_ids),
    }
    if with_bulk:
        shapes["patches_shapes"] = circles_element(
            centres, diameter / 2, [f"p{i}" for i in range(len(spot_ids))]
        )
    sdata = sd.SpatialData(shapes=shapes, tables=tables)
    set_scale(sdata, mpp=1.0, spot_diameter_um=diameter, spot_spacing_um=spacing, sample_id=f"toy{seed}")
    return sdata


GENES = [f"G{i}" for i in range(N_GENES)]
SMALL = {"hidden_dim": 16, "ffn_dim": 32, "readout_hidden": 16, "pos_bins": 8, "dropout": 0.0}
