"""From SpatialData to batched bags of cells (numpy; tensors only at collate time).

A :class:`BagSet` holds the cells of many bags (spots or patches) of one or more
slides, sorted so that each bag's cells are contiguous, with their projected
features, quantised relative positions, phenotype labels and a within-bag kNN
graph. :func:`collate` turns a list of bag indices into the tensors that
:class:`bitro.models.BiTroNet` consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro.io._build import get_mpp, get_scale, get_table
from bitro.pp._graph import within_bag_knn

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd


@dataclass
class BagSet:
    """Cells grouped into bags, ready for batching.

    Attributes
    ----------
    features
        ``(N, D)`` float32 projected cell features, cells sorted by bag.
    pos
        ``(N, 2)`` int64 quantised position of each cell relative to its bag.
    phenotype
        ``(N,)`` int64 phenotype label.
    bag_ptr
        ``(B + 1,)`` offsets: the cells of bag ``b`` are rows ``bag_ptr[b]:bag_ptr[b+1]``.
    edges
        ``(2, E)`` int64 within-bag kNN edges in *local* cell indices, sorted by bag.
    edge_ptr
        ``(B + 1,)`` offsets into ``edges`` per bag.
    bag_ids
        ``(B,)`` unit id of each bag (spot or patch obs name).
    bag_slide
        ``(B,)`` index of the slide each bag comes from.
    cell_obs
        ``(N,)`` row index of each cell in its slide's cells table.
    targets
        ``(B, G)`` float32 normalised targets, or ``None``.
    counts
        ``(B, G)`` float32 observed counts of the bags (likelihood losses), or ``None``.
    ctx_features, ctx_pos, ctx_ptr
        Optional context cells around each bag (``context_um``): features ``(M, D)``, positions
        ``(M, 2)`` and offsets ``(B + 1,)``; the context of bag ``b`` is rows ``ctx_ptr[b]:ctx_ptr[b+1]``.
    bag_group
        ``(B,)`` int64 group of each bag, or ``None`` (every bag its own group): bags of augmented copies
        of one slide (:func:`bitro.pp.augment_slide`) that show the same unit share a group with the
        original, so a validation split can keep the copies of a validation spot out of training.
    """

    features: np.ndarray
    pos: np.ndarray
    phenotype: np.ndarray
    bag_ptr: np.ndarray
    edges: np.ndarray
    edge_ptr: np.ndarray
    bag_ids: np.ndarray
    bag_slide: np.ndarray
    cell_obs: np.ndarray
    targets: np.ndarray | None = None
    counts: np.ndarray | None = None
    slide_names: list[str] = field(default_factory=list)
    ctx_features: np.ndarray | None = None
    ctx_pos: np.ndarray | None = None
    ctx_ptr: np.ndarray | None = None
    bag_group: np.ndarray | None = None

    @property
    def n_bags(self) -> int:
        """Number of bags."""
        return len(self.bag_ptr) - 1

    @property
    def n_cells(self) -> np.ndarray:
        """Cells per bag."""
        return np.diff(self.bag_ptr)

    def subset(self, bags: np.ndarray) -> BagSet:
        """Return a BagSet with only ``bags`` (indices), in that order."""
        bags = np.asarray(bags, dtype=np.int64)
        cell_idx = np.concatenate(
            [np.arange(self.bag_ptr[b], self.bag_ptr[b + 1]) for b in bags] or [np.zeros(0, int)]
        )
        edge_idx = np.concatenate(
            [np.arange(self.edge_ptr[b], self.edge_ptr[b + 1]) for b in bags] or [np.zeros(0, int)]
        )
        n_cells = self.n_cells[bags]
        n_edges = np.diff(self.edge_ptr)[bags]
        ctx = {}
        if self.ctx_ptr is not None:
            ctx_idx = np.concatenate(
                [np.arange(self.ctx_ptr[b], self.ctx_ptr[b + 1]) for b in bags] or [np.zeros(0, int)]
            )
            ctx = {
                "ctx_features": self.ctx_features[ctx_idx],
                "ctx_pos": self.ctx_pos[ctx_idx],
                "ctx_ptr": np.concatenate([[0], np.cumsum(np.diff(self.ctx_ptr)[bags])]),
            }
        return BagSet(
            features=self.features[cell_idx],
            pos=self.pos[cell_idx],
            phenotype=self.phenotype[cell_idx],
            bag_ptr=np.concatenate([[0], np.cumsum(n_cells)]),
            edges=self.edges[:, edge_idx],
            edge_ptr=np.concatenate([[0], np.cumsum(n_edges)]),
            bag_ids=self.bag_ids[bags],
            bag_slide=self.bag_slide[bags],
            cell_obs=self.cell_obs[cell_idx],
            targets=None if self.targets is None else self.targets[bags],
            counts=None if self.counts is None else self.counts[bags],
            slide_names=self.slide_names,
            bag_group=None if self.bag_group is None else self.bag_group[bags],
            **ctx,
        )


def quantise_positions(rel: np.ndarray, n_bins: int) -> np.ndarray:
    """Map relative positions in [0, 1) (per axis) to integer bins ``0..n_bins-1`` (clipped)."""
    return np.clip(np.floor(rel * n_bins), 0, n_bins - 1).astype(np.int64)


def cells_of(sdata: sd.SpatialData, cells_key: str = K.CELLS) -> ad.AnnData:
    """The cells table, with an error that says which steps create it."""
    return get_table(
        sdata,
        cells_key,
        hint="Run bt.pp.segment_cells (or bt.io.read_cell_segmentation) and bt.pp.embed_cells first.",
    )


def build_bags(
    sdatas: list[sd.SpatialData],
    *,
    features: list[np.ndarray],
    phenotypes: list[np.ndarray],
    units_key: str,
    bag_key: str,
    cells_key: str = K.CELLS,
    k: int = 8,
    pos_bins: int = 64,
    bag_size_um: float | None = None,
    context_um: float | None = None,
    graphs: list[tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> tuple[BagSet, list[pd.Index]]:
    """Group the cells of each slide into bags (one per unit of table ``units_key``).

    Parameters
    ----------
    sdatas
        Slides.
    features, phenotypes
        Per slide: projected cell features ``(n_cells, D)`` and phenotype labels ``(n_cells,)``.
    units_key
        Table of the units (``"spots"`` or ``"patches"``); its ``obsm["spatial"]`` holds unit centres.
    bag_key
        Column of the cells table naming each cell's unit (``"spot_id"`` or ``"patch_id"``).
    k
        Neighbours per cell in the within-bag graph.
    pos_bins
        Bins of the position tables.
    bag_size_um
        Physical width of a bag (spot diameter or patch side) for the relative positions;
        default: the recorded ``spot_diameter_um``.
    context_um
        Also collect, for every bag, the cells within this distance outside it (a ring around a spot,
        a border around a patch) as context tokens; positions are then quantised over the bag plus
        its ring.
    graphs
        Per slide, a within-bag kNN graph already built for exactly these bags (``(src, dst)`` rows of
        the cells table, e.g. from :func:`bitro.pp.cell_graph`), or ``None`` to build it here with
        :func:`bitro.pp._graph.within_bag_knn` (the same builder, so both give the same edges).

    Returns
    -------
    The BagSet (empty units are skipped) and, per slide, the unit names in table order.
    """
    parts: dict[str, list] = {
        k_: []
        for k_ in (
            "feat",
            "pos",
            "pheno",
            "ncell",
            "edges",
            "nedge",
            "ids",
            "slide",
            "obs",
            "source",
            "cfeat",
            "cpos",
            "cn",
        )
    }
    unit_names = []
    slide_names = []
    for s, sdata in enumerate(sdatas):
        cells = cells_of(sdata, cells_key)
        units = get_table(sdata, units_key)
        unit_names.append(units.obs_names)
        slide_names.append(str(get_scale(sdata).get("sample_id", f"slide{s}")))
        if bag_key not in cells.obs:
            fn = "bt.pp.assign_cells" if bag_key == K.SPOT_ID else "bt.pp.make_patches"
            msg = f"cells.obs[{bag_key!r}] is missing: run {fn} first so each cell knows its bag."
            raise KeyError(msg)
        mpp = get_mpp(sdata)
        size_um = bag_size_um or get_scale(sdata).get(K.SPOT_DIAMETER_UM)
        if size_um is None:
            msg = "The bag size in µm is unknown: pass bag_size_um= or record spot_diameter_um with bt.io.set_scale."
            raise ValueError(msg)
        size_px = float(size_um) / mpp
        member = pd.Categorical(cells.obs[bag_key].astype("object"), categories=units.obs_names)
        codes = np.asarray(member.codes, dtype=np.int64)
        inside = np.flatnonzero(codes >= 0)
        order = inside[np.argsort(codes[inside], kind="stable")]
        bag_of = codes[order]
        counts = np.bincount(bag_of, minlength=units.n_obs)
        nonempty = np.flatnonzero(counts > 0)
        n_empty = units.n_obs - len(nonempty)
        if n_empty:
            logger.info(
                "%s: %d of %d %s have no cells and get no bag.",
                slide_names[-1],
                n_empty,
                units.n_obs,
                units_key,
            )
        xy_all = np.asarray(cells.obsm[K.SPATIAL], dtype=np.float64)
        xy = xy_all[order]
        centres = np.asarray(units.obsm[K.SPATIAL], dtype=np.float64)[bag_of]
        window_px = size_px + (2 * float(context_um) / mpp if context_um else 0.0)
        rel = (xy - centres) / window_px + 0.5
        if context_um:
            from scipy.spatial import cKDTree

            unit_xy = np.asarray(units.obsm[K.SPATIAL], dtype=np.float64)[nonempty]
            hits = cKDTree(xy_all).query_ball_point(unit_xy, r=size_px / 2 + float(context_um) / mpp)
            feat_s = np.asarray(features[s], dtype=np.float32)
            for u, cand in zip(nonempty, hits):
                cand = np.asarray(cand, dtype=np.int64)
                cand = cand[codes[cand] != u]
                parts["cfeat"].append(feat_s[cand])
                parts["cpos"].append(
                    quantise_positions((xy_all[cand] - units.obsm[K.SPATIAL][u]) / window_px + 0.5, pos_bins)
                )
                parts["cn"].append(len(cand))
        graph = graphs[s] if graphs is not None else None
        if graph is not None:  # the stored graph, in positions of the bag-sorted cells
            pos = np.full(cells.n_obs, -1, dtype=np.int64)
            pos[order] = np.arange(len(order))
            ps, pt = pos[graph[0]], pos[graph[1]]
            keep = (ps >= 0) & (pt >= 0)
            m = max(len(order), 1)
            lin = np.unique(ps[keep] * m + pt[keep])
            src, dst = lin // m, lin % m
        else:
            src, dst = within_bag_knn(xy, bag_of, k=k)
        # local indices within each bag
        start = np.concatenate([[0], np.cumsum(counts)])[:-1]
        eb = bag_of[src]
        sort = np.argsort(eb, kind="stable")
        src, dst, eb = src[sort], dst[sort], eb[sort]
        local = np.stack([src - start[eb], dst - start[eb]])
        parts["feat"].append(np.asarray(features[s], dtype=np.float32)[order])
        parts["pos"].append(quantise_positions(rel, pos_bins))
        parts["pheno"].append(np.asarray(phenotypes[s], dtype=np.int64)[order])
        parts["ncell"].append(counts[nonempty])
        parts["edges"].append(local)
        parts["nedge"].append(np.bincount(eb, minlength=units.n_obs)[nonempty])
        parts["ids"].append(units.obs_names.to_numpy()[nonempty])
        parts["slide"].append(np.full(len(nonempty), s, dtype=np.int64))
        parts["obs"].append(order)
        parts["source"].append(
            np.full(len(nonempty), source_sample(sdata, units, slide_names[-1]), dtype=object)
        )
    ncell = np.concatenate(parts["ncell"])
    nedge = np.concatenate(parts["nedge"])
    bags = BagSet(
        features=np.concatenate(parts["feat"]),
        pos=np.concatenate(parts["pos"]),
        phenotype=np.concatenate(parts["pheno"]),
        bag_ptr=np.concatenate([[0], np.cumsum(ncell)]).astype(np.int64),
        edges=np.concatenate(parts["edges"], axis=1).astype(np.int64),
        edge_ptr=np.concatenate([[0], np.cumsum(nedge)]).astype(np.int64),
        bag_ids=np.concatenate(parts["ids"]).astype(str),
        bag_slide=np.concatenate(parts["slide"]),
        cell_obs=np.concatenate(parts["obs"]).astype(np.int64),
        slide_names=slide_names,
    )
    # a unit shown by several slides (augmented copies of one source) is one group
    source = np.concatenate(parts["source"]) if parts["source"] else np.zeros(0, dtype=object)
    bags.bag_group = unit_groups(source, bags.bag_ids)
    if context_um:
        d = parts["feat"][0].shape[1]
        bags.ctx_features = np.concatenate(parts["cfeat"]) if parts["cfeat"] else np.zeros((0, d), np.float32)
        bags.ctx_pos = np.concatenate(parts["cpos"]) if parts["cpos"] else np.zeros((0, 2), np.int64)
        bags.ctx_ptr = np.concatenate([[0], np.cumsum(parts["cn"])]).astype(np.int64)
    if bags.n_bags == 0:
        msg = f"No {units_key} contain any cell: check that cells and {units_key} share coordinates (run bt.pp.assign_cells)."
        raise ValueError(msg)
    return bags, unit_names


def validation_groups(group: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean validation mask over units drawn by ``group``: a ``fraction`` of the groups, all their units.

    ``group``: ``(n,)`` integer group of each unit, ``0 .. n_groups - 1`` (the augmented copies of one
    source spot share a group; ``np.arange(n)`` draws units one by one). At least one group goes to
    validation when ``fraction > 0`` and there are two or more. The draw is ``rng.permutation(n_groups)``.
    """
    group = np.asarray(group, dtype=np.int64)
    n = int(group.max()) + 1 if len(group) else 0
    n_val = round(fraction * n)
    if fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    is_val = np.zeros(n, dtype=bool)
    is_val[rng.permutation(n)[:n_val]] = True
    return is_val[group]


