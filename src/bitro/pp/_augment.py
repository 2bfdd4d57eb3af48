"""Training-time augmentation of a slide: scale and stain (``bt.pp.augment_slide``, ``bt.pp.augment_slides``).

A model trained on a few slides meets new patients whose slides were scanned at another
magnification (nuclei larger or smaller, more or fewer per spot) or stained in another lab. An
augmented copy of a training slide shows the same tissue and the same counts under such a change,
so adding copies to the training slides teaches the model to ignore it.

An augmented copy holds the H&E image and the spots (moved with the image) with their counts; the
cells, the normalised image and the masks describe the original image and are left out. Run the
usual preprocessing on the copy (:func:`bitro.pp.run_pipeline`, or ``normalize_stains`` →
``detect_tissue`` → ``segment_cells`` → ``embed_cells`` → ``assign_cells``) before passing it to
:func:`bitro.tl.fit` beside the original slides.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro.io._build import get_image
from bitro.pp._resample import check_factor, check_rgb, rescaled_copy

if TYPE_CHECKING:
    import spatialdata as sd

#: Key of ``sdata.attrs`` (and of ``uns`` of the copy's tables) holding the augmentation records.
AUGMENT_ATTRS_KEY = K.AUGMENT


def augment_slide(
    sdata: sd.SpatialData,
    *,
    scale: float = 1.0,
    hed_jitter: float = 0.0,
    hed_shift: float = 0.0,
    seed: int | None = 0,
    image_key: str = K.IMAGE,
    sample_id: str | None = None,
) -> sd.SpatialData:
    """An augmented copy of a training slide: its image rescaled and/or its stains jittered.

    **Scale.** The image is resampled by ``scale`` while the recorded µm per pixel is kept, exactly
    as :func:`bitro.datasets.rescale` simulates a scanner at another magnification: nuclei become
    ``scale`` times longer in the slide's µm, about ``1 / scale²`` as many fall in a spot, and the
    spots (centres ``(p + ½)·scale − ½``, circle radii × ``scale``) stay on the same tissue with the
    same counts.

    **Stain (HED jitter).** Every pixel is split into hematoxylin, eosin and DAB concentrations
    (:func:`skimage.color.rgb2hed`); each concentration ``c_k`` becomes ``α_k·c_k + β_k`` with one
    ``α_k ~ U(1 − hed_jitter, 1 + hed_jitter)`` and one ``β_k ~ U(−hed_shift, hed_shift)`` per stain
    for the whole slide (drawn from ``seed``), and the result is painted back
    (:func:`skimage.color.hed2rgb`): the same tissue as stained a little stronger, weaker or in
    another hue. ``β`` is in :func:`~skimage.color.rgb2hed` units, where white is 0 and the
    hematoxylin of dense nuclei is about 0.1–0.15 (its 99th percentile on the kit's stain target
    image is 0.15, eosin's 0.05), so ``hed_shift`` of a few thousandths is already visible. Pixels
    whose colour lies outside the H/E/DAB cone come back slightly changed even without jitter, so the
    colour step is skipped when both ``hed_jitter`` and ``hed_shift`` are 0.

    Both steps are lazy (dask, chunk by chunk); nothing is computed until the image is read.

    What the copy holds: the augmented image ``image_key`` (RGB, the source's pyramid factors and
    chunks); tables annotating circles (the spots, with their counts) and their circles, moved with
    the image; tables with no location (``"bulk"``) as they are. Left out, because they describe the
    original image: other images (e.g. the stain-normalised ``"he_normalized"``), labels (tissue and
    nucleus masks), points, tables annotating polygons (segmented cells, patches) and their polygons,
    and the spots' ``obs["n_cells"]``. **Preprocess the copy again** (stain normalisation, tissue,
    segmentation, embedding, assignment; e.g. :func:`bitro.pp.run_pipeline`) before training on it.

    Never augment a slide you will test on and train on its copies: the copy shows the same tissue
    and counts, so the test would leak into training. Augment the training slides only.

    Parameters
    ----------
    sdata
        Slide in bitro's convention (every element in level-0 pixels of ``image_key``), with an RGB
        H&E image. It is not modified.
    scale
        Resampling factor of the image, e.g. ``0.8`` or ``1.2`` (``1``: no resampling).
    hed_jitter
        Half-width of the multiplicative stain factors ``α_k``, in ``[0, 1)`` (e.g. ``0.1``: each
        stain ×0.9 to ×1.1; ``0``: none).
    hed_shift
        Half-width of the additive stain offsets ``β_k``, in ``[0, 0.1]`` (rgb2hed units; ``0``: none).
    seed
        Seed of the stain draws (``None``: ``bt.settings.seed``).
    image_key
        H&E image to augment.
    sample_id
        Sample id of the copy (``attrs["bitro_scale"]["sample_id"]``); default the source's id with
        the augmentation appended (e.g. ``"C3_aug_x1.2_hed0.1_seed0"``), so training sees distinct
        slides.

    Returns
    -------
    A new SpatialData as described. ``attrs["bitro_augment"]`` (a list: augmenting a copy again
    appends) gains ``{"scale", "hed_jitter", "hed_shift", "seed", "hed_factors" (α), "hed_offsets" (β),
    "image_key", "source_sample_id", "sample_id", "shape_before", "shape_after", "dropped",
    "bitro_version"}``; every kept table's ``uns["bitro_augment"]`` holds the same list, so the
    tables alone still say they come from an augmented copy.

    Raises
    ------
    ValueError
        ``scale`` not a positive finite number or leaving no pixel; ``hed_jitter`` outside ``[0, 1)``
        or ``hed_shift`` outside ``[0, 0.1]``; an image that is not RGB.
    KeyError
        No image ``image_key`` (the message lists the images).

    Examples
    --------
    >>> larger = bt.pp.augment_slide(sdata, scale=1.2, hed_jitter=0.1, seed=1)
    >>> bt.pp.run_pipeline({"C3": sdata, "C3_x1.2": larger}, out="prepared/")
    """
    from bitro._version import __version__

    scale = check_factor(scale, name="scale")
    hed_jitter = _check_range(hed_jitter, "hed_jitter", 0.0, 1.0, closed=False, example="0.1")
    hed_shift = _check_range(hed_shift, "hed_shift", 0.0, 0.1, closed=True, example="0.005")
    seed = resolve_seed(seed)
    level0 = get_image(sdata, image_key)  # the KeyError lists the images
    check_rgb(int(level0.shape[0]), image_key)

    out, info = rescaled_copy(sdata, scale, image_key=image_key)
    rng = np.random.default_rng(seed)
    factors = rng.uniform(1.0 - hed_jitter, 1.0 + hed_jitter, size=3)
    offsets = rng.uniform(-hed_shift, hed_shift, size=3)
    if hed_jitter > 0 or hed_shift > 0:
        _jitter_image(out, image_key, factors, offsets)

    scale_attrs = dict(out.attrs.get(K.SCALE, {}))
    source_id = scale_attrs.get("sample_id")
    if sample_id is None:
        sample_id = f"{source_id or 'slide'}_aug_x{scale:g}_hed{hed_jitter:g}"
        sample_id += f"_shift{hed_shift:g}_seed{seed}" if hed_shift > 0 else f"_seed{seed}"
    if scale_attrs:
        out.attrs[K.SCALE] = {**scale_attrs, "sample_id": str(sample_id)}
    record = {
        "scale": scale,
        "hed_jitter": hed_jitter,
        "hed_shift": hed_shift,
        "seed": seed,
        "hed_factors": [float(v) for v in factors],
        "hed_offsets": [float(v) for v in offsets],
        "image_key": image_key,
        "source_sample_id": "" if source_id is None else str(source_id),
        "sample_id": str(sample_id),
        "shape_before": info["shape_before"],
        "shape_after": info["shape_after"],
        "dropped": info["dropped"],
        "bitro_version": __version__,
    }
    history = [*copy.deepcopy(list(out.attrs.get(AUGMENT_ATTRS_KEY, []))), record]
    out.attrs[AUGMENT_ATTRS_KEY] = history
    for table in out.tables.values():
        table.uns[AUGMENT_ATTRS_KEY] = copy.deepcopy(history)
    if info["dropped"]:
        logger.info(
            "augment_slide: left out %s (they describe the original image); preprocess the copy again.",
            info["dropped"],
        )
    logger.info(
        "augment_slide: %r ×%g, stain factors %s, offsets %s → sample %r.",
        image_key,
        scale,
        np.round(factors, 3).tolist(),
        np.round(offsets, 4).tolist(),
        sample_id,
    )
    return out


def augment_slides(
    slides: Mapping[str, sd.SpatialData],
    *,
    scales: Sequence[float] = (0.8, 1.2),
    hed_jitter: float = 0.1,
    hed_shift: float = 0.0,
    seed: int | None = 0,
    image_key: str = K.IMAGE,
) -> dict[str, sd.SpatialData]:
    """Augmented copies of training slides, one per slide and scale, named for :func:`bitro.pp.run_pipeline`.

    Copy ``i`` of slide ``name`` is ``augment_slide(slides[name], scale=scales[i], hed_jitter=hed_jitter,
    hed_shift=hed_shift, seed=seed + i, image_key=image_key)`` and is named ``f"{name}_aug{i}_x{scale:g}"``
    (also its sample id). The recipe for training on them::

        train = {"C3": c3, "C4": c4}  # raw slides (image + spots); never the test slide
        copies = bt.pp.augment_slides(train, scales=(0.8, 1.2), hed_jitter=0.1)
        bt.pp.run_pipeline({**train, **copies}, out="prepared/")
        slides = [bt.io.read_zarr(f"prepared/{name}.zarr") for name in [*train, *copies]]
        model = bt.tl.fit(slides)

    :func:`bitro.tl.fit` reads each copy's source from ``attrs["bitro_augment"]`` (or the spots table's
    ``uns``) and draws its early-stopping validation spots by source spot, so the copies of a validation
    spot never train.

    Parameters
    ----------
    slides
        Name → training slide (image and spots; cells are dropped from the copies anyway). Only
        training slides: a copy of a test slide in training leaks the test into the model.
    scales
        One copy per scale (e.g. ``(0.8, 1.2)``: the ±20 % of magnification a new scanner may bring;
        ``1.0`` gives a stain-only copy).
    hed_jitter, hed_shift
        Stain jitter of every copy (see :func:`bitro.pp.augment_slide`); each copy draws its own.
    seed
        Seed of copy 0; copy ``i`` uses ``seed + i`` (``None``: ``bt.settings.seed``).
    image_key
        H&E image to augment.

    Returns
    -------
    Name → augmented copy (lazy images; nothing is computed until the copies are preprocessed).

    Raises
    ------
    ValueError
        No slides or no scales, or a copy's name that clashes with a slide's; the errors of
        :func:`bitro.pp.augment_slide`.
    """
    if not slides:
        msg = "Pass a dict name → training slide (at least one)."
        raise ValueError(msg)
    scales = [check_factor(s, name="scales") for s in scales]
    if not scales:
        msg = "scales is empty; pass e.g. scales=(0.8, 1.2) (1.0 for a stain-only copy)."
        raise ValueError(msg)
    seed = resolve_seed(seed)
    out = {}
    for name, sdata in slides.items():
        for i, scale in enumerate(scales):
            key = f"{name}_aug{i}_x{scale:g}"
            if key in slides or key in out:
                msg = f"The augmented copy name {key!r} clashes with a slide of that name; rename the slide."
                raise ValueError(msg)
            out[key] = augment_slide(
                sdata,
                scale=scale,
                hed_jitter=hed_jitter,
                hed_shift=hed_shift,
                seed=seed + i,
                image_key=image_key,
                sample_id=key,
            )
    return out


def _check_range(value: Any, name: str, low: float, high: float, *, closed: bool, example: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    inside = low <= v <= high if closed else low <= v < high
    if not np.isfinite(v) or not inside:
        bounds = f"[{low:g}, {high:g}]" if closed else f"[{low:g}, {high:g})"
        msg = f"{name} must be a number in {bounds} (e.g. {example}; 0 for none), got {value!r}."
        raise ValueError(msg)
    return v


def _jitter_image(sdata: sd.SpatialData, image_key: str, factors: np.ndarray, offsets: np.ndarray) -> None:
    """Replace image ``image_key`` of ``sdata`` (in place) by its lazily HED-jittered copy, same pyramid."""
    import dask.array as da

    from bitro.io._build import image_element, image_levels

    data = get_image(sdata, image_key).data[:3]
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(3, 1024, 1024))
    data = data.rechunk({0: 3})
    chunk = int(data.chunksize[1])
    jittered = da.map_blocks(_jitter_block, data, factors=factors, offsets=offsets, dtype=np.uint8)
    levels = image_levels(sdata, image_key)
    scale_factors = [max(1, round(levels[i - 1][0] / levels[i][0])) for i in range(1, len(levels))]
    sdata.images[image_key] = image_element(jittered, scale_factors=scale_factors or None, chunks=chunk)


def _jitter_block(block: np.ndarray, *, factors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``map_blocks`` kernel: ``(3, y, x)`` uint8 → the same with every stain ``c_k`` as ``α_k·c_k + β_k``."""
    from skimage.color import hed2rgb, rgb2hed

    rgb = np.moveaxis(np.asarray(block), 0, -1)
    hed = rgb2hed(rgb) * factors + offsets
    out = np.clip(np.rint(hed2rgb(np.maximum(hed, 0.0)) * 255.0), 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, 0)
