"""Reader for 10x Visium Space Ranger output (through spatialdata-io)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro.io._build import circles_element, image_element, set_scale
from bitro.io._image import read_image_file
from bitro.io._st import check_inside_image, spots_table, validate_counts

if TYPE_CHECKING:
    import spatialdata as sd

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_SPOT_SPACING_UM = 100.0


def read_visium(
    path: str | Path,
    *,
    fullres_image: str | Path | None = None,
    only_in_tissue: bool = True,
    sample_id: str | None = None,
    chunks: int = 1024,
) -> sd.SpatialData:
    """Read a Space Ranger output folder.

    The image ``"he"`` is the full-resolution image when given, else ``spatial/tissue_hires_image.png``,
    else the low-resolution PNG; spot centres and the µm/px are expressed in the pixels of that image
    (µm/px from the 55 µm spot diameter and ``spot_diameter_fullres``).

    Parameters
    ----------
    path
        Space Ranger ``outs`` folder (``filtered_feature_bc_matrix.h5`` and ``spatial/``).
    fullres_image
        The full-resolution H&E used for Space Ranger, if available.
    only_in_tissue
        Keep spots under tissue only.
    sample_id
        Name of the sample (default: folder name).
    chunks
        Dask chunk size of the image.
    """
    import spatialdata as sd
    import spatialdata_io as sio

    path = Path(path)
    scale_json = path / "spatial" / "scalefactors_json.json"
    if not scale_json.is_file():
        msg = f"{str(path)!r} is not a Space Ranger folder: {scale_json} is missing."
        raise FileNotFoundError(msg)
    sample_id = sample_id or path.name
    factors = json.loads(scale_json.read_text())
    raw = sio.visium(path, dataset_id=sample_id)
    table = raw.tables["table"]
    if only_in_tissue and "in_tissue" in table.obs:
        table = table[table.obs["in_tissue"].astype(int) == 1].copy()
    if fullres_image is not None:
        image, factor = read_image_file(fullres_image), 1.0
    elif (path / "spatial" / "tissue_hires_image.png").is_file():
        image, factor = (
            read_image_file(path / "spatial" / "tissue_hires_image.png"),
            factors["tissue_hires_scalef"],
        )
    else:
        image, factor = (
            read_image_file(path / "spatial" / "tissue_lowres_image.png"),
            factors["tissue_lowres_scalef"],
        )
    mpp = VISIUM_SPOT_DIAMETER_UM / float(factors["spot_diameter_fullres"]) / factor
    centres = np.asarray(table.obsm["spatial"], dtype=np.float64) * factor
    x = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
    table.var_names_make_unique()
    counts = validate_counts(
        pd.DataFrame(x, index=table.obs_names.astype(str), columns=table.var_names.astype(str)),
        source=str(path),
    )
    check_inside_image(centres, image.shape[:2], ids=counts.index, source=sample_id)
    obs = pd.DataFrame(
        {
            "array_row": table.obs["array_row"].to_numpy(int),
            "array_col": table.obs["array_col"].to_numpy(int),
            "sample_id": pd.Categorical([sample_id] * table.n_obs),
        },
        index=counts.index,
    )
    spots = spots_table(counts, centres, obs=obs)
    spots.var = spots.var.join(table.var.set_index(table.var_names.astype(str)), how="left")
    sdata = sd.SpatialData(
        images={K.IMAGE: image_element(image, dims=("y", "x", "c"), chunks=chunks)},
        shapes={
            K.shapes_key(K.SPOTS): circles_element(centres, VISIUM_SPOT_DIAMETER_UM / 2 / mpp, counts.index)
        },
        tables={K.SPOTS: spots},
    )
    set_scale(
        sdata,
        mpp=mpp,
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
        spot_spacing_um=VISIUM_SPOT_SPACING_UM,
        technology="Visium",
        sample_id=sample_id,
    )
    return sdata
