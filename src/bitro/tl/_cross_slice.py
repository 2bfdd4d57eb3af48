"""What the cross-slice models share: setup from training slides, the leakage checks, writing, files.

:class:`CrossSliceModel` is the base of :class:`~bitro.tl.SpaHGCModel` and
:class:`~bitro.tl.RetrievalModel`. Its setup fits the spot features and the target statistics on the
training slides, and indexes every training spot (features, slide, spot id, normalised expression)
in an :class:`~bitro.tl.ExemplarIndex`. Its prediction refuses a slide that is one of the training
slides (by name, or by content under another name): its exemplars would come from itself.
:func:`fit_cross_slice` is what ``bt.tl.fit(model="spahgc" | "retrieval")`` calls.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro.io._build import get_table
from bitro.tl._configs import SetupConfig, TrainConfig, split_options
from bitro.tl._cross_slice_config import CrossSliceConfig
from bitro.tl._cross_slice_state import CrossSliceState, read_cross_slice, write_cross_slice

if TYPE_CHECKING:
    import pandas as pd
    import spatialdata as sd

    from bitro.tl._spot_features import SpotTable

CROSS_SLICE_MODELS = ("spahgc", "retrieval")


def _options(cls: type, given: Any, options: dict[str, Any]) -> Any:
    base = given if isinstance(given, cls) else cls.from_dict(given)
    return base.replace(**options) if options else base


def _slide_counts(
    sdata: sd.SpatialData, name: str, rows: np.ndarray, genes: list[str], setup: SetupConfig
) -> np.ndarray:
    """``(spots, genes)`` counts of ``rows`` of the slide's spot table; missing genes raise naming the slide."""
    from bitro.tl._levels import unit_counts

    spots = get_table(sdata, setup.spots_key)
    missing = [g for g in genes if g not in spots.var_names]
    if missing:
        msg = (
            f"{len(missing)} of {len(genes)} genes are missing from slide {name!r} (e.g. {missing[:5]}); pass "
            "genes= measured in every training slide (bt.pp.select_genes intersects them)."
        )
        raise ValueError(msg)
    return unit_counts(spots[rows], genes, layer=K.COUNTS_LAYER, what=f"{name} spots")


