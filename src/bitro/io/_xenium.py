"""Reader for 10x Xenium output (through spatialdata-io): cell-resolved truth for cell-level evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro.io._build import polygons_element, set_scale, table_element

if TYPE_CHECKING:
    import spatialdata as sd

XENIUM_PIXEL_SIZE_UM = 0.2125
TRUTH = "cells_truth"


def xenium_to_bitro(raw: sd.SpatialData, *, mpp: float = XENIUM_PIXEL_SIZE_UM, sample_id: str = "xenium"):
    """Convert spatialdata-io's Xenium layout to bitro's.

    spatialdata-io stores cell centroids (``table.obsm["spatial"]``) and ``"cell_boundaries"`` polygons in
    µm. bitro writes table ``"cells_truth"`` (counts in ``X`` and ``layers["counts"]``, centroids in pixels
    of ``mpp`` in ``obsm["spatial"]``) linked to shapes ``"cells_truth_shapes"``; with ``mpp`` = the
    morphology image pixel size (0.2125 µm) the coordinates are those image's pixels.
    """
    import spatialdata as sd
    from scipy import sparse
    from shapely import affinity

    if "table" not in raw.tables:
        msg = f"Xenium data has no 'table' (cell × gene counts); found tables {list(raw.tables)}."
        raise KeyError(msg)
    table = raw.tables["table"].copy()
    if "spatial" not in table.obsm:
        msg = "Xenium table has no obsm['spatial'] cell centroids."
        raise ValueError(msg)
    ids = (
        table.obs["cell_id"].astype(str).to_numpy() if "cell_id" in table.obs else table.obs_names.astype(str)
    )
    table.obs_names = pd.Index(ids, dtype=str)
    counts = table.X if sparse.issparse(table.X) else sparse.csr_matrix(np.asarray(table.X))
    table.X = counts.astype(np.float32)
    table.layers[K.COUNTS_LAYER] = table.X.copy()
    table.obsm[K.SPATIAL] = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2] / mpp
    table.obs = table.obs.drop(columns=[c for c in ("region", K.INSTANCE_KEY) if c in table.obs])
    table.uns.pop("spatialdata_attrs", None)
    shapes = {}
    if "cell_boundaries" in raw.shapes:
        bounds = raw.shapes["cell_boundaries"]
        bounds.index = bounds.index.astype(str)
        missing = pd.Index(ids).difference(bounds.index)
        if len(missing):
            msg = f"{len(missing)} cells of the Xenium table have no boundary polygon (e.g. {list(missing[:3])})."
            raise ValueError(msg)
        geoms = [affinity.scale(g, 1 / mpp, 1 / mpp, origin=(0, 0)) for g in bounds.loc[ids].geometry]
        shapes[K.shapes_key(TRUTH)] = polygons_element(geoms, ids)
        region = K.shapes_key(TRUTH)
    else:
        from bitro.io._build import circles_element

        shapes[K.shapes_key(TRUTH)] = circles_element(table.obsm[K.SPATIAL], 5.0 / mpp, ids)
        region = K.shapes_key(TRUTH)
    sdata = sd.SpatialData(shapes=shapes, tables={TRUTH: table_element(table, region=region)})
    set_scale(sdata, mpp=mpp, technology="Xenium", sample_id=sample_id)
    return sdata


def read_xenium(path: str | Path, *, sample_id: str | None = None, **kwargs) -> sd.SpatialData:
    """Read a Xenium output folder as cell-resolved truth (table ``"cells_truth"``).

    Parameters
    ----------
    path
        Xenium output folder (as written by the instrument).
    sample_id
        Name of the sample (default: folder name).
    **kwargs
        Passed to :func:`spatialdata_io.xenium`.
    """
    import spatialdata_io as sio

    path = Path(path)
    if not path.is_dir():
        msg = f"Xenium folder {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    kwargs.setdefault("cells_as_circles", False)
    raw = sio.xenium(path, **kwargs)
    return xenium_to_bitro(raw, sample_id=sample_id or path.name)
