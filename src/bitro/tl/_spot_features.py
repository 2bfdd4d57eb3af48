"""Spot-level image features for the cross-slice models: pooled projected cells, cell count, spot patch.

A spot's feature vector is, in this order:

1. the mean of its cells' projected features (``cells.obsm[use_rep]`` through a
   :class:`~bitro.pp.FeatureProjection` fitted on the training slides' cells, as BiTro's);
2. ``log1p`` of its number of cells;
3. optionally its spot-patch embedding ``spots.obsm[spot_rep]``, through a second projection fitted on
   the training spots.

Every block is centred with the training spots' mean and divided by one number per block (the root
mean column variance), so each block weighs about its number of columns while the PCA keeps its
variance ordering inside the block — cosine similarities then follow the main axes of variation
rather than noise components. All statistics come from the training slides only. Spots without
cells have no features (they are not predicted, as with BiTro and the baselines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._hashing import arrays_sha256
from bitro.io._build import get_mpp, get_scale, get_table
from bitro.tl._configs import SetupConfig
from bitro.tl._data import cells_of
from bitro.tl._setup import MAX_CELLS_FIT, cell_features, slide_name

if TYPE_CHECKING:
    import spatialdata as sd

    from bitro.pp._reduce import FeatureProjection


@dataclass
class SpotTable:
    """The spots of one slide that hold cells, with their features.

    Attributes
    ----------
    slide
        The slide's name (sample id).
    spot_ids
        ``(n,)`` ids of the spots with at least one cell, in table order.
    x
        ``(n, d)`` float32 standardised features (training statistics).
    n_cells
        ``(n,)`` cells per spot.
    xy_um
        ``(n, 2)`` spot centres in µm.
    fingerprint
        sha256 of the raw (unstandardised) features: equal for the same slide under another name.
    spacing_um
        Centre-to-centre spot spacing (recorded in the scale, else the median nearest-neighbour distance).
    """

    slide: str
    spot_ids: np.ndarray
    x: np.ndarray
    n_cells: np.ndarray
    xy_um: np.ndarray
    fingerprint: str
    spacing_um: float


def spot_codes(sdata: sd.SpatialData, setup: SetupConfig) -> np.ndarray:
    """``(n_cells,)`` row of each cell's spot in the spot table (−1: outside every spot)."""
    spots = get_table(sdata, setup.spots_key)
    cells = cells_of(sdata, setup.cells_key)
    if K.SPOT_ID not in cells.obs:
        msg = f"cells.obs[{K.SPOT_ID!r}] is missing: run bt.pp.assign_cells first."
        raise KeyError(msg)
    return np.asarray(
        pd.Categorical(cells.obs[K.SPOT_ID].astype("object"), categories=spots.obs_names).codes, dtype=np.int64
    )


def _pooled(sdata: sd.SpatialData, projection: FeatureProjection, setup: SetupConfig) -> tuple:
    """``(spot ids, pooled projected features, cells per spot)`` of the spots with cells."""
    spots = get_table(sdata, setup.spots_key)
    codes = spot_codes(sdata, setup)
    x = projection.transform(cell_features(sdata, setup.use_rep, setup.cells_key))
    inside = codes >= 0
    n = np.bincount(codes[inside], minlength=spots.n_obs)
    sums = np.zeros((spots.n_obs, x.shape[1]))
    np.add.at(sums, codes[inside], x[inside])
    keep = n > 0
    return np.flatnonzero(keep), sums[keep] / n[keep, None], n[keep]


def spot_rep_matrix(sdata: sd.SpatialData, spot_rep: str, setup: SetupConfig) -> np.ndarray:
    """``spots.obsm[spot_rep]`` as float64, refusing missing and non-finite values."""
    spots = get_table(sdata, setup.spots_key)
    if spot_rep not in spots.obsm:
        msg = (
            f"spots.obsm[{spot_rep!r}] is missing in {slide_name(sdata, 0)} (have {list(spots.obsm)}); embed "
            "every slide's spot patches under that key, or pass spot_rep=None."
        )
        raise KeyError(msg)
    x = np.asarray(spots.obsm[spot_rep], dtype=np.float64)
    if not np.isfinite(x).all():
        msg = (
            f"spots.obsm[{spot_rep!r}] has non-finite values in {slide_name(sdata, 0)}; re-embed those spots."
        )
        raise ValueError(msg)
    return x


def check_same_spot_encoder(
    sdatas: list[sd.SpatialData], spot_rep: str, setup: SetupConfig
) -> dict[str, Any]:
    """Refuse spot-patch embeddings of different widths or recorded encoders across slides."""
    widths, infos = [], []
    for s in sdatas:
        spots = get_table(s, setup.spots_key)
        widths.append(spot_rep_matrix(s, spot_rep, setup).shape[1])
        info = spots.uns.get(spot_rep, {})
        infos.append({k: info[k] for k in ("encoder", "mode") if k in info} if isinstance(info, dict) else {})
    if len(set(widths)) > 1:
        msg = (
            f"spots.obsm[{spot_rep!r}] has different widths across the slides ({sorted(set(widths))}); embed "
            "every slide's spot patches with the same encoder."
        )
        raise ValueError(msg)
    known = [i for i in infos if i.get("encoder") is not None]
    if any(i != known[0] for i in known[1:]):
        msg = (
            f"spots.obsm[{spot_rep!r}] comes from different encoders across the slides "
            f"({sorted({str(i) for i in known})}); embed every slide with one encoder."
        )
        raise ValueError(msg)
    return known[0] if known else {}


