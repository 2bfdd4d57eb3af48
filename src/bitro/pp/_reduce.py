"""Projection of cell embeddings (standardise + PCA) and cell phenotypes (k-means).

Both steps are *fitted once* on the cells of the training slides and then applied
unchanged to any new slide, so that a projected dimension or a phenotype label
means the same thing on every slide. The fitted states (:class:`FeatureProjection`,
:class:`PhenotypeModel`) are small dataclasses that a model stores next to its
weights: ``arrays()`` gives the numeric parts (for safetensors), ``meta()`` the
JSON-serialisable rest, and ``from_arrays(arrays, meta)`` rebuilds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro._validate import check_not_exists
from bitro._version import __version__

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

MAX_CELLS_FIT = 200_000
"""Cells sampled (without replacement) to fit the PCA; all cells are then transformed."""
MINIBATCH_ABOVE = 100_000
"""Above this many training cells k-means uses :class:`~sklearn.cluster.MiniBatchKMeans`."""
CHUNK = 65_536
"""Rows transformed / labelled per chunk, so memory stays bounded on millions of cells."""
PCA_KEY = "X_bitro_pca"


def _tables(
    objs: Any, table_key: str, *, hint: str = "Cells are created by bt.pp.segment_cells."
) -> list[ad.AnnData]:
    """Return the tables ``table_key`` of one or several SpatialData objects (AnnData passes through)."""
    import anndata as ad

    from bitro.io._build import get_table

    if isinstance(objs, ad.AnnData) or hasattr(objs, "tables"):
        objs = [objs]
    objs = list(objs)
    if not objs:
        msg = "No slides given; pass a SpatialData object or a non-empty list of them."
        raise ValueError(msg)
    out = []
    for obj in objs:
        if isinstance(obj, ad.AnnData):
            out.append(obj)
        elif hasattr(obj, "tables"):
            out.append(get_table(obj, table_key, hint=hint))
        else:
            msg = f"Expected SpatialData or AnnData objects, got {type(obj).__name__}."
            raise TypeError(msg)
    return out


def _rep(adata: ad.AnnData, use_rep: str, *, hint: str) -> np.ndarray:
    if use_rep not in adata.obsm:
        msg = (
            f"obsm[{use_rep!r}] not found in the cells table (available: {sorted(adata.obsm.keys())}). {hint}"
        )
        raise KeyError(msg)
    x = adata.obsm[use_rep]
    if hasattr(x, "to_numpy"):
        x = x.to_numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        msg = f"obsm[{use_rep!r}] must be a 2-D array (cells x features), got shape {x.shape}."
        raise ValueError(msg)
    return x


def _embed_hint(use_rep: str) -> str:
    if use_rep == K.EMBEDDING:
        return "Run bt.pp.embed_cells(sdata) first."
    if use_rep == PCA_KEY:
        return "Run bt.pp.reduce_features(sdatas) first."
    return "Run bt.pp.embed_cells / bt.pp.reduce_features first, or pass the right use_rep=."


def _sample_rows(xs: Sequence[np.ndarray], max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Stack the rows of ``xs``; above ``max_rows`` take a uniform random sample (each slide pro rata)."""
    total = sum(len(x) for x in xs)
    if total <= max_rows:
        return np.concatenate([np.asarray(x, dtype=np.float64) for x in xs], axis=0)
    keep = np.sort(rng.choice(total, size=max_rows, replace=False))
    parts, start = [], 0
    for x in xs:
        sel = keep[(keep >= start) & (keep < start + len(x))] - start
        parts.append(np.asarray(x[sel], dtype=np.float64))
        start += len(x)
    return np.concatenate(parts, axis=0)


