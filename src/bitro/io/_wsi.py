"""Reader for whole-slide images (SVS / pyramidal TIFF), lazily as a multiscale image."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro.io._build import image_element, set_scale
from bitro.io._image import PLAIN_SUFFIXES, read_image_file, to_uint8, uint8_factor

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd


def _mpp_from_tiff(tif: Any) -> float | None:
    """µm per pixel from Aperio metadata or TIFF resolution tags, when recorded."""
    page = tif.pages[0]
    desc = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    if match:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num > 0 and den > 0 and unit in (2, 3):
            px_per_unit = num / den
            um_per_unit = 25_400.0 if unit == 2 else 10_000.0
            mpp = um_per_unit / px_per_unit
            if 0.05 < mpp < 50:  # ignore the 72-dpi default written by generic tools
                return float(mpp)
    return None


def _open_levels(path: Path) -> tuple[list[Any], float | None]:
    """Open the pyramid levels of a TIFF-like slide as dask arrays ``(y, x, 3)``."""
    import dask.array as da
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            n_levels = len(series.levels)
            mpp = _mpp_from_tiff(tif)
            shape0 = series.levels[0].shape
    except Exception as err:
        msg = (
            f"Could not open whole-slide file {str(path)!r} ({type(err).__name__}: {err}). The file is corrupt, "
            "truncated or not a TIFF/SVS slide; re-download or re-export it."
        )
        raise ValueError(msg) from err
    if len(shape0) != 3 or shape0[-1] not in (3, 4):
        msg = f"Slide {path.name!r} has level-0 shape {shape0}; expected an RGB(A) image (y, x, 3|4)."
        raise ValueError(msg)
    levels = []
    for level in range(n_levels):
        store = tifffile.imread(path, aszarr=True, series=0, level=level)
        arr = da.from_zarr(zarr.open(store, mode="r"))
        levels.append(arr[..., :3])
    if levels[0].dtype != np.uint8:  # e.g. 16-bit scans: one rule for all levels, from the smallest
        factor = uint8_factor(levels[-1].compute(), source=f"Slide {path.name!r}")
        levels = [to_uint8(arr, factor) for arr in levels]
    return levels, mpp


def _check_slide_path(path: Path) -> None:
    """Refuse a missing path, or a folder, with what to pass instead."""
    if path.is_dir():
        if any((path / f).exists() for f in ("zarr.json", ".zgroup")):
            hint = "it is a zarr store: read it with bt.io.read_zarr"
        elif (path / "spatial").is_dir():
            hint = "it looks like a Space Ranger folder: read it with bt.io.read_visium"
        else:
            hint = "pass the slide file inside it (e.g. .svs, .tif, .ndpi) instead"
        msg = f"Slide {str(path)!r} is a folder, not a whole-slide image file; {hint}."
        raise ValueError(msg)
    if not path.is_file():
        msg = f"Slide file {str(path)!r} does not exist."
        raise FileNotFoundError(msg)


def _multiscale(levels: list[Any], chunks: int):
    """Assemble stored pyramid levels into a spatialdata multiscale image (DataTree)."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    h0, w0 = levels[0].shape[:2]
    tree = {}
    for i, arr in enumerate(levels):
        arr = arr.transpose(2, 0, 1).rechunk((3, chunks, chunks))
        data = xr.DataArray(arr, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})
        h, w = arr.shape[1:]
        tf = Identity() if i == 0 else Scale([h0 / h, w0 / w], axes=("y", "x"))
        data.attrs["transform"] = {K.CS: tf}
        tree[f"scale{i}"] = xr.Dataset({"image": data})
    dt = xr.DataTree.from_dict(tree)
    Image2DModel().validate(dt)
    return dt


