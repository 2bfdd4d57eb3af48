"""The heterogeneous graph of one slide and its exemplars (``torch_geometric.data.HeteroData``).

:func:`build_hetero_graph` turns a slide's spots and their retrieved exemplars into the graph
:class:`bitro.models.SpaHGCNet` reads (node and edge types are named in :mod:`bitro.models._spahgc`):

- ``target`` nodes: the slide's spots, ``x`` = their features; ``spot`` = their row in the spot table.
- ``reference`` nodes: one per (target, exemplar) pair, ``x`` = ``[exemplar features ‖ exemplar
  expression]``; ``target`` = the target they serve, ``bank_row`` = their row in the exemplar index.
- ``("target", "near", "target")``: each spot and its nearest spots within ``radius_um`` (at most
  ``max_neighbours``), made symmetric; no self-loops.
- ``("reference", "exemplar_of", "target")``: every exemplar to its target, with ``similarity``.
- ``("reference", "similar", "reference")``: each exemplar from its ``reference_k`` most similar
  exemplars of the same target (cosine of their features).

A target's exemplars are its own nodes, so everything a target's prediction depends on after ``L``
layers is its ``L``-hop spatial neighbourhood and those spots' exemplars: :meth:`SlideGraph.batch`
cuts exactly that out, and a prediction made in batches equals the whole-slide one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro.tl._exemplars import unit_rows

if TYPE_CHECKING:
    from bitro.tl._exemplars import ExemplarIndex, Exemplars


def spatial_edges(xy: np.ndarray, *, radius: float, max_neighbours: int) -> np.ndarray:
    """``(2, E)`` symmetric edges between points closer than ``radius`` (each to its nearest ``max_neighbours``)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if n < 2:
        return np.zeros((2, 0), dtype=np.int64)
    k = min(max_neighbours + 1, n)
    dist, idx = cKDTree(xy).query(xy, k=k, distance_upper_bound=radius)
    dst = np.repeat(np.arange(n), k)
    src = idx.ravel()
    ok = (src < n) & (src != dst) & np.isfinite(dist.ravel())
    pairs = np.concatenate([np.stack([src[ok], dst[ok]]), np.stack([dst[ok], src[ok]])], axis=1)
    pairs = np.unique(pairs, axis=1) if pairs.size else pairs
    return pairs.astype(np.int64)


def reference_edges(vectors: np.ndarray, reference_k: int) -> np.ndarray:
    """``(2, E)`` edges among each target's exemplars: node ``t·k + r`` from its ``reference_k`` most similar.

    ``vectors``: ``(T, k, d)`` exemplar features. With ``k = 1`` there are no edges.
    """
    t, k, d = vectors.shape
    kk = min(reference_k, k - 1)
    if kk < 1:
        return np.zeros((2, 0), dtype=np.int64)
    u = unit_rows(vectors.reshape(-1, d)).reshape(t, k, d)
    sim = np.einsum("tkd,tld->tkl", u, u)
    sim[:, np.arange(k), np.arange(k)] = -np.inf
    # most similar first; ties in exemplar order
    nearest = np.argsort(-sim, axis=2, kind="stable")[:, :, :kk]
    dst = np.broadcast_to((np.arange(t)[:, None] * k + np.arange(k))[:, :, None], nearest.shape)
    src = np.arange(t)[:, None, None] * k + nearest
    return np.stack([src.ravel(), dst.ravel()]).astype(np.int64)