def unit_groups(sources: np.ndarray, unit_ids: np.ndarray) -> np.ndarray:
    """``(n,)`` group of each unit: units with the same source sample and id (augmented copies) share one."""
    key = pd.Series(np.asarray(sources).astype(str)) + "\x00" + pd.Series(np.asarray(unit_ids).astype(str))
    return pd.factorize(key)[0].astype(np.int64)


def source_sample(sdata: sd.SpatialData, units: Any, sample_id: str) -> str:
    """The sample a slide's units come from: the source of an augmented copy, else its own sample id.

    :func:`bitro.pp.augment_slide` records ``source_sample_id`` in ``attrs["bitro_augment"]`` (and in the
    kept tables' ``uns``); augmenting a copy again appends, so the first record names the original.
    """
    records = sdata.attrs.get(K.AUGMENT) or units.uns.get(K.AUGMENT) or []
    if len(records) and isinstance(records[0], dict) and records[0].get("source_sample_id"):
        return str(records[0]["source_sample_id"])
    return sample_id


def collate(bags: BagSet, index: np.ndarray, *, device: Any = "cpu") -> dict[str, Any]:
    """Tensors for the bags ``index``: one disjoint graph, cells sorted by bag.

    Returns a dict with ``x`` (N, D), ``batch`` (N,), ``edge_index`` (2, E), ``pos`` (N, 2),
    ``phenotype`` (N,), ``cells`` (N,) positions into ``bags``' cell arrays, and ``y`` (B, G) when
    targets exist.
    """
    import torch

    index = np.asarray(index, dtype=np.int64)
    starts, ends = bags.bag_ptr[index], bags.bag_ptr[index + 1]
    n = ends - starts
    offs = np.concatenate([[0], np.cumsum(n)])
    cells = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
    e_parts = [bags.edges[:, bags.edge_ptr[b] : bags.edge_ptr[b + 1]] + offs[i] for i, b in enumerate(index)]
    edge_index = np.concatenate(e_parts, axis=1) if e_parts else np.zeros((2, 0), np.int64)
    out = {
        "x": torch.from_numpy(bags.features[cells]).to(device),
        "batch": torch.from_numpy(np.repeat(np.arange(len(index)), n)).to(device),
        "edge_index": torch.from_numpy(edge_index).to(device),
        "pos": torch.from_numpy(bags.pos[cells]).to(device),
        "phenotype": torch.from_numpy(bags.phenotype[cells]).to(device),
        "cells": cells,
    }
    if bags.targets is not None:
        out["y"] = torch.from_numpy(bags.targets[index]).to(device)
    if bags.counts is not None:
        out["counts"] = torch.from_numpy(bags.counts[index]).to(device)
    if bags.ctx_ptr is not None:
        cs, ce = bags.ctx_ptr[index], bags.ctx_ptr[index + 1]
        ctx = np.concatenate([np.arange(a, b) for a, b in zip(cs, ce)]) if len(index) else np.zeros(0, int)
        out["ctx_x"] = torch.from_numpy(bags.ctx_features[ctx]).to(device)
        out["ctx_pos"] = torch.from_numpy(bags.ctx_pos[ctx]).to(device)
        out["ctx_batch"] = torch.from_numpy(np.repeat(np.arange(len(index)), ce - cs)).to(device)
    return out


def net_inputs(batch: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Positional and keyword arguments of :class:`bitro.models.BiTroNet` from a collated batch."""
    kwargs = {k: batch[k] for k in ("ctx_x", "ctx_batch", "ctx_pos") if k in batch}
    return (batch["x"], batch["batch"], batch["edge_index"], batch["pos"]), kwargs


def batches(
    n: int, batch_size: int, *, shuffle: bool, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Split ``range(n)`` into batches (shuffled with ``rng`` when asked)."""
    order = rng.permutation(n) if shuffle and rng is not None else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]
