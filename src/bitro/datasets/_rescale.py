"""Scanner-scale shift of one slide: :func:`rescale` (``bt.datasets.rescale``).

The image is resampled by a factor while the recorded µm per pixel is kept, so nuclei look larger
or smaller and more or fewer of them fall in a spot, as on a slide scanned at another
magnification. Like the other shifts (:mod:`bitro.datasets._shift`) it returns a new SpatialData
and records itself in ``attrs["bitro_shift"]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bitro import _keys as K
from bitro._logging import logger
from bitro.datasets._shift import _record
from bitro.pp._resample import rescaled_copy

if TYPE_CHECKING:
    import spatialdata as sd


# --------------------------------------------------------------------------- scale
def rescale(sdata: sd.SpatialData, factor: float, *, image_key: str = K.IMAGE) -> sd.SpatialData:
    """A copy of the slide as a scanner at another magnification would give it, with the old scale recorded.

    The image is resampled by ``factor`` (``1.2``: 20 % more pixels along each axis) while
    ``attrs["bitro_scale"]`` is kept as it was (µm per pixel, spot diameter and spacing in µm). In
    the slide's recorded µm, nuclei are then ``factor`` times longer (``factor²`` the area), and
    bitro, which places a spot's disc from the recorded spot diameter (:func:`bitro.pp.assign_cells`),
    finds about ``1 / factor²`` as many nuclei in each spot: the density and size shift of a slide
    scanned at another magnification than recorded.

    The spots stay on the same tissue: their centres ``(x, y)`` map to ``((x + ½)·factor − ½,
    (y + ½)·factor − ½)`` (pixel centres at integer coordinates), the radii of their circles are
    multiplied by ``factor``, and their counts are unchanged.

    What is kept, what is dropped:

    - image ``image_key``: resampled lazily (bilinear, with a Gaussian pre-filter of
      ``σ = (1/factor − 1)/2`` px when shrinking, like ``skimage.transform.rescale``), same pyramid
      factors and chunks; other images are left out (re-derive them, e.g. with
      :func:`bitro.pp.normalize_stains`);
    - labels (tissue masks, nucleus masks) and points: left out;
    - tables annotating polygons (segmented or truth cells, patches) and those polygons: left out,
      since their morphology (areas in µm², embeddings, spot assignment) describes the unscaled
      image — segment the result again (the shift benchmark does);
    - tables annotating circles (spots) with their circles: kept and scaled; the column
      ``obs["n_cells"]`` written by :func:`bitro.pp.assign_cells` is dropped with the cells;
    - shapes no table annotates: scaled (circle radii too); tables with no location (``"bulk"``):
      kept as they are.

    Parameters
    ----------
    sdata
        Slide in bitro's convention (every element in level-0 pixels of ``image_key``).
    factor
        Resampling factor, e.g. ``0.8`` or ``1.2``.
    image_key
        Image to resample.

    Returns
    -------
    A new SpatialData as described; ``attrs["bitro_shift"]`` gains ``{"kind": "rescale", "factor",
    "image_key", "shape_before", "shape_after", "mpp", "dropped"}`` (``dropped``: element names
    left out, by kind).

    Raises
    ------
    ValueError
        A factor that is not a positive finite number, or that leaves no pixel.
    KeyError
        No image ``image_key``.

    Examples
    --------
    >>> denser = bt.datasets.rescale(sdata, 0.8)
    """
    from bitro.io._build import get_mpp

    out, info = rescaled_copy(sdata, factor, image_key=image_key)
    factor = float(factor)
    dropped = info["dropped"]
    _record(
        out,
        {
            "kind": "rescale",
            "factor": factor,
            "image_key": image_key,
            "shape_before": info["shape_before"],
            "shape_after": info["shape_after"],
            "mpp": get_mpp(sdata) if K.SCALE in sdata.attrs else None,
            "dropped": dropped,
        },
    )
    if dropped:
        logger.info("rescale: left out %s (they describe the unscaled image).", dropped)
    logger.info(
        "rescale: %r resampled ×%g to %d × %d px; µm per pixel kept.",
        image_key,
        factor,
        *info["shape_after"][::-1],
    )
    return out
