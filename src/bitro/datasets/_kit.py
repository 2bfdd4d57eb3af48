"""Access to the local real-data kit (HER2ST legacy ST sections with H&E)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import spatialdata as sd

ENV_VAR = "BITRO_DATA_DIR"
_DEFAULT = Path(__file__).resolve().parents[3].parent / "shared" / "data"
HER2ST_IMAGED = ("C2", "C3", "C4", "C5", "C6")


def data_dir(path: str | Path | None = None) -> Path:
    """Return the data-kit folder: ``path``, else ``$BITRO_DATA_DIR``, else ``../shared/data``.

    The default is ``../shared/data`` relative to the project root (the repository checkout).
    """
    return _kit_root(path)


def _kit_root(path: str | Path | None) -> Path:
    candidates = [Path(path)] if path is not None else []
    if not candidates and os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    if not candidates:
        candidates = [_DEFAULT, Path.cwd().parent / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    msg = (
        f"The bitro data kit was not found (looked in {[str(p) for p in candidates]}). "
        f"Set the environment variable {ENV_VAR} to the folder that holds her2st/, or pass data_dir=."
    )
    raise FileNotFoundError(msg)


def her2st_sections(data_dir: str | Path | None = None, *, with_image: bool = True) -> list[str]:
    """Names of the HER2ST sections in the kit (those with an H&E image when ``with_image``)."""
    root = _kit_root(data_dir) / "her2st"
    names = sorted(p.name.split(".")[0] for p in (root / "counts").glob("*.tsv.gz"))
    if with_image:
        names = [n for n in names if (root / "images" / f"{n}.jpg").is_file()]
    return names


def her2st(
    section: str = "C2",
    *,
    data_dir: str | Path | None = None,
    image: bool = True,
    crop_um: float | None = None,
    **kwargs,
) -> sd.SpatialData:
    """Load a HER2ST section of the kit with :func:`bitro.io.read_st`.

    Parameters
    ----------
    section
        Section name, e.g. ``"C2"`` (patient C, replicate 2). Sections C2–C6 have H&E images in the kit.
    data_dir
        Kit folder; see :func:`bitro.datasets.data_dir`.
    image
        Load the H&E image (about 9,300 × 9,900 px).
    crop_um
        Keep only a square window of this side (µm) around the spot nearest the median spot
        position, in the window's own pixel frame (:func:`bitro.datasets.crop`); ``None``: the
        whole section. Needs ``image=True``.
    **kwargs
        Passed to :func:`bitro.io.read_st`.
    """
    from bitro.io._st import read_st

    root = _kit_root(data_dir) / "her2st"
    counts = root / "counts" / f"{section}.tsv.gz"
    if not counts.is_file():
        msg = f"HER2ST section {section!r} is not in the kit; available: {her2st_sections(root.parent, with_image=False)}."
        raise KeyError(msg)
    img = root / "images" / f"{section}.jpg"
    if image and not img.is_file():
        msg = f"Section {section!r} has no H&E image in the kit (only {list(HER2ST_IMAGED)} do); pass image=False."
        raise FileNotFoundError(msg)
    if crop_um is not None and not image:
        msg = "crop_um= cuts a window of the H&E image; pass image=True (the default) or crop_um=None."
        raise ValueError(msg)
    sdata = read_st(
        counts,
        root / "spots" / f"{section}_selection.tsv",
        img if image else None,
        sample_id=section,
        **kwargs,
    )
    if crop_um is None:
        return sdata
    from bitro.datasets._crop import crop

    return crop(sdata, size_um=crop_um)


def her2st_genes(data_dir: str | Path | None = None) -> list[str]:
    """The 785-gene HER2ST list used by Hist2ST and BiTro for BRCA."""
    import numpy as np

    path = _kit_root(data_dir) / "her2st" / "genes" / "her_hvg_cut_1000.npy"
    try:
        genes = np.load(path, allow_pickle=False)  # a plain string array; never unpickle a data file
    except ValueError as err:
        msg = f"{str(path)!r} is not a plain .npy array of gene names (object arrays are never read): {err}"
        raise ValueError(msg) from err
    if genes.dtype.kind not in "US" or genes.ndim != 1:
        msg = f"{str(path)!r} must hold a 1-D array of gene names, got dtype {genes.dtype} and shape {genes.shape}."
        raise ValueError(msg)
    return [str(g) for g in genes]
