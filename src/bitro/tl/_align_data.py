"""Spot pairs for the alignment: each spot's cells (tower inputs) beside its normalised expression.

:class:`CellInputs` is the fitted map from ``cells.obsm[use_rep]`` to the image tower's input: the
training cells' :class:`~bitro.pp.FeatureProjection` (standardise + PCA), divided by one number (the
root mean variance of the projected training cells) so the MLP sees unit-scale inputs.
:class:`SpotPairs` holds the cells of many spots grouped by spot (``offsets``), with the spots'
normalised expression when it is known. Cells are matched to spots by ``cells.obs["spot_id"]``
(:func:`bitro.tl._spot_features.spot_codes`, the cross-slice models' helper); spots without a cell
have no image and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro.io._build import get_table
from bitro.tl._configs import SetupConfig
from bitro.tl._setup import MAX_CELLS_FIT, cell_features, slide_name
from bitro.tl._spot_features import spot_codes

if TYPE_CHECKING:
    import spatialdata as sd


@dataclass
class CellInputs:
    """``cells.obsm[use_rep]`` → tower input: projection, then division by ``input_scale``."""

    projection: Any
    input_scale: float

    @classmethod
    def fit(cls, sdatas: list[sd.SpatialData], setup: SetupConfig) -> CellInputs:
        """Fit on the cells of the training slides."""
        from bitro.pp._reduce import FeatureProjection

        raw = [cell_features(s, setup.use_rep, setup.cells_key) for s in sdatas]
        projection = FeatureProjection.fit(
            raw, n_components=setup.n_components, seed=setup.seed, use_rep=setup.use_rep,
            max_cells_fit=MAX_CELLS_FIT,
        )  # fmt: skip
        scale = float(np.sqrt(np.mean(projection.explained_variance)))
        return cls(projection, scale if scale > 0 else 1.0)

    @property
    def dim(self) -> int:
        """Width of the tower input."""
        return int(self.projection.n_components)

    def transform(self, sdata: sd.SpatialData, setup: SetupConfig) -> np.ndarray:
        """``(n_cells, dim)`` float32 inputs of every cell of the slide."""
        x = self.projection.transform(cell_features(sdata, setup.use_rep, setup.cells_key))
        return (x / self.input_scale).astype(np.float32)


@dataclass
class SpotPairs:
    """Spots with their cells grouped by spot and, when known, their normalised expression.

    Attributes
    ----------
    slide
        ``(n,)`` slide name of every spot.
    spot_ids
        ``(n,)`` spot ids.
    cells
        ``(m, d)`` tower inputs of the spots' cells, spot by spot.
    offsets
        ``(n + 1,)``: the cells of spot ``i`` are ``cells[offsets[i]:offsets[i + 1]]`` (at least one).
    z
        ``(n, n_genes)`` normalised expression, or ``None``.
    """

    slide: np.ndarray
    spot_ids: np.ndarray
    cells: np.ndarray
    offsets: np.ndarray
    z: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.spot_ids)

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(cells, segment)`` of spots ``rows``: their cells and each cell's position in ``rows``."""
        starts, ends = self.offsets[rows], self.offsets[np.asarray(rows) + 1]
        lengths = ends - starts
        segment = np.repeat(np.arange(len(rows)), lengths)
        idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(
            lengths.sum()
        )
        return self.cells[idx], segment

    def subset(self, rows: np.ndarray) -> SpotPairs:
        """The spots ``rows`` (in that order)."""
        cells, _ = self.batch(rows)
        lengths = self.offsets[np.asarray(rows) + 1] - self.offsets[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        z = None if self.z is None else self.z[rows]
        return SpotPairs(self.slide[rows], self.spot_ids[rows], cells, offsets, z)

    @classmethod
    def concat(cls, parts: list[SpotPairs]) -> SpotPairs:
        """One set of pairs from several (expression kept only when every part has it)."""
        sizes = [p.offsets[-1] for p in parts]
        shifts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)])
        z = None if any(p.z is None for p in parts) else np.concatenate([p.z for p in parts])
        return cls(
            np.concatenate([p.slide for p in parts]),
            np.concatenate([p.spot_ids for p in parts]),
            np.concatenate([p.cells for p in parts]),
            offsets.astype(np.int64),
            z,
        )


def slide_pairs(
    sdata: sd.SpatialData,
    inputs: CellInputs,
    setup: SetupConfig,
    *,
    i: int = 0,
    z_of: Any = None,
) -> tuple[SpotPairs, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of one slide's spots with cells.

    Parameters
    ----------
    z_of
        ``(rows of the spot table) → (normalised expression, keep mask)`` or ``None`` (images only).

    Returns
    -------
    ``(pairs, rows of these spots in the spot table, tower inputs of every cell of the slide, rows of
    the pairs' cells in the cell table)``.
    """
    spots = get_table(sdata, setup.spots_key)
    name = slide_name(sdata, i)
    codes = spot_codes(sdata, setup)
    x = inputs.transform(sdata, setup)
    n = np.bincount(codes[codes >= 0], minlength=spots.n_obs)
    rows = np.flatnonzero(n > 0)
    z = None
    if z_of is not None:
        z, keep = z_of(rows)
        rows, z = rows[keep], z[keep]
    if len(rows) == 0:
        msg = (
            f"No spot of slide {name!r} holds a cell{' with counts' if z_of is not None else ''}: nothing to "
            "align. Run bt.pp.assign_cells first (cells.obs['spot_id'])."
        )
        raise ValueError(msg)
    member = np.isin(codes, rows)
    order = np.argsort(codes[member], kind="stable")
    cell_rows = np.flatnonzero(member)[order]
    offsets = np.concatenate([[0], np.cumsum(n[rows])]).astype(np.int64)
    pairs = SpotPairs(
        np.repeat(name, len(rows)).astype(str),
        spots.obs_names.to_numpy()[rows].astype(str),
        x[cell_rows],
        offsets,
        None if z is None else z.astype(np.float32),
    )
    return pairs, rows, x, cell_rows
