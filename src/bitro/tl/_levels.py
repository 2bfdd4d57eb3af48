"""Level strategies: what a bag is, what it is trained against and where its predictions go.

A :class:`Level` owns everything that differs between training on spots (spatial transcriptomics)
and on slides (bulk RNA): its unit table and bag column, its targets, its loss, how the validation
split is drawn, how an epoch is cut into steps, and what it writes besides the unit and cell outputs.
Nothing outside this module branches on the level. A new level is a subclass registered with
:func:`register_level` (and its name then works in ``bt.tl.fit(level=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bitro import _keys as K
from bitro._logging import logger
from bitro.io._build import get_table
from bitro.tl._data import BagSet, batches, collate, net_inputs
from bitro.tl._targets import TargetTransform, dense

if TYPE_CHECKING:
    import spatialdata as sd

    from bitro.tl._configs import SetupConfig


@dataclass
class TrainingSet:
    """What a level trains on: the bags (with ``targets`` at spot level) and its level-specific targets.

    Attributes
    ----------
    bags
        The training :class:`~bitro.tl._data.BagSet` (``bags.targets``: ``(B, G)`` normalised targets
        at spot level).
    transform
        The target transform (counts ↔ normalised network outputs).
    cluster_weight
        λ of the cluster loss.
    slide_targets
        Bulk level: ``(slides, G)`` log1p(TPM) of each training slide's bulk profile.
    loss
        Spot level: ``"mse"`` or ``"poisson"`` (:class:`~bitro.tl.SetupConfig`).
    """

    bags: BagSet
    transform: TargetTransform
    cluster_weight: float
    slide_targets: np.ndarray | None = None
    loss: str = "mse"

    @property
    def n_slides(self) -> int:
        """Number of training slides."""
        return len(self.bags.slide_names)


def unit_counts(table: Any, genes: list[str], *, layer: str | None, what: str) -> np.ndarray:
    """``(units, genes)`` dense counts of ``genes`` from ``table`` (``layer`` or ``.X``); missing genes raise."""
    missing = [g for g in genes if g not in table.var_names]
    if missing:
        msg = (
            f"{len(missing)} of {len(genes)} genes are missing from the {what} table (e.g. {missing[:5]}); "
            "pass genes= present in every training slide (bt.pp.select_genes intersects them)."
        )
        raise ValueError(msg)
    idx = table.var_names.get_indexer(genes)
    matrix = table.layers[layer] if layer and layer in table.layers else table.X
    return dense(matrix[:, idx])


class Level:
    """Strategy of one training level (subclass and :func:`register_level` to add one)."""

    name: ClassVar[str]
    #: role of the unit table in ``SetupConfig.keys`` (``"spots"`` or ``"patches"``)
    units_role: ClassVar[str]
    #: ``cells.obs`` column naming each cell's bag
    bag_key: ClassVar[str]
    #: role of the table holding the genes and targets
    gene_role: ClassVar[str]
    default_cluster_weight: ClassVar[float] = 0.0

    def units_key(self, setup: SetupConfig) -> str:
        """Name of the unit table (the bags' table)."""
        return setup.keys[self.units_role]

    def check_slides(self, sdatas: list[sd.SpatialData], setup: SetupConfig) -> None:
        """Raise before any work when a slide lacks what this level trains on."""

    def default_genes(self, sdatas: list[sd.SpatialData], setup: SetupConfig) -> list[str]:
        """Genes to predict when none are given: those shared by every slide's gene table."""
        tables = [get_table(s, setup.keys[self.gene_role]) for s in sdatas]
        shared = set(tables[0].var_names)
        for t in tables[1:]:
            shared &= set(t.var_names)
        return [g for g in tables[0].var_names if g in shared]

    def check_genes(self, sdatas: list[sd.SpatialData], setup: SetupConfig, genes: list[str]) -> None:
        """Raise when a gene is missing from some slide's gene table."""
        key = setup.keys[self.gene_role]
        for s in sdatas:
            unit_counts(get_table(s, key)[:1], genes, layer=None, what=key)

    def targets(
        self,
        sdatas: list[sd.SpatialData],
        bags: BagSet,
        genes: list[str],
        setup: SetupConfig,
        *,
        source: TargetTransform | None = None,
    ) -> TrainingSet:
        """Build the targets of ``bags`` (``source``: the transform of a model being transferred)."""
        raise NotImplementedError

    def split(
        self, data: TrainingSet, fraction: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(train, validation)`` unit indices drawn from the training data."""
        raise NotImplementedError

    def steps(
        self, data: TrainingSet, idx: np.ndarray, batch_size: int, rng: np.random.Generator
    ) -> list[Any]:
        """One epoch's optimiser steps over the training units ``idx``."""
        raise NotImplementedError

    def loss(self, net: Any, data: TrainingSet, step: Any, *, device: Any, max_cells: int | None) -> Any:
        """The loss of one step (a scalar tensor)."""
        raise NotImplementedError

    def eval_steps(self, data: TrainingSet, idx: np.ndarray, batch_size: int) -> list[tuple[Any, int]]:
        """Validation steps and their weights (the validation loss is their weighted mean)."""
        raise NotImplementedError

    def warn_data(self, data: TrainingSet, n_train: int, n_val: int) -> None:
        """Warn when the training data cannot teach the model much."""

    def write(self, sdata: sd.SpatialData, counts: np.ndarray, is_unit: np.ndarray, genes: list[str],
              setup: SetupConfig, *, key_added: str, provenance: dict[str, Any],
              overwrite: bool) -> dict[str, np.ndarray]:  # fmt: skip
        """Outputs besides the unit and cell layers: the slide's bulk profile when it has a bulk table.

        ``counts``: ``(bags, G)`` predicted counts of every bag (units and the bins of the other cells);
        ``is_unit``: which bags are units. The default sums every bag, i.e. every cell of the slide.
        """
        return write_bulk(sdata, counts, genes, setup, key_added=key_added, provenance=provenance)

    def output_tables(self, sdata: sd.SpatialData, setup: SetupConfig) -> list[tuple[Any, str]]:
        """``(table, name)`` of the tables :meth:`write` writes into (checked for existing keys first)."""
        return [(sdata.tables[setup.bulk_key], setup.bulk_key)] if setup.bulk_key in sdata.tables else []


def write_bulk(sdata: sd.SpatialData, counts: np.ndarray, genes: list[str], setup: SetupConfig, *,
               key_added: str, provenance: dict[str, Any]) -> dict[str, np.ndarray]:  # fmt: skip
    """``bulk.layers[key_added]`` = log1p(TPM) of the summed ``counts`` (nothing without a bulk table)."""
    if setup.bulk_key not in sdata.tables:
        return {}
    bulk = sdata.tables[setup.bulk_key]
    tpm = counts.sum(axis=0)
    tpm = tpm / max(tpm.sum(), 1e-12) * 1e6
    layer = np.full((bulk.n_obs, bulk.n_vars), np.nan, dtype=np.float32)
    cols = bulk.var_names.get_indexer(genes)
    layer[:, cols[cols >= 0]] = np.log1p(tpm[cols >= 0])
    bulk.layers[key_added] = layer
    bulk.uns[key_added] = provenance
    return {"bulk": layer}


def bag_outputs(out: dict[str, Any], transform: TargetTransform) -> tuple[Any, Any]:
    """``(z, counts)`` of the bags from the network's output, whatever its head.

    The attention head predicts normalised targets ``z`` (counts follow from the transform); the count
    head predicts log expected counts (``z`` follows from the same transform), so every loss and every
    output can use either.
    """
    import torch

    if "cell_log_counts" in out:
        counts = torch.exp(out["y"])
        return transform.encode_torch(counts), counts
    return out["y"], transform.to_counts_torch(out["y"])


def _poisson(counts: Any, observed: Any, scale: str) -> Any:
    """Mean over bags of the Poisson NLL per observed count; library size as an offset on that scale."""
    import torch

    log_mu = torch.log(counts.clamp_min(1e-8))
    depth = observed.sum(dim=1).clamp_min(1.0)
    if scale == "library_size":  # the observed total is given: only the composition is fitted
        log_p = log_mu - torch.logsumexp(log_mu, dim=1, keepdim=True)
        nll = -(observed * log_p).sum(dim=1)
    else:
        nll = (counts - observed * log_mu).sum(dim=1)
    return (nll / depth).mean()


def _cluster_term(out: dict[str, Any], counts: Any, batch: dict[str, Any], weight: float) -> Any:
    import torch

    from bitro.models import cluster_loss, pseudo_cell_expression

    cells = torch.log1p(pseudo_cell_expression(out["attn"], counts, batch["batch"]))
    return weight * cluster_loss(cells, batch["phenotype"])


class SpotLevel(Level):
    """Spatial transcriptomics: each spot is a bag; its counts are the target."""

    name = "spot"
    units_role = "spots"
    bag_key = K.SPOT_ID
    gene_role = "spots"
    default_cluster_weight = 0.0

    def default_genes(self, sdatas: list[sd.SpatialData], setup: SetupConfig) -> list[str]:
        """Highly variable genes of the training spots (:func:`bitro.pp.select_genes`)."""
        from bitro.pp._genes import select_genes

        return list(select_genes(sdatas, table_key=setup.spots_key))

    def targets(self, sdatas, bags, genes, setup, *, source=None) -> TrainingSet:
        """Spot counts → log1p (raw or library-size) → per-gene z-score with training statistics."""
        key = self.units_key(setup)
        counts = []
        for s, sdata in enumerate(sdatas):
            table = get_table(sdata, key)
            rows = table.obs_names.get_indexer(bags.bag_ids[bags.bag_slide == s])
            counts.append(unit_counts(table[rows], genes, layer=K.COUNTS_LAYER, what=key))
        counts = np.concatenate(counts)
        transform = TargetTransform.fit(counts, genes, scale=setup.target, zscore=setup.zscore)
        bags.targets = transform.encode(counts)
        bags.counts = counts.astype(np.float32)
        weight = self.default_cluster_weight if setup.cluster_weight is None else setup.cluster_weight
        return TrainingSet(bags=bags, transform=transform, cluster_weight=float(weight), loss=setup.loss)

    def split(self, data, fraction, rng):
        """A random ``fraction`` of the training spots (at least one when there are two or more).

        Spots are drawn by group (``bags.bag_group``): the augmented copies of a validation spot go to
        validation with it, never to training, so early stopping is not judged on spots the model has
        seen under another scale or stain. Without copies every spot is its own group.
        """
        from bitro.tl._data import validation_groups

        bags = data.bags
        group = np.arange(bags.n_bags) if bags.bag_group is None else bags.bag_group
        is_val = validation_groups(group, fraction, rng)
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)

    def steps(self, data, idx, batch_size, rng):
        """Shuffled batches of ``batch_size`` spots."""
        return [idx[b] for b in batches(len(idx), batch_size, shuffle=True, rng=rng)]

    def eval_steps(self, data, idx, batch_size):
        """Batches in order, weighted by their size."""
        return [(idx[b], len(b)) for b in batches(len(idx), batch_size, shuffle=False)]

    def loss(self, net, data, step, *, device, max_cells):
        """MSE of the normalised spot targets or Poisson NLL of the counts (+ λ · cluster loss)."""
        import torch

        batch = collate(data.bags, step, device=device)
        args, kwargs = net_inputs(batch)
        out = net(*args, **kwargs)
        z, counts = bag_outputs(out, data.transform)
        if data.loss == "poisson":
            loss = _poisson(counts, batch["counts"], data.transform.scale)
        else:
            loss = torch.nn.functional.mse_loss(z, batch["y"])
        if data.cluster_weight > 0:
            loss = loss + _cluster_term(out, counts, batch, data.cluster_weight)
        return loss

    def warn_data(self, data, n_train, n_val):
        """Few training spots cannot teach gene-level differences."""
        if n_train < 2:
            logger.warning(
                "Training on %d spot: the model can only learn that spot's profile and will predict the same "
                "expression everywhere. Train on slides with many spots.",
                n_train,
            )
        elif n_train < 20:
            logger.warning(
                "Training on only %d spots: too few to learn how expression varies between spots; expect "
                "predictions close to the training mean.",
                n_train,
            )


class BulkLevel(Level):
    """Bulk RNA: a slide's spot-sized patches are the bags; their summed counts meet the slide's profile."""

    name = "bulk"
    units_role = "patches"
    bag_key = K.PATCH_ID
    gene_role = "bulk"
    default_cluster_weight = 0.1
    #: Below this many training slides a bulk fit warns that it can learn little beyond the mean.
    MIN_SLIDES = 8

    def check_slides(self, sdatas, setup):
        """Every slide needs a one-row bulk table and spot-sized patches."""
        for i, sdata in enumerate(sdatas):
            lacks = []
            if setup.bulk_key not in sdata.tables:
                lacks.append(
                    f"a one-row {setup.bulk_key!r} table of its bulk profile (bt.io.read_wsi(..., bulk=...), or "
                    "the summed spot counts for a pseudo-bulk)"
                )
            if setup.patches_key not in sdata.tables:
                lacks.append(
                    f"spot-sized patches (bt.pp.make_patches(sdata) writes table {setup.patches_key!r})"
                )
            if lacks:
                name = sdata.attrs.get(K.SCALE, {}).get("sample_id", f"slide {i}")
                msg = f"Bulk-level training: {name} lacks " + " and ".join(lacks) + "."
                raise KeyError(msg)

    def targets(self, sdatas, bags, genes, setup, *, source=None) -> TrainingSet:
        """log1p(TPM) of each slide's bulk profile; per-patch statistics from ``source`` or a nominal patch."""
        tpm = bulk_profiles(sdatas, genes, setup)
        if source is not None:
            # transfer from a spot model: keep its spot statistics for the genes it had
            pos = {g: i for i, g in enumerate(source.genes)}
            per_patch = np.log1p(tpm / 1e6 * 1e4).mean(axis=0)
            mean = np.array([source.mean[pos[g]] if g in pos else per_patch[i] for i, g in enumerate(genes)])
            std = np.array([source.std[pos[g]] if g in pos else 1.0 for g in genes])
            transform = TargetTransform(tuple(genes), source.scale, source.target_sum, mean, std)
        else:
            # Patch-level statistics are unknown for bulk-only data: centre the network's output on the
            # expected per-patch share of a nominal 10^4-molecule patch (the TPM renormalisation makes the
            # absolute depth irrelevant), unit spread in log space.
            mean = np.log1p(tpm / 1e6 * 1e4).mean(axis=0)
            transform = TargetTransform(tuple(genes), "raw", None, mean, np.ones_like(mean))
        if setup.target != "raw":
            logger.info("Bulk level compares log1p(TPM); target=%r is ignored.", setup.target)
        weight = self.default_cluster_weight if setup.cluster_weight is None else setup.cluster_weight
        return TrainingSet(
            bags=bags,
            transform=transform,
            cluster_weight=float(weight),
            slide_targets=np.log1p(tpm).astype(np.float32),
        )

    def split(self, data, fraction, rng):
        """Whole slides, and only with at least three of them."""
        n = data.n_slides
        n_val = round(fraction * n) if n >= 3 else 0
        if fraction > 0 and n < 3:
            logger.warning(
                "Only %d bulk slide(s): no validation slide is held out, training runs for max_epochs without "
                "early stopping.",
                n,
            )
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def steps(self, data, idx, batch_size, rng):
        """One slide per step, in random order."""
        return [int(s) for s in rng.permutation(idx)]

    def eval_steps(self, data, idx, batch_size):
        """One slide per step, equal weights."""
        return [(int(s), 1) for s in idx]

    def loss(self, net, data, step, *, device, max_cells):
        """MSE of log1p(TPM of the summed patch counts) against the slide's profile (+ λ · cluster loss)."""
        import torch

        from bitro.models import aggregate_bulk
        from bitro.tl._chunked import bag_tokens, chunked_bulk_loss

        slide = int(step)
        bags = data.bags
        idx = np.flatnonzero(bags.bag_slide == slide)
        target = torch.as_tensor(data.slide_targets[slide : slide + 1], device=device)
        if max_cells is not None and bag_tokens(bags, idx).sum() > max_cells:  # bounded memory
            return chunked_bulk_loss(
                net,
                bags,
                idx,
                to_counts=lambda out: bag_outputs(out, data.transform)[1],
                target=target,
                cluster_weight=data.cluster_weight,
                max_cells=max_cells,
                device=device,
            )
        batch = collate(bags, idx, device=device)
        args, kwargs = net_inputs(batch)
        out = net(*args, **kwargs)
        _, counts = bag_outputs(out, data.transform)
        tpm = aggregate_bulk(counts, torch.zeros(len(idx), dtype=torch.long, device=device), 1)
        loss = torch.nn.functional.mse_loss(torch.log1p(tpm), target)
        if data.cluster_weight > 0:
            loss = loss + _cluster_term(out, counts, batch, data.cluster_weight)
        return loss

    def warn_data(self, data, n_train, n_val):
        """A handful of bulk samples teaches the mean, not slide-to-slide differences."""
        if data.n_slides < self.MIN_SLIDES:
            logger.warning(
                "Bulk-level training on %d slide(s) (%d optimiser step(s) per epoch): too few to learn how slides "
                "differ; expect predictions near the training mean. A spot-trained model summed over the slide's "
                "cells, or more bulk samples (≥ %d), do better.",
                data.n_slides,
                n_train,
                self.MIN_SLIDES,
            )

    def write(self, sdata, counts, is_unit, genes, setup, *, key_added, provenance, overwrite):
        """``bulk.layers[key_added]``: log1p(TPM) of the summed patch predictions (the trained definition)."""
        return write_bulk(sdata, counts[is_unit], genes, setup, key_added=key_added, provenance=provenance)


def bulk_profiles(sdatas: list[sd.SpatialData], genes: list[str], setup: SetupConfig) -> np.ndarray:
    """``(slides, genes)`` bulk expression as TPM over ``genes``."""
    rows = []
    for sdata in sdatas:
        bulk = get_table(sdata, setup.bulk_key, hint="Bulk training needs a one-row 'bulk' table.")
        layer = K.COUNTS_LAYER if K.COUNTS_LAYER in bulk.layers else None
        x = unit_counts(bulk, genes, layer=layer, what=setup.bulk_key)
        if x.shape[0] != 1:
            msg = f"The bulk table must have one row per slide, got {x.shape[0]}."
            raise ValueError(msg)
        total = x.sum()
        if total <= 0:
            msg = "A bulk profile sums to 0 over the selected genes; check the genes and the bulk table."
            raise ValueError(msg)
        rows.append(x[0] / total * 1e6)
    return np.stack(rows)


_LEVELS: dict[str, Level] = {}


def register_level(level: Level) -> Level:
    """Make ``level`` available by its ``name`` (``bt.tl.fit(level=name)``); returns it."""
    if not isinstance(level, Level) or not getattr(level, "name", None):
        msg = "register_level takes a Level instance with a name."
        raise TypeError(msg)
    _LEVELS[level.name] = level
    return level


def get_level(name: str) -> Level:
    """The registered level ``name``; unknown names raise with the list of levels."""
    if name not in _LEVELS:
        msg = f"level must be one of {tuple(_LEVELS)}, got {name!r}."
        raise ValueError(msg)
    return _LEVELS[name]


def levels() -> tuple[str, ...]:
    """Names of the registered levels."""
    return tuple(_LEVELS)


register_level(SpotLevel())
register_level(BulkLevel())
