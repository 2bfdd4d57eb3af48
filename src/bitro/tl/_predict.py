"""Prediction: run a trained network on a slide's bags and write units, pseudo-cells and level outputs.

The network runs on every bag of the slide (batches of bags as one disjoint graph). Writing happens
after every existing key has been checked, so a refused overwrite leaves the slide untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro._logging import logger
from bitro._settings import progress, resolve_device
from bitro.io._build import get_table
from bitro.tl._data import BagSet, batches, cells_of, collate, net_inputs
from bitro.tl._levels import Level
from bitro.tl._setup import cell_features, encoder_info, make_bags
from bitro.tl._state import ModelState
from bitro.tl._write import write_units_layer

if TYPE_CHECKING:
    import spatialdata as sd

#: Cells per chunk when the per-cell outputs are written (bounds the cells × genes temporaries).
PREDICT_CHUNK = 65_536


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
    for key in ("encoder", "mode"):
        want, got = state.encoder.get(key), info.get(key)
        if want is not None and got is not None and want != got:
            msg = (
                f"The cells were embedded with {key} {got!r} but the model was trained on {want!r} features; "
                f"re-run bt.pp.embed_cells with {key}={want!r}."
            )
            raise ValueError(msg)
    return x


def run_bags(
    state: ModelState, net: Any, level: Level, sdata: sd.SpatialData, *, batch_size: int, device: str | None
) -> tuple[BagSet, np.ndarray, np.ndarray]:
    """``(bags, z, attn)``: the slide's bags, ``(B, G)`` normalised predictions, ``(N, G)`` cell attention."""
    import torch

    x = check_features(state, sdata)
    proj = state.projection.transform(x)
    bags, _ = make_bags(
        [sdata],
        level,
        state.setup,
        [proj],
        [state.phenotypes.predict(proj)],
        pos_bins=state.net_config.pos_bins,
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
                zs.append(out["y"].cpu().numpy())
                attn[batch["cells"]] = out["attn"].cpu().numpy()
    finally:
        net.cpu()
    return bags, np.concatenate(zs).astype(np.float64), attn


def _refuse_existing(tables: list[tuple[Any, str]], key_added: str, obsm_key: str, overwrite: bool) -> None:
    if overwrite:
        return
    for table, what in tables:
        if key_added in table.layers:
            msg = f"{what}.layers[{key_added!r}] already exists; pass overwrite=True or another key_added."
            raise ValueError(msg)
    cells = tables[-1][0]
    if obsm_key in cells.obsm:
        msg = f"cells.obsm[{obsm_key!r}] already exists; pass overwrite=True or another key_added."
        raise ValueError(msg)


def write_predictions(
    sdata: sd.SpatialData,
    state: ModelState,
    level: Level,
    bags: BagSet,
    z: np.ndarray,
    attn: np.ndarray,
    *,
    key_added: str,
    provenance: dict[str, Any],
    overwrite: bool,
) -> dict[str, np.ndarray]:
    """Write unit, pseudo-cell (and level) outputs; see :meth:`bitro.tl.BiTroModel.predict`."""
    import anndata as ad
    from scipy import sparse

    setup, genes = state.setup, list(state.genes)
    units_key, cells_key = level.units_key(setup), setup.cells_key
    units = get_table(sdata, units_key)
    cells = cells_of(sdata, cells_key)
    obsm_key = f"X_{key_added}_expr"
    extra = level.output_tables(sdata, setup)
    _refuse_existing([*extra, (units, units_key), (cells, cells_key)], key_added, obsm_key, overwrite)
    if not units.var_names.isin(genes).any() and units.n_vars:
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
    log_units = state.transform.to_log1p(z)
    counts_units = state.transform.to_counts(z)
    out = {
        "units": write_units_layer(
            units,
            bags.bag_ids,
            genes,
            log_units,
            key_added=key_added,
            provenance=provenance,
            n_cells=bags.n_cells,
            overwrite=overwrite,
        )
    }

    # cells: pseudo single-cell expression in count space (Eq. 10), chunk by chunk so that no further
    # cells x genes temporaries (float64 products, a NaN-padded copy) are held at once
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
    normed = np.full((n_all, len(genes)), np.nan, dtype=np.float32)  # NaN outside every bag
    ccols = cells.var_names.get_indexer(genes)
    chave = ccols >= 0
    bag_of_cell = np.repeat(np.arange(bags.n_bags), bags.n_cells)
    for start in range(0, len(bags.cell_obs), PREDICT_CHUNK):
        part = slice(start, start + PREDICT_CHUNK)
        rows = bags.cell_obs[part]
        pseudo = (attn[part] * counts_units[bag_of_cell[part]]).astype(np.float32)  # (n, G)
        lib = np.nansum(pseudo, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            normed[rows] = np.log1p(np.where(lib > 0, pseudo / lib * 1e4, np.nan))
        cell_layer[np.ix_(rows, ccols[chave])] = np.log1p(pseudo[:, chave])
    cells.layers[key_added] = cell_layer
    cells.obsm[obsm_key] = normed
    in_bag = np.zeros(n_all, dtype=bool)
    in_bag[bags.cell_obs] = True
    cells.obs[f"{key_added}_in_bag"] = in_bag
    cells.uns[key_added] = {**provenance, "genes": genes, "obsm_key": obsm_key}
    out["cells"] = cell_layer
    out.update(
        level.write(
            sdata, counts_units, genes, setup, key_added=key_added, provenance=provenance, overwrite=overwrite
        )
    )
    return out
