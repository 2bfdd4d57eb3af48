"""``bt.pp.reduce_features`` and ``bt.pp.cluster_phenotypes``: fit once on the training slides, write.

Both steps are *fitted once* on the cells of the training slides and then applied unchanged to any
new slide, so that a projected dimension or a phenotype label means the same thing on every slide.
The fitted states live in :mod:`bitro.pp._projection` (:class:`FeatureProjection`) and
:mod:`bitro.pp._phenotypes` (:class:`PhenotypeModel`); their state is also stored in ``uns`` so that
a model trained on exactly those slides reuses it (:func:`stored_state`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro._validate import check_not_exists
from bitro._version import __version__
from bitro.pp._phenotypes import PhenotypeModel
from bitro.pp._projection import MAX_CELLS_FIT, FeatureProjection

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

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
