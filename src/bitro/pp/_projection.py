"""The fitted projection of cell embeddings: standardise, then PCA (:class:`FeatureProjection`).

Fitted once on the cells of the training slides (:meth:`FeatureProjection.fit`, used by
:func:`bitro.pp.reduce_features` and by the model) and applied unchanged to any new slide, so a
projected dimension means the same on every slide. ``arrays()`` gives the numeric parts (for
safetensors), ``meta()`` the JSON-serialisable rest, ``from_arrays(arrays, meta)`` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro._version import __version__

MAX_CELLS_FIT = 200_000
"""Cells sampled (without replacement) to fit the PCA; all cells are then transformed."""
CHUNK = 65_536
"""Rows transformed per chunk, so memory stays bounded on millions of cells."""
SCALE_FLOOR = 0.1
"""Smallest per-feature scale, as a share of the median feature standard deviation (see :func:`feature_scale`)."""


def feature_scale(x: np.ndarray) -> np.ndarray:
    """Per-column standard deviations for standardising features, floored at a share of the typical one.

    A feature that is almost constant on the fitting rows (e.g. a ReLU channel that fires in a few
    cells of the training slides) has a standard deviation near zero; dividing by it turns a small
    value on a new slide into a z-score of thousands, which then dominates every projection and every
    linear prediction (measured: one HER2ST spot at a PCA score of 4,744 where training spots stay
    below 124, and ridge's raw PCC_gene on that section falling from 0.14 to 0.00). Scales below
    :data:`SCALE_FLOOR` × the median standard deviation of the non-constant columns are raised to that
    floor; constant and non-finite columns get the floor too (1 when every column is constant).
    """
    std = np.asarray(x, dtype=np.float64).std(axis=0)
    ok = np.isfinite(std) & (std > 0)
    floor = SCALE_FLOOR * float(np.median(std[ok])) if ok.any() else 1.0
    return np.where(ok, np.maximum(std, floor), floor)


def _sample_rows(xs: Sequence[np.ndarray], max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Stack the rows of ``xs``; above ``max_rows`` take a uniform random sample (each slide pro rata)."""
    total = sum(len(x) for x in xs)
    keep = None if total <= max_rows else np.sort(rng.choice(total, size=max_rows, replace=False))
    # filled slide by slide into one float64 array: no float64 copy of every slide is held at once
    out = np.empty((total if keep is None else len(keep), xs[0].shape[1] if len(xs) else 0), dtype=np.float64)
    row = start = 0
    for x in xs:
        part = x if keep is None else x[keep[(keep >= start) & (keep < start + len(x))] - start]
        out[row : row + len(part)] = part
        row += len(part)
        start += len(x)
    return out


@dataclass(frozen=True)
class FeatureProjection:
    """A fitted standardise-then-PCA projection of cell embeddings.

    ``transform(x) = ((x - mean) / scale) @ components.T`` (float32).

    Attributes
    ----------
    mean, scale
        Per-feature mean and standard deviation of the training cells (``(d,)``; a zero
        standard deviation is stored as 1).
    components
        Principal axes, ``(n_components, d)``.
    explained_variance, explained_variance_ratio
        Variance explained by each component (of the standardised features), ``(n_components,)``.
    use_rep
        The ``obsm`` key the projection was fitted on.
    n_cells_fit
        Number of cells the PCA was fitted on (after sampling).
    seed
        Seed used for sampling and the randomized solver.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    use_rep: str = K.EMBEDDING
    n_cells_fit: int = 0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        """Input dimension ``d``."""
        return int(self.components.shape[1])

    @property
    def n_components(self) -> int:
        """Output dimension."""
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray, *, chunk_size: int = CHUNK) -> np.ndarray:
        """Project ``x`` (``(n, d)``) to ``(n, n_components)`` float32, in chunks of rows."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            msg = (
                f"This projection was fitted on {self.n_features}-dimensional features "
                f"(obsm[{self.use_rep!r}]) but got shape {x.shape}; embed the slide with the same encoder."
            )
            raise ValueError(msg)
        out = np.empty((x.shape[0], self.n_components), dtype=np.float32)
        comp_t = (self.components / self.scale[None, :]).T  # fold the scaling into the projection
        offset = (self.mean / self.scale) @ self.components.T
        for start in range(0, x.shape[0], chunk_size):
            block = np.asarray(x[start : start + chunk_size], dtype=np.float64)
            out[start : start + chunk_size] = block @ comp_t - offset
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Numeric parts as float32 arrays (for safetensors)."""
        return {
            "mean": np.asarray(self.mean, dtype=np.float32),
            "scale": np.asarray(self.scale, dtype=np.float32),
            "components": np.asarray(self.components, dtype=np.float32),
            "explained_variance": np.asarray(self.explained_variance, dtype=np.float32),
            "explained_variance_ratio": np.asarray(self.explained_variance_ratio, dtype=np.float32),
        }

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {
            "kind": "FeatureProjection",
            "use_rep": self.use_rep,
            "n_features": self.n_features,
            "n_components": self.n_components,
            "n_cells_fit": int(self.n_cells_fit),
            "seed": int(self.seed),
            "standardize": True,
            "bitro_version": __version__,
            **self.extra,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> FeatureProjection:
        """Rebuild from :meth:`arrays` and :meth:`meta`."""
        known = {"kind", "use_rep", "n_features", "n_components", "n_cells_fit", "seed", "standardize"}
        known.add("bitro_version")
        arr = {k: np.asarray(arrays[k], dtype=np.float64) for k in cls._array_names()}
        if arr["components"].shape != (meta["n_components"], meta["n_features"]):
            msg = (
                f"Stored PCA components have shape {arr['components'].shape}, expected "
                f"({meta['n_components']}, {meta['n_features']}) from the metadata; the files do not match."
            )
            raise ValueError(msg)
        return cls(
            **arr,
            use_rep=meta.get("use_rep", K.EMBEDDING),
            n_cells_fit=int(meta.get("n_cells_fit", 0)),
            seed=int(meta.get("seed", 0)),
            extra={k: v for k, v in meta.items() if k not in known},
        )

    @staticmethod
    def _array_names() -> tuple[str, ...]:
        return ("mean", "scale", "components", "explained_variance", "explained_variance_ratio")

    @classmethod
    def fit(
        cls,
        xs: Sequence[np.ndarray],
        *,
        n_components: int = 128,
        seed: int | None = None,
        use_rep: str = K.EMBEDDING,
        max_cells_fit: int = MAX_CELLS_FIT,
    ) -> FeatureProjection:
        """Fit the standardise-then-PCA projection on the cells of one or more slides.

        Used by :func:`bitro.pp.reduce_features` and by :class:`bitro.tl.BiTroModel`, so both give the same
        projection for the same cells and seed. The fitted state is returned in its stored (float32) form,
        so a projection applied before and after a save/load gives identical features.

        Parameters
        ----------
        xs
            One ``(n_cells, d)`` array per slide.
        n_components
            Output dimension; reduced, with a warning, to ``min(n_cells, d)``.
        seed
            Seed of the row sample and the randomized solver (default ``bt.settings.seed``).
        use_rep
            The ``obsm`` key the features came from (recorded).
        max_cells_fit
            At most this many cells (sampled uniformly across slides) are used for the fit.
        """
        state = _fit_projection(
            list(xs),
            n_components=n_components,
            seed=resolve_seed(seed),
            use_rep=use_rep,
            max_cells_fit=max_cells_fit,
        )
        return cls.from_arrays(state.arrays(), state.meta())

    def to_dict(self) -> dict[str, Any]:
        """Everything as one JSON-serialisable dict (arrays as nested lists)."""
        return {"meta": self.meta(), "arrays": {k: v.tolist() for k, v in self.arrays().items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureProjection:
        """Inverse of :meth:`to_dict`."""
        return cls.from_arrays({k: np.asarray(v) for k, v in d["arrays"].items()}, d["meta"])

    def __repr__(self) -> str:
        evr = float(np.sum(self.explained_variance_ratio))
        return (
            f"FeatureProjection({self.use_rep!r}: {self.n_features} -> {self.n_components}, "
            f"fitted on {self.n_cells_fit} cells, explained variance {evr:.3f})"
        )


def _fit_projection(
    xs: Sequence[np.ndarray], *, n_components: int, seed: int, use_rep: str, max_cells_fit: int
):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    x = _sample_rows(xs, max_cells_fit, rng)
    n, d = x.shape
    k = min(n_components, n, d)
    if k < 1:
        msg = (
            f"Cannot fit a PCA on {n} cells with {d} features; at least one cell and one feature are needed."
        )
        raise ValueError(msg)
    if k < n_components:
        logger.warning(
            "reduce_features: n_components=%d exceeds min(n_cells=%d, n_features=%d); using %d components.",
            n_components,
            n,
            d,
            k,
        )
    mean = x.mean(axis=0)
    scale = feature_scale(x)
    z = x  # standardised in place: x is this function's own copy, and a second one would double the peak
    z -= mean
    z /= scale
    if k == min(n, d):
        solver = "full"
    else:
        solver = "randomized" if n > 10_000 else "auto"
    # copy=False: PCA centres z in place (z is ours), the result is the same without a second copy
    pca = PCA(n_components=k, svd_solver=solver, random_state=seed, copy=False).fit(z)
    return FeatureProjection(
        mean=mean,
        scale=scale,
        components=pca.components_.astype(np.float64),
        explained_variance=pca.explained_variance_.astype(np.float64),
        explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float64),
        use_rep=use_rep,
        n_cells_fit=int(n),
        seed=seed,
        extra={"svd_solver": solver},
    )
