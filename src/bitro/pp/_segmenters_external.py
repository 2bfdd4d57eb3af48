"""StarDist and Cellpose as segmentation backends (``method="stardist"`` / ``"cellpose"``).

bitro neither ships nor downloads their weights: pass a model you loaded yourself (``model=``) or the
location of local weights. The packages are optional; without them (and without ``model=``) the
backend fails with the install command. A model object only needs the method bitro calls
(StarDist: ``predict_instances(image, **kwargs) -> (labels, details)``; Cellpose:
``eval(image, diameter=..., **kwargs) -> (masks, ...)``), so any model with that interface works.

Models of both packages hold framework state (TensorFlow / torch) and may not pickle: run them in
this process or with ``scheduler="threads"``, not on process-based dask workers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bitro.pp._segmenters import Segmenter

__all__ = ["CellposeSegmenter", "StarDistSegmenter"]

_INSTALL = {"stardist": "pip install stardist tensorflow", "cellpose": "pip install cellpose"}


def _require(package: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        msg = (
            f"method={package!r} needs the {package!r} package, which is not installed. Install it with: "
            f"{_INSTALL[package]} — then pass {what} (bitro never downloads weights), or pass "
            "model=<a model you loaded> in method_kwargs."
        )
        raise ImportError(msg)


def normalize_percentiles(rgb: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """``(h, w, 3)`` float32 image scaled so that the ``low``/``high`` percentiles map to 0/1 (per channel)."""
    x = np.asarray(rgb, dtype=np.float32)
    lo = np.percentile(x, low, axis=(0, 1), keepdims=True)
    hi = np.percentile(x, high, axis=(0, 1), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-6)


class StarDistSegmenter(Segmenter):
    """StarDist 2D on H&E tiles.

    Parameters
    ----------
    model
        A loaded model with ``predict_instances`` (e.g. ``stardist.models.StarDist2D``). Default: load
        ``StarDist2D(None, name=name, basedir=basedir)`` from local weights.
    name, basedir
        Folder name and parent folder of local StarDist weights (``basedir/name/config.json`` …).
    percentiles
        Tile normalisation before prediction (StarDist's ``normalize(img, 1, 99.8)``).
    predict_kwargs
        More keywords for ``predict_instances`` (e.g. ``prob_thresh``, ``nms_thresh``).
    """

    name = "stardist"

    def __init__(
        self,
        model: Any = None,
        *,
        name: str | None = None,
        basedir: str | Path | None = None,
        percentiles: Sequence[float] = (1.0, 99.8),
        predict_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.weights = None
        if model is None:
            _require("stardist", "method_kwargs={'name': ..., 'basedir': ...} of your local weights")
            if name is None or basedir is None or not (Path(basedir) / name).is_dir():
                msg = (
                    f"method='stardist' needs local weights: method_kwargs={{'name': <model folder>, "
                    f"'basedir': <its parent folder>}}; got name={name!r}, basedir={basedir!r}. "
                    "bitro never downloads weights."
                )
                raise ValueError(msg)
            from stardist.models import StarDist2D

            model = StarDist2D(None, name=name, basedir=str(basedir))
            self.weights = str(Path(basedir) / name)
        if not hasattr(model, "predict_instances"):
            msg = (
                f"model must have a predict_instances method (a StarDist model); got {type(model).__name__}."
            )
            raise TypeError(msg)
        self.model = model
        self.percentiles = tuple(float(p) for p in percentiles)
        self.predict_kwargs = dict(predict_kwargs or {})

    def segment_tile(self, rgb: np.ndarray, mpp: float) -> np.ndarray:
        """Normalise the tile and call ``predict_instances``."""
        labels = self.model.predict_instances(
            normalize_percentiles(rgb, *self.percentiles), **self.predict_kwargs
        )
        return labels[0] if isinstance(labels, tuple) else labels

    def params(self) -> dict[str, Any]:
        """Weights folder (or model type), normalisation and prediction options."""
        return {
            "model": self.weights or type(self.model).__name__,
            "percentiles": list(self.percentiles),
            "predict_kwargs": {k: repr(v) for k, v in self.predict_kwargs.items()},
        }


class CellposeSegmenter(Segmenter):
    """Cellpose on H&E tiles.

    Parameters
    ----------
    model
        A loaded model with ``eval`` (e.g. ``cellpose.models.CellposeModel``). Default: load
        ``CellposeModel(pretrained_model=pretrained_model, gpu=gpu)`` from a local weights file.
    pretrained_model
        Path of local Cellpose weights.
    diameter_um
        Typical nucleus diameter in µm, converted to pixels with the tile's µm per pixel
        (``None``: Cellpose's own estimate).
    gpu
        Load the model on the GPU.
    eval_kwargs
        More keywords for ``eval`` (e.g. ``channels`` for Cellpose 3, ``flow_threshold``).
    """

    name = "cellpose"

    def __init__(
        self,
        model: Any = None,
        *,
        pretrained_model: str | Path | None = None,
        diameter_um: float | None = None,
        gpu: bool = False,
        eval_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.weights = None
        if model is None:
            _require("cellpose", "method_kwargs={'pretrained_model': <path of your local weights>}")
            if pretrained_model is None or not Path(pretrained_model).is_file():
                msg = (
                    "method='cellpose' needs local weights: method_kwargs={'pretrained_model': <weights file>}; "
                    f"got {pretrained_model!r}. bitro never downloads weights."
                )
                raise ValueError(msg)
            from cellpose import models

            model = models.CellposeModel(gpu=gpu, pretrained_model=str(pretrained_model))
            self.weights = str(pretrained_model)
        if not hasattr(model, "eval"):
            msg = f"model must have an eval method (a Cellpose model); got {type(model).__name__}."
            raise TypeError(msg)
        if diameter_um is not None and not diameter_um > 0:
            msg = f"diameter_um must be a positive number of µm, got {diameter_um!r}."
            raise ValueError(msg)
        self.model = model
        self.diameter_um = None if diameter_um is None else float(diameter_um)
        self.eval_kwargs = dict(eval_kwargs or {})

    def segment_tile(self, rgb: np.ndarray, mpp: float) -> np.ndarray:
        """Call ``eval`` with the diameter in the tile's pixels."""
        diameter = None if self.diameter_um is None else self.diameter_um / mpp
        out = self.model.eval(rgb, diameter=diameter, **self.eval_kwargs)
        return out[0] if isinstance(out, tuple | list) else out

    def params(self) -> dict[str, Any]:
        """Weights file (or model type), diameter and evaluation options."""
        return {
            "model": self.weights or type(self.model).__name__,
            "diameter_um": self.diameter_um,
            "eval_kwargs": {k: repr(v) for k, v in self.eval_kwargs.items()},
        }
