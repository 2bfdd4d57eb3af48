"""``SpaHGCModel``: the cross-slice exemplar graph model on SpatialData (``bt.tl.fit(model="spahgc")``).

A thin facade over :class:`~bitro.tl._cross_slice.CrossSliceModel` (features, targets, exemplar index,
leakage checks, writing, files), :mod:`bitro.tl._hetero` (the graph), :mod:`bitro.tl._spahgc_train`
(the loop) and the pure torch :class:`bitro.models.SpaHGCNet`.

Training: every training slide is a target slide in turn; its spots' exemplars come from the *other*
training slides, never from validation spots (whose targets are hidden from the network during
training: their loss is left out and they are not exemplars). Prediction: the spots of a held-out
slide get exemplars from every training spot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bitro.io._build import get_table
from bitro.tl._configs import TrainConfig, split_options
from bitro.tl._cross_slice import CrossSliceModel, _options

if TYPE_CHECKING:
    from bitro.tl._exemplars import Exemplars
    from bitro.tl._hetero import SlideGraph
    from bitro.tl._spot_features import SpotTable


def _build_net(config: Any, seed: int) -> Any:
    import torch

    from bitro.models import SpaHGCNet

    torch.manual_seed(seed)
    return SpaHGCNet(config)


class SpaHGCModel(CrossSliceModel):
    """SpaHGC on SpatialData: a slide's spots, their spatial neighbours and their cross-slide exemplars.

    Parameters
    ----------
    sdatas
        Training slides (``spots`` with counts, ``cells`` with ``obsm[use_rep]`` and ``obs["spot_id"]``);
        at least two, since each training slide learns from the exemplars of the others.
    genes
        Genes to predict (default: :func:`bitro.pp.select_genes` of the training spots).
    config
        :class:`bitro.models.SpaHGCConfig` or a dict of its fields (``n_genes``/``in_dim`` are set here).
    setup
        :class:`~bitro.tl.SetupConfig` or a dict of its fields (``target``, ``zscore``, ``use_rep``,
        ``n_components``, ``seed``, table keys).
    cross_slice
        :class:`~bitro.tl.CrossSliceConfig` or a dict of its fields (``n_exemplars``, ``reference_k``,
        ``neighbour_radius``, ``max_neighbours``, ``spot_rep``, ``index``).
    **options
        Fields of ``SetupConfig`` or ``CrossSliceConfig``.
    """

    kind = "spahgc"

    def __init__(self, sdatas: Any, *, config: Any = None, **kwargs: Any) -> None:
        from bitro.models import SpaHGCConfig
        from bitro.tl._setup import as_slides, slide_name

        fields = dict(config.to_dict() if hasattr(config, "to_dict") else (config or {}))
        checked = SpaHGCConfig.from_dict(
            {**fields, "n_genes": 1, "in_dim": 1}
        )  # bad options fail before any work
        sdatas = as_slides(sdatas)
        if checked.use_exemplars and len(sdatas) < 2:
            msg = (
                f"SpaHGC learns from exemplars of other slides, but the training set is one slide "
                f"({slide_name(sdatas[0], 0)!r}): no training spot has a cross-slide exemplar. Train on two or more "
                "slides, or use model='retrieval' (no training) or config={'use_exemplars': False}."
            )
            raise ValueError(msg)
        super().__init__(sdatas, **kwargs)
        fields.update(n_genes=len(self.genes), in_dim=self.state.features.dim)
        self.state.net_config = SpaHGCConfig.from_dict(fields)
        self.net = _build_net(self.state.net_config, self.seed)

    config = property(lambda self: self.state.net_config, doc="The :class:`~bitro.models.SpaHGCConfig`.")
    train_params = property(
        lambda self: self.state.train, doc="Options and outcome of the last training run."
    )

    # ------------------------------------------------------------------ training
    def train(self, config: TrainConfig | dict[str, Any] | None = None, **options: Any) -> SpaHGCModel:
        """Train with Adam, the SpaHGC objective and early stopping on a validation share of the training spots.

        Parameters
        ----------
        config
            :class:`~bitro.tl.TrainConfig` or a dict of its fields.
        **options
            Fields of :class:`~bitro.tl.TrainConfig` (``max_epochs``, ``lr``, ``batch_size`` = target spots
            per step, ``patience``, ``validation_fraction``, ``device``, ...).

        Returns
        -------
        ``self``, trained: the weights of the best validation epoch, ``history`` and ``train_params``.
        """
        from bitro.tl._spahgc_train import train_spahgc

        if self._tables is None:
            msg = "This model was loaded from disk and holds no training data; build a new one from slides."
            raise RuntimeError(msg)
        (extra,) = split_options(options, allowed=(TrainConfig,))
        cfg = _options(TrainConfig, config, extra)
        slides = self._training_data(cfg.validation_fraction)
        history, summary = train_spahgc(self.net, slides, cfg, seed=self.seed)
        self.state.history, self.state.train, self.state.is_trained = history, summary, True
        return self

    def _training_data(self, fraction: float) -> list[Any]:
        """Each training slide's graph and split.

        Exemplars come from the other slides, never from validation spots and never from a slide of the
        same source sample (an augmented copy of the slide, :func:`bitro.pp.augment_slides`, would offer
        its own spots under another scale or stain). Validation spots are drawn by source spot: the copies
        of a validation spot are validation spots too.
        """
        from bitro.tl._data import source_sample, unit_groups, validation_groups
        from bitro.tl._spahgc_train import SlideTrainingData

        index = self.index
        key = self.setup.spots_key
        sources = np.array(
            [source_sample(s, get_table(s, key), t.slide) for s, t in zip(self._sdatas, self._tables, strict=True)],
            dtype=object,
        )
        sizes = [len(t.x) for t in self._tables]
        ref_source = np.repeat(sources, sizes)
        group = unit_groups(ref_source, np.concatenate([t.spot_ids for t in self._tables]))
        if self.config.use_exemplars and len(set(sources)) < 2:
            msg = (
                f"The training slides {self.train_slides} are all copies of one sample ({sources[0]!r}, "
                "bt.pp.augment_slides): SpaHGC takes a spot's exemplars from other samples only, so no training "
                "spot has one. Add slides of another sample, or use config={'use_exemplars': False}."
            )
            raise ValueError(msg)
        val = validation_groups(group, fraction, np.random.default_rng(self.seed))
        out, start = [], 0
        for table, z, source in zip(self._tables, self._z, sources, strict=True):
            rows = np.arange(start, start + len(table.x))
            start += len(table.x)
            exemplars = None
            if self.config.use_exemplars:
                exemplars = index.query(
                    table.x,
                    self.cross_slice.n_exemplars,
                    query_slides=table.slide,
                    exclude=val | (ref_source == source),
                )
            graph = self._graph(table, exemplars)
            out.append(SlideTrainingData(graph, z, np.flatnonzero(~val[rows]), np.flatnonzero(val[rows])))
        return out

    def _graph(self, table: SpotTable, exemplars: Exemplars | None) -> SlideGraph:
        from bitro.tl._hetero import build_hetero_graph

        cs = self.cross_slice
        return build_hetero_graph(
            table.x,
            table.xy_um,
            exemplars=exemplars,
            index=self.index,
            radius_um=cs.neighbour_radius * table.spacing_um,
            max_neighbours=cs.max_neighbours,
            reference_k=cs.reference_k,
        )

    # ------------------------------------------------------------------ prediction
    def predict_z(self, table: SpotTable, *, batch_size: int = 64, device: str | None = None):
        """Normalised predictions of the slide's spots (exact in batches of ``batch_size`` spots) and their exemplars."""
        from bitro._settings import resolve_device
        from bitro.tl._spahgc_train import run_graph

        exemplars = self.index.query(table.x, self.cross_slice.n_exemplars, query_slides=table.slide)
        graph = self._graph(table, exemplars if self.config.use_exemplars else None)
        dev = resolve_device(device)
        try:
            z = run_graph(self.net.to(dev), graph, np.arange(len(table.x)), batch_size=batch_size, device=dev)
        finally:
            self.net.cpu()
        return z.astype(np.float64), exemplars

    def _provenance(self) -> dict[str, Any]:
        return {**super()._provenance(), "weights_sha256": self.weights_hash()}

    def weights_hash(self) -> str:
        """A short SHA-256 of the network weights."""
        from bitro._hashing import state_sha256

        return state_sha256(self.net.state_dict())[:16]

    # ------------------------------------------------------------------ persistence
    def _weights(self) -> dict[str, np.ndarray]:
        from bitro._hashing import tensor_to_numpy

        return {k: tensor_to_numpy(v) for k, v in self.net.state_dict().items()}

    def _from_files(self, weights: dict[str, np.ndarray], path: Any) -> None:
        import torch

        from bitro.models import SpaHGCNet
        from bitro.tl._state import WEIGHTS_FILE

        config = self.state.net_config
        if (
            config is None
            or config.n_genes != len(self.state.genes)
            or config.in_dim != self.state.features.dim
        ):
            msg = f"{path}: the network, the genes and the spot features disagree; the files do not belong together."
            raise ValueError(msg)
        net = SpaHGCNet(config)
        try:
            net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
        except RuntimeError as err:
            msg = (
                f"The weights in {path}/{WEIGHTS_FILE} do not fit the network described in config.json "
                f"({str(err).splitlines()[0]}); the files do not belong together."
            )
            raise ValueError(msg) from err
        self.net = net

    def __repr__(self) -> str:
        status = "trained" if self.is_trained else "untrained"
        c = self.config
        return (
            f"SpaHGCModel(genes={len(self.genes)}, features={self.state.features.dim}, k={self.cross_slice.n_exemplars}, "
            f"layers={c.num_layers}, exemplars={c.use_exemplars}, contrastive={c.contrastive}, {status})"
        )
