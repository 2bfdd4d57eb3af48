"""From training slides to a model state and a training set: features, phenotypes, graph, bags, targets.

What ``bt.pp`` already wrote is used rather than recomputed: a projection from
:func:`bitro.pp.reduce_features` or phenotypes from :func:`bitro.pp.cluster_phenotypes` fitted on
exactly the training slides (same features, dimension and cluster count), and a within-bag graph from
:func:`bitro.pp.cell_graph` built for the same bags and ``k``. The model fits the same objects with the
same functions otherwise, so either way the result is the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro.io._build import get_scale
from bitro.tl._configs import SetupConfig
from bitro.tl._data import BagSet, build_bags, cells_of
from bitro.tl._levels import Level, TrainingSet
from bitro.tl._state import ModelState

if TYPE_CHECKING:
    import anndata as ad
    import spatialdata as sd

#: Cells sampled to fit the PCA (the rest are transformed).
MAX_CELLS_FIT = 200_000
#: Encoder provenance compared across slides and recorded with the model.
ENCODER_FIELDS = ("encoder", "mode", "dim", "checkpoint_sha256", "context_um", "tile_mpp")


def as_slides(sdatas: Any) -> list[sd.SpatialData]:
    """A non-empty list of SpatialData objects (one object is wrapped)."""
    import spatialdata as sd

    if isinstance(sdatas, sd.SpatialData):
        return [sdatas]
    sdatas = list(sdatas) if sdatas is not None else []
    if not sdatas or not all(isinstance(s, sd.SpatialData) for s in sdatas):
        msg = "Pass a SpatialData object or a non-empty list of SpatialData objects."
        raise TypeError(msg)
    return sdatas


def slide_name(sdata: sd.SpatialData, i: int) -> str:
    """The slide's sample id, or ``slide<i>``."""
    return str(get_scale(sdata).get("sample_id", f"slide{i}"))


