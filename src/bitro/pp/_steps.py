"""What a cohort run does to one slide: the validated options and the steps, in order.

:func:`pipeline_options` checks the steps and fills the defaults; :func:`apply_steps` runs them on one
slide in place (later steps use the stain-normalised image); with a scratch folder per slide,
segmentation and embedding keep their finished tiles so a failed slide resumes mid-way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import resolve_seed, settings
from bitro.pp._scratch import check_scratch_dir, clear_scratch_dir

STEPS = ("normalize_stains", "detect_tissue", "segment_cells", "embed_cells", "assign_cells")
KNOWN_STEPS = (*STEPS, "make_patches", "bags")

Step = str | Callable[[Any], Any]


# ------------------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class PipelineOptions:
    """What :func:`apply_steps` runs on each slide (built and validated by :func:`pipeline_options`)."""

    steps: tuple[Step, ...]
    stain_method: str = K.STAIN_METHOD
    segment_method: str = "watershed"
    encoder: Any = "efficientnet_lite0"
    mode: str = "tile"
    patch_um: float | None = None
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    step_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    scratch_dir: str | None = None


def pipeline_options(
    steps: Sequence[Step] = STEPS,
    *,
    step_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int | None = None,
    device: str | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> PipelineOptions:
    """Check the steps and fill the defaults (seed and device from ``bt.settings``).

    ``scratch_dir`` is checked (created and probe-written) and stored as an absolute path, so that
    workers of a cluster resolve it alike.
    """
    if isinstance(steps, str) or callable(steps):
        steps = [steps]
    steps = tuple(steps)
    for step in steps:
        if not callable(step) and step not in KNOWN_STEPS:
            msg = f"unknown step {step!r}; use one of {KNOWN_STEPS} or a function taking the SpatialData."
            raise ValueError(msg)
    if not steps:
        msg = f"steps is empty; give some of {KNOWN_STEPS}."
        raise ValueError(msg)
    step_kwargs = dict(step_kwargs or {})
    for name in step_kwargs:
        if name not in KNOWN_STEPS:
            msg = f"step_kwargs has unknown step {name!r}; keys must be among {KNOWN_STEPS}."
            raise ValueError(msg)
    return PipelineOptions(
        steps=steps,
        seed=resolve_seed(seed),
        device=settings.device if device is None else device,
        step_kwargs=step_kwargs,
        scratch_dir=None if scratch_dir is None else str(check_scratch_dir(scratch_dir).resolve()),
        **options,
    )


#: Subfolders of a slide's scratch folder, per step that writes tiles there.
SCRATCH_SUBFOLDERS = {"segment_cells": "segment", "embed_cells": "embed"}


def slide_scratch(options: PipelineOptions, name: str) -> Path | None:
    """``scratch_dir/<name>`` of one slide, or ``None`` without ``scratch_dir``."""
    return None if options.scratch_dir is None else Path(options.scratch_dir) / name


def remove_slide_scratch(scratch: Path | None) -> None:
    """Delete the tile files the steps left in ``scratch`` (see :func:`slide_scratch`), nothing else."""
    if scratch is None:
        return
    for sub in SCRATCH_SUBFOLDERS.values():
        clear_scratch_dir(scratch / sub)
    with contextlib.suppress(OSError):
        scratch.rmdir()  # only when empty


def _has_spots(sdata: Any) -> bool:
    return K.SPOTS in sdata.tables


def apply_steps(sdata: Any, options: PipelineOptions, *, scratch: Path | None = None) -> Any:
    """Run ``options.steps`` on one slide, in place; later steps use the stain-normalised image.

    With ``scratch`` (the slide's folder, :func:`slide_scratch`), segmentation and embedding write
    their tiles to its subfolders ``segment`` and ``embed`` and keep them (a rerun of a slide that
    failed later resumes); :func:`remove_slide_scratch` deletes them once the slide is written.
    """
    import bitro as bt

    ow, seed = options.overwrite, options.seed
    image = K.IMAGE
    bags = []
    for step in options.steps:
        if callable(step):
            step(sdata)
            continue
        extra = dict(options.step_kwargs.get(step, {}))
        if step == "bags":
            step = "assign_cells" if _has_spots(sdata) else "make_patches"
            extra = dict(options.step_kwargs.get(step, {})) | extra
        if step == "normalize_stains":
            kw = {"image_key": K.IMAGE, "method": options.stain_method, "overwrite": ow, "seed": seed}
            kw |= extra
            bt.pp.normalize_stains(sdata, **kw)
            image = kw.get("key_added", K.IMAGE_NORMALIZED)
        elif step == "detect_tissue":
            bt.pp.detect_tissue(sdata, **({"image_key": image, "overwrite": ow} | extra))
        elif step == "segment_cells":
            kw = {"image_key": image, "method": options.segment_method, "overwrite": ow, "seed": seed}
            kw |= _scratch_kwargs(scratch, step)
            bt.pp.segment_cells(sdata, **(kw | extra))
        elif step == "embed_cells":
            kw = {"image_key": image, "encoder": options.encoder, "mode": options.mode}
            kw |= {"device": options.device, "overwrite": ow, "seed": seed} | _scratch_kwargs(scratch, step)
            bt.pp.embed_cells(sdata, **(kw | extra))
        elif step == "assign_cells":
            if not _has_spots(sdata):
                logger.info("no %r table: assign_cells skipped", K.SPOTS)
                continue
            bt.pp.assign_cells(sdata, **({"overwrite": ow} | extra))
            bags.append("assign")
        elif step == "make_patches":
            bt.pp.make_patches(sdata, **({"size_um": options.patch_um, "overwrite": ow} | extra))
            bags.append("patches")
    if K.CELLS in sdata.tables:
        cells = sdata.tables[K.CELLS]
        features = cells.obsm[K.EMBEDDING].shape[1] if K.EMBEDDING in cells.obsm else 0
        logger.info("%d cells, %d features; bags: %s", cells.n_obs, features, "+".join(bags) or "none")
    return sdata


def _scratch_kwargs(scratch: Path | None, step: str) -> dict[str, Any]:
    if scratch is None:
        return {}
    return {"scratch_dir": scratch / SCRATCH_SUBFOLDERS[step], "keep_scratch": True}