def _slide_names(objs: Any, tables: list[ad.AnnData]) -> list[str]:
    """Sample ids of the slides (``bt.io`` scale metadata), ``slide<i>`` when unknown."""
    import anndata as ad

    if isinstance(objs, ad.AnnData) or hasattr(objs, "tables"):
        objs = [objs]
    names = []
    for i, (obj, table) in enumerate(zip(list(objs), tables, strict=True)):
        scale = table.uns.get(K.SCALE, {}) if isinstance(obj, ad.AnnData) else obj.attrs.get(K.SCALE, {})
        names.append(str(scale.get("sample_id", f"slide{i}")) if isinstance(scale, dict) else f"slide{i}")
    return names


def _stored_state(state: Any, fitted_on: list[str], *, fitted_here: bool) -> dict[str, Any]:
    """What ``uns`` keeps of a fitted projection / phenotype model: arrays, metadata, the slides it saw."""
    return {
        "arrays": {k: np.asarray(v) for k, v in state.arrays().items()},
        "meta": {k: v for k, v in state.meta().items() if v is not None},
        "fitted_on": list(fitted_on) if fitted_here else [],
    }


def stored_state(table: ad.AnnData, key: str, cls: type) -> tuple[Any, list[str]] | None:
    """The fitted state that :func:`reduce_features` / :func:`cluster_phenotypes` stored in ``uns[key]``.

    Returns ``(state, slide names it was fitted on)``, or ``None`` when there is none (or it is unreadable).
    """
    entry = table.uns.get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("state"), dict):
        return None
    saved = entry["state"]
    try:
        state = cls.from_arrays(dict(saved["arrays"]), dict(saved["meta"]))
    except (KeyError, TypeError, ValueError):
        return None
    return state, [str(n) for n in np.atleast_1d(saved.get("fitted_on", []))]


# --------------------------------------------------------------------------------------------- PCA state
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
    scale = x.std(axis=0)
    scale[~np.isfinite(scale) | (scale <= 0)] = 1.0
    z = (x - mean) / scale
    if k == min(n, d):
        solver = "full"
    else:
        solver = "randomized" if n > 10_000 else "auto"
    pca = PCA(n_components=k, svd_solver=solver, random_state=seed).fit(z)
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


