"""Cell embedding (``bt.pp.embed_cells``): one feature vector per segmented cell.

The image is processed tile by tile through the tiled-step runner (:mod:`bitro.pp._runner`: one tile,
or one batch of crops, in memory per worker; the local loop, plain dask or ``dask.distributed``;
``scratch_dir`` resume; ``on_error``). Cells are assigned to exactly one tile by the tile *core* that
contains their centroid, and each tile is read with a margin of context (white outside the image)
so that cells near borders see their surroundings. The three ways of embedding are tiled steps of
:mod:`bitro.pp._embed_tasks`:

- ``mode="crop"`` (the paper's): a ``crop_um`` window around each centroid, read at the chosen
  pyramid ``level`` in that level's coordinates, resized to the encoder input and mean-pooled.
- ``mode="tile"`` (fast): one forward pass per tile at the level's native resolution (resampled to
  the encoder's ``mpp`` when it declares one). Each cell's feature is the tile's feature map averaged
  over the cells covered by its ``crop_um`` window (weighted by overlap), so tile mode approximates
  crop mode with the same crop definition; when the window is smaller than one feature cell
  (stride 32 px for EfficientNet, ~16 µm at 0.5 µm/px, larger than a nucleus) this is bilinear
  interpolation at the centroid. The network's receptive field brings in the surrounding tissue.
- ``encoder="morphology"`` measures each nucleus from its rasterised polygon (``mode`` is ignored).

Each task's features are copied into one float32 output matrix as soon as they arrive and then
dropped, so the features are held once (plus one task), never as a list of all tiles. With
``scratch_dir`` each finished task's features are written to disk at once
(:class:`bitro.pp._scratch.FeatureStore`), a rerun resumes from those files, and the output matrix
is assembled from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._hashing import arrays_sha256, state_sha256
from bitro._logging import logger
from bitro._settings import resolve_device, resolve_seed
from bitro._validate import check_not_exists
from bitro.io._build import get_image, get_mpp, get_shapes, get_table, image_levels
from bitro.pp._embed_tasks import crop_step, feature_map_step, morphology_step
from bitro.pp._encoders import Encoder, get_encoder
from bitro.pp._image_key import resolve_image_key
from bitro.pp._runner import TileRunner

if TYPE_CHECKING:
    import spatialdata as sd

__all__ = ["DEFAULT_CONTEXT_UM", "embed_cells"]

#: Neighbourhood window(s) (µm) of ``context_um="auto"``: about two HER2ST spot diameters, the best of
#: 100 and 200 µm in the leave-one-section-out benchmark (``benchmarks/crop_vs_tile.py``).
DEFAULT_CONTEXT_UM: tuple[float, ...] = (200.0,)

_SEGMENT_HINT = "Cells are created by bt.pp.segment_cells(sdata); run it first (or import a segmentation)."


def embed_cells(
    sdata: sd.SpatialData,
    *,
    image_key: str | None = None,
    cells_key: str = K.CELLS,
    encoder: Any = "efficientnet_lite0",
    mode: Literal["tile", "crop"] = "tile",
    crop_um: float = 33.0,
    context_um: float | Sequence[float] | Literal["auto"] | None = "auto",
    tile_mpp: float | None = None,
    level: int = 0,
    tile_size: int = 1024,
    batch_size: int = 64,
    device: str = "auto",
    key_added: str = K.EMBEDDING,
    overwrite: bool = False,
    inplace: bool = True,
    seed: int | None = None,
    client: Any = None,
    scheduler: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    scratch_dir: str | Path | None = None,
    keep_scratch: bool = False,
) -> np.ndarray | None:
    """Embed every cell of table ``cells_key`` with an image encoder.

    Parameters
    ----------
    sdata
        SpatialData with image ``image_key`` and the cells table written by
        :func:`bitro.pp.segment_cells` (centroids in ``obsm["spatial"]``, level-0 pixels, ``x, y``;
        nucleus polygons in shapes ``"<cells_key>_shapes"``, needed by ``"morphology"``).
    image_key
        Image to read. ``None``: ``"he_normalized"`` when :func:`bitro.pp.normalize_stains` wrote it,
        else ``"he"`` (logged; see :mod:`bitro.pp._image_key`) — the image :func:`~bitro.pp.segment_cells`
        reads by default.
    cells_key
        Table of cells.
    encoder
        A registered name (:func:`bitro.pp.list_encoders`: ``"efficientnet_lite0"``, ``"morphology"``, …),
        ``"vit:/path"`` / ``"dinov2:/path"`` / a path to a local ``transformers`` checkpoint, an
        :class:`~bitro.pp._encoders.Encoder`, a function ``crops (n, h, w, 3) uint8 -> (n, d)`` or a
        ``torch.nn.Module`` taking ``(n, 3, h, w)`` floats in ``[0, 1]``.
    mode
        ``"crop"``: a window of ``crop_um`` around each centroid, resized to the encoder input,
        mean-pooled (the paper). ``"tile"``: one forward pass per tile, feature map sampled at each
        centroid (much faster).
    crop_um
        Side of the crop window in µm. The default 33 µm is the paper's 48-px crop at its
        ~0.69 µm/px. In tile mode it sets the context margin around each tile.
    context_um
        Side(s) in µm of larger windows around each centroid over which the tile feature map is
        averaged, appended after the cell's own features (``dim`` columns per window, in the order
        given): every cell is described together with its neighbourhood (the tissue around it,
        nuclei or not), also cells outside any spot. Tile mode: the same forward pass serves both
        (tiles are read with a margin of half the largest window). Crop mode: one extra tile pass
        (its scratch files go to ``scratch_dir/context``). ``uns[key_added]["blocks"]`` names the
        column ranges. ``"auto"`` (default): :data:`DEFAULT_CONTEXT_UM` when the encoder has a
        feature map, else none (the ``crop_vs_tile`` benchmark: context raised bitro's
        leave-one-section-out accuracy on HER2ST). ``None``: the cell's own window only (the
        features of bitro before 0.2).
    tile_mpp
        µm per pixel at which the tile pass runs: each tile is resampled to it before the forward
        pass, and the windows are pooled at that scale. ``None`` (default): the encoder's own ``mpp``
        if it declares one, else the level as read. A finer value (e.g. half the slide's µm per
        pixel) shows the encoder larger nuclei, closer to what crop mode shows it, at the cost of
        ``(slide mpp / tile_mpp)²`` times the compute (the ``crop_vs_tile`` benchmark measures it).
    level
        Pyramid level to read; centroids are converted to that level's pixels.
    tile_size
        Side of a tile core in pixels of ``level``.
    batch_size
        Crops per forward pass (crop mode).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    key_added
        Key in ``obsm`` and ``uns`` of the cells table.
    overwrite
        Replace an existing ``obsm[key_added]``.
    inplace
        Write into the cells table and return ``None``; ``False``: write nothing and return the
        features (see :doc:`/contributing`, "Return values and inplace").
    seed
        Seed for torch (recorded; inference itself is deterministic).
    client
        A ``distributed.Client`` to run the tiles on a dask cluster (local or remote), one task per
        tile (crop mode: per group of tiles holding ``batch_size`` cells, as in the local loop, so the
        forward passes and features are the same). ``None``: the client active in this process if
        there is one, else the local loop. The encoder is scattered to each worker once (a torch
        model is pickled once per worker, not per tile) after being moved to ``device``, so use
        ``device="cpu"`` unless every worker has that device; set torch threads on the workers to
        avoid oversubscription. Custom encoders must be picklable (cloudpickle).
    scheduler
        ``"threads"``, ``"processes"`` or ``"synchronous"``: run the tiles with plain dask (no
        cluster). ``"threads"`` shares one encoder; ``"processes"`` pickles it with every task.
    on_error
        ``"raise"``: a tile that cannot be read (e.g. a corrupt chunk) stops the run with an error
        naming the image and tile box. ``"skip"``: its cells keep zero features, a warning is
        logged and its boxes are listed in ``uns[key_added]["skipped_tiles"]``.
    scratch_dir
        Folder (created if missing) where the features of each finished tile (crop mode: group of
        tiles) are written as soon as it is done (``tile_<i>.npz``: the cells' row indices and
        float32 feature rows; written by this process as results arrive, also with a cluster), with
        a ``manifest.json`` of the parameters that determine the features (encoder name and weights
        fingerprint, mode, crop and tile sizes, level, device, image key and shape, cells key,
        number of cells and a fingerprint of their centroids). Rerunning the same call with the same
        folder after a crash only computes the missing tiles (tiles skipped with
        ``on_error="skip"`` are retried) and gives identical features; different parameters raise
        an error before any tile runs. The pixels themselves are not fingerprinted: use a new folder
        if the image changed under the same key. The output matrix is filled from the files into one
        preallocated array, so the features are not held twice in memory. ``None``: no files; each
        tile's features are copied into the output as they arrive (also not held twice).
    keep_scratch
        Leave the tile files and manifest in ``scratch_dir`` after the run (a later identical call
        then only re-assembles). ``False`` (default): delete them (and the folder, if nothing else is
        in it) once ``obsm[key_added]`` is written; they duplicate the output.

    Returns
    -------
    ``None`` when ``inplace``, else the ``(n_cells, dim)`` float32 features. When ``inplace``, writes
    to table ``cells_key``:

    - ``obsm[key_added]``: ``(n_cells, dim)`` float32 features;
    - ``uns[key_added]``: encoder name, dimension, checkpoint path and sha256, feature names (morphology),
      parameters, the bitro version, ``execution`` (where the tiles ran) and ``skipped_tiles``.
    """
    from bitro import __version__

    table = get_table(sdata, cells_key, hint=_SEGMENT_HINT)
    if table.n_obs == 0:
        raise ValueError(_no_cells_message(table, cells_key, image_key))
    if mode not in ("tile", "crop"):
        msg = f"mode must be 'tile' or 'crop', got {mode!r}."
        raise ValueError(msg)
    if inplace:
        check_not_exists(key_added, table.obsm, what="obsm key", overwrite=overwrite)
    if K.SPATIAL not in table.obsm:
        msg = f"Table {cells_key!r} has no obsm[{K.SPATIAL!r}] centroids. {_SEGMENT_HINT}"
        raise KeyError(msg)
    if tile_mpp is not None and (
        isinstance(tile_mpp, bool) or not isinstance(tile_mpp, int | float) or not 0 < tile_mpp < float("inf")
    ):
        msg = f"tile_mpp must be a positive number of µm per pixel (or None for the encoder's own), got {tile_mpp!r}."
        raise ValueError(msg)
    if crop_um <= 0 or tile_size < 16 or batch_size < 1:
        msg = f"Need crop_um > 0, tile_size >= 16 and batch_size >= 1; got {crop_um}, {tile_size}, {batch_size}."
        raise ValueError(msg)

    image_key = resolve_image_key(sdata, image_key, step="embed_cells")
    xy0 = np.asarray(table.obsm[K.SPATIAL], dtype=np.float64)[:, :2]
    mpp0 = get_mpp(sdata)
    image = get_image(sdata, image_key, level=level)
    (h0, w0), (hl, wl) = image_levels(sdata, image_key)[0], image_levels(sdata, image_key)[level]
    downsample = np.array([w0 / wl, h0 / hl])
    xy = xy0 / downsample  # centroids in pixels of the level being read
    um_per_px = mpp0 * float(downsample.mean())
    crop_px = crop_um / um_per_px
    seed = resolve_seed(seed)
    runner = TileRunner(
        client=client,
        scheduler=scheduler,
        on_error=on_error,
        scratch_dir=scratch_dir,
        keep_scratch=keep_scratch,
    )

    enc = get_encoder(encoder)
    if isinstance(context_um, str) and context_um == "auto":
        has_map = enc.kind != "mask" and enc.supports_tiles
        context_um = DEFAULT_CONTEXT_UM if has_map else None
    context = _context_windows(context_um, crop_um)
    context_px = tuple(c / um_per_px for c in context)
    dev = None
    if hasattr(enc, "module"):
        import torch

        torch.manual_seed(seed)
        dev = resolve_device(device)
        enc.to(dev)
    if enc.kind == "mask":
        if context:
            msg = f"context_um needs an encoder with a feature map; {enc.name!r} measures nucleus masks. Drop context_um."
            raise ValueError(msg)
        used_mode = "mask"
        shapes = get_shapes(sdata, K.shapes_key(cells_key), hint=_SEGMENT_HINT)
        polygons = _polygons_for(table, shapes, downsample)
    elif mode == "crop":
        used_mode = "crop"
        if context and not enc.supports_tiles:
            msg = (
                f"context_um needs an encoder with a feature map (context windows come from a tile pass); "
                f"{enc.name!r} has none. Drop context_um."
            )
            raise ValueError(msg)
    else:
        if not enc.supports_tiles:
            msg = f"Encoder {enc.name!r} has no feature map, so it cannot run in tile mode; use mode='crop'."
            raise ValueError(msg)
        used_mode = "tile"
    if tile_mpp is not None and (used_mode == "mask" or (used_mode == "crop" and not context)):
        msg = (
            f"tile_mpp sets the magnification of a tile pass, and this call makes none ({used_mode} mode"
            + (" without context_um" if used_mode == "crop" else f", encoder {enc.name!r}")
            + "); drop tile_mpp, or use mode='tile' (or context_um in crop mode)."
        )
        raise ValueError(msg)
    data = image.data
    fingerprint = {
        "encoder": _encoder_fingerprint(enc),
        "mode": used_mode,
        "image_key": image_key,
        "image_shape": [int(v) for v in data.shape],
        "level": int(level),
        "cells_key": cells_key,
        "n_cells": len(xy0),
        "centroids_sha256": arrays_sha256([xy0]),
        "um_per_px": float(um_per_px),
        "crop_um": float(crop_um),
        "crop_px": float(crop_px),
        "tile_size": int(tile_size),
        "device": str(dev) if dev is not None else "cpu",
    }
    if context:  # absent otherwise, so scratch folders written without it stay valid
        fingerprint["context_um"] = list(context)
    if tile_mpp is not None:  # likewise
        fingerprint["tile_mpp"] = float(tile_mpp)
    if used_mode == "crop":  # the grouping of tiles into tasks (and the forward batches)
        fingerprint["batch_size"] = int(batch_size)
    if used_mode == "mask":
        fingerprint["polygons_sha256"] = arrays_sha256(polygons)
        feats = np.zeros((len(xy), enc.dim), dtype=np.float32)
        step = morphology_step(
            enc,
            data,
            xy,
            polygons,
            um_per_px=um_per_px,
            tile_size=tile_size,
            out=feats,
            fingerprint=fingerprint,
        )
        runner.run(step, data, image_name=image_key)
        feats[:, feats.shape[1] - len(enc.density_radii_um) :] = enc.density_features(xy0 * mpp0)
    elif used_mode == "crop":
        step = crop_step(
            enc,
            data,
            xy,
            crop_px=crop_px,
            tile_size=tile_size,
            batch_size=batch_size,
            fingerprint=fingerprint,
        )
        feats = runner.run(step, data, image_name=image_key)
        if context:  # the neighbourhood windows come from one tile pass, appended after the crops
            ctx_step = feature_map_step(
                enc,
                data,
                xy,
                windows_px=context_px,
                margin_px=max(context_px) / 2,
                tile_size=tile_size,
                um_per_px=um_per_px,
                target_mpp=tile_mpp,
                fingerprint=fingerprint,
                name="embed_cells_context",
            )
            ctx_runner = runner.sibling(None if scratch_dir is None else Path(scratch_dir) / "context")
            feats = np.concatenate([feats, ctx_runner.run(ctx_step, data, image_name=image_key)], axis=1)
            runner.absorb(ctx_runner)
    else:
        step = feature_map_step(
            enc,
            data,
            xy,
            windows_px=(crop_px, *context_px),
            margin_px=max((crop_px, *(c / 2 for c in context_px))),
            tile_size=tile_size,
            um_per_px=um_per_px,
            target_mpp=tile_mpp,
            fingerprint=fingerprint,
        )
        feats = runner.run(step, data, image_name=image_key)

    feats = np.asarray(feats, dtype=np.float32)
    n_bad = _zero_non_finite(feats)
    if n_bad:
        logger.warning("embed_cells: %d non-finite feature values set to 0 (encoder %r).", n_bad, enc.name)
    if not inplace:
        runner.finish()
        return feats
    table.obsm[key_added] = feats
    prov = {k: v for k, v in enc.provenance().items() if v is not None}
    prov["dim"] = int(feats.shape[1])
    prov["bitro_version"] = __version__
    prov.update(runner.provenance())
    prov["params"] = {
        "image_key": image_key,
        "mode": used_mode,
        "crop_um": float(crop_um),
        "crop_px": float(crop_px),
        "level": int(level),
        "um_per_px": float(um_per_px),
        "tile_size": int(tile_size),
        "batch_size": int(batch_size),
        "device": str(dev) if dev is not None else "cpu",
        "seed": int(seed),
        "pooling": {
            "crop": "mean of the final feature map / patch tokens",
            "tile": "tile feature map averaged over the crop window (bilinear at the centroid if smaller than a stride)",
            "mask": "per-nucleus mask statistics",
        }[used_mode],
    }
    if context:
        prov["context_um"] = prov["params"]["context_um"] = list(context)
        prov["blocks"] = _blocks(feats.shape[1], crop_um, context)
    if "tile_mpp" in fingerprint:  # features of another magnification: fit refuses to mix them
        prov["tile_mpp"] = prov["params"]["tile_mpp"] = fingerprint["tile_mpp"]
    table.uns[key_added] = prov
    runner.finish()
    logger.info("embed_cells: %d cells x %d features in obsm[%r]", feats.shape[0], feats.shape[1], key_added)
    return None


def _context_windows(context_um: float | Sequence[float] | None, crop_um: float) -> tuple[float, ...]:
    """``context_um`` as a tuple of positive window sides larger than the crop window."""
    if context_um is None:
        return ()
    values = (context_um,) if np.isscalar(context_um) else tuple(context_um)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        msg = f"context_um must be a number or a list of numbers (µm), got {context_um!r}."
        raise ValueError(msg) from err
    bad = [v for v in out if not np.isfinite(v) or v <= crop_um]
    if bad or len(set(out)) != len(out):
        msg = (
            f"context_um windows must be distinct and larger than crop_um={crop_um} µm, got {list(out)}; "
            "e.g. context_um=100 for a spot-sized neighbourhood."
        )
        raise ValueError(msg)
    return out


def _blocks(dim: int, crop_um: float, context: tuple[float, ...]) -> list[dict[str, Any]]:
    """Names and column ranges of the cell-window and context-window features."""
    width = dim // (1 + len(context))
    names = [f"cell_{crop_um:g}um", *(f"context_{c:g}um" for c in context)]
    return [{"name": n, "start": i * width, "stop": (i + 1) * width} for i, n in enumerate(names)]


def _no_cells_message(table: Any, cells_key: str, image_key: str) -> str:
    """Why table ``cells_key`` is empty (segmentation found nothing, or an empty import) and what to check."""
    record = table.uns.get(cells_key, {})
    record = record if isinstance(record, dict) else {}
    if "source" in record:
        origin = f"the segmentation imported from {record['source']!r} holds no cells"
        check = "Check that file (and that it belongs to this image)."
    else:
        method, tissue = record.get("method"), record.get("tissue_key")
        origin = "bt.pp.segment_cells" + (f" (method {method!r})" if isinstance(method, str) else "")
        origin += " found no cells"
        mask = f"that the tissue mask {tissue!r} covers the tissue, " if isinstance(tissue, str) else ""
        check = (
            f"Check that image {record.get('image_key', image_key)!r} shows H&E-stained tissue at the recorded "
            f"µm per pixel (bt.io.get_mpp), {mask}and the segmentation parameters (threshold, min_area_um2, "
            "max_area_um2)."
        )
    return f"Table {cells_key!r} has 0 cells: {origin}, so there is nothing to embed. {check}"


def _zero_non_finite(feats: np.ndarray, mask_bytes: int = 1 << 20) -> int:
    """Set NaN/inf entries to 0 in place, a ~``mask_bytes`` mask at a time (no full-size mask); return their count."""
    n_bad = 0
    chunk = max(1, mask_bytes // max(1, feats.shape[1]))
    for start in range(0, len(feats), chunk):
        block = feats[start : start + chunk]
        bad = np.isfinite(block)
        np.logical_not(bad, out=bad)
        if bad.any():
            n_bad += int(bad.sum())
            block[bad] = 0.0
    return n_bad


def _encoder_fingerprint(enc: Encoder) -> dict[str, Any]:
    """What identifies the encoder's features for the scratch manifest.

    Its provenance (name, input size, checkpoint path and sha256, morphology parameters) without
    ``dim`` (unknown before the first call for plain functions); a torch module without a checkpoint
    file gets the sha256 of its weights, a plain function its qualified name.
    """
    out = {k: v for k, v in enc.provenance().items() if k != "dim" and v is not None}
    if not out.get("checkpoint_sha256") and hasattr(enc, "module"):
        out["weights_sha256"] = state_sha256(enc.module.state_dict())
    func = getattr(enc, "func", None)
    if func is not None:
        qualname = getattr(func, "__qualname__", type(func).__name__)
        out["function"] = f"{getattr(func, '__module__', '')}.{qualname}"
    return out


def _polygons_for(table: Any, shapes: Any, downsample: np.ndarray) -> list[np.ndarray]:
    """Exterior ring (x, y) in level pixels of each table row's nucleus, matched by instance id."""
    ids = (
        table.obs[K.INSTANCE_KEY].astype(str) if K.INSTANCE_KEY in table.obs else table.obs_names.astype(str)
    )
    index = shapes.index.astype(str)
    # a hash lookup: np.isin on object (string) arrays compares every pair, O(n²) — 2 min at 112k cells
    missing = ~pd.Index(np.asarray(ids)).isin(index)
    if missing.any():
        msg = (
            f"{int(missing.sum())} cells of the table have no polygon in the shapes element (e.g. "
            f"{list(np.asarray(ids)[missing][:3])}); the table and its shapes are out of sync. {_SEGMENT_HINT}"
        )
        raise ValueError(msg)
    geoms = shapes.geometry.set_axis(index).loc[np.asarray(ids)]
    radius = shapes["radius"].set_axis(index).loc[np.asarray(ids)] if "radius" in shapes else None
    out = []
    for i, g in enumerate(geoms):
        if g.geom_type == "Point" and radius is not None:
            g = g.buffer(float(radius.iloc[i]))
        elif g.geom_type == "MultiPolygon":
            g = max(g.geoms, key=lambda p: p.area)
        out.append(np.asarray(g.exterior.coords, dtype=np.float64)[:, :2] / downsample)
    return out
