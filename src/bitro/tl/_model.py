"""``BiTroModel``: the user-facing model (scvi-tools pattern) — set up from data, train, predict, save, load.

A thin facade. The work lives in one module per job: :mod:`bitro.tl._setup` (slides → state and
training set), :mod:`bitro.tl._levels` (what a spot or a bulk sample is trained against),
:mod:`bitro.tl._trainer` (the loop), :mod:`bitro.tl._predict` (writing predictions) and
:mod:`bitro.tl._state` (the declared state and the model files). The network itself is the pure torch
:class:`bitro.models.BiTroNet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro import _keys as K
from bitro._hashing import state_sha256
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro.tl._configs import SetupConfig, TrainConfig, split_options
from bitro.tl._levels import get_level
from bitro.tl._state import ModelState

if TYPE_CHECKING:
    import spatialdata as sd

    from bitro.tl._data import BagSet
    from bitro.tl._levels import TrainingSet


def _options(cls: type, given: Any, options: dict[str, Any]) -> Any:
    """``given`` (a ``cls``, a dict or ``None``) with ``options`` applied."""
    base = given if isinstance(given, cls) else cls.from_dict(given)
    return base.replace(**options) if options else base


def _build_net(config: Any, seed: int) -> Any:
    import torch

    from bitro.models import BiTroNet

    torch.manual_seed(seed)
    return BiTroNet(config)


class BiTroModel:
    """The BiTro model on SpatialData: bags of cells → spot or bulk expression, and pseudo single cells.

    Parameters
    ----------
    sdatas
        Training slides. Each needs table ``cells`` with ``obsm[use_rep]`` (``bt.pp.embed_cells``) and,
        at spot level, ``obs["spot_id"]`` (``bt.pp.assign_cells``) plus table ``spots`` with counts; at
        bulk level, ``obs["patch_id"]`` (``bt.pp.make_patches``), table ``patches`` and a one-row table
        ``bulk``.
    level
        ``"spot"`` (ST spots are the bags; targets are spot counts) or ``"bulk"`` (spot-sized patches
        are the bags; the slide's bulk profile constrains their sum).
    genes
        Genes to predict. Default: at spot level the highly variable genes of the training spots
        (:func:`bitro.pp.select_genes`), at bulk level all genes shared by the bulk tables.
    config
        :class:`bitro.models.BiTroConfig` or a dict of its fields (``n_genes``/``in_dim`` are set here).
    setup
        :class:`bitro.tl.SetupConfig` (or a dict of its fields): target scale, feature projection,
        phenotypes, graph, table keys and seed.
    projection, phenotypes
        A fitted :class:`~bitro.pp.FeatureProjection` / :class:`~bitro.pp.PhenotypeModel` to use instead
        of fitting (a transfer keeps the source model's, so features mean the same on both levels).
    source_transform
        Bulk level: the target statistics of a spot model being transferred.
    **options
        Fields of :class:`bitro.tl.SetupConfig` (e.g. ``target="raw"``, ``k=8``, ``seed=0``).
    """

    def __init__(
        self,
        sdatas: sd.SpatialData | list[sd.SpatialData],
        *,
        level: str = "spot",
        genes: list[str] | None = None,
        config: Any = None,
        setup: SetupConfig | dict[str, Any] | None = None,
        projection: Any = None,
        phenotypes: Any = None,
        source_transform: Any = None,
        **options: Any,
    ) -> None:
        from bitro.tl._setup import as_slides, prepare

        (extra,) = split_options(options, allowed=(SetupConfig,))
        setup = _options(SetupConfig, setup, extra)
        setup = setup.replace(seed=resolve_seed(setup.seed))
        self._level = get_level(level)
        self.state, self._data = prepare(
            as_slides(sdatas),
            level=self._level,
            genes=genes,
            setup=setup,
            net_config=config,
            projection=projection,
            phenotypes=phenotypes,
            source_transform=source_transform,
        )
        if setup.context_um is not None and not self.state.net_config.use_transformer:
            msg = (
                f"context_um={setup.context_um} adds context cells around each bag, which only the Transformer "
                "reads, and the network has none (the default since 0.2). Pass config={'use_transformer': True} "
                "or drop context_um."
            )
            raise ValueError(msg)
        self.net = _build_net(self.state.net_config, setup.seed)
        if self.state.net_config.head == "cell_counts":  # start every gene at the data's level
            from bitro.tl._setup import initial_log_counts

            self.net.head.set_log_scale(initial_log_counts(self._data))

    @classmethod
    def _from_state(cls, state: ModelState, net: Any) -> BiTroModel:
        self = cls.__new__(cls)
        self.state, self.net, self._data = state, net, None
        self._level = get_level(state.level)
        return self

    # ------------------------------------------------------------------ views of the state
    level = property(lambda self: self.state.level, doc="Training level (``spot`` or ``bulk``).")
    genes = property(lambda self: list(self.state.genes), doc="Predicted genes, in output order.")
    config = property(
        lambda self: self.state.net_config, doc="The network's :class:`~bitro.models.BiTroConfig`."
    )
    setup = property(lambda self: self.state.setup, doc="The :class:`~bitro.tl.SetupConfig`.")
    transform = property(
        lambda self: self.state.transform, doc="Target statistics (:class:`~bitro.tl.TargetTransform`)."
    )
    projection = property(lambda self: self.state.projection, doc="Cell feature projection (PCA).")
    phenotypes = property(lambda self: self.state.phenotypes, doc="k-means phenotype centroids.")
    history = property(lambda self: self.state.history, doc="Per-epoch training and validation losses.")
    is_trained = property(lambda self: self.state.is_trained, doc="Whether :meth:`train` has run.")
    train_params = property(
        lambda self: self.state.train, doc="Options and outcome of the last training run."
    )
    encoder_info = property(lambda self: self.state.encoder, doc="Provenance of the training embedding.")
    train_slides = property(lambda self: list(self.state.train_slides), doc="Names of the training slides.")
    seed = property(lambda self: self.state.setup.seed, doc="Random seed.")
    use_rep = property(lambda self: self.state.setup.use_rep, doc="Cell embedding in ``cells.obsm``.")
    keys = property(lambda self: self.state.setup.keys, doc="Table names by role.")

    @property
    def training_set(self) -> TrainingSet:
        """The bags and targets this model was set up with (not saved: absent after :meth:`load`)."""
        if self._data is None:
            msg = "This model was loaded from disk and holds no training data; build a new one from slides."
            raise RuntimeError(msg)
        return self._data

    @property
    def train_bags(self) -> BagSet:
        """The training bags (see :attr:`training_set`)."""
        return self.training_set.bags

    # ------------------------------------------------------------------ training
    def train(self, config: TrainConfig | dict[str, Any] | None = None, *, parameters: Any = None,
              **options: Any) -> BiTroModel:  # fmt: skip
        """Train with Adam, gradient clipping and early stopping on a validation split of the training data.

        Parameters
        ----------
        config
            :class:`bitro.tl.TrainConfig` or a dict of its fields; defaults are the benchmark's best.
        parameters
            Parameters to optimise (default: every trainable one); used by transfer.
        **options
            Fields of :class:`~bitro.tl.TrainConfig` (``max_epochs``, ``lr``, ``device``, ...).

        Returns
        -------
        ``self``, trained: the weights of the best validation epoch, ``history`` and ``train_params``.
        """
        from bitro.tl._trainer import Trainer

        (extra,) = split_options(options, allowed=(TrainConfig,))
        cfg = _options(TrainConfig, config, extra)
        result = Trainer(self._level, self.training_set, cfg, seed=self.seed).run(
            self.net, parameters=parameters, history=self.state.history
        )
        self.state.history, self.state.train, self.state.is_trained = result.history, result.summary, True
        return self

    def transfer(
        self,
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
    ) -> BiTroModel:
        """A new model for ``level``, initialised from this one and fine-tuned on ``sdatas`` (paper §3.5).

        The feature projection, phenotypes, encoder, table keys, ``k`` and ``context_um`` are carried over
        (features must mean the same on both levels); gene queries are copied for genes this model has
        and freshly initialised for new ones.

        Parameters
        ----------
        sdatas
            Slides of the target level.
        level
            Target level.
        method
            ``"lora"``: LoRA adapters (via peft) on the projection, attention and feed-forward layers, base
            weights frozen, gene head trainable; ``"full"``: fine-tune every weight.
        genes
            Target genes (default: this model's).
        rank, alpha, dropout
            LoRA rank, scaling and dropout.
        train
            :class:`~bitro.tl.TrainConfig` of the fine-tuning.
        **options
            Fields of :class:`~bitro.tl.SetupConfig` to change (``target``, ``cluster_weight``, ``seed``) or
            of :class:`~bitro.tl.TrainConfig`.
        """
        from bitro.models import apply_lora

        if method not in ("lora", "full"):
            msg = f"method must be 'lora' or 'full', got {method!r}."
            raise ValueError(msg)
        if not self.is_trained:
            msg = "transfer needs a trained model; call train() (or bt.tl.fit) first."
            raise ValueError(msg)
        setup_opts, train_opts = split_options(options, allowed=(SetupConfig, TrainConfig))
        changeable = ("target", "cluster_weight", "seed", "zscore")
        carried = {k: v for k, v in setup_opts.items() if k in changeable and v is not None}
        setup_opts = {k: v for k, v in setup_opts.items() if v is not None}
        if set(setup_opts) - set(carried):
            msg = f"transfer keeps the source model's {sorted(set(setup_opts) - set(carried))}; do not pass them."
            raise ValueError(msg)
        setup = self.setup.replace(**{"cluster_weight": None, **carried})  # λ: the new level's default
        genes = self.genes if genes is None else [str(g) for g in genes]
        new = BiTroModel(
            sdatas,
            level=level,
            genes=genes,
            config=self.config,
            setup=setup,
            projection=self.projection,
            phenotypes=self.phenotypes,
            source_transform=self.transform if get_level(level).name == "bulk" else None,
        )
        new.net = self.net.with_genes(genes, self.genes)
        new.state.encoder = dict(self.encoder_info)
        new.state.transferred_from = {
            "level": self.level,
            "weights_sha256": self.weights_hash(),
            "method": method,
        }
        if method == "lora":
            lora = {"rank": rank, "alpha": alpha, "dropout": dropout}
            new.net = apply_lora(new.net, **lora)
            new.state.lora = lora
        return new.train(train, **train_opts)

    # ------------------------------------------------------------------ prediction
    def predict_bags(
        self, sdata: sd.SpatialData, *, batch_size: int = 64, device: str | None = None
    ) -> tuple[BagSet, np.ndarray, np.ndarray, np.ndarray]:
        """Run the network on every bag of ``sdata``: its units, and bins of the cells outside them.

        Returns
        -------
        ``(bags, is_unit, z, attn)``: the bags (units first, then bins named ``"bin:<i>_<j>"``), which
        of them are units, ``(B, G)`` normalised predictions and ``(N, G)`` each cell's share of its bag
        (cells in ``bags`` order).
        """
        from bitro.tl._predict import run_bags

        if not self.is_trained:
            logger.warning("Predicting with an untrained model.")
        return run_bags(self.state, self.net, self._level, sdata, batch_size=batch_size, device=device)

    def predict(
        self,
        sdata: sd.SpatialData,
        *,
        key_added: str = K.PRED,
        batch_size: int = 64,
        device: str | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Predict unit- and cell-level expression and write it into ``sdata``.

        Writes (``key_added`` = ``"bitro"`` by default):

        - units table (``spots`` or ``patches``): ``layers[key_added]`` log1p expression on the model's
          target scale, aligned to ``var`` (NaN for genes the model does not predict and for units
          without cells); ``obs[f"{key_added}_n_cells"]``.
        - ``cells``: expression of **every** segmented cell, in count space so that the cells of a unit
          sum to its prediction, as ``layers[key_added]`` = log1p(predicted counts) and
          ``obsm[f"X_{key_added}_expr"]`` = log1p of per-cell library-size-normalised counts (for
          ``sc.pp.neighbors(use_rep=...)``). With the attention head a cell's counts are its attention
          share of its bag (paper Eq. 10); with ``head="cell_counts"`` they are the cell's own expected
          counts. Cells outside every unit (between spots, or on a slide without spots) are read in
          square bins of the bag's size; ``obs[f"{key_added}_in_bag"]`` says which cells lie under a unit.
          A cells table without genes gets the model genes as ``var``.
        - ``bulk.layers[key_added]`` when the slide has a bulk table: log1p(TPM) of the summed predictions
          (every cell at spot level; the patches at bulk level).
        - provenance in ``.uns[key_added]`` of each written table.

        ``device=None`` means ``bt.settings.device``.

        Returns
        -------
        dict with the arrays written (``units``, ``cells``, and ``bulk`` at bulk level).
        """
        bags, is_unit, z, attn = self.predict_bags(sdata, batch_size=batch_size, device=device)
        return self.write_outputs(sdata, bags, is_unit, z, attn, key_added=key_added, overwrite=overwrite)

    def write_outputs(
        self,
        sdata: sd.SpatialData,
        bags: BagSet,
        is_unit: np.ndarray,
        z: np.ndarray,
        attn: np.ndarray,
        *,
        key_added: str,
        overwrite: bool,
        provenance: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the outputs of :meth:`predict_bags` (or an average of several models') with this model's provenance.

        ``provenance``: entries added to the model's own (e.g. the members of an ensemble).
        """
        from bitro.tl._predict import write_predictions

        prov = self._provenance()
        prov["domain_outside"] = self._check_domain(sdata)
        prov.update(provenance or {})
        return write_predictions(
            sdata,
            self.state,
            self._level,
            bags,
            is_unit,
            z,
            attn,
            key_added=key_added,
            provenance=prov,
            overwrite=overwrite,
        )

    def domain_report(
        self,
        sdata: sd.SpatialData,
        *,
        tolerance: float | None = None,
        stain_tolerance_deg: float | None = None,
    ) -> Any:
        """How far ``sdata`` sits from the training slides (depth, nuclei per spot, nucleus size, stain, embedding).

        Returns the :func:`bitro.tl.domain_report` table: one row per statistic with the training range,
        the slide's value and whether it lies outside (then the model extrapolates). :meth:`predict`
        logs its summary and records the statistics outside the range in the provenance. ``tolerance``
        and ``stain_tolerance_deg`` (``None``: the defaults) are those of :func:`bitro.tl.domain_report`.
        """
        from bitro.tl._domain import STAIN_ANGLE_TOLERANCE_DEG, TOLERANCE, domain_report
        from bitro.tl._setup import slide_domain

        if not self.state.domain:
            msg = "This model records no training-slide statistics (saved by an older bitro); re-train to get them."
            raise ValueError(msg)
        stats = slide_domain(sdata, self.setup, self.projection)
        return domain_report(
            self.state.domain,
            stats,
            tolerance=TOLERANCE if tolerance is None else tolerance,
            stain_tolerance_deg=STAIN_ANGLE_TOLERANCE_DEG
            if stain_tolerance_deg is None
            else stain_tolerance_deg,
        )

    def _check_domain(self, sdata: sd.SpatialData) -> list[str]:
        """Log the domain report of ``sdata``; return the statistics outside the training range."""
        from bitro.tl._domain import format_domain_report

        if not self.state.domain:
            return []
        try:
            report = self.domain_report(sdata)
        except (KeyError, ValueError) as err:  # a statistic that cannot be computed on this slide
            logger.info("No domain report for this slide: %s", err)
            return []
        outside = [str(n) for n in report.index[report["outside"]]]
        (logger.warning if outside else logger.info)("%s", format_domain_report(report))
        return outside

    def _provenance(self) -> dict[str, Any]:
        from bitro import __version__

        return {
            "model": "bitro",
            "level": self.level,
            "target_scale": self.transform.scale,
            "use_rep": self.use_rep,
            "encoder": self.encoder_info,
            "n_genes": len(self.genes),
            "seed": self.seed,
            "train_slides": self.train_slides,
            "weights_sha256": self.weights_hash(),
            "bitro_version": __version__,
            # only when set: AnnData cannot store None in .uns
            **({"transferred_from": self.state.transferred_from} if self.state.transferred_from else {}),
        }

    def weights_hash(self) -> str:
        """A short SHA-256 of the network weights (identifies the checkpoint in provenance)."""
        return state_sha256(self.net.state_dict())[:16]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save as ``model.safetensors`` (weights, PCA, centroids, target statistics) + ``config.json``.

        Written to a temporary folder first and moved into place, so an interrupted save never leaves
        a half-written model. ``config.json`` records a content hash of every array and of the state,
        verified by :meth:`load`. ``overwrite=True`` replaces only a bitro model folder
        (``config.json`` and ``model.safetensors``, nothing else); any other existing path is refused.
        """
        import shutil
        import tempfile

        from bitro import __version__
        from bitro._files import check_replaceable, remove_path
        from bitro._hashing import tensor_to_numpy
        from bitro.tl._state import save_model

        path = check_replaceable(path, kind="model", overwrite=overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = {k: tensor_to_numpy(v) for k, v in self.net.state_dict().items()}
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_model(tmp, self.state, weights, bitro_version=__version__)
            if path.exists():
                check_replaceable(path, kind="model", overwrite=overwrite)  # still ours at the swap
                remove_path(path)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> BiTroModel:
        """Load a model saved with :meth:`save` (safetensors + JSON; no pickle is ever read).

        The content hashes recorded at save are verified: an edited ``config.json`` or replaced weights
        raise ``ValueError`` naming the file.
        """
        import torch

        from bitro.models import BiTroNet, apply_lora
        from bitro.tl._state import CONFIG_FILE, WEIGHTS_FILE, read_model_files

        state, weights, _ = read_model_files(path)
        if list(state.transform.genes) != list(state.genes) or state.net_config.n_genes != len(state.genes):
            msg = (
                f"{Path(path) / CONFIG_FILE}: the gene list, the target statistics and the network disagree."
            )
            raise ValueError(msg)
        net = BiTroNet(state.net_config)
        if state.lora:
            net = apply_lora(net, **state.lora)
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        try:
            net.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            msg = (
                f"The weights in {Path(path) / WEIGHTS_FILE} do not fit the network described in "
                f"{CONFIG_FILE} ({str(err).splitlines()[0]}); the files do not belong together."
            )
            raise ValueError(msg) from err
        return cls._from_state(state, net)

    def __repr__(self) -> str:
        status = "trained" if self.is_trained else "untrained"
        return (
            f"BiTroModel(level={self.level!r}, genes={len(self.genes)}, features={self.use_rep!r}→"
            f"{self.projection.n_components}, phenotypes={self.phenotypes.n_clusters}, {status})"
        )
