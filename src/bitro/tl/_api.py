"""``bt.tl.fit`` / ``bt.tl.predict`` / ``bt.tl.transfer``: thin wrappers around the model classes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bitro import _keys as K

if TYPE_CHECKING:
    import spatialdata as sd

    from bitro.tl._baselines import BaselineModel
    from bitro.tl._model import BiTroModel


def fit(
    sdatas: sd.SpatialData | list[sd.SpatialData],
    *,
    level: str = "spot",
    genes: list[str] | None = None,
    model: str = "bitro",
    target: str = "raw",
    zscore: bool = True,
    use_rep: str = K.EMBEDDING,
    config: Any = None,
    max_epochs: int = 100,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    patience: int = 6,
    validation_fraction: float = 0.1,
    cluster_weight: float | None = None,
    n_components: int = 128,
    n_phenotypes: int = 8,
    device: str | None = "auto",
    seed: int | None = None,
    spots_key: str = K.SPOTS,
    cells_key: str = K.CELLS,
    context_um: float | None = None,
    max_cells_per_step: int | None = 10_000,
) -> BiTroModel | BaselineModel:
    """Train a model on one or more slides.

    Parameters
    ----------
    sdatas
        Training slides, preprocessed with ``bt.pp`` (cells embedded and assigned to spots or patches).
    level
        ``"spot"`` or ``"bulk"``.
    genes
        Genes to predict; default selected from the training data.
    model
        ``"bitro"`` or a baseline: ``"ridge"``, ``"mlp"``, ``"depth"``, ``"cell_count"``, ``"mean"``
        (spot level).
    target
        ``"raw"`` (log1p of raw counts) or ``"library_size"`` (log1p of library-size-normalised counts).
    zscore
        Per-gene z-scoring of the targets (paper Eq. 21; default). ``False`` is the ablation.
    use_rep
        Cell embedding in ``cells.obsm``.
    config
        :class:`bitro.models.BiTroConfig` or dict of its fields.
    max_epochs, lr, weight_decay, batch_size, patience, validation_fraction
        Training options; see :meth:`bitro.models.BiTroModel.train`.
    cluster_weight
        λ of the cluster loss (default 0 for spots, 0.1 for bulk).
    n_components, n_phenotypes
        PCA dimension and number of k-means phenotypes.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    seed
        Random seed.
    context_um
        Cells within this distance around each bag join the Transformer as context (not pooled);
        default off. See :class:`bitro.models.BiTroModel`.
    max_cells_per_step
        Bulk level: cells per chunk of a slide's forward pass (bounded memory, same loss); ``None``
        runs each slide at once. See :meth:`bitro.models.BiTroModel.train`.
    spots_key, cells_key
        Tables of the spots and of the cells (e.g. ``"cells_truth"`` for pseudo-spots of cell-resolved
        data built with :func:`bitro.tl.pseudo_spots`; bitro model only).

    Returns
    -------
    The trained :class:`bitro.models.BiTroModel` (or a baseline model with the same ``predict``).
    """
    from bitro.tl._baselines import BASELINES, BaselineModel
    from bitro.tl._model import BiTroModel, _as_list

    sdatas = _as_list(sdatas)
    if model != "bitro":
        if model not in BASELINES:
            msg = f"Unknown model {model!r}; choose 'bitro' or one of {BASELINES}."
            raise ValueError(msg)
        if level != "spot":
            msg = f"Baseline {model!r} is spot-level only; use model='bitro' for level={level!r}."
            raise ValueError(msg)
        if genes is None:
            from bitro.pp._genes import select_genes

            genes = list(select_genes(sdatas, table_key=K.SPOTS))
        return BaselineModel(sdatas, kind=model, genes=genes, target=target, use_rep=use_rep, seed=seed)
    m = BiTroModel(
        sdatas,
        level=level,
        genes=genes,
        config=config,
        target=target,
        zscore=zscore,
        use_rep=use_rep,
        n_components=n_components,
        n_phenotypes=n_phenotypes,
        cluster_weight=cluster_weight,
        seed=seed,
        spots_key=spots_key,
        cells_key=cells_key,
        context_um=context_um,
    )
    return m.train(
        max_epochs=max_epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        patience=patience,
        validation_fraction=validation_fraction,
        device=device,
        max_cells_per_step=max_cells_per_step,
    )


def predict(
    model: BiTroModel | BaselineModel,
    sdata: sd.SpatialData,
    *,
    key_added: str = K.PRED,
    batch_size: int = 64,
    device: str | None = "auto",
    overwrite: bool = False,
) -> sd.SpatialData:
    """Predict with ``model`` and write into ``sdata`` (see :meth:`bitro.models.BiTroModel.predict`).

    Returns ``sdata`` (modified in place) for chaining.
    """
    model.predict(sdata, key_added=key_added, batch_size=batch_size, device=device, overwrite=overwrite)
    return sdata


def transfer(
    model: BiTroModel,
    sdatas: sd.SpatialData | list[sd.SpatialData],
    *,
    level: str,
    method: str = "lora",
    genes: list[str] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target: str | None = None,
    max_epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 32,
    patience: int = 6,
    validation_fraction: float = 0.1,
    cluster_weight: float | None = None,
    device: str | None = "auto",
    seed: int | None = None,
    max_cells_per_step: int | None = 10_000,
) -> BiTroModel:
    """Fine-tune a trained model on another level (spot → bulk or bulk → spot).

    The source model's feature projection and phenotype centroids are kept (features must mean the
    same on both levels); gene queries are copied for genes the source had and freshly initialised
    for new ones.

    Parameters
    ----------
    model
        A trained :class:`bitro.models.BiTroModel`.
    sdatas
        Slides of the target level.
    level
        Target level, ``"spot"`` or ``"bulk"``.
    method
        ``"lora"``: LoRA adapters (via peft) on the projection, attention and feed-forward layers, base
        weights frozen, gene head trainable; ``"full"``: fine-tune every weight.
    genes
        Target genes (default: the source model's).
    rank, alpha, dropout
        LoRA rank, scaling and dropout.
    target
        Target scale of the new level (default: the source's scale).
    max_epochs, lr, batch_size, patience, validation_fraction, cluster_weight, device, seed, max_cells_per_step
        As in :func:`bitro.tl.fit`.
    """
    from bitro.models import apply_lora
    from bitro.tl._model import BiTroModel

    if method not in ("lora", "full"):
        msg = f"method must be 'lora' or 'full', got {method!r}."
        raise ValueError(msg)
    if not getattr(model, "is_trained", False) or not isinstance(model, BiTroModel):
        msg = "transfer needs a trained BiTroModel (bt.tl.fit(..., model='bitro'))."
        raise ValueError(msg)
    genes = list(model.genes) if genes is None else list(genes)
    cfg = model.config.to_dict()
    new = BiTroModel(
        sdatas,
        level=level,
        genes=genes,
        config=cfg,
        target=target or model.transform.scale,
        use_rep=model.use_rep,
        cluster_weight=cluster_weight,
        k=model.k,
        context_um=model.context_um,
        seed=model.seed if seed is None else seed,
        projection=model.projection,
        phenotypes=model.phenotypes,
        patch_transform=model.transform if level == "bulk" else None,
    )
    new.net = model.net.with_genes(genes, list(model.genes))
    new.encoder_info = dict(model.encoder_info)
    new.source = {"level": model.level, "weights_sha256": model.weights_hash(), "method": method}
    if method == "lora":
        lora = {"rank": rank, "alpha": alpha, "dropout": dropout}
        new.net = apply_lora(new.net, **lora)
        new.lora_info = lora
    return new.train(
        max_epochs=max_epochs,
        lr=lr,
        batch_size=batch_size,
        patience=patience,
        validation_fraction=validation_fraction,
        device=device,
        max_cells_per_step=max_cells_per_step,
    )