def prepare_state(
    sdatas: list[sd.SpatialData],
    *,
    model: str,
    genes: list[str] | None,
    setup: SetupConfig,
    cross_slice: CrossSliceConfig,
) -> tuple[CrossSliceState, list[SpotTable], list[np.ndarray]]:
    """Fit features and targets on the training slides and index their spots.

    Returns
    -------
    ``(state, spot tables per slide, normalised targets per slide)``.
    """
    from bitro.tl._exemplars import ExemplarIndex
    from bitro.tl._setup import check_same_encoder, slide_name
    from bitro.tl._spot_features import SpotFeatures
    from bitro.tl._targets import TargetTransform

    names = [slide_name(s, i) for i, s in enumerate(sdatas)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        msg = (
            f"Training slides share the sample id(s) {repeated}; exemplars are told apart by slide, so give every "
            "slide its own sample_id (bt.io.set_scale(sdata, sample_id=...)) or drop the duplicates."
        )
        raise ValueError(msg)
    if genes is None:
        from bitro.pp._genes import select_genes

        genes = list(select_genes(sdatas, table_key=setup.spots_key))
    genes = [str(g) for g in genes]
    if not genes or len(set(genes)) != len(genes):
        msg = "genes= must be a non-empty list without duplicates."
        raise ValueError(msg)
    for s, name in zip(sdatas, names, strict=True):  # before any fitting: a missing gene fails fast
        _slide_counts(s, name, np.zeros(0, dtype=np.int64), genes, setup)
    encoder = check_same_encoder(sdatas, setup)
    features, tables = SpotFeatures.fit(sdatas, setup, spot_rep=cross_slice.spot_rep)
    prints = [t.fingerprint for t in tables]
    for i, fp in enumerate(prints):
        if fp in prints[:i]:
            msg = (
                f"Training slides {names[prints.index(fp)]!r} and {names[i]!r} hold the same spots (identical "
                "features): one slide would be its own exemplar. Pass each section once."
            )
            raise ValueError(msg)
    counts = [
        _slide_counts(
            s, t.slide, get_table(s, setup.spots_key).obs_names.get_indexer(t.spot_ids), genes, setup
        )
        for s, t in zip(sdatas, tables, strict=True)
    ]
    transform = TargetTransform.fit(np.concatenate(counts), genes, scale=setup.target, zscore=setup.zscore)
    z = [transform.encode(c) for c in counts]
    index = ExemplarIndex.build(
        np.concatenate([t.x for t in tables]),
        np.concatenate([np.repeat(t.slide, len(t.x)) for t in tables]),
        np.concatenate([t.spot_ids for t in tables]),
        values=np.concatenate(z),
        method=cross_slice.index,
    )
    state = CrossSliceState(
        model=model,
        genes=genes,
        setup=setup,
        cross_slice=cross_slice,
        features=features,
        transform=transform,
        index=index,
        encoder=encoder,
        train_slides=names,
        slide_fingerprints=prints,
    )
    return state, tables, z


class CrossSliceModel:
    """Base of the models that predict a slide from spots of other, measured slides.

    Subclasses set :attr:`kind` and implement :meth:`predict_z` and the network parts of
    :meth:`_weights` / :meth:`_from_files`.
    """

    kind: str = ""

    def __init__(
        self,
        sdatas: sd.SpatialData | list[sd.SpatialData],
        *,
        genes: list[str] | None = None,
        setup: SetupConfig | dict[str, Any] | None = None,
        cross_slice: CrossSliceConfig | dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        from bitro.tl._setup import as_slides

        setup_opts, cs_opts = split_options(options, allowed=(SetupConfig, CrossSliceConfig))
        setup = _options(SetupConfig, setup, setup_opts)
        setup = setup.replace(seed=resolve_seed(setup.seed))
        cross_slice = _options(CrossSliceConfig, cross_slice, cs_opts)
        self._sdatas = as_slides(sdatas)
        self.state, self._tables, self._z = prepare_state(
            self._sdatas, model=self.kind, genes=genes, setup=setup, cross_slice=cross_slice
        )

    # ------------------------------------------------------------------ views of the state
    level = "spot"
    genes = property(lambda self: list(self.state.genes), doc="Predicted genes, in output order.")
    setup = property(lambda self: self.state.setup, doc="The :class:`~bitro.tl.SetupConfig`.")
    cross_slice = property(
        lambda self: self.state.cross_slice, doc="The :class:`~bitro.tl.CrossSliceConfig`."
    )
    transform = property(lambda self: self.state.transform, doc="Target statistics (training slides only).")
    index = property(
        lambda self: self.state.index, doc="The :class:`~bitro.tl.ExemplarIndex` of the training spots."
    )
    train_slides = property(lambda self: list(self.state.train_slides), doc="Names of the training slides.")
    history = property(lambda self: self.state.history, doc="Per-epoch losses (SpaHGC).")
    is_trained = property(lambda self: self.state.is_trained, doc="Whether the model can predict.")
    seed = property(lambda self: self.state.setup.seed, doc="Random seed.")
    use_rep = property(lambda self: self.state.setup.use_rep, doc="Cell embedding in ``cells.obsm``.")

    # ------------------------------------------------------------------ prediction
    def spot_table(self, sdata: sd.SpatialData) -> SpotTable:
        """The features of the slide to predict, after the encoder and leakage checks.

        Raises
        ------
        ValueError
            The slide is a training slide (same name, or the same spot features under another name):
            its exemplars would come from the slide being predicted. Also: cells embedded with another
            encoder or width than the training cells; no spot holds a cell.
        """
        from bitro.tl._predict import check_features

        state = self.state
        check_features(
            SimpleNamespace(setup=state.setup, projection=state.features.projection, encoder=state.encoder),
            sdata,
        )
        table = state.features.table(sdata, state.setup)
        same = table.slide if table.slide in state.train_slides else None
        if same is None and table.fingerprint in state.slide_fingerprints:
            same = state.train_slides[state.slide_fingerprints.index(table.fingerprint)]
        if same is not None:
            how = "is" if same == table.slide else f"({table.slide!r}) holds the same spots as"
            msg = (
                f"The slide to predict {how} training slide {same!r}: its exemplars would come from the slide "
                "being predicted (leakage). Predict a held-out slide, or train without this one."
            )
            raise ValueError(msg)
        if len(table.x) == 0:
            msg = (
                f"No spot of {table.slide!r} holds a cell: nothing to predict. Run bt.pp.assign_cells first."
            )
            raise ValueError(msg)
        return table

    def predict_z(self, table: SpotTable, *, batch_size: int, device: str | None) -> tuple[np.ndarray, Any]:
        """``(normalised predictions (n, G), exemplars)`` of a slide's spots."""
        raise NotImplementedError

    def predict_log1p(
        self, sdata: sd.SpatialData, *, batch_size: int = 64, device: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
        """``(spot ids, log1p predictions (n, G), cells per spot, exemplars)`` of the spots with cells."""
        if not self.is_trained:
            logger.warning("Predicting with an untrained model.")
        table = self.spot_table(sdata)
        z, exemplars = self.predict_z(table, batch_size=batch_size, device=device)
        return table.spot_ids, self.transform.to_log1p(z), table.n_cells, exemplars.to_frame(table.spot_ids)

    def predict(
        self,
        sdata: sd.SpatialData,
        *,
        key_added: str = K.PRED,
        batch_size: int = 64,
        device: str | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Predict the slide's spots and write ``spots.layers[key_added]``.

        Writes (like BiTro's spot outputs): ``spots.layers[key_added]`` log1p expression on the model's
        target scale aligned to ``var`` (NaN for genes the model does not predict and for spots without
        cells), ``spots.obs[f"{key_added}_n_cells"]`` and provenance in ``spots.uns[key_added]``.
        ``device=None`` means ``bt.settings.device``.

        Returns
        -------
        dict with ``units`` (the layer written) and ``exemplars`` (one row per spot and exemplar:
        ``query`` spot, ``rank``, training ``slide`` and ``spot``, cosine ``similarity``).
        """
        from bitro.tl._write import write_units_layer

        spots = get_table(sdata, self.setup.spots_key)
        if key_added in spots.layers and not overwrite:
            msg = f"spots.layers[{key_added!r}] already exists; pass overwrite=True or another key_added."
            raise ValueError(msg)
        ids, log1p, n, exemplars = self.predict_log1p(sdata, batch_size=batch_size, device=device)
        layer = write_units_layer(
            spots, ids, self.genes, log1p, key_added=key_added, provenance=self._provenance(), n_cells=n,
            overwrite=overwrite,
        )  # fmt: skip
        return {"units": layer, "exemplars": exemplars}

    def _provenance(self) -> dict[str, Any]:
        from bitro import __version__

        cs = self.cross_slice
        out = {
            "model": self.kind,
            "level": "spot",
            "target_scale": self.transform.scale,
            "use_rep": self.use_rep,
            "encoder": self.state.encoder,
            "n_genes": len(self.genes),
            "seed": self.seed,
            "train_slides": self.train_slides,
            "n_exemplars": cs.n_exemplars,
            "bitro_version": __version__,
        }
        if cs.spot_rep is not None:
            out["spot_rep"] = cs.spot_rep
        return out

    # ------------------------------------------------------------------ persistence
    def _weights(self) -> dict[str, np.ndarray]:
        return {}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save as ``model.safetensors`` + ``config.json`` (content hashes, no pickle; see :meth:`load`).

        The folder is written next to ``path`` and moved into place. ``overwrite=True`` replaces only a
        bitro model folder; any other existing path is refused.
        """
        from bitro import __version__
        from bitro._files import write_replacing

        weights = self._weights()
        return write_replacing(
            lambda tmp: (tmp.mkdir(), write_cross_slice(tmp, self.state, weights, bitro_version=__version__)),
            path,
            kind="model",
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: str | Path) -> CrossSliceModel:
        """Load a model saved with :meth:`save`; edited or replaced files raise ``ValueError`` naming the file."""
        state, weights = read_cross_slice(path, model=cls.kind)
        if list(state.transform.genes) != list(state.genes):
            msg = (
                f"{path}: the gene list and the target statistics disagree; the files do not belong together."
            )
            raise ValueError(msg)
        self = cls.__new__(cls)
        self.state, self._sdatas, self._tables, self._z = state, None, None, None
        self._from_files(weights, path)
        return self

    def _from_files(self, weights: dict[str, np.ndarray], path: str | Path) -> None:
        """Rebuild the network from ``weights`` (none for retrieval)."""


def fit_cross_slice(
    sdatas: Any,
    *,
    model: str,
    level: str,
    genes: list[str] | None,
    config: Any,
    setup: Any,
    train: Any,
    **options: Any,
) -> CrossSliceModel:
    """``bt.tl.fit(model="spahgc" | "retrieval")``: build (and for SpaHGC train) the model."""
    from bitro.tl._retrieval import RetrievalModel
    from bitro.tl._spahgc import SpaHGCModel

    if level != "spot":
        msg = f"model={model!r} predicts spots; use level='spot' (got {level!r})."
        raise ValueError(msg)
    setup_opts, train_opts, cs_opts = split_options(
        options, allowed=(SetupConfig, TrainConfig, CrossSliceConfig)
    )
    if model == "retrieval":
        ignored = sorted(
            [*train_opts, *(["config"] if config is not None else []), *(["train"] if train else [])]
        )
        if ignored:
            logger.warning("model='retrieval' is not trained; it ignores %s.", ignored)
        return RetrievalModel(sdatas, genes=genes, setup=setup, **setup_opts, **cs_opts)
    if model != "spahgc":
        msg = f"Unknown cross-slice model {model!r}; choose one of {CROSS_SLICE_MODELS}."
        raise ValueError(msg)
    return SpaHGCModel(sdatas, genes=genes, config=config, setup=setup, **setup_opts, **cs_opts).train(
        train, **train_opts
    )
