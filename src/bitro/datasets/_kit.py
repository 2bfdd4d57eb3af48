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
    prepared: bool = False,
    cache_dir: str | Path | None = None,
    **kwargs,
) -> sd.SpatialData:
    """Load a HER2ST section of the kit with :func:`bitro.io.read_st`, raw or prepared for training.

    With ``prepared=True`` the section comes preprocessed exactly as the benchmarks do it:
    Macenko stain normalisation (image ``"he_normalized"``), tissue detection (labels
    ``"tissue"``), watershed segmentation inside the tissue (shapes ``"cells_shapes"``, table
    ``"cells"``), EfficientNet-Lite0 tile embedding (``cells.obsm["X_bitro"]``) and assignment of
    the cells to the spots (``cells.obs["spot_id"]``, ``spots.obs["n_cells"]``). The first call
    for a section does the work and caches the result as a zarr store under
    :func:`bitro.datasets.cache_dir` (a progress bar shows the steps; a whole section costs about
    4 CPU minutes); later calls read the store in seconds. The store records its parameters,
    bitro's preparation version and the kit files' checksums, and is rebuilt when any of them
    changes.

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
        whole section. Needs ``image=True``. With ``prepared=True`` the window keeps only the
        spots whose whole disc lies inside (``keep="whole"``), and the environment variable
        ``BITRO_PREPARED_CROP_UM`` (a testing setting, e.g. for the README smoke test) sets a
        default window for every prepared section.
    prepared
        Return the section preprocessed (see above), from the cache or built and cached.
    cache_dir
        ``prepared=True``: cache folder; default :func:`bitro.datasets.cache_dir`
        (``$BITRO_CACHE_DIR`` or the platform's user cache folder, e.g. ``~/.cache/bitro``).
    **kwargs
        Passed to :func:`bitro.io.read_st` (not with ``prepared=True``, which reads the kit as is).

    Returns
    -------
    A SpatialData with image ``"he"``, shapes ``"spots_shapes"`` and table ``"spots"`` (raw counts
    in ``layers["counts"]``); with ``prepared=True`` also the elements listed above. With
    ``prepared=True, image=False`` the images are left out (tables, shapes and tissue mask only).

    Examples
    --------
    >>> train = [bt.datasets.her2st(s, prepared=True) for s in ("C2", "C3", "C4", "C5")]
    """
    from bitro.io._st import read_st

    if prepared:
        if kwargs:
            msg = f"prepared=True reads the kit with read_st's defaults; drop {sorted(kwargs)} or use prepared=False."
            raise TypeError(msg)
        from bitro.datasets._prepared import crop_from_env, load_prepared

        return load_prepared(
            section, crop_um=crop_from_env(crop_um), data_dir=data_dir, cache_dir=cache_dir, image=image
        )

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
