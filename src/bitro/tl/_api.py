"""``bt.tl.fit`` / ``bt.tl.predict`` / ``bt.tl.transfer``: thin wrappers around the model classes.

Options are not repeated here: every keyword option of :func:`fit` and :func:`transfer` is a field of
:class:`bitro.tl.SetupConfig` or :class:`bitro.tl.TrainConfig`, where its default and its documentation
live (the ``bitro`` command line builds its options from the same fields).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bitro import _keys as K
from bitro._logging import logger

if TYPE_CHECKING:
    import spatialdata as sd

    from bitro.tl._baselines import BaselineModel
    from bitro.tl._configs import SetupConfig, TrainConfig
    from bitro.tl._cross_slice import CrossSliceModel
    from bitro.tl._ensemble_model import BiTroEnsemble
    from bitro.tl._model import BiTroModel

#: Models that predict a slide from spots of other slides (``bitro.tl._cross_slice``).
CROSS_SLICE_MODELS = ("spahgc", "retrieval")
#: SetupConfig fields the baselines use (the rest only shape the BiTro network's bags).
_BASELINE_OPTIONS = ("target", "use_rep", "seed", "spots_key", "cells_key")


def fit(
    sdatas: sd.SpatialData | list[sd.SpatialData],
    *,
    level: str = "spot",
    genes: list[str] | None = None,
    model: str = "bitro",
    config: Any = None,
    setup: SetupConfig | dict[str, Any] | None = None,
    train: TrainConfig | dict[str, Any] | None = None,
    n_models: int = 1,
    **options: Any,
) -> BiTroModel | BiTroEnsemble | BaselineModel | CrossSliceModel:
    """Train a model on one or more slides.

    With no options this trains BiTro with the settings the accuracy benchmark found best
    (:class:`~bitro.tl.TrainConfig` and :class:`~bitro.tl.SetupConfig` defaults: library-size targets,
    learning rate 1e-3, at most 30 epochs, early stopping on 10% of the training spots).

    Parameters
    ----------
    sdatas
        Training slides, preprocessed with ``bt.pp`` (cells embedded and assigned to spots or patches).
    level
        ``"spot"`` or ``"bulk"``.
    genes
        Genes to predict; default selected from the training data.
    model
        ``"bitro"``; a baseline: ``"ridge"``, ``"mlp"``, ``"depth"``, ``"cell_count"``, ``"mean"``
        (spot level; they use ``target``, ``use_rep``, ``seed`` and the table keys only); or a
        cross-slice model (spot level): ``"spahgc"`` (:class:`~bitro.tl.SpaHGCModel`) or ``"retrieval"``
        (:class:`~bitro.tl.RetrievalModel`), which also take the fields of
        :class:`~bitro.tl.CrossSliceConfig` (``n_exemplars``, ``spot_rep``, ...).
    config
        :class:`bitro.models.BiTroConfig` (network) or a dict of its fields;
        :class:`bitro.models.SpaHGCConfig` for ``model="spahgc"``.
    setup
        :class:`bitro.tl.SetupConfig` or a dict of its fields.
    train
        :class:`bitro.tl.TrainConfig` or a dict of its fields.
    n_models
        BiTro only: fit this many models with seeds ``seed, seed + 1, ...`` and return them as one
        :class:`~bitro.tl.BiTroEnsemble`, whose predictions are the members' average. Leave one HER2ST
        section out, ``n_models=3`` raised normalised PCC_gene from 0.169 to 0.183 (higher on 5 of 5
        sections) for three times the training; the README's path uses it. The default 1 returns one
        :class:`~bitro.tl.BiTroModel` (one network to inspect, three times faster).
    **options
        Any field of :class:`~bitro.tl.SetupConfig` (``target``, ``zscore``, ``use_rep``, ``n_components``,
        ``n_phenotypes``, ``cluster_weight``, ``k``, ``context_um``, ``seed``, table keys) or of
        :class:`~bitro.tl.TrainConfig` (``max_epochs``, ``lr``, ``weight_decay``, ``batch_size``,
        ``patience``, ``validation_fraction``, ``grad_clip``, ``max_cells_per_step``, ``checkpoint_dir``,
        ``device``); they override ``setup`` / ``train``. Unknown names raise ``TypeError``.

    Returns
    -------
    The trained :class:`bitro.tl.BiTroModel` (a :class:`~bitro.tl.BiTroEnsemble` with ``n_models > 1``; or a
    baseline or cross-slice model with the same ``predict``).
    """
    from bitro.tl._configs import SetupConfig, TrainConfig, split_options
    from bitro.tl._model import BiTroModel
    from bitro.tl._setup import as_slides

    if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 1:
        msg = f"n_models must be an integer ≥ 1, got {n_models!r}."
        raise ValueError(msg)
    if n_models > 1 and model != "bitro":
        msg = f"n_models={n_models} fits a BiTro ensemble; model={model!r} fits one model, so drop n_models."
        raise ValueError(msg)
    if n_models > 1:
        from bitro.tl._ensemble_model import fit_ensemble

        given_train = train.to_dict() if isinstance(train, TrainConfig) else dict(train or {})
        if options.get("checkpoint_dir") or given_train.get("checkpoint_dir"):
            msg = (
                f"checkpoint_dir with n_models={n_models}: the members would share one checkpoint folder. Fit "
                "the members one at a time (seed=0, 1, ...), each with its own checkpoint_dir, and pass "
                "bt.tl.BiTroEnsemble([m0, m1, ...])."
            )
            raise ValueError(msg)
        seed = options.pop("seed", None)

        def fit_one(member_seed: int) -> BiTroModel:
            return fit(sdatas, level=level, genes=genes, config=config, setup=setup, train=train,
                       seed=member_seed, **options)  # fmt: skip

        if seed is None and setup is not None:
            seed = setup.seed if isinstance(setup, SetupConfig) else dict(setup).get("seed")
        return fit_ensemble(n_models, seed, fit_one)
    if model in CROSS_SLICE_MODELS:  # SpaHGC and retrieval: their own options (CrossSliceConfig)
        from bitro.tl._cross_slice import fit_cross_slice

        return fit_cross_slice(sdatas, model=model, level=level, genes=genes, config=config, setup=setup,
                               train=train, **options)  # fmt: skip
    setup_opts, train_opts = split_options(options, allowed=(SetupConfig, TrainConfig))
    sdatas = as_slides(sdatas)
    if model != "bitro":
        return _fit_baseline(sdatas, model=model, level=level, genes=genes, setup=setup, options=setup_opts,
                             ignored=[*train_opts, *(["config"] if config is not None else [])])  # fmt: skip
    m = BiTroModel(sdatas, level=level, genes=genes, config=config, setup=setup, **setup_opts)
    return m.train(train, **train_opts)


def _fit_baseline(sdatas, *, model, level, genes, setup, options, ignored) -> BaselineModel:
    from bitro.tl._baselines import BASELINES, BaselineModel
    from bitro.tl._configs import SetupConfig

    if model not in BASELINES:
        msg = f"Unknown model {model!r}; choose 'bitro', one of {BASELINES} or one of {CROSS_SLICE_MODELS}."
        raise ValueError(msg)
    if level != "spot":
        msg = f"Baseline {model!r} is spot-level only; use model='bitro' for level={level!r}."
        raise ValueError(msg)
    given = setup if isinstance(setup, SetupConfig) else SetupConfig.from_dict(setup)
    given = given.replace(**options)
    unused = sorted({*ignored, *(k for k in options if k not in _BASELINE_OPTIONS)})
    if unused:
        logger.warning("Baseline %r ignores %s (BiTro options).", model, unused)
    if genes is None:
        from bitro.pp._genes import select_genes

        genes = list(select_genes(sdatas, table_key=given.spots_key))
    return BaselineModel(
        sdatas, kind=model, genes=genes, target=given.target, use_rep=given.use_rep, seed=given.seed
    )


def predict(
    model: BiTroModel | BiTroEnsemble | BaselineModel | CrossSliceModel | Sequence[BiTroModel],
    sdata: sd.SpatialData,
    *,
    key_added: str = K.PRED,
    batch_size: int = 64,
    device: str | None = None,
    inplace: bool = True,
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Predict with ``model`` and write into ``sdata`` (see :meth:`bitro.tl.BiTroModel.predict`).

    Parameters
    ----------
    model
        A trained model (:func:`fit`, :func:`transfer` or :meth:`bitro.tl.BiTroModel.load`), a
        :class:`~bitro.tl.BiTroEnsemble` (``fit(..., n_models=3)``), or a list of
        BiTro models fitted on the same slides and genes with different seeds: their predictions are
        averaged (each spot's log1p prediction on the target scale, each cell's share of its spot, so the
        cells still sum to the spot) and written once, with every member in ``uns[key_added]["ensemble"]``.
        Leave one HER2ST section out, three seeds averaged raised normalised PCC_gene from 0.169 to 0.183
        (higher on 5 of 5 sections; see the benchmarks page), for three times the training.
    sdata
        The slide, preprocessed like the training slides.
    key_added
        Layer / ``obsm`` / ``uns`` key of the predictions.
    batch_size
        Bags per forward pass.
    device
        ``None`` means ``bt.settings.device``.
    inplace
        Write the predictions into ``sdata`` and return ``None`` (the package rule,
        ``docs/contributing.md``); ``False``: write nothing and return the arrays that would be
        written (``units``, ``cells`` and ``bulk`` when present).
    overwrite
        Replace existing prediction keys.
    """
    if isinstance(model, list | tuple):
        from functools import partial

        from bitro.tl._ensemble import predict_ensemble

        run = partial(predict_ensemble, model)
    else:
        run = model.predict
    if inplace:
        run(sdata, key_added=key_added, batch_size=batch_size, device=device, overwrite=overwrite)
        return None
    from bitro.tl._cv import light_copy

    tables = tuple(sdata.tables)
    return run(
        light_copy(sdata, tables=tables), key_added=key_added, batch_size=batch_size, device=device,
        overwrite=overwrite,
    )  # fmt: skip