def reduce_features(
    sdatas: sd.SpatialData | ad.AnnData | Sequence[sd.SpatialData | ad.AnnData],
    *,
    use_rep: str = K.EMBEDDING,
    n_components: int = 128,
    per_sample: bool = False,
    pca: FeatureProjection | None = None,
    key_added: str = PCA_KEY,
    table_key: str = K.CELLS,
    max_cells_fit: int = MAX_CELLS_FIT,
    seed: int | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> FeatureProjection | list[FeatureProjection]:
    """Project cell embeddings with one PCA fitted on the training slides.

    Each feature is first standardised (z-scored with the mean and standard deviation
    of the training cells; constant features keep scale 1) so that no embedding
    dimension dominates by its units, then projected on the leading principal axes.
    The fit uses at most ``max_cells_fit`` cells sampled uniformly across slides
    (sklearn's randomized solver above 10,000 cells); every cell is then transformed,
    in chunks.

    Parameters
    ----------
    sdatas
        One slide or a list of slides (SpatialData, or the cells AnnData itself).
    use_rep
        ``obsm`` key of the embedding (written by :func:`bitro.pp.embed_cells`).
    n_components
        Output dimension (paper: 128). Reduced, with a warning, to ``min(n_cells, n_features)``.
    per_sample
        Fit one PCA per slide (the paper's choice); dimensions then mean different things
        on different slides. Default: one PCA for all given slides.
    pca
        A projection returned by an earlier call: applied unchanged (no fitting) to ``sdatas``.
    key_added
        ``obsm`` key of the output.
    table_key
        Cells table.
    max_cells_fit
        Upper bound on the cells used to fit the PCA.
    seed
        Seed for the row sample and the randomized solver (default ``bt.settings.seed``).
    overwrite
        Replace an existing ``obsm[key_added]``.
    inplace
        Write the projected features (below); ``False``: only fit, write nothing — the values are
        ``projection.transform(x)`` (see :doc:`/contributing`, "Return values and inplace").

    Returns
    -------
    The fitted (or the given) :class:`FeatureProjection`, whatever ``inplace``; a list of them (one
    per slide) when ``per_sample=True``. When ``inplace``, writes on each cells table:

    - ``obsm[key_added]``: ``(n_cells, n_components)`` float32.
    - ``uns[key_added]``: parameters and explained variance (provenance).
    """
    tables = _tables(sdatas, table_key)
    seed = resolve_seed(seed)
    if pca is not None and per_sample:
        msg = "Pass either pca= (apply a fitted projection) or per_sample=True (fit one per slide), not both."
        raise ValueError(msg)
    if pca is not None and pca.use_rep != use_rep:
        logger.warning(
            "reduce_features: the given projection was fitted on obsm[%r] but is applied to obsm[%r].",
            pca.use_rep,
            use_rep,
        )
    if inplace:
        for adata in tables:
            check_not_exists(key_added, adata.obsm, what="obsm key", overwrite=overwrite)
    xs = [_rep(a, use_rep, hint=_embed_hint(use_rep)) for a in tables]
    dims = {x.shape[1] for x in xs}
    if len(dims) > 1:
        msg = f"obsm[{use_rep!r}] has different widths across slides ({sorted(dims)}); embed all with one encoder."
        raise ValueError(msg)

    if pca is not None:
        states, fitted = [pca] * len(tables), False
    elif per_sample:
        states = [
            FeatureProjection.fit(
                [x], n_components=n_components, seed=seed, use_rep=use_rep, max_cells_fit=max_cells_fit
            )
            for x in xs
        ]
        fitted = True
    else:
        state = FeatureProjection.fit(
            xs, n_components=n_components, seed=seed, use_rep=use_rep, max_cells_fit=max_cells_fit
        )
        states, fitted = [state] * len(tables), True
    names = _slide_names(sdatas, tables)

    if not inplace:
        return states if per_sample else states[0]
    for adata, x, state, n in zip(tables, xs, states, names, strict=True):
        adata.obsm[key_added] = state.transform(x)
        adata.uns[key_added] = {
            "params": {
                "use_rep": use_rep,
                "n_components": state.n_components,
                "n_components_requested": int(n_components),
                "standardize": True,
                "per_sample": bool(per_sample),
                "fitted_here": fitted,
                "max_cells_fit": int(max_cells_fit),
                "seed": seed,
            },
            "n_cells_fit": state.n_cells_fit,
            "explained_variance_ratio": state.explained_variance_ratio.astype(np.float32),
            "bitro_version": __version__,
            # the fitted state, so a model trained on exactly these slides reuses it instead of refitting
            "state": _stored_state(state, [n] if per_sample else names, fitted_here=fitted),
        }
    logger.info("reduce_features: wrote obsm[%r] on %d slide(s) (%r).", key_added, len(tables), states[0])
    if per_sample:
        return states
    return states[0]


# ------------------------------------------------------------------------------------------ phenotypes
@dataclass(frozen=True)
class PhenotypeModel:
    """Fitted k-means phenotypes: each cell gets the label of its nearest centroid.

    Attributes
    ----------
    centroids
        ``(n_clusters, d)`` cluster centres in the ``use_rep`` space.
    use_rep
        ``obsm`` key the centroids live in.
    inertia
        Sum of squared distances of the training cells to their centroid.
    n_cells_fit
        Number of training cells.
    seed
        Seed of the k-means initialisation.
    """

    centroids: np.ndarray
    use_rep: str = PCA_KEY
    inertia: float = float("nan")
    n_cells_fit: int = 0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        """Number of phenotypes."""
        return int(self.centroids.shape[0])

    @property
    def categories(self) -> list[str]:
        """Label names ``"0"`` … ``"K-1"``."""
        return [str(i) for i in range(self.n_clusters)]

    def predict(self, x: np.ndarray, *, chunk_size: int = CHUNK) -> np.ndarray:
        """Index of the nearest centroid for each row of ``x`` (int64)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.centroids.shape[1]:
            msg = (
                f"The phenotype centroids are {self.centroids.shape[1]}-dimensional (obsm[{self.use_rep!r}]) "
                f"but got features of shape {x.shape}; project the slide with the same PCA first."
            )
            raise ValueError(msg)
        c = np.asarray(self.centroids, dtype=np.float64)
        c_sq = np.einsum("ij,ij->i", c, c)
        out = np.empty(x.shape[0], dtype=np.int64)
        for start in range(0, x.shape[0], chunk_size):
            block = np.asarray(x[start : start + chunk_size], dtype=np.float64)
            out[start : start + chunk_size] = np.argmin(c_sq[None, :] - 2.0 * block @ c.T, axis=1)
        return out

    def labels(self, x: np.ndarray) -> pd.Categorical:
        """Categorical labels ``"0"`` … ``"K-1"`` (all categories present)."""
        return pd.Categorical.from_codes(self.predict(x), categories=self.categories)

    def arrays(self) -> dict[str, np.ndarray]:
        """Numeric parts (for safetensors)."""
        return {"centroids": np.asarray(self.centroids, dtype=np.float32)}

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {
            "kind": "PhenotypeModel",
            "use_rep": self.use_rep,
            "n_clusters": self.n_clusters,
            "n_features": int(self.centroids.shape[1]),
            "inertia": float(self.inertia),
            "n_cells_fit": int(self.n_cells_fit),
            "seed": int(self.seed),
            "bitro_version": __version__,
            **self.extra,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> PhenotypeModel:
        """Rebuild from :meth:`arrays` and :meth:`meta`."""
        known = {
            "kind",
            "use_rep",
            "n_clusters",
            "n_features",
            "inertia",
            "n_cells_fit",
            "seed",
            "bitro_version",
        }
        centroids = np.asarray(arrays["centroids"], dtype=np.float64)
        if centroids.shape[0] != meta.get("n_clusters", centroids.shape[0]):
            msg = (
                f"Stored centroids have {centroids.shape[0]} rows but the metadata says {meta['n_clusters']}."
            )
            raise ValueError(msg)
        return cls(
            centroids=centroids,
            use_rep=meta.get("use_rep", PCA_KEY),
            inertia=float(meta.get("inertia", float("nan"))),
            n_cells_fit=int(meta.get("n_cells_fit", 0)),
            seed=int(meta.get("seed", 0)),
            extra={k: v for k, v in meta.items() if k not in known},
        )

    @classmethod
    def fit(
        cls, x: np.ndarray, *, n_clusters: int = 8, seed: int | None = None, use_rep: str = PCA_KEY
    ) -> PhenotypeModel:
        """Fit k-means phenotypes on ``x`` (``(n_cells, d)``, the training cells of all slides stacked).

        Used by :func:`bitro.pp.cluster_phenotypes` and by :class:`bitro.tl.BiTroModel`. The centroids are
        returned in their stored (float32) form. k-means uses :class:`~sklearn.cluster.KMeans`
        (10 initialisations), or :class:`~sklearn.cluster.MiniBatchKMeans` above 100,000 cells.
        """
        state = _fit_kmeans(np.asarray(x), n_clusters=n_clusters, seed=resolve_seed(seed), use_rep=use_rep)
        return cls.from_arrays(state.arrays(), state.meta())

    def to_dict(self) -> dict[str, Any]:
        """Everything as one JSON-serialisable dict."""
        return {"meta": self.meta(), "arrays": {k: v.tolist() for k, v in self.arrays().items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhenotypeModel:
        """Inverse of :meth:`to_dict`."""
        return cls.from_arrays({k: np.asarray(v) for k, v in d["arrays"].items()}, d["meta"])

    def __repr__(self) -> str:
        return (
            f"PhenotypeModel({self.n_clusters} phenotypes in obsm[{self.use_rep!r}] "
            f"({self.centroids.shape[1]} dims), fitted on {self.n_cells_fit} cells)"
        )


def _fit_kmeans(x: np.ndarray, *, n_clusters: int, seed: int, use_rep: str) -> PhenotypeModel:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n = x.shape[0]
    if n < n_clusters:
        msg = (
            f"k-means with n_clusters={n_clusters} needs at least that many cells; got {n}. Lower n_clusters."
        )
        raise ValueError(msg)
    if n > MINIBATCH_ABOVE:
        km = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=3, batch_size=4096)
        algo = "MiniBatchKMeans"
    else:
        km = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10)
        algo = "KMeans"
    km.fit(x)
    return PhenotypeModel(
        centroids=np.asarray(km.cluster_centers_, dtype=np.float64),
        use_rep=use_rep,
        inertia=float(km.inertia_),
        n_cells_fit=int(n),
        seed=seed,
        extra={"algorithm": algo},
    )


def cluster_phenotypes(
    sdatas: sd.SpatialData | ad.AnnData | Sequence[sd.SpatialData | ad.AnnData],
    *,
    use_rep: str = PCA_KEY,
    n_clusters: int = 8,
    kmeans: PhenotypeModel | None = None,
    key_added: str = K.PHENOTYPE,
    table_key: str = K.CELLS,
    seed: int | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> PhenotypeModel:
    """Cluster cells into phenotypes with k-means fitted on all given training slides.

    Parameters
    ----------
    sdatas
        One slide or a list of slides (SpatialData, or the cells AnnData itself).
    use_rep
        ``obsm`` key of the features (default: the PCA of :func:`bitro.pp.reduce_features`).
    n_clusters
        Number of phenotypes K (paper: 8–10).
    kmeans
        A :class:`PhenotypeModel` from an earlier call: new slides are labelled by nearest
        centroid, consistently with the training slides; nothing is fitted.
    key_added
        ``obs`` column of the labels.
    table_key
        Cells table.
    seed
        Seed of the k-means initialisation (default ``bt.settings.seed``).
    overwrite
        Replace an existing ``obs[key_added]``.
    inplace
        Write the labels (below); ``False``: only fit, write nothing — the labels are
        ``model.labels(x)`` (see :doc:`/contributing`, "Return values and inplace").

    Returns
    -------
    The fitted (or given) :class:`PhenotypeModel`, whatever ``inplace``. When ``inplace``, writes on
    each cells table:

    - ``obs[key_added]``: categorical labels ``"0"`` … ``"K-1"`` (nearest centroid). k-means uses
      :class:`~sklearn.cluster.KMeans` (10 initialisations), or
      :class:`~sklearn.cluster.MiniBatchKMeans` above 100,000 cells.
    - ``uns[key_added]``: parameters, cluster sizes (provenance).
    """
    tables = _tables(sdatas, table_key)
    seed = resolve_seed(seed)
    if inplace:
        for adata in tables:
            check_not_exists(key_added, adata.obs, what="obs column", overwrite=overwrite)
    xs = [_rep(a, use_rep, hint=_embed_hint(use_rep)) for a in tables]
    if kmeans is None:
        model = PhenotypeModel.fit(
            np.concatenate(xs, axis=0), n_clusters=n_clusters, seed=seed, use_rep=use_rep
        )
        fitted = True
    else:
        model, fitted = kmeans, False
    if not inplace:
        return model
    names = _slide_names(sdatas, tables)
    for adata, x in zip(tables, xs, strict=True):
        labels = model.labels(x)
        adata.obs[key_added] = labels
        adata.uns[key_added] = {
            "params": {
                "use_rep": use_rep,
                "n_clusters": model.n_clusters,
                "fitted_here": fitted,
                "seed": seed,
                "method": model.extra.get("algorithm", "nearest centroid"),
            },
            "counts": np.bincount(labels.codes, minlength=model.n_clusters).astype(np.int64),
            "bitro_version": __version__,
            "state": _stored_state(model, names, fitted_here=fitted),
        }
    logger.info("cluster_phenotypes: wrote obs[%r] on %d slide(s) (%r).", key_added, len(tables), model)
    return model