def bulk_table(bulk: Any, *, sample_id: str) -> ad.AnnData:
    """One-row bulk table: TPM in ``X`` (and raw counts in ``layers["counts"]`` when given counts).

    ``bulk`` may be a pandas Series (genes → values, TPM) or a one-row AnnData (its ``X`` is TPM; a
    ``"counts"`` layer is kept).
    """
    import anndata as ad
    from spatialdata.models import TableModel

    if isinstance(bulk, pd.Series):
        values = pd.to_numeric(bulk, errors="coerce")
        if values.isna().any():
            msg = f"bulk has {int(values.isna().sum())} missing or non-numeric values; fill or drop those genes."
            raise ValueError(msg)
        if bulk.index.duplicated().any():
            msg = f"bulk has duplicate gene names (e.g. {list(bulk.index[bulk.index.duplicated()][:3])})."
            raise ValueError(msg)
        adata = ad.AnnData(
            X=values.to_numpy(np.float32)[None, :],
            obs=pd.DataFrame(index=[sample_id]),
            var=pd.DataFrame(index=bulk.index.astype(str)),
        )
    elif isinstance(bulk, ad.AnnData):
        if bulk.n_obs != 1:
            msg = f"bulk AnnData must have exactly one row (this slide), got {bulk.n_obs}."
            raise ValueError(msg)
        adata = bulk.copy()
    else:
        msg = f"bulk must be a pandas Series (gene → TPM) or a one-row AnnData, got {type(bulk).__name__}."
        raise TypeError(msg)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    if (x < 0).any():
        msg = "bulk expression has negative values; pass TPM or counts (non-negative)."
        raise ValueError(msg)
    return TableModel.parse(adata)


def read_wsi(
    path: str | Path,
    *,
    bulk: Any = None,
    mpp: float | None = None,
    sample_id: str | None = None,
    chunks: int = 1024,
    min_pyramid_size: int = 4096,
) -> sd.SpatialData:
    """Open a whole slide (SVS / pyramidal TIFF) lazily as a multiscale image ``"he"``.

    Slides stored with more than 8 bits per channel (or as floats) are converted to 8-bit RGB by the
    rule of :mod:`bitro.io._image` (16-bit by the bit depth their values use, decided from the
    smallest pyramid level), lazily, with a logged warning.

    Parameters
    ----------
    path
        Slide file. Pixels are read lazily through tifffile + dask; nothing is loaded up front. A
        plain PNG or JPEG image is read into memory instead (it records no scale: pass ``mpp``).
    bulk
        Optional bulk expression of this slide (pandas Series gene → TPM, or a one-row AnnData),
        stored as table ``"bulk"``.
    mpp
        µm per level-0 pixel; read from the slide metadata when ``None`` (required for PNG/JPEG).
    sample_id
        Name of the slide (default: file stem).
    chunks
        Dask chunk size.
    min_pyramid_size
        A single-level slide larger than this (px) gets a lazily computed ×2/×4/… pyramid.
    """
    import spatialdata as sd

    path = Path(path)
    _check_slide_path(path)
    sample_id = sample_id or path.stem
    if path.suffix.lower() in PLAIN_SUFFIXES:  # a plain PNG/JPEG: one level, read into memory
        if mpp is None:
            msg = (
                f"{path.name!r} is a plain {path.suffix.lstrip('.').upper()} image, which records no µm per "
                "pixel; pass mpp= (--mpp for bitro preprocess), e.g. 0.25 for 40×, 0.5 for 20×."
            )
            raise ValueError(msg)
        levels, file_mpp = [read_image_file(path)], None
    else:
        levels, file_mpp = _open_levels(path)
    mpp = mpp if mpp is not None else file_mpp
    if mpp is None:
        msg = (
            f"Slide {path.name!r} records no µm per pixel (no Aperio MPP, no TIFF resolution tags); "
            "pass mpp= (e.g. 0.25 for 40×, 0.5 for 20×)."
        )
        raise ValueError(msg)
    if len(levels) > 1:
        image = _multiscale(levels, chunks)
    else:
        h, w = levels[0].shape[:2]
        factors, size = [], max(h, w)
        while size / 2 ** (len(factors) + 1) >= min_pyramid_size / 4 and size > min_pyramid_size:
            factors.append(2)
            if len(factors) == 5:
                break
        image = image_element(levels[0], dims=("y", "x", "c"), scale_factors=factors or None, chunks=chunks)
    tables = {}
    if bulk is not None:
        tables[K.BULK] = bulk_table(bulk, sample_id=sample_id)
    sdata = sd.SpatialData(images={K.IMAGE: image}, tables=tables)
    set_scale(sdata, mpp=mpp, sample_id=sample_id, source=str(path))
    logger.info("Opened %s: %d level(s), %.3f µm/px.", path.name, len(levels), mpp)
    return sdata
