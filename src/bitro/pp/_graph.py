"""kNN graphs within bags: the one graph builder of the package and :func:`cell_graph`.

:func:`cell_graph` links each cell to its nearest neighbours inside its own bag (the cells of a spot
or a patch, :mod:`bitro.pp._bags`). One KD-tree serves all bags; nothing quadratic in the number of
cells is built. The model builds its bags' graphs with the same :func:`within_bag_knn`, so a graph
written by :func:`cell_graph` is the graph the model would build (and it reuses it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._validate import check_not_exists
from bitro._version import __version__
from bitro.pp._bags import _CELLS_HINT, _coords

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd
    from scipy import sparse


def _bag_codes(cells: ad.AnnData, bag_key: str) -> np.ndarray:
    if bag_key not in cells.obs:
        msg = (
            f"cells.obs[{bag_key!r}] not found (columns: {list(cells.obs.columns)}). Run bt.pp.assign_cells "
            "(ST spots → 'spot_id') or bt.pp.make_patches (bulk patches → 'patch_id') first, or pass bag_key=."
        )
        raise KeyError(msg)
    col = cells.obs[bag_key]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype("category")
    return np.asarray(col.cat.codes, dtype=np.int64)


def _knn_edges(xy: np.ndarray, bag: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Directed kNN edges (i → j) among points of the same bag, without self-edges.

    One KD-tree on all cells: each bag is centred and moved to its own slot of a
    coarse grid whose pitch exceeds twice the largest bag diameter, so every cell of
    a cell's own bag is nearer than any cell of another bag. A query of ``k + 1``
    neighbours then returns own-bag cells first; other-bag hits (bags with ≤ k cells)
    are discarded.
    """
    from scipy.spatial import cKDTree

    n = len(xy)
    if n < 2 or k < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, bag = np.unique(bag, return_inverse=True)
    n_bags = int(bag.max()) + 1
    counts = np.bincount(bag, minlength=n_bags).astype(np.float64)
    centre = np.column_stack([np.bincount(bag, weights=xy[:, d], minlength=n_bags) / counts for d in (0, 1)])
    local = xy - centre[bag]
    reach = float(np.abs(local).max()) if n else 0.0
    # within a bag: distance ≤ 2√2·reach; across bags: ≥ pitch − 2·reach along one axis (> 2√2·reach)
    pitch = 5.0 * reach + 1.0
    side = int(np.ceil(np.sqrt(n_bags)))
    slot = np.column_stack([bag % side, bag // side]).astype(np.float64) * pitch
    placed = local + slot
    kq = min(k + 1, n)
    _, nbr = cKDTree(placed).query(placed, k=kq)
    nbr = nbr.reshape(n, kq)
    rows = np.repeat(np.arange(n), kq).reshape(n, kq)
    valid = nbr < n
    nbr_safe = np.where(valid, nbr, 0)
    ok = valid & (nbr_safe != rows) & (bag[nbr_safe] == bag[rows])
    ok &= np.cumsum(ok, axis=1) <= k
    return rows[ok], nbr_safe[ok]


def within_bag_knn(xy: np.ndarray, bag: np.ndarray, *, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric kNN edges among cells of the same bag: the one graph builder of the package.

    Each cell is linked to its ``k`` nearest cells of its own bag (all of them when the bag has ``k`` or
    fewer other cells); the edges are symmetrised and de-duplicated; no self-edges. Used by
    :func:`cell_graph` and by the model's bags, so a graph written by :func:`cell_graph` is the graph
    the model would build.

    Parameters
    ----------
    xy
        ``(n, 2)`` cell centroids.
    bag
        ``(n,)`` integer bag of each cell (every cell belongs to a bag).
    k
        Neighbours per cell.

    Returns
    -------
    ``(src, dst)`` int64 arrays, both directions of every edge, sorted by ``(src, dst)``.
    """
    n = len(xy)
    src, dst = _knn_edges(np.asarray(xy, dtype=np.float64), np.asarray(bag), int(k))
    lin = np.concatenate([src * n + dst, dst * n + src]).astype(np.int64)
    lin = np.unique(lin)  # sorted, de-duplicated
    return (lin // max(n, 1)).astype(np.int64), (lin % max(n, 1)).astype(np.int64)


def bag_fingerprint(codes: np.ndarray) -> str:
    """Fingerprint of a cell → bag assignment (a stored graph is reused only for the same bags)."""
    from bitro._hashing import arrays_sha256

    return arrays_sha256([np.asarray(codes, dtype=np.int64)])


def cell_graph(
    sdata: sd.SpatialData | ad.AnnData,
    *,
    cells_key: str = K.CELLS,
    bag_key: str = K.SPOT_ID,
    k: int = 8,
    key_added: str = K.SPATIAL,
    overwrite: bool = False,
    inplace: bool = True,
) -> tuple[sparse.csr_matrix, sparse.csr_matrix] | None:
    """Build a kNN graph on cell centroids within each bag (paper §3.3).

    Each cell is linked to its ``k`` nearest cells *of the same bag* (all of them when
    the bag has ``k`` or fewer other cells); the graph is then symmetrised and
    de-duplicated. No self-edges are stored (the model adds self-loops), so a bag of
    one cell, and a cell with no bag (NA), has no edges. One KD-tree serves all bags;
    nothing quadratic in the number of cells is built, so 10⁵–10⁶ cells are fine.

    Parameters
    ----------
    sdata
        Slide, or the cells AnnData itself (which then needs ``uns["bitro_scale"]``).
    cells_key
        Cells table.
    bag_key
        ``cells.obs`` column naming each cell's bag: ``"spot_id"`` (:func:`assign_cells`) or
        ``"patch_id"`` (:func:`make_patches`).
    k
        Neighbours per cell (paper: 8).
    key_added
        Prefix of the outputs; the default gives squidpy's key names.
    overwrite
        Replace existing outputs.
    inplace
        Write into the cells table and return ``None``; ``False``: write nothing and return the
        graph (see :doc:`/contributing`, "Return values and inplace").

    Returns
    -------
    ``None`` when ``inplace``, else ``(connectivities, distances)`` as below. When ``inplace``,
    writes on the cells table

    - ``obsp[f"{key_added}_connectivities"]``: binary symmetric CSR, float32.
    - ``obsp[f"{key_added}_distances"]``: the same edges with their Euclidean length **in µm**
      (pixels × mpp), CSR float32.
    - ``uns[f"{key_added}_neighbors"]``: ``{"connectivities_key", "distances_key", "params"}``, as
      :func:`squidpy.gr.spatial_neighbors` writes it.
    """
    import anndata as ad
    from scipy import sparse

    from bitro.io._build import get_mpp, get_table

    if isinstance(sdata, ad.AnnData):
        cells = sdata
    else:
        cells = get_table(sdata, cells_key, hint=_CELLS_HINT)
    if not isinstance(k, int | np.integer) or k < 1:
        msg = f"k must be a positive integer, got {k!r}."
        raise ValueError(msg)
    conn_key, dist_key, uns_key = (
        f"{key_added}_connectivities",
        f"{key_added}_distances",
        f"{key_added}_neighbors",
    )
    if inplace:
        for key in (conn_key, dist_key):
            check_not_exists(key, cells.obsp, what="obsp key", overwrite=overwrite)
        check_not_exists(uns_key, cells.uns, what="uns key", overwrite=overwrite)
    mpp = get_mpp(sdata if not isinstance(sdata, ad.AnnData) else cells)
    codes = _bag_codes(cells, bag_key)
    xy = _coords(cells, cells_key)
    n = cells.n_obs

    members = np.flatnonzero(codes >= 0)
    src, dst = within_bag_knn(xy[members], codes[members], k=int(k))
    r, c = members[src], members[dst]  # members is increasing: (r, c) stays sorted
    lin = r * n + c
    dist = (np.linalg.norm(xy[r] - xy[c], axis=1) * mpp).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=n))]).astype(np.int64)
    indices = c.astype(np.int32 if n < 2**31 else np.int64)
    connectivities = sparse.csr_matrix((np.ones(len(lin), np.float32), indices, indptr), shape=(n, n))
    distances = sparse.csr_matrix((dist, indices.copy(), indptr.copy()), shape=(n, n))
    if not inplace:
        return connectivities, distances
    cells.obsp[conn_key] = connectivities
    cells.obsp[dist_key] = distances
    params: dict[str, Any] = {
        "n_neighbors": int(k),
        "coord_type": "generic",
        "transform": "none",
        "bag_key": bag_key,
        "within_bags": True,
        "symmetric": True,
        "self_loops": False,
        "distance_unit": "um",
        "mpp": mpp,
    }
    cells.uns[uns_key] = {
        "connectivities_key": conn_key,
        "distances_key": dist_key,
        "params": params,
        "n_edges": int(len(lin) // 2),
        "n_cells_in_bags": len(members),
        "bags_sha256": bag_fingerprint(codes),
        "bitro_version": __version__,
    }
    logger.info(
        "cell_graph: %d undirected edges among %d cells in bags (%d cells without a bag).",
        len(lin) // 2,
        len(members),
        n - len(members),
    )