@dataclass
class SpotFeatures:
    """The fitted spot-feature map (projections and block statistics of the training spots).

    Attributes
    ----------
    projection
        Cell feature projection (PCA of the training cells).
    spot_projection
        Projection of ``spots.obsm[spot_rep]`` (PCA of the training spots), or ``None``.
    mean
        ``(d,)`` training mean of every column.
    block_scale
        ``(d,)`` the divisor of every column (one value per block).
    spot_rep
        The ``spots.obsm`` key of the spot-patch embedding, or ``None``.
    """

    projection: Any
    spot_projection: Any
    mean: np.ndarray
    block_scale: np.ndarray
    spot_rep: str | None = None

    @property
    def dim(self) -> int:
        """Width ``d`` of the features."""
        return int(self.mean.shape[0])

    @classmethod
    def fit(
        cls, sdatas: list[sd.SpatialData], setup: SetupConfig, *, spot_rep: str | None = None
    ) -> tuple[SpotFeatures, list[SpotTable]]:
        """Fit on the training slides; return the map and every training slide's :class:`SpotTable`."""
        from bitro.pp._reduce import FeatureProjection

        raw = [cell_features(s, setup.use_rep, setup.cells_key) for s in sdatas]
        projection = FeatureProjection.fit(
            raw,
            n_components=setup.n_components,
            seed=setup.seed,
            use_rep=setup.use_rep,
            max_cells_fit=MAX_CELLS_FIT,
        )
        spot_projection = None
        if spot_rep is not None:
            check_same_spot_encoder(sdatas, spot_rep, setup)
            rows = [_pooled(s, projection, setup)[0] for s in sdatas]
            mats = [spot_rep_matrix(s, spot_rep, setup)[r] for s, r in zip(sdatas, rows, strict=True)]
            spot_projection = FeatureProjection.fit(
                mats, n_components=setup.n_components, seed=setup.seed, use_rep=spot_rep
            )
        self = cls(projection, spot_projection, np.zeros(0), np.zeros(0), spot_rep)
        blocks = [self._blocks(s, setup) for s in sdatas]
        full = np.concatenate([np.concatenate(b[1], axis=1) for b in blocks])
        if full.shape[0] < 2:
            msg = f"The training slides hold {full.shape[0]} spot(s) with cells; at least 2 are needed."
            raise ValueError(msg)
        self.mean = full.mean(axis=0)
        self.block_scale = np.empty_like(self.mean)
        start = 0
        for part in blocks[0][1]:
            cols = slice(start, start + part.shape[1])
            rms = float(np.sqrt(full[:, cols].var(axis=0).mean()))
            self.block_scale[cols] = rms if rms > 0 else 1.0
            start += part.shape[1]
        tables = [self._table(s, setup, i, *b) for i, (s, b) in enumerate(zip(sdatas, blocks, strict=True))]
        return self, tables

    def table(self, sdata: sd.SpatialData, setup: SetupConfig, *, i: int = 0) -> SpotTable:
        """The :class:`SpotTable` of a slide (``i``: its position, for the default name ``slide<i>``)."""
        return self._table(sdata, setup, i, *self._blocks(sdata, setup))

    def _blocks(
        self, sdata: sd.SpatialData, setup: SetupConfig
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """``(rows of the spots with cells, [pooled cells, log1p count, (spot patch)], cells per spot)``."""
        rows, pooled, n = _pooled(sdata, self.projection, setup)
        parts = [pooled, np.log1p(n)[:, None].astype(np.float64)]
        if self.spot_projection is not None:
            patch = spot_rep_matrix(sdata, self.spot_rep, setup)[rows]
            parts.append(self.spot_projection.transform(patch).astype(np.float64))
        return rows, parts, n

    def _table(self, sdata, setup, i, rows, parts, n) -> SpotTable:
        raw = np.concatenate(parts, axis=1)
        spots = get_table(sdata, setup.spots_key)
        xy = np.asarray(spots.obsm[K.SPATIAL], dtype=np.float64)[rows] * get_mpp(sdata)
        return SpotTable(
            slide=slide_name(sdata, i),
            spot_ids=spots.obs_names.to_numpy()[rows].astype(str),
            x=((raw - self.mean) / self.block_scale).astype(np.float32),
            n_cells=n,
            xy_um=xy,
            fingerprint=arrays_sha256([raw.astype(np.float32)]),
            spacing_um=spot_spacing_um(sdata, xy),
        )

    # ------------------------------------------------------------------ storage
    def arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store in safetensors (projections under ``cells.`` and ``spots.``)."""
        out = {"mean": self.mean.astype(np.float64), "block_scale": self.block_scale.astype(np.float64)}
        out.update({f"cells.{k}": v for k, v in self.projection.arrays().items()})
        if self.spot_projection is not None:
            out.update({f"spots.{k}": v for k, v in self.spot_projection.arrays().items()})
        return out

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable metadata."""
        return {
            "spot_rep": self.spot_rep,
            "cells": self.projection.meta(),
            "spots": None if self.spot_projection is None else self.spot_projection.meta(),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> SpotFeatures:
        """Rebuild from :meth:`arrays` and :meth:`meta`."""
        from bitro.pp._reduce import FeatureProjection

        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

        projection = FeatureProjection.from_arrays(part("cells."), meta["cells"])
        spot_projection = None
        if meta.get("spots") is not None:
            spot_projection = FeatureProjection.from_arrays(part("spots."), meta["spots"])
        return cls(projection, spot_projection, arrays["mean"], arrays["block_scale"], meta.get("spot_rep"))


def spot_spacing_um(sdata: sd.SpatialData, xy_um: np.ndarray) -> float:
    """Centre-to-centre spot spacing in µm: recorded in the scale, else the median nearest-neighbour distance."""
    spacing = get_scale(sdata).get(K.SPOT_SPACING_UM)
    if spacing:
        return float(spacing)
    if len(xy_um) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(xy_um).query(xy_um, k=2)
    return float(np.median(dist[:, 1]))