def transfer(
    model: BiTroModel | BiTroEnsemble,
    sdatas: sd.SpatialData | list[sd.SpatialData],
    *,
    level: str,
    method: str = "lora",
    genes: list[str] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    train: TrainConfig | dict[str, Any] | None = None,
    **options: Any,
) -> BiTroModel | BiTroEnsemble:
    """Fine-tune a trained model on another level (spot → bulk or bulk → spot).

    See :meth:`bitro.tl.BiTroModel.transfer`: the source model's feature projection, phenotypes, table
    keys and graph settings are kept; ``options`` are ``target``, ``cluster_weight``, ``seed``, ``zscore``
    (:class:`~bitro.tl.SetupConfig`) or any :class:`~bitro.tl.TrainConfig` field. An ensemble transfers
    member by member (each keeps its seed) and stays an ensemble.
    """
    from bitro.tl._ensemble_model import BiTroEnsemble
    from bitro.tl._model import BiTroModel

    if not isinstance(model, BiTroModel | BiTroEnsemble):
        msg = f"transfer needs a trained BiTroModel (bt.tl.fit(..., model='bitro')), got {type(model).__name__}."
        raise ValueError(msg)
    return model.transfer(
        sdatas, level=level, method=method, genes=genes, rank=rank, alpha=alpha, dropout=dropout, train=train,
        **options,
    )  # fmt: skip
