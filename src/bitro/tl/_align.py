"""Contrastive image ↔ expression alignment (HESCAPE-style): ``bt.tl.align_encoder`` and ``bt.tl.apply_alignment``.

Two towers map a spot's image and its expression into one space where the pair is close:

- the image tower (:class:`bitro.models.CellPoolTower`) runs an MLP on each of the spot's cells and
  averages over the spot. With ``encoder="features"`` its input is the cells' existing embedding
  ``cells.obsm[use_rep]`` (projected by a PCA of the training cells);
- the gene tower (:class:`bitro.models.GeneTower`) is an MLP on the spot's log1p expression,
  normalised (library size, per-gene z-score) with training statistics.

They are trained with the CLIP or SigLIP loss on the spots of the **training slides only**
(:mod:`bitro.tl._align_train`). :class:`Alignment` holds the result; ``save`` writes an
aligned-encoder folder (safetensors + JSON with content hashes, :mod:`bitro.pp._encoders_aligned`).
A ``"features"`` folder is applied with :func:`~bitro.tl.apply_alignment`
(:mod:`bitro.tl._align_apply`), which writes ``cells.obsm`` and ``spots.obsm``; it is not an image
encoder for :func:`bitro.pp.embed_cells`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro._hashing import arrays_sha256
from bitro._logging import logger
from bitro._settings import resolve_seed
from bitro.io._build import get_table
from bitro.tl._align_config import TRAIN_DEFAULTS, AlignConfig
from bitro.tl._configs import SetupConfig, TrainConfig, split_options

if TYPE_CHECKING:
    import spatialdata as sd


@dataclass
class AlignedSpots:
    """One slide in the aligned space (:meth:`Alignment.embed`).

    Attributes
    ----------
    slide
        The slide's name.
    spot_ids
        ``(n,)`` spots with at least one cell.
    rows
        ``(n,)`` their rows in the spot table.
    image
        ``(n, d)`` unit-length image embeddings (the mean of the spot's cell embeddings, normalised).
    expression
        ``(n, d)`` unit-length expression embeddings, or ``None`` (genes not measured). Spots without
        counts are NaN.
    cells
        ``(n_cells, d)`` cell embeddings of every cell of the slide (head outputs, not normalised).
    z
        ``(n, n_genes)`` normalised expression of the spots, or ``None``.
    """

    slide: str
    spot_ids: np.ndarray
    rows: np.ndarray
    image: np.ndarray
    expression: np.ndarray | None
    cells: np.ndarray
    z: np.ndarray | None


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.full_like(x, np.nan), where=norm > 0)


def _fingerprint(sdata: sd.SpatialData, setup: SetupConfig) -> str:
    from bitro.tl._setup import cell_features

    return arrays_sha256([cell_features(sdata, setup.use_rep, setup.cells_key)])


class Alignment:
    """Trained image and gene towers with what they need to embed a new slide (see :func:`align_encoder`)."""

    def __init__(self, *, config, setup, genes, inputs, transform, net, encoder, train_slides, fingerprints,
                 history, train) -> None:  # fmt: skip
        self.config, self.setup, self.genes = config, setup, list(genes)
        self.inputs, self.transform, self.net, self.encoder = inputs, transform, net, dict(encoder)
        self.train_slides, self.fingerprints = list(train_slides), list(fingerprints)
        self.history, self.train_params = history, train

    kind = property(lambda self: self.config.encoder, doc="The image tower: ``'features'`` or a CNN name.")

    def __repr__(self) -> str:
        return (
            f"Alignment({self.kind!r}, loss={self.config.loss!r}, dim={self.config.embed_dim}, genes={len(self.genes)}, "
            f"trained on {len(self.train_slides)} slides, {self.train_params.get('epochs_run', 0)} epochs)"
        )

    # ------------------------------------------------------------------ embedding
    def expression_of(
        self, sdata: sd.SpatialData, rows: np.ndarray, *, name: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(normalised expression, has counts)`` of spot-table ``rows``; missing genes raise naming the slide."""
        from bitro.tl._cross_slice import _slide_counts

        counts = _slide_counts(sdata, name, rows, self.genes, self.setup)
        return self.transform.encode(counts).astype(np.float32), counts.sum(axis=1) > 0

    def embed(self, sdata: sd.SpatialData, *, i: int = 0, expression: bool | None = None) -> AlignedSpots:
        """The slide's spots (and cells) in the aligned space.

        Parameters
        ----------
        sdata
            A slide embedded like the training slides (``cells.obsm[use_rep]``, ``cells.obs["spot_id"]``).
        i
            Position of the slide, for the default name ``slide<i>``.
        expression
            Also embed the spots' expression: ``True`` requires every gene, ``None`` embeds it when the
            spot table holds every gene, ``False`` skips it.
        """
        import torch

        from bitro.tl._align_data import slide_pairs
        from bitro.tl._predict import check_features
        from bitro.tl._setup import slide_name

        check_features(
            SimpleNamespace(setup=self.setup, projection=self.inputs.projection, encoder=self.encoder), sdata
        )
        name = slide_name(sdata, i)
        pairs, rows, x, cell_rows = slide_pairs(sdata, self.inputs, self.setup, i=i)
        spots = get_table(sdata, self.setup.spots_key)
        if expression is None:
            expression = all(g in spots.var_names for g in self.genes)
        self.net.eval()
        with torch.no_grad():
            cells = self.net.image.cells(torch.from_numpy(x)).numpy()
            z = expr = None
            if expression:
                z, has = self.expression_of(sdata, rows, name=name)
                expr = _unit(self.net.gene(torch.from_numpy(z)).numpy())
                expr[~has] = np.nan
        _, segment = pairs.batch(np.arange(len(pairs)))
        sums = np.zeros((len(pairs), cells.shape[1]), dtype=np.float64)
        np.add.at(sums, segment, cells[cell_rows])
        image = _unit((sums / np.diff(pairs.offsets)[:, None]).astype(np.float32))
        return AlignedSpots(name, pairs.spot_ids, rows, image, expr, cells, z)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write an aligned-encoder folder: ``model.safetensors`` + ``config.json`` with content hashes.

        ``overwrite=True`` replaces only a bitro model or aligned-encoder folder. A ``"features"``
        folder is applied with :func:`bitro.tl.apply_alignment` (``bt.pp.embed_cells`` refuses it).
        """
        from bitro import __version__
        from bitro._files import write_replacing
        from bitro._hashing import tensor_to_numpy
        from bitro.pp._encoders_aligned import write_aligned_folder

        arrays = {f"projection.{k}": v for k, v in self.inputs.projection.arrays().items()}
        arrays.update({f"transform.{k}": v for k, v in self.transform.arrays().items()})
        arrays.update({k: tensor_to_numpy(v) for k, v in self.net.state_dict().items()})
        meta = {
            "kind": self.kind,
            "bitro_version": __version__,
            "use_rep": self.setup.use_rep,
            "genes": self.genes,
            "align": self.config.to_dict(),
            "setup": self.setup.to_dict(),
            "encoder": self.encoder,
            "input_scale": self.inputs.input_scale,
            "projection": self.inputs.projection.meta(),
            "transform": self.transform.meta(),
            "train_slides": self.train_slides,
            "slide_fingerprints": self.fingerprints,
            "train": self.train_params,
            "history": self.history,
        }
        return write_replacing(
            lambda tmp: (tmp.mkdir(), write_aligned_folder(tmp, meta, arrays)),
            path,
            kind="model",
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: str | Path) -> Alignment:
        """Load a folder written by :meth:`save` (edited or replaced files raise ``ValueError``)."""
        import torch

        from bitro.pp._encoders_aligned import read_aligned_folder
        from bitro.pp._projection import FeatureProjection
        from bitro.tl._align_data import CellInputs
        from bitro.tl._targets import TargetTransform

        config, arrays = read_aligned_folder(path)

        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

        align, setup = AlignConfig.from_dict(config["align"]), SetupConfig.from_dict(config["setup"])
        transform = TargetTransform.from_arrays(part("transform."), config["transform"])
        if list(transform.genes) != list(config["genes"]):
            msg = f"{path}: the gene list and the expression statistics disagree; the files do not belong together."
            raise ValueError(msg)
        inputs = CellInputs(FeatureProjection.from_arrays(part("projection."), config["projection"]),
                            float(config["input_scale"]))  # fmt: skip
        net = _build_net(align, inputs.dim, len(config["genes"]), seed=0)
        weights = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()
                   if not k.startswith(("projection.", "transform."))}  # fmt: skip
        try:
            net.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            msg = f"The weights in {path} do not fit the towers its config.json describes ({str(err).splitlines()[0]})."
            raise ValueError(msg) from err
        return cls(config=align, setup=setup, genes=config["genes"], inputs=inputs, transform=transform,
                   net=net.eval(), encoder=config["encoder"], train_slides=config["train_slides"],
                   fingerprints=config["slide_fingerprints"], history=config["history"], train=config["train"])  # fmt: skip


def _build_net(config: AlignConfig, in_dim: int, n_genes: int, *, seed: int) -> Any:
    import torch

    from bitro.models import AlignmentNet, CellPoolTower, GeneTower, contrastive_loss

    torch.manual_seed(seed)
    image = CellPoolTower(in_dim, config.hidden_dim, config.embed_dim, config.dropout)
    gene = GeneTower(n_genes, config.hidden_dim, config.embed_dim, config.dropout)
    return AlignmentNet(image, gene, contrastive_loss(config.loss, config.temperature))


def _check_genes(sdatas: list[sd.SpatialData], genes: list[str] | None, setup: SetupConfig) -> list[str]:
    from bitro.tl._setup import slide_name

    if genes is None:
        sets = [set(get_table(s, setup.spots_key).var_names) for s in sdatas]
        if any(s != sets[0] for s in sets[1:]):
            common = set.intersection(*sets)
            msg = (
                f"The training slides measure different genes ({len(common)} in common; "
                f"{', '.join(f'{slide_name(s, i)}: {len(g)}' for i, (s, g) in enumerate(zip(sdatas, sets, strict=True)))}). "
                "Pass genes= measured in every slide, e.g. genes=bt.pp.select_genes(sdatas)."
            )
            raise ValueError(msg)
        from bitro.pp._genes import select_genes

        genes = list(select_genes(sdatas, table_key=setup.spots_key))
    genes = [str(g) for g in genes]
    if not genes or len(set(genes)) != len(genes):
        msg = "genes= must be a non-empty list without duplicates."
        raise ValueError(msg)
    return genes


def align_encoder(
    sdatas: list[sd.SpatialData],
    *,
    encoder: str = "features",
    genes: list[str] | None = None,
    config: AlignConfig | dict[str, Any] | None = None,
    setup: SetupConfig | dict[str, Any] | None = None,
    train: TrainConfig | dict[str, Any] | None = None,
    **options: Any,
) -> Alignment:
    """Align an image tower with an expression tower by contrastive learning on training slides (HESCAPE).

    Parameters
    ----------
    sdatas
        Two or more **training** slides: ``spots`` with counts, ``cells`` with ``obsm[use_rep]`` and
        ``obs["spot_id"]``. Nothing of a held-out slide may be among them (the evaluation refuses it).
    encoder
        ``"features"``: MLP over the cells' existing embedding, applied per cell and averaged per spot;
        save it and apply it with :func:`apply_alignment` (writes ``obsm``). See :class:`~bitro.tl.AlignConfig`.
    genes
        Genes of the expression tower (default: :func:`bitro.pp.select_genes` of the training spots,
        which must all measure the same genes).
    config
        :class:`~bitro.tl.AlignConfig` or a dict of its fields (loss ``"clip"``/``"siglip"``, widths, ...).
    setup
        :class:`~bitro.tl.SetupConfig` or a dict (``use_rep``, ``n_components``, ``target``, ``seed``, keys).
    train
        :class:`~bitro.tl.TrainConfig` or a dict (``max_epochs``, ``lr``, ``batch_size`` = spots per step,
        ``patience``, ``validation_fraction`` of the training spots for early stopping, ``device``;
        ``None`` means ``bt.settings.device``). Defaults: :data:`bitro.tl._align_config.TRAIN_DEFAULTS`.
    **options
        Fields of any of the three configs.

    Returns
    -------
    The trained :class:`~bitro.tl.Alignment` (``history``: per-epoch train / validation loss and temperature).
    """
    from bitro.tl._align_data import CellInputs, SpotPairs, slide_pairs
    from bitro.tl._align_train import train_alignment
    from bitro.tl._cross_slice import _slide_counts
    from bitro.tl._data import source_sample, unit_groups, validation_groups
    from bitro.tl._setup import as_slides, check_same_encoder, slide_name
    from bitro.tl._targets import TargetTransform

    setup_opts, train_opts, align_opts = split_options(
        options, allowed=(SetupConfig, TrainConfig, AlignConfig)
    )
    base = config if isinstance(config, AlignConfig) else AlignConfig.from_dict(config)
    cfg = base.replace(encoder=encoder, **align_opts)
    setup = (setup if isinstance(setup, SetupConfig) else SetupConfig.from_dict(setup)).replace(**setup_opts)
    setup = setup.replace(seed=resolve_seed(setup.seed))
    given = train.to_dict() if isinstance(train, TrainConfig) else dict(train or {})
    train_cfg = TrainConfig.from_dict({**TRAIN_DEFAULTS, **given, **train_opts})
    sdatas = as_slides(sdatas)
    names = [slide_name(s, i) for i, s in enumerate(sdatas)]
    if len(sdatas) < 2:
        msg = (
            f"align_encoder needs two or more training slides, got one ({names[0]!r}): an alignment learnt on one "
            "slide learns that slide's batch, and its validation spots would come from the same slide. Pass more slides."
        )
        raise ValueError(msg)
    if len(set(names)) < len(names):
        msg = f"Training slides share sample ids ({names}); give every slide its own (bt.io.set_scale(sdata, sample_id=...))."
        raise ValueError(msg)
    genes = _check_genes(sdatas, genes, setup)
    encoder_info = check_same_encoder(sdatas, setup)
    inputs = CellInputs.fit(sdatas, setup)
    counts, parts = [], []
    for i, (s, name) in enumerate(zip(sdatas, names, strict=True)):

        def z_of(rows, s=s, name=name):
            c = _slide_counts(s, name, rows, genes, setup)
            counts.append(c[c.sum(axis=1) > 0])
            return c, c.sum(axis=1) > 0

        parts.append(slide_pairs(s, inputs, setup, i=i, z_of=z_of)[0])
    transform = TargetTransform.fit(np.concatenate(counts), genes, scale=setup.target, zscore=setup.zscore)
    for p in parts:  # the pairs hold counts so far: normalise with the training statistics
        p.z = transform.encode(p.z).astype(np.float32)
    pairs = SpotPairs.concat(parts)
    # the augmented copies of a validation spot are validation spots too (see SpotLevel.split)
    sources = {n: source_sample(s, get_table(s, setup.spots_key), n) for s, n in zip(sdatas, names, strict=True)}
    group = unit_groups(np.array([sources[n] for n in pairs.slide], dtype=object), pairs.spot_ids)
    val_mask = validation_groups(group, train_cfg.validation_fraction, np.random.default_rng(setup.seed))
    net = _build_net(cfg, inputs.dim, len(genes), seed=setup.seed)
    val = pairs.subset(np.flatnonzero(val_mask)) if val_mask.any() else None
    history, summary = train_alignment(
        net, pairs.subset(np.flatnonzero(~val_mask)), val, train_cfg, seed=setup.seed
    )
    logger.info(
        "align_encoder: %d epochs on %d spots of %d slides", summary["epochs_run"], len(pairs), len(sdatas)
    )
    return Alignment(config=cfg, setup=setup, genes=genes, inputs=inputs, transform=transform, net=net,
                     encoder=encoder_info, train_slides=names, fingerprints=[_fingerprint(s, setup) for s in sdatas],
                     history=history, train=summary)  # fmt: skip
