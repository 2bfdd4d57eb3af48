"""Prediction: run a trained network on a slide's bags and write units, every cell, and level outputs.

Every segmented cell gets a prediction. The cells under a unit (a spot, or a bulk patch) form that
unit's bag; the other cells — between spots, outside the spot array, or all cells of a slide that has
no spots (a new H&E slide) — are grouped into square bins of the bag's size, which the network reads
like bags but which are written only to the cells. Writing happens after every existing key has been
checked, so a refused overwrite leaves the slide untouched.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import progress, resolve_device
from bitro.io._build import get_mpp, get_scale
from bitro.tl._data import BagSet, batches, cells_of, collate, net_inputs
from bitro.tl._levels import Level, bag_outputs
from bitro.tl._setup import cell_features, encoder_info, make_bags
from bitro.tl._state import ModelState
from bitro.tl._write import write_units_layer

if TYPE_CHECKING:
    import spatialdata as sd

#: Cells per chunk when the per-cell outputs are written (bounds the cells × genes temporaries).
PREDICT_CHUNK = 65_536
#: Prefix of the bins that group the cells outside every unit.
BIN_PREFIX = "bin:"


def check_features(state: ModelState, sdata: sd.SpatialData) -> np.ndarray:
    """The slide's cell features, refused when they come from another encoder or width than training's."""
    setup = state.setup
    x = cell_features(sdata, setup.use_rep, setup.cells_key)
    if x.shape[1] != state.projection.n_features:
        msg = (
            f"cells.obsm[{setup.use_rep!r}] has {x.shape[1]} features but the model was trained on "
            f"{state.projection.n_features} ({state.encoder.get('encoder', 'unknown encoder')}); embed the "
            "cells with the same encoder and mode as the training data."
        )
        raise ValueError(msg)
    info = encoder_info(cells_of(sdata, setup.cells_key), setup.use_rep)
    for key in ("encoder", "mode", "context_um"):
        want, got = state.encoder.get(key), info.get(key)
        if want is not None and got is not None and want != got:
            msg = (
                f"The cells were embedded with {key} {got!r} but the model was trained on {want!r} features; "
                f"re-run bt.pp.embed_cells with {key}={want!r}."
            )
            raise ValueError(msg)
    # None is a value here (the tile pass at the slide's own scale): compare whenever both were embedded by bitro
    if state.encoder.get("encoder") is not None and info.get("encoder") is not None:
        want, got = state.encoder.get("tile_mpp"), info.get("tile_mpp")
        if want != got:
            msg = (
                f"The cells were embedded with tile_mpp {got!r} but the model was trained on tile_mpp {want!r} "
                f"features (another magnification); re-run bt.pp.embed_cells with tile_mpp={want!r}."
            )
            raise ValueError(msg)
    return x


def _with_bins(sdata: sd.SpatialData, level: Level, state: ModelState) -> tuple[Any, pd.Index]:
    """A light view of the slide whose unit table also holds square bins for the cells outside every unit.

    Returns the view (``tables`` and ``attrs``, what :func:`bitro.tl._data.build_bags` reads) and the names
    of the real units.
    """
    import anndata as ad

    setup = state.setup
    units_key, cells_key, bag_key = level.units_key(setup), setup.cells_key, level.bag_key
    cells = cells_of(sdata, cells_key)
    xy = np.asarray(cells.obsm[K.SPATIAL], dtype=np.float64)
    has_units = units_key in sdata.tables and bag_key in cells.obs
    if has_units:
        units = sdata.tables[units_key]
        names, centres = units.obs_names, np.asarray(units.obsm[K.SPATIAL], dtype=np.float64)
        member = cells.obs[bag_key].astype(object).where(cells.obs[bag_key].notna(), None).to_numpy()
    else:
        names, centres = pd.Index([], dtype=str), np.zeros((0, 2))
        member = np.full(cells.n_obs, None, dtype=object)
        why = f"no {units_key!r} table" if units_key not in sdata.tables else f"no cells.obs[{bag_key!r}]"
        logger.info("The slide has %s: every cell is predicted in %s bins.", why, "bag-sized")
    outside = np.array([m is None or (isinstance(m, float) and np.isnan(m)) for m in member])
    bag_um = get_scale(sdata).get(K.SPOT_DIAMETER_UM) or state.bag_size_um
    if bag_um is None:
        msg = (
            "The bag size is unknown: the slide records no spot_diameter_um and the model no training bag "
            "size; record it with bt.io.set_scale(sdata, spot_diameter_um=...)."
        )
        raise ValueError(msg)
    side = float(bag_um) / get_mpp(sdata)
    cell_bin = np.floor(xy[outside] / side).astype(np.int64)
    keys, inverse = np.unique(cell_bin, axis=0, return_inverse=True)
    bin_names = pd.Index([f"{BIN_PREFIX}{i}_{j}" for i, j in keys], dtype=str)
    member = member.copy()
    member[outside] = bin_names.to_numpy()[inverse.ravel()]
    all_names = names.append(bin_names)
    view_units = ad.AnnData(obs=pd.DataFrame(index=all_names))
    view_units.obsm[K.SPATIAL] = np.concatenate([centres, (keys + 0.5) * side])
    view_cells = ad.AnnData(
        obs=pd.DataFrame({bag_key: pd.Categorical(member, categories=all_names)}, index=cells.obs_names)
    )
    view_cells.obsm[K.SPATIAL] = xy
    scale = {**get_scale(sdata), K.SPOT_DIAMETER_UM: float(bag_um)}
    view = SimpleNamespace(tables={units_key: view_units, cells_key: view_cells}, attrs={K.SCALE: scale})
    return view, names


def run_bags(
    state: ModelState, net: Any, level: Level, sdata: sd.SpatialData, *, batch_size: int, device: str | None
) -> tuple[BagSet, np.ndarray, np.ndarray, np.ndarray]:
    """Run the network on every bag and bin of the slide.

    Returns
    -------
    ``(bags, is_unit, z, attn)``: the bags (units, then bins), which of them are real units, ``(B, G)``
    normalised predictions and ``(N, G)`` each cell's share of its bag (cells in ``bags`` order).
    """
    import torch

    x = check_features(state, sdata)
    proj = state.projection.transform(x)
    view, unit_names = _with_bins(sdata, level, state)
    bags, _ = make_bags(
        [view],
        level,
        state.setup,
        [proj],
        [state.phenotypes.predict(proj)],
        pos_bins=state.net_config.pos_bins,
        use_stored_graph=False,
    )
    dev = resolve_device(device)
    net = net.to(dev).eval()
    zs, attn = [], np.zeros((len(bags.features), len(state.genes)), dtype=np.float32)
    try:
        with torch.no_grad():
            for b in progress(
                batches(bags.n_bags, batch_size, shuffle=False), desc="predicting", unit="batch"
            ):
                batch = collate(bags, b, device=dev)
                args, kwargs = net_inputs(batch)
                out = net(*args, **kwargs)
                z, _ = bag_outputs(out, state.transform)
                zs.append(z.cpu().numpy())
                attn[batch["cells"]] = out["attn"].cpu().numpy()
    finally:
        net.cpu()
    is_unit = pd.Index(bags.bag_ids).isin(unit_names)
    return bags, is_unit, np.concatenate(zs).astype(np.float64), attn


def _refuse_existing(
    tables: list[tuple[Any, str]], cells: Any, key_added: str, obsm_key: str, overwrite: bool
) -> None:
    if overwrite:
        return
    for table, what in tables:
        if key_added in table.layers:
            msg = f"{what}.layers[{key_added!r}] already exists; pass overwrite=True or another key_added."
            raise ValueError(msg)
    if obsm_key in cells.obsm:
        msg = f"cells.obsm[{obsm_key!r}] already exists; pass overwrite=True or another key_added."
        raise ValueError(msg)


def write_predictions(
    sdata: sd.SpatialData,
    state: ModelState,
    level: Level,
    bags: BagSet,
    is_unit: np.ndarray,
    z: np.ndarray,
    attn: np.ndarray,
    *,
    key_added: str,
    provenance: dict[str, Any],
    overwrite: bool,
) -> dict[str, np.ndarray]:
    """Write unit, every-cell (and level) outputs; see :meth:`bitro.tl.BiTroModel.predict`."""
    import anndata as ad
    from scipy import sparse

    setup, genes = state.setup, list(state.genes)
    units_key, cells_key = level.units_key(setup), setup.cells_key
    units = sdata.tables.get(units_key) if is_unit.any() else None
    cells = cells_of(sdata, cells_key)
    obsm_key = f"X_{key_added}_expr"
    tables = [*level.output_tables(sdata, setup), *([(units, units_key)] if units is not None else [])]
    _refuse_existing([*tables, (cells, cells_key)], cells, key_added, obsm_key, overwrite)
    if units is not None and units.n_vars and not units.var_names.isin(genes).any():
        logger.warning(
            "None of the model's %d genes (e.g. %s) is in the %s table (genes e.g. %s): its layer %r is all NaN. "
            "The predictions are in cells.obsm[%r] and the returned arrays.",
            len(genes),
            genes[:3],
            units_key,
            list(units.var_names[:3]),
            key_added,
            obsm_key,
        )
    log_bags = state.transform.to_log1p(z)
    counts_bags = state.transform.to_counts(z)
    out: dict[str, np.ndarray] = {}
    if units is not None:
        out["units"] = write_units_layer(
            units,
            bags.bag_ids[is_unit],
            genes,
            log_bags[is_unit],
            key_added=key_added,
            provenance=provenance,
            n_cells=bags.n_cells[is_unit],
            overwrite=overwrite,
        )

    # cells: each cell's share of its bag's counts (cells of a unit sum to it), chunk by chunk so that no
    # further cells x genes temporaries (float64 products, a NaN-padded copy) are held at once
    n_all = cells.n_obs
    if cells.n_vars == 0:
        new = ad.AnnData(
            X=sparse.csr_matrix((n_all, len(genes)), dtype=np.float32),
            obs=cells.obs,
            var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
            obsm=dict(cells.obsm),
            obsp=dict(cells.obsp),
            uns=dict(cells.uns),
            layers={},
        )
        sdata.tables[cells_key] = new
        cells = new
    cell_layer = np.full((n_all, cells.n_vars), np.nan, dtype=np.float32)
    normed = np.full((n_all, len(genes)), np.nan, dtype=np.float32)
    ccols = cells.var_names.get_indexer(genes)
    chave = ccols >= 0
    bag_of_cell = np.repeat(np.arange(bags.n_bags), bags.n_cells)
    for start in range(0, len(bags.cell_obs), PREDICT_CHUNK):
        part = slice(start, start + PREDICT_CHUNK)
        rows = bags.cell_obs[part]
        pseudo = (attn[part] * counts_bags[bag_of_cell[part]]).astype(np.float32)  # (n, G)
        lib = np.nansum(pseudo, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            normed[rows] = np.log1p(np.where(lib > 0, pseudo / lib * 1e4, np.nan))
        cell_layer[np.ix_(rows, ccols[chave])] = np.log1p(pseudo[:, chave])
    cells.layers[key_added] = cell_layer
    cells.obsm[obsm_key] = normed
    in_unit = np.zeros(n_all, dtype=bool)
    in_unit[bags.cell_obs[np.repeat(is_unit, bags.n_cells)]] = True
    cells.obs[f"{key_added}_in_bag"] = in_unit
    cells.uns[key_added] = {**provenance, "genes": genes, "obsm_key": obsm_key}
    out["cells"] = cell_layer
    out.update(
        level.write(
            sdata,
            counts_bags,
            is_unit,
            genes,
            setup,
            key_added=key_added,
            provenance=provenance,
            overwrite=overwrite,
        )
    )
    return out