@dataclass
class SlideGraph:
    """A slide's heterogeneous graph and what batching needs.

    Attributes
    ----------
    data
        The :class:`~torch_geometric.data.HeteroData`.
    neighbours
        CSR adjacency (scipy) of the spatial target–target edges.
    k
        Exemplars per target (0 without reference nodes).
    """

    data: Any
    neighbours: Any
    k: int

    @property
    def n_targets(self) -> int:
        """Number of target spots."""
        return int(self.data["target"].num_nodes)

    def closure(self, seeds: np.ndarray, hops: int) -> np.ndarray:
        """The sorted target nodes within ``hops`` spatial hops of ``seeds``."""
        mask = np.zeros(self.n_targets, dtype=bool)
        mask[seeds] = True
        frontier = mask.copy()
        for _ in range(hops):
            reached = self.neighbours[np.flatnonzero(frontier)].indices
            frontier = np.zeros_like(mask)
            frontier[reached] = True
            frontier &= ~mask
            if not frontier.any():
                break
            mask |= frontier
        return np.flatnonzero(mask)

    def batch(self, seeds: np.ndarray, hops: int) -> tuple[Any, np.ndarray]:
        """The subgraph every output of ``seeds`` depends on after ``hops`` layers, and the seeds' positions in it."""
        import torch

        seeds = np.asarray(seeds, dtype=np.int64)
        targets = self.closure(seeds, hops)
        subset = {"target": torch.as_tensor(targets)}
        if self.k:
            refs = (targets[:, None] * self.k + np.arange(self.k)).ravel()
            subset["reference"] = torch.as_tensor(refs)
        return self.data.subgraph(subset), np.searchsorted(targets, seeds)


def build_hetero_graph(
    x: np.ndarray,
    xy_um: np.ndarray,
    *,
    exemplars: Exemplars | None,
    index: ExemplarIndex | None,
    radius_um: float,
    max_neighbours: int,
    reference_k: int,
) -> SlideGraph:
    """Build the graph of one slide's spots.

    Parameters
    ----------
    x
        ``(T, d)`` target spot features.
    xy_um
        ``(T, 2)`` spot centres in µm.
    exemplars
        The spots' exemplars (:meth:`~bitro.tl.ExemplarIndex.query`), or ``None`` for a graph of
        target nodes only (the no-exemplar ablation).
    index
        The index the exemplars come from; its ``vectors`` and ``values`` (normalised expression)
        make the reference features.
    radius_um, max_neighbours
        Spatial neighbours: closer than ``radius_um``, at most ``max_neighbours`` nearest.
    reference_k
        Reference–reference links per exemplar.
    """
    import scipy.sparse as sp
    import torch
    from torch_geometric.data import HeteroData

    from bitro.models._spahgc import EXEMPLAR_EDGE, REFERENCE_EDGE, SPATIAL_EDGE

    x = np.asarray(x, dtype=np.float32)
    t = len(x)
    data = HeteroData()
    data["target"].x = torch.as_tensor(x)
    data["target"].spot = torch.arange(t)
    near = spatial_edges(xy_um, radius=radius_um, max_neighbours=max_neighbours)
    data[SPATIAL_EDGE].edge_index = torch.as_tensor(near)
    csr = sp.csr_matrix((np.ones(near.shape[1], dtype=bool), (near[1], near[0])), shape=(t, t))
    if exemplars is None:
        return SlideGraph(data, csr, 0)
    if index is None or index.values is None:
        msg = "build_hetero_graph needs the exemplar index with values (the exemplars' expression)."
        raise ValueError(msg)
    if exemplars.index.shape[0] != t:
        msg = f"{exemplars.index.shape[0]} exemplar rows for {t} target spots; query the index with these spots."
        raise ValueError(msg)
    k = exemplars.k
    rows = exemplars.index.ravel()
    feats = index.vectors[rows]
    data["reference"].x = torch.as_tensor(np.concatenate([feats, index.values[rows]], axis=1))
    data["reference"].target = torch.as_tensor(np.repeat(np.arange(t), k))
    data["reference"].bank_row = torch.as_tensor(rows)
    data[EXEMPLAR_EDGE].edge_index = torch.as_tensor(np.stack([np.arange(t * k), np.repeat(np.arange(t), k)]))
    data[EXEMPLAR_EDGE].similarity = torch.as_tensor(exemplars.similarity.ravel().astype(np.float32))
    data[REFERENCE_EDGE].edge_index = torch.as_tensor(reference_edges(feats.reshape(t, k, -1), reference_k))
    return SlideGraph(data, csr, k)
