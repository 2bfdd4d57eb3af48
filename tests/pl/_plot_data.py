"""A tiny slide for the plotting tests: H&E-like image, spots with counts and predictions, cells.

A helper module rather than ``conftest.py``: test folders without ``__init__.py`` all register their
``conftest`` as the module ``conftest``, so ``from conftest import ...`` would pick another folder's.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import spatialdata as sd
from shapely.geometry import Polygon

from bitro.io._build import circles_element, image_element, polygons_element, set_scale, table_element

GENES = ["ERBB2", "GNAS", "KRT19", "CD74", "MT-CO1"]
PHENOTYPES = ["tumour", "immune", "stroma"]
SPOT_RADIUS = 30.0
SPACING = 90.0
MPP = 2.0


def make_slide(seed: int = 0, *, scale_factors=None, n_cells_per_spot: int = 7) -> sd.SpatialData:
    """4 × 3 spots on a 420 × 330 px image; every spot holds ``n_cells_per_spot`` nucleus polygons."""
    rng = np.random.default_rng(seed)
    h, w = 330, 420
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres (pixel i spans [i, i + 1))
    # pink eosin background with a smooth gradient
    img = np.empty((h, w, 3), dtype=np.float64)
    img[..., 0] = 235 - 20 * xx / w
    img[..., 1] = 170 + 30 * yy / h
    img[..., 2] = 200
    gx, gy = np.meshgrid(np.arange(4), np.arange(3))
    centres = np.column_stack([gx.ravel(), gy.ravel()]) * SPACING + np.array([75.0, 75.0])
    spot_ids = [f"spot{i}" for i in range(len(centres))]

    cell_polys, cell_xy, cell_spot, cell_pheno = [], [], [], []
    for sid, c in zip(spot_ids, centres):
        r = SPOT_RADIUS * 0.8 * np.sqrt(rng.random(n_cells_per_spot))
        th = rng.uniform(0, 2 * np.pi, n_cells_per_spot)
        for x, y in c + np.column_stack([r * np.cos(th), r * np.sin(th)]):
            a, b, rot = rng.uniform(3, 5), rng.uniform(2, 4), rng.uniform(0, np.pi)
            t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
            px = x + a * np.cos(t) * np.cos(rot) - b * np.sin(t) * np.sin(rot)
            py = y + a * np.cos(t) * np.sin(rot) + b * np.sin(t) * np.cos(rot)
            cell_polys.append(Polygon(np.column_stack([px, py])))
            cell_xy.append((x, y))
            cell_spot.append(sid)
            cell_pheno.append(PHENOTYPES[rng.integers(len(PHENOTYPES))])
            inside = ((xx - x) * np.cos(rot) + (yy - y) * np.sin(rot)) ** 2 / a**2 + (
                -(xx - x) * np.sin(rot) + (yy - y) * np.cos(rot)
            ) ** 2 / b**2 <= 1
            img[inside] = (90, 50, 140)  # haematoxylin-purple nuclei
    image = image_element(img.round().astype(np.uint8), dims=("y", "x", "c"), scale_factors=scale_factors)

    # spots: counts with a left→right gradient per gene; predictions = log1p(counts) with noise
    grad = (centres[:, 0] - centres[:, 0].min()) / np.ptp(centres[:, 0])
    base = np.array([20.0, 5.0, 40.0, 2.0, 60.0])
    lam = base[None, :] * (0.2 + np.outer(grad, np.ones(len(GENES))))
    counts = rng.poisson(lam).astype(np.float32)
    pred = (np.log1p(counts) * 0.8 + rng.normal(0, 0.15, counts.shape)).clip(0.05).astype(np.float32)
    spots = ad.AnnData(X=counts.copy(), obs=pd.DataFrame(index=spot_ids), var=pd.DataFrame(index=GENES))
    spots.layers["counts"] = counts
    spots.layers["bitro"] = pred
    spots.obsm["spatial"] = centres
    spots.uns["bitro"] = {"target_scale": "raw", "genes": list(GENES), "model": "toy"}

    # cells: pseudo-cells = A[g, i] · ŷ_spot, stored as log1p
    cell_ids = [f"cell{i}" for i in range(len(cell_xy))]
    spot_of = np.repeat(np.arange(len(spot_ids)), n_cells_per_spot)
    attn = np.concatenate([rng.dirichlet(np.ones(n_cells_per_spot), size=len(GENES)).T for _ in spot_ids])
    pseudo = attn * np.expm1(pred)[spot_of]
    cells = ad.AnnData(
        X=np.log1p(pseudo).astype(np.float32),
        obs=pd.DataFrame(
            {
                "spot_id": pd.Categorical(np.array(spot_ids)[spot_of], categories=spot_ids),
                "phenotype": pd.Categorical(cell_pheno, categories=PHENOTYPES),
                "area": rng.uniform(20, 60, len(cell_ids)),
            },
            index=cell_ids,
        ),
        var=pd.DataFrame(index=GENES),
    )
    cells.layers["bitro"] = cells.X.copy()
    cells.obsm["spatial"] = np.asarray(cell_xy)
    cells.obsm["X_bitro_expr"] = cells.X.copy()
    cells.uns["bitro"] = {"target_scale": "raw", "genes": list(GENES)}
    cells.uns["_true_attention"] = attn

    sdata = sd.SpatialData(
        images={"he": image},
        shapes={
            "spots_shapes": circles_element(centres, SPOT_RADIUS, spot_ids),
            "cells_shapes": polygons_element(cell_polys, cell_ids),
        },
        tables={
            "spots": table_element(spots, region="spots_shapes"),
            "cells": table_element(cells, region="cells_shapes"),
        },
    )
    set_scale(sdata, mpp=MPP, spot_diameter_um=2 * SPOT_RADIUS * MPP)
    return sdata
