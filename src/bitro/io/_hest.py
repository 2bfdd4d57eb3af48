"""Reader for the HEST-1k folder layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro.io._build import circles_element, set_scale
from bitro.io._st import check_inside_image, spots_table, validate_counts
from bitro.io._wsi import read_wsi

if TYPE_CHECKING:
    import spatialdata as sd


def _find(
    root: Path, candidates: list[str], what: str, sample_id: str, *, required: bool = True
) -> Path | None:
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    if required:
        msg = (
            f"HEST sample {sample_id!r}: no {what} found under {str(root)!r} (looked for {candidates}). "
            "Check the folder (the HEST-1k layout has st/, wsis/, metadata/) and the sample id."
        )
        raise FileNotFoundError(msg)
    return None


def read_hest(
    root: str | Path,
    sample_id: str,
    *,
    cells: bool = True,
    chunks: int = 1024,
) -> sd.SpatialData:
    """Read one HEST-1k sample.

    Expected layout (as in the HEST-1k download)::

        root/st/{id}.h5ad                        spots × genes raw counts, obsm["spatial"] full-res px
        root/wsis/{id}.tif                       pyramidal TIFF of the H&E
        root/metadata/{id}.json                  pixel_size_um_estimated, spot_diameter, inter_spot_dist (µm)
        root/cellvit_seg/{id}_cellvit_seg.parquet | .geojson   (optional) nucleus polygons

    Parameters
    ----------
    root
        The HEST folder.
    sample_id
        Sample id, e.g. ``"SPA141"``.
    cells
        Import the CellViT segmentation as shapes ``"cells_shapes"`` + table ``"cells"`` when present.
    chunks
        Dask chunk size of the image.
    """
    import anndata as ad

    root = Path(root)
    if not root.is_dir():
        msg = f"HEST folder {str(root)!r} does not exist."
        raise FileNotFoundError(msg)
    st_path = _find(root, [f"st/{sample_id}.h5ad"], "spot table (st/{id}.h5ad)", sample_id)
    wsi_path = _find(root, [f"wsis/{sample_id}.tif", f"wsis/{sample_id}.tiff"], "slide", sample_id)
    meta_path = _find(root, [f"metadata/{sample_id}.json"], "metadata", sample_id)
    meta = json.loads(meta_path.read_text())
    mpp = meta.get("pixel_size_um_estimated") or meta.get("pixel_size_um_embedded")
    if mpp is None:
        msg = f"{meta_path.name} has no pixel_size_um_estimated / pixel_size_um_embedded; cannot place µm scales."
        raise ValueError(msg)
    diameter = float(meta.get("spot_diameter") or 55.0)
    spacing = float(meta.get("inter_spot_dist") or 100.0)

    sdata = read_wsi(wsi_path, mpp=float(mpp), sample_id=sample_id, chunks=chunks)
    adata = ad.read_h5ad(st_path)
    if "spatial" not in adata.obsm:
        msg = f"{st_path.name} has no obsm['spatial'] (full-resolution pixel centres of the spots)."
        raise ValueError(msg)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    counts = validate_counts(
        pd.DataFrame(x, index=adata.obs_names.astype(str), columns=adata.var_names.astype(str)),
        source=st_path.name,
    )
    centres = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    h, w = (
        sdata.images[K.IMAGE]["scale0"]["image"].shape[1:]
        if hasattr(sdata.images[K.IMAGE], "children") and len(sdata.images[K.IMAGE].children)
        else sdata.images[K.IMAGE].shape[1:]
    )
    check_inside_image(centres, (h, w), ids=counts.index, source=sample_id)
    obs = adata.obs.copy()
    obs.index = obs.index.astype(str)
    obs["sample_id"] = pd.Categorical([sample_id] * adata.n_obs)
    sdata.shapes[K.shapes_key(K.SPOTS)] = circles_element(centres, diameter / 2 / float(mpp), counts.index)
    sdata.tables[K.SPOTS] = spots_table(counts, centres, obs=obs)
    set_scale(
        sdata,
        mpp=float(mpp),
        spot_diameter_um=diameter,
        spot_spacing_um=spacing,
        technology=str(meta.get("st_technology", "unknown")),
        sample_id=sample_id,
    )
    if cells:
        seg = _find(
            root,
            [f"cellvit_seg/{sample_id}_cellvit_seg.parquet", f"cellvit_seg/{sample_id}_cellvit_seg.geojson"],
            "CellViT segmentation",
            sample_id,
            required=False,
        )
        if seg is not None:
            from bitro.io._cells import read_cell_segmentation

            read_cell_segmentation(sdata, seg)
        else:
            logger.info("HEST sample %s: no CellViT segmentation found; run bt.pp.segment_cells.", sample_id)
    return sdata