def cell_features(sdata: sd.SpatialData, use_rep: str, cells_key: str) -> np.ndarray:
    """``cells.obsm[use_rep]`` as float32, refusing missing and non-finite features."""
    cells = cells_of(sdata, cells_key)
    if use_rep not in cells.obsm:
        msg = (
            f"cells.obsm[{use_rep!r}] is missing (have {list(cells.obsm)}); run bt.pp.embed_cells "
            f"(key_added={use_rep!r}) first."
        )
        raise KeyError(msg)
    x = np.asarray(cells.obsm[use_rep], dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        msg = (
            f"cells.obsm[{use_rep!r}] has non-finite values in {len(rows)} cells (e.g. "
            f"{list(cells.obs_names[rows[:3]])}); re-run bt.pp.embed_cells or drop those cells."
        )
        raise ValueError(msg)
    return x


def encoder_info(cells: ad.AnnData, use_rep: str) -> dict[str, Any]:
    """The encoder provenance ``bt.pp.embed_cells`` recorded in ``cells.uns[use_rep]``."""
    info = cells.uns.get(use_rep, {})
    return {k: info[k] for k in ENCODER_FIELDS if k in info} if isinstance(info, dict) else {}


def check_same_encoder(sdatas: list[sd.SpatialData], setup: SetupConfig) -> dict[str, Any]:
    """Refuse training slides embedded with different encoders (same width or not); return the encoder."""
    infos = [encoder_info(cells_of(s, setup.cells_key), setup.use_rep) for s in sdatas]
    widths = {int(cells_of(s, setup.cells_key).obsm[setup.use_rep].shape[1]) for s in sdatas}
    if len(widths) > 1:
        msg = (
            f"cells.obsm[{setup.use_rep!r}] has different widths across the training slides ({sorted(widths)}); "
            "embed every slide with the same encoder and mode."
        )
        raise ValueError(msg)
    keys = [k for k in ENCODER_FIELDS if k != "dim"]
    known = [(i, info) for i, info in enumerate(infos) if info.get("encoder") is not None]
    for i, info in known[1:]:
        ref_i, ref = known[0]
        diff = [k for k in keys if info.get(k) != ref.get(k)]
        if diff:
            parts = ", ".join(f"{k}: {ref.get(k)!r} vs {info.get(k)!r}" for k in diff)
            msg = (
                f"The training slides were embedded differently ({slide_name(sdatas[ref_i], ref_i)} vs "
                f"{slide_name(sdatas[i], i)}: {parts}); features of different encoders do not mean the same. "
                "Re-run bt.pp.embed_cells with one encoder and mode on every slide."
            )
            raise ValueError(msg)
    return dict(known[0][1]) if known else {}


def _reuse(sdatas, setup, key: str, cls: type, names: list[str], fits: Any) -> Any | None:
    """A state stored by ``bt.pp`` in every slide's ``cells.uns[key]``, if it fits these slides and options."""
    from bitro.pp._reduce import stored_state

    found = [stored_state(cells_of(s, setup.cells_key), key, cls) for s in sdatas]
    if any(f is None for f in found):
        return None
    state, fitted_on = found[0]
    if any(
        not np.array_equal(f[0].arrays()[a], state.arrays()[a]) for f in found[1:] for a in state.arrays()
    ):
        logger.info("The slides hold different %s states; fitting one on the training slides.", key)
        return None
    if sorted(fitted_on) != sorted(names) or not fits(state):
        logger.info(
            "cells.uns[%r] holds a state fitted on %s with other options; fitting one on the training slides %s.",
            key,
            fitted_on,
            names,
        )
        return None
    logger.info(
        "Using the %s that bt.pp stored in cells.uns[%r] (fitted on %s).", type(state).__name__, key, names
    )
    return state


def fit_features(
    sdatas: list[sd.SpatialData],
    setup: SetupConfig,
    *,
    projection: Any = None,
    phenotypes: Any = None,
) -> tuple[Any, Any, list[np.ndarray], list[np.ndarray]]:
    """The projection and phenotypes of the training cells (given, stored by ``bt.pp``, or fitted).

    Returns
    -------
    ``(projection, phenotypes, projected features per slide, phenotype labels per slide)``.
    """
    from bitro.pp._reduce import PCA_KEY, FeatureProjection, PhenotypeModel

    raw = [cell_features(s, setup.use_rep, setup.cells_key) for s in sdatas]
    names = [slide_name(s, i) for i, s in enumerate(sdatas)]
    if projection is None:
        projection = _reuse(
            sdatas,
            setup,
            PCA_KEY,
            FeatureProjection,
            names,
            lambda p: (
                p.use_rep == setup.use_rep
                and p.n_features == raw[0].shape[1]
                and p.n_components == min(setup.n_components, raw[0].shape[1], sum(len(x) for x in raw))
            ),
        )
    if projection is None:
        projection = FeatureProjection.fit(
            raw,
            n_components=setup.n_components,
            seed=setup.seed,
            use_rep=setup.use_rep,
            max_cells_fit=MAX_CELLS_FIT,
        )
    elif raw[0].shape[1] != projection.n_features:
        msg = (
            f"cells.obsm[{setup.use_rep!r}] has {raw[0].shape[1]} features; the projection expects "
            f"{projection.n_features}. Embed all slides with the same encoder."
        )
        raise ValueError(msg)
    projected = [projection.transform(x) for x in raw]
    if phenotypes is None:
        phenotypes = _reuse(
            sdatas,
            setup,
            K.PHENOTYPE,
            PhenotypeModel,
            names,
            lambda p: p.n_clusters == setup.n_phenotypes and p.centroids.shape[1] == projection.n_components,
        )
    if phenotypes is None:
        phenotypes = PhenotypeModel.fit(
            np.concatenate(projected), n_clusters=setup.n_phenotypes, seed=setup.seed
        )
    return projection, phenotypes, projected, [phenotypes.predict(p) for p in projected]


def stored_graph(cells: ad.AnnData, bag_key: str, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The within-bag graph :func:`bitro.pp.cell_graph` stored, if built for these bags and this ``k``."""
    from bitro.pp._graph import _bag_codes, bag_fingerprint

    entry = cells.uns.get(f"{K.SPATIAL}_neighbors")
    if not isinstance(entry, dict) or K.CONNECTIVITIES not in cells.obsp:
        return None
    params = entry.get("params", {})
    if not (
        params.get("within_bags") and params.get("bag_key") == bag_key and params.get("n_neighbors") == k
    ):
        return None
    if bag_key not in cells.obs or entry.get("bags_sha256") != bag_fingerprint(_bag_codes(cells, bag_key)):
        return None
    graph = cells.obsp[K.CONNECTIVITIES].tocoo()
    return graph.row.astype(np.int64), graph.col.astype(np.int64)


def make_bags(
    sdatas: list[sd.SpatialData],
    level: Level,
    setup: SetupConfig,
    features: list[np.ndarray],
    phenotypes: list[np.ndarray],
    *,
    pos_bins: int,
    use_stored_graph: bool = True,
) -> tuple[BagSet, list[Any]]:
    """The bags of ``sdatas`` at ``level`` (cells sorted by bag, within-bag graph, positions)."""
    graphs = None
    if use_stored_graph:
        graphs = [stored_graph(cells_of(s, setup.cells_key), level.bag_key, setup.k) for s in sdatas]
        if any(g is not None for g in graphs):
            logger.info(
                "Using the cell graph of bt.pp.cell_graph on %d slide(s).", sum(g is not None for g in graphs)
            )
    return build_bags(
        sdatas,
        features=features,
        phenotypes=phenotypes,
        units_key=level.units_key(setup),
        bag_key=level.bag_key,
        cells_key=setup.cells_key,
        k=setup.k,
        pos_bins=pos_bins,
        context_um=setup.context_um,
        graphs=graphs,
    )


def prepare(
    sdatas: list[sd.SpatialData],
    *,
    level: Level,
    genes: list[str] | None,
    setup: SetupConfig,
    net_config: Any,
    projection: Any = None,
    phenotypes: Any = None,
    source_transform: Any = None,
) -> tuple[ModelState, TrainingSet]:
    """Build the state of an untrained model and its training set from the training slides."""
    from bitro.models import BiTroConfig

    level.check_slides(sdatas, setup)
    if genes is None:
        genes = level.default_genes(sdatas, setup)
    else:
        genes = [str(g) for g in genes]
        if len(set(genes)) != len(genes):
            msg = "genes= contains duplicates; pass each gene once."
            raise ValueError(msg)
        level.check_genes(sdatas, setup, genes)
    if not genes:
        msg = "No genes to predict: the training slides share no genes (or genes=[] was given)."
        raise ValueError(msg)
    encoder = check_same_encoder(sdatas, setup)
    projection, phenotypes, projected, labels = fit_features(
        sdatas, setup, projection=projection, phenotypes=phenotypes
    )
    fields = dict(net_config.to_dict() if hasattr(net_config, "to_dict") else (net_config or {}))
    fields.update(n_genes=len(genes), in_dim=int(projection.n_components))
    config = BiTroConfig.from_dict(fields)
    bags, _ = make_bags(sdatas, level, setup, projected, labels, pos_bins=config.pos_bins)
    data = level.targets(sdatas, bags, genes, setup, source=source_transform)
    state = ModelState(
        level=level.name,
        genes=list(genes),
        setup=setup.replace(cluster_weight=data.cluster_weight),
        net_config=config,
        projection=projection,
        phenotypes=phenotypes,
        transform=data.transform,
        encoder=encoder,
        bag_size_um=get_scale(sdatas[0]).get(K.SPOT_DIAMETER_UM),
        domain=[slide_domain(s, setup, projection) for s in sdatas],
        train_slides=[str(n) for n in bags.slide_names],
    )
    return state, data


def initial_log_counts(data: TrainingSet) -> np.ndarray:
    """``(G,)`` log expected counts of one cell of an average bag (starts a count head near the data)."""
    bags = data.bags
    per_bag = data.transform.to_counts(bags.targets).mean(axis=0) if bags.targets is not None else None
    if per_bag is None:
        per_bag = np.expm1(data.transform.mean)
    cells = max(float(bags.n_cells.mean()), 1.0)
    return np.log(np.maximum(per_bag / cells, 1e-6)).astype(np.float32)


def slide_domain(sdata: sd.SpatialData, setup: SetupConfig, projection: Any) -> dict[str, Any]:
    """:func:`bitro.tl.domain_stats` of a slide, as the model compares slides."""
    from bitro.tl._domain import domain_stats

    return domain_stats(
        sdata,
        spots_key=setup.spots_key,
        cells_key=setup.cells_key,
        use_rep=setup.use_rep,
        projection=projection,
    )
