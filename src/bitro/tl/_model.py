"""``BiTroModel``: the user-facing model (scvi-tools pattern) — setup, train, predict, save, load.

The torch network (:class:`bitro.models.BiTroNet`) is pure tensor code; this class turns
SpatialData into bags (:mod:`bitro.tl._data`), owns the feature projection (PCA), the
phenotype centroids (k-means) and the target normalisation, trains with early stopping
on a validation split of the training data, and writes predictions back.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro._settings import progress, resolve_device, resolve_seed
from bitro.io._build import get_table
from bitro.tl._data import BagSet, batches, build_bags, cells_of, collate, net_inputs
from bitro.tl._targets import TargetTransform, dense
from bitro.tl._write import write_units_layer

if TYPE_CHECKING:
    import spatialdata as sd

Level = Literal["spot", "bulk"]
LEVELS = ("spot", "bulk")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BULK_LOG_FLOOR = 0.0
#: Cells per chunk when predict writes the per-cell outputs (bounds its cells x genes temporaries).
_PREDICT_CHUNK = 65_536


def _as_list(sdatas: Any) -> list[sd.SpatialData]:
    import spatialdata as sd

    if isinstance(sdatas, sd.SpatialData):
        return [sdatas]
    sdatas = list(sdatas)
    if not sdatas or not all(isinstance(s, sd.SpatialData) for s in sdatas):
        msg = "Pass a SpatialData object or a non-empty list of SpatialData objects."
        raise TypeError(msg)
    return sdatas


def _cell_features(sdata: sd.SpatialData, use_rep: str, cells_key: str) -> np.ndarray:
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
            f"cells.obsm[{use_rep!r}] has non-finite values in {len(rows)} cells (e.g. {list(cells.obs_names[rows[:3]])}); "
            "re-run bt.pp.embed_cells or drop those cells."
        )
        raise ValueError(msg)
    return x


def _unit_counts(table: Any, genes: list[str], *, layer: str | None, what: str) -> np.ndarray:
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        Genes to predict. Default: all genes shared by the training slides' unit tables, selected with
        :func:`bitro.pp.select_genes` at spot level.
    config
        :class:`bitro.models.BiTroConfig` or a dict of its fields (``n_genes``/``in_dim`` are set here).
    target
        ``"raw"``: log1p of raw counts (the paper's convention); ``"library_size"``: counts rescaled to
        the median library size first.
    zscore
        Standardise each gene's log1p target with the training mean and standard deviation (paper
        Eq. 21; the default). ``False`` trains on log1p values directly (an ablation; spot level only).
    use_rep
        Cell embedding in ``cells.obsm``.
    n_components
        PCA dimension (``D``; the paper's 128).
    n_phenotypes
        k-means clusters for the phenotype labels and the cluster loss.
    cluster_weight
        λ of the cluster loss; default 0 at spot level, 0.1 at bulk level.
    k
        Neighbours per cell in the within-bag graph.
    context_um
        Let the Transformer also see the cells within this distance around each bag (a ring around a
        spot) as extra keys/values; they are not pooled by the gene head. Default off.
    seed
        Random seed (PCA, k-means, initialisation, splits, batches).
    projection, phenotypes
        A fitted feature projection / phenotype model to reuse instead of fitting new ones (transfer
        keeps the source model's so that features mean the same on both levels).
    patch_transform
        Bulk level: the per-patch target statistics (transfer from a spot model passes its spot
        statistics); default derived from the bulk profiles.
    """

    def __init__(
        self,
        sdatas: sd.SpatialData | list[sd.SpatialData],
        *,
        level: Level = "spot",
        genes: list[str] | None = None,
        config: Any = None,
        target: str = "raw",
        zscore: bool = True,
        use_rep: str = K.EMBEDDING,
        n_components: int = 128,
        n_phenotypes: int = 8,
        cluster_weight: float | None = None,
        k: int = 8,
        context_um: float | None = None,
        spots_key: str = K.SPOTS,
        cells_key: str = K.CELLS,
        patches_key: str = K.PATCHES,
        bulk_key: str = K.BULK,
        seed: int | None = None,
        projection: Any = None,
        phenotypes: Any = None,
        patch_transform: TargetTransform | None = None,
        _setup: bool = True,
    ) -> None:
        if level not in LEVELS:
            msg = f"level must be one of {LEVELS}, got {level!r}."
            raise ValueError(msg)
        self.level = level
        self.use_rep = use_rep
        self.k = int(k)
        self.context_um = None if context_um in (None, 0) else float(context_um)
        if self.context_um is not None and self.context_um < 0:
            msg = f"context_um must be ≥ 0, got {context_um!r}."
            raise ValueError(msg)
        self.keys = {"spots": spots_key, "cells": cells_key, "patches": patches_key, "bulk": bulk_key}
        self.seed = resolve_seed(seed)
        self.cluster_weight = (
            (0.0 if level == "spot" else 0.1) if cluster_weight is None else float(cluster_weight)
        )
        self.history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "val_loss": []}
        self.train_params: dict[str, Any] = {}
        self.encoder_info: dict[str, Any] = {}
        self.bulk_transform: dict[str, np.ndarray] | None = None
        self.is_trained = False
        if not _setup:
            return
        sdatas = _as_list(sdatas)
        self.genes = self._resolve_genes(sdatas, genes)
        self._patch_transform = patch_transform
        self._setup_features(
            sdatas,
            n_components=n_components,
            n_phenotypes=n_phenotypes,
            projection=projection,
            phenotypes=phenotypes,
        )
        self._build_net(config)
        self._setup_targets(sdatas, target=target, zscore=zscore)

    # ------------------------------------------------------------------ setup
    def _unit_key(self) -> tuple[str, str]:
        return (self.keys["spots"], K.SPOT_ID) if self.level == "spot" else (self.keys["patches"], "patch_id")

    def _resolve_genes(self, sdatas: list[sd.SpatialData], genes: list[str] | None) -> list[str]:
        key = self.keys["spots"] if self.level == "spot" else self.keys["bulk"]
        tables = [get_table(s, key, hint=self._table_hint(key)) for s in sdatas]
        if genes is not None:
            genes = [str(g) for g in genes]
            if len(set(genes)) != len(genes):
                msg = "genes= contains duplicates; pass each gene once."
                raise ValueError(msg)
            for t in tables:
                _unit_counts(t[:1], genes, layer=None, what=key)
            return genes
        if self.level == "spot":
            from bitro.pp._genes import select_genes

            return list(select_genes(sdatas, table_key=key))
        shared = set(tables[0].var_names)
        for t in tables[1:]:
            shared &= set(t.var_names)
        return [g for g in tables[0].var_names if g in shared]

    def _table_hint(self, key: str) -> str:
        if key == self.keys["bulk"]:
            return "Bulk training needs a one-row 'bulk' table (bt.io.read_wsi(..., bulk=...))."
        if key == self.keys["patches"]:
            return "Run bt.pp.make_patches first."
        return "Spot-level training needs the spots table written by a bt.io reader."

    def _setup_features(
        self,
        sdatas: list[sd.SpatialData],
        *,
        n_components: int,
        n_phenotypes: int,
        projection: Any,
        phenotypes: Any,
    ) -> None:
        from bitro.pp._reduce import _fit_kmeans, _fit_projection

        raw = [_cell_features(s, self.use_rep, self.keys["cells"]) for s in sdatas]
        if projection is None:
            projection = _fit_projection(
                raw, n_components=n_components, seed=self.seed, use_rep=self.use_rep, max_cells_fit=200_000
            )
        elif raw[0].shape[1] != projection.n_features:
            msg = (
                f"cells.obsm[{self.use_rep!r}] has {raw[0].shape[1]} features; the given projection expects "
                f"{projection.n_features}. Embed all slides with the same encoder."
            )
            raise ValueError(msg)
        # round-trip through the stored (float32) form so predictions equal those of a saved+loaded model
        self.projection = type(projection).from_arrays(projection.arrays(), projection.meta())
        projected = [self.projection.transform(x) for x in raw]
        if phenotypes is None:
            phenotypes = _fit_kmeans(
                np.concatenate(projected), n_clusters=n_phenotypes, seed=self.seed, use_rep=self.use_rep
            )
        self.phenotypes = type(phenotypes).from_arrays(phenotypes.arrays(), phenotypes.meta())
        info = cells_of(sdatas[0], self.keys["cells"]).uns.get(self.use_rep, {})
        self.encoder_info = {k: info[k] for k in ("encoder", "mode", "dim", "checkpoint_sha256") if k in info}
        self._train_inputs = (projected, [self.phenotypes.predict(p) for p in projected])

    def _bags(self, sdatas: list[sd.SpatialData], projected, phenos) -> tuple[BagSet, list[pd.Index]]:
        units_key, bag_key = self._unit_key()
        return build_bags(
            sdatas,
            features=projected,
            phenotypes=phenos,
            units_key=units_key,
            bag_key=bag_key,
            cells_key=self.keys["cells"],
            k=self.k,
            pos_bins=self.config.pos_bins,
            context_um=self.context_um,
        )

    def _setup_targets(self, sdatas: list[sd.SpatialData], *, target: str, zscore: bool = True) -> None:
        projected, phenos = self._train_inputs
        bags, _ = self._bags(sdatas, projected, phenos)
        units_key, _ = self._unit_key()
        if self.level == "spot":
            counts = []
            for s, sdata in enumerate(sdatas):
                table = get_table(sdata, units_key)
                rows = table.obs_names.get_indexer(bags.bag_ids[bags.bag_slide == s])
                counts.append(_unit_counts(table[rows], self.genes, layer=K.COUNTS_LAYER, what=units_key))
            counts = np.concatenate(counts)
            self.transform = TargetTransform.fit(counts, self.genes, scale=target, zscore=zscore)
            bags.targets = self.transform.encode(counts)
        else:
            self._setup_bulk_targets(sdatas, bags, target=target)
        self.train_bags = bags
        self.train_slides = [str(n) for n in bags.slide_names]

    def _bulk_profiles(self, sdatas: list[sd.SpatialData]) -> np.ndarray:
        """``(slides, genes)`` bulk expression as TPM over the model genes."""
        rows = []
        for sdata in sdatas:
            bulk = get_table(sdata, self.keys["bulk"], hint=self._table_hint(self.keys["bulk"]))
            layer = K.COUNTS_LAYER if K.COUNTS_LAYER in bulk.layers else None
            x = _unit_counts(bulk, self.genes, layer=layer, what=self.keys["bulk"])
            if x.shape[0] != 1:
                msg = f"The bulk table must have one row per slide, got {x.shape[0]}."
                raise ValueError(msg)
            total = x.sum()
            if total <= 0:
                msg = "A bulk profile sums to 0 over the selected genes; check the genes and the bulk table."
                raise ValueError(msg)
            rows.append(x[0] / total * 1e6)
        return np.stack(rows)

    def _setup_bulk_targets(self, sdatas: list[sd.SpatialData], bags: BagSet, *, target: str) -> None:
        tpm = self._bulk_profiles(sdatas)
        n_patches = np.bincount(bags.bag_slide, minlength=len(sdatas)).astype(np.float64)
        # Patch-level statistics are unknown for bulk-only data: centre the network's output on the
        # expected per-patch share of a nominal 10^4-molecule patch (the TPM renormalisation makes the
        # absolute depth irrelevant), unit spread in log space.
        if self._patch_transform is not None:
            src = self._patch_transform
            pos = {g: i for i, g in enumerate(src.genes)}
            per_patch = np.log1p(tpm / 1e6 * 1e4).mean(axis=0)
            mean = np.array(
                [src.mean[pos[g]] if g in pos else per_patch[i] for i, g in enumerate(self.genes)]
            )
            std = np.array([src.std[pos[g]] if g in pos else 1.0 for g in self.genes])
            self.transform = TargetTransform(tuple(self.genes), src.scale, src.target_sum, mean, std)
        else:
            per_patch = tpm / 1e6 * 1e4
            mean = np.log1p(per_patch).mean(axis=0)
            self.transform = TargetTransform(tuple(self.genes), "raw", None, mean, np.ones_like(mean))
        self.bulk_targets = np.log1p(tpm).astype(np.float32)
        self.bulk_n_patches = n_patches
        if target != "raw":
            logger.info("Bulk level compares log1p(TPM); target=%r is ignored.", target)

    def _build_net(self, config: Any) -> None:
        import torch

        from bitro.models import BiTroConfig, BiTroNet

        fields = dict(config.to_dict() if hasattr(config, "to_dict") else (config or {}))
        fields.update(n_genes=len(self.genes), in_dim=int(self.projection.n_components))
        self.config = BiTroConfig(**fields)
        torch.manual_seed(self.seed)
        self.net = BiTroNet(self.config)

    # ------------------------------------------------------------------ training
    def _loss_spot(self, net, batch, cluster_weight: float):
        import torch

        from bitro.models import cluster_loss, pseudo_cell_expression

        args, kwargs = net_inputs(batch)

        out = net(*args, **kwargs)
        loss = torch.nn.functional.mse_loss(out["y"], batch["y"])
        if cluster_weight > 0:
            counts = self._to_counts_t(out["y"])
            cells = torch.log1p(pseudo_cell_expression(out["attn"], counts, batch["batch"]))
            loss = loss + cluster_weight * cluster_loss(cells, batch["phenotype"])
        return loss

    def _to_counts_t(self, z):
        import torch

        mean = torch.as_tensor(self.transform.mean, dtype=z.dtype, device=z.device)
        std = torch.as_tensor(self.transform.std, dtype=z.dtype, device=z.device)
        return torch.clamp(torch.expm1(z * std + mean), min=0.0)

    def _loss_bulk(self, net, bags: BagSet, slide: int, cluster_weight: float, device, max_cells=None):
        import torch

        from bitro.models import aggregate_bulk, cluster_loss, pseudo_cell_expression
        from bitro.tl._chunked import bag_tokens, chunked_bulk_loss

        idx = np.flatnonzero(bags.bag_slide == slide)
        if max_cells is not None and bag_tokens(bags, idx).sum() > max_cells:  # bounded memory
            target = torch.as_tensor(self.bulk_targets[slide : slide + 1], device=device)
            return chunked_bulk_loss(
                net,
                bags,
                idx,
                to_counts=self._to_counts_t,
                target=target,
                cluster_weight=cluster_weight,
                max_cells=max_cells,
                device=device,
            )
        batch = collate(bags, idx, device=device)
        args, kwargs = net_inputs(batch)
        out = net(*args, **kwargs)
        counts = self._to_counts_t(out["y"])
        tpm = aggregate_bulk(counts, torch.zeros(len(idx), dtype=torch.long, device=device), 1)
        target = torch.as_tensor(self.bulk_targets[slide : slide + 1], device=device)
        loss = torch.nn.functional.mse_loss(torch.log1p(tpm), target)
        if cluster_weight > 0:
            cells = torch.log1p(pseudo_cell_expression(out["attn"], counts, batch["batch"]))
            loss = loss + cluster_weight * cluster_loss(cells, batch["phenotype"])
        return loss

    def _split(self, validation_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Validation units drawn from the training data (bags at spot level, slides at bulk level)."""
        if self.level == "spot":
            n = self.train_bags.n_bags
            n_val = round(validation_fraction * n)
            if validation_fraction > 0 and n_val == 0 and n >= 2:
                n_val = 1
            perm = rng.permutation(n)
            return np.sort(perm[n_val:]), np.sort(perm[:n_val])
        n = len(self.bulk_targets)
        n_val = round(validation_fraction * n) if n >= 3 else 0
        if validation_fraction > 0 and n < 3:
            logger.warning(
                "Only %d bulk slide(s): no validation slide is held out, training runs for max_epochs without "
                "early stopping.",
                n,
            )
        perm = rng.permutation(n)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def train(
        self,
        *,
        max_epochs: int = 100,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        batch_size: int = 32,
        patience: int = 6,
        validation_fraction: float = 0.1,
        grad_clip: float = 1.0,
        device: str | None = "auto",
        parameters: Any = None,
        checkpoint_dir: str | Path | None = None,
        max_cells_per_step: int | None = 10_000,
    ) -> BiTroModel:
        """Train with Adam, gradient-norm clipping and early stopping on a validation split.

        The validation split is drawn from the training data only (``validation_fraction`` of the
        spots, or of the bulk slides when there are at least three); the weights of the best
        validation epoch are kept. ``history`` records the losses per epoch.

        Parameters
        ----------
        max_epochs
            Upper bound on epochs.
        lr
            Adam learning rate (paper: 1e-4).
        weight_decay
            Adam weight decay.
        batch_size
            Bags per step at spot level (bulk level: one slide per step).
        patience
            Epochs without validation improvement before stopping (paper: 6).
        validation_fraction
            Share of the training units held out for early stopping; 0 disables early stopping.
        grad_clip
            Gradient-norm clip (paper: 1.0).
        device
            ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``.
        parameters
            Parameters to optimise (default: all trainable ones); used by transfer.
        checkpoint_dir
            Save the training state there after every epoch (safetensors + JSON). If the folder already
            holds a checkpoint of this training run, training resumes from it; on the CPU the result is
            identical to an uninterrupted run with the same seed.
        max_cells_per_step
            Bulk level: run a slide with more cells than this in chunks of at most this many cells
            (context cells included), each under gradient checkpointing, and backpropagate the slide's
            loss once, so peak memory scales with the chunk instead of the slide. The loss, including
            the cluster loss, is the same as in one pass up to float rounding (with ``dropout > 0``
            the dropout masks differ). A bag larger than the limit is run as a chunk of its own.
            ``None``: whole slide at once. Ignored at spot level (``batch_size`` bounds the step).
        """
        import torch

        from bitro.tl._chunked import check_max_cells

        if max_epochs < 1:
            msg = f"max_epochs must be ≥ 1, got {max_epochs}."
            raise ValueError(msg)
        self._max_cells = check_max_cells(max_cells_per_step)
        dev = resolve_device(device)
        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        self._start_hash = self.weights_hash()
        train_idx, val_idx = self._split(validation_fraction, rng)
        net = self.net.to(dev)
        params = [p for p in (parameters if parameters is not None else net.parameters()) if p.requires_grad]
        if not params:
            msg = "No trainable parameters."
            raise RuntimeError(msg)
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        best, best_state, bad_epochs = np.inf, None, 0
        start_epoch = len(self.history["epoch"])
        first = 0
        if checkpoint_dir is not None:
            from bitro.tl._checkpoint import load_training_state, restore_optimizer

            saved = load_training_state(checkpoint_dir)
            if saved is not None:
                tensors, meta = saved
                if meta.get("weights_start") != self._start_hash:
                    msg = (
                        f"The checkpoint in {str(checkpoint_dir)!r} belongs to another training run (different "
                        "model, data or seed); use an empty checkpoint_dir or delete it."
                    )
                    raise ValueError(msg)
                net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
                if meta["has_best"]:
                    best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
                restore_optimizer(opt, tensors, meta)
                rng.bit_generator.state = meta["numpy_rng"]
                torch.set_rng_state(tensors["rng.torch"])
                best, bad_epochs, first = meta["best"], meta["bad_epochs"], meta["epochs_done"]
                self.history = {k: list(v) for k, v in meta["history"].items()}
                start_epoch = len(self.history["epoch"]) - first
                logger.info("Resuming training from epoch %d (%s).", first, checkpoint_dir)
        stopped = bool(checkpoint_dir is not None and first and bad_epochs >= patience and len(val_idx))
        bar = progress(
            range(first, max_epochs if not stopped else first), desc=f"training ({self.level})", unit="epoch"
        )
        for epoch in bar:
            net.train()
            losses = []
            for step in self._steps(train_idx, batch_size, rng):
                opt.zero_grad(set_to_none=True)
                loss = self._step_loss(net, step, dev)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
            train_loss = float(np.mean(losses))
            val_loss = self._evaluate_loss(net, val_idx, batch_size, dev) if len(val_idx) else np.nan
            self.history["epoch"].append(start_epoch + epoch + 1)
            self.history["train_loss"].append(train_loss)
            self.history["val_loss"].append(val_loss)
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
            monitored = val_loss if len(val_idx) else train_loss
            if monitored < best - 1e-6:
                best, bad_epochs = monitored, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
            else:
                bad_epochs += 1
            if checkpoint_dir is not None:
                from bitro.tl._checkpoint import save_training_state

                save_training_state(
                    checkpoint_dir,
                    net_state=net.state_dict(),
                    best_state=best_state,
                    optimizer=opt,
                    rng=rng,
                    meta={
                        "weights_start": self._start_hash,
                        "epochs_done": epoch + 1,
                        "best": float(best),
                        "bad_epochs": bad_epochs,
                        "history": self.history,
                    },
                )
            if len(val_idx) and bad_epochs >= patience:
                logger.info("Early stopping after epoch %d (best validation loss %.4f).", epoch + 1, best)
                break
        if best_state is not None:
            net.load_state_dict(best_state)
        self.net = net.cpu()
        self.is_trained = True
        self.train_params = {
            "max_epochs": max_epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "patience": patience,
            "validation_fraction": validation_fraction,
            "grad_clip": grad_clip,
            "max_cells_per_step": max_cells_per_step,
            "best_loss": float(best),
            "epochs_run": len(self.history["epoch"]),
            "n_train_units": len(train_idx),
            "n_val_units": len(val_idx),
        }
        return self

    def _steps(self, idx: np.ndarray, batch_size: int, rng: np.random.Generator):
        if self.level == "spot":
            return [idx[b] for b in batches(len(idx), batch_size, shuffle=True, rng=rng)]
        return [int(s) for s in rng.permutation(idx)]

    def _step_loss(self, net, step, dev):
        if self.level == "spot":
            return self._loss_spot(net, collate(self.train_bags, step, device=dev), self.cluster_weight)
        return self._loss_bulk(net, self.train_bags, step, self.cluster_weight, dev, self._max_cells)

    def _evaluate_loss(self, net, idx: np.ndarray, batch_size: int, dev) -> float:
        import torch

        net.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            if self.level == "spot":
                for b in batches(len(idx), batch_size, shuffle=False):
                    loss = self._loss_spot(
                        net, collate(self.train_bags, idx[b], device=dev), self.cluster_weight
                    )
                    total += float(loss) * len(b)
                    n += len(b)
            else:
                for s in idx:
                    loss = self._loss_bulk(
                        net, self.train_bags, int(s), self.cluster_weight, dev, self._max_cells
                    )
                    total += float(loss)
                    n += 1
        return total / max(n, 1)

    # ------------------------------------------------------------------ prediction
    def _check_features(self, sdata: sd.SpatialData) -> np.ndarray:
        x = _cell_features(sdata, self.use_rep, self.keys["cells"])
        if x.shape[1] != self.projection.n_features:
            msg = (
                f"cells.obsm[{self.use_rep!r}] has {x.shape[1]} features but the model was trained on "
                f"{self.projection.n_features} ({self.encoder_info.get('encoder', 'unknown encoder')}); embed the "
                "cells with the same encoder and mode as the training data."
            )
            raise ValueError(msg)
        info = cells_of(sdata, self.keys["cells"]).uns.get(self.use_rep, {})
        enc = self.encoder_info.get("encoder")
        if enc is not None and info.get("encoder") not in (None, enc):
            msg = (
                f"The cells were embedded with encoder {info.get('encoder')!r} but the model was trained on "
                f"{enc!r} features; re-run bt.pp.embed_cells with encoder={enc!r}."
            )
            raise ValueError(msg)
        return x

    def predict_bags(self, sdata: sd.SpatialData, *, batch_size: int = 64, device: str | None = "auto"):
        """Run the network on every bag of ``sdata``.

        Returns
        -------
        ``(bags, unit_names, z, attn)``: the BagSet, the unit names of the units table, ``(B, G)``
        normalised predictions and ``(N, G)`` attention of each cell (cells in ``bags`` order).
        """
        import torch

        if not self.is_trained:
            logger.warning("Predicting with an untrained model.")
        x = self._check_features(sdata)
        proj = self.projection.transform(x)
        bags, names = self._bags([sdata], [proj], [self.phenotypes.predict(proj)])
        dev = resolve_device(device)
        net = self.net.to(dev).eval()
        zs, attn = [], np.zeros((len(bags.features), len(self.genes)), dtype=np.float32)
        with torch.no_grad():
            for b in progress(
                batches(bags.n_bags, batch_size, shuffle=False), desc="predicting", unit="batch"
            ):
                batch = collate(bags, b, device=dev)
                args, kwargs = net_inputs(batch)
                out = net(*args, **kwargs)
                zs.append(out["y"].cpu().numpy())
                attn[batch["cells"]] = out["attn"].cpu().numpy()
        self.net = net.cpu()
        return bags, names[0], np.concatenate(zs).astype(np.float64), attn

    def predict(
        self,
        sdata: sd.SpatialData,
        *,
        key_added: str = K.PRED,
        batch_size: int = 64,
        device: str | None = "auto",
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Predict unit- and cell-level expression and write it into ``sdata``.

        Writes (``key_added`` = ``"bitro"`` by default):

        - units table (``spots`` or ``patches``): ``layers[key_added]`` log1p expression on the model's
          target scale, aligned to ``var`` (NaN for genes the model does not predict and for units
          without cells); ``obs[f"{key_added}_n_cells"]``.
        - ``cells``: pseudo single-cell expression (paper Eq. 10, in count space so a unit's cells sum
          to its prediction) as ``layers[key_added]`` = log1p(pseudo-counts) and
          ``obsm[f"X_{key_added}_expr"]`` = log1p of per-cell library-size-normalised pseudo-counts
          (for ``sc.pp.neighbors(use_rep=...)``). Cells outside every bag have no prediction: their
          rows are NaN and ``obs[f"{key_added}_in_bag"]`` is False — cluster
          ``cells[cells.obs["bitro_in_bag"]]``. A cells table without genes gets the model genes as
          ``var``.
        - at bulk level also ``bulk.layers[key_added]`` = log1p(TPM) of the summed patch predictions.
        - provenance in ``.uns[key_added]`` of each written table.

        Returns
        -------
        dict with the arrays written (``units``, ``cells``, and ``bulk`` at bulk level).
        """
        import anndata as ad
        from scipy import sparse

        bags, _names, z, attn = self.predict_bags(sdata, batch_size=batch_size, device=device)
        units_key, _ = self._unit_key()
        units = get_table(sdata, units_key)
        cells = cells_of(sdata, self.keys["cells"])
        for table, what in ((units, units_key), (cells, self.keys["cells"])):
            if key_added in table.layers and not overwrite:
                msg = (
                    f"{what}.layers[{key_added!r}] already exists; pass overwrite=True or another key_added."
                )
                raise ValueError(msg)
        obsm_key = f"X_{key_added}_expr"
        if obsm_key in cells.obsm and not overwrite:
            msg = f"cells.obsm[{obsm_key!r}] already exists; pass overwrite=True or another key_added."
            raise ValueError(msg)
        log_units = self.transform.to_log1p(z)
        counts_units = self.transform.to_counts(z)
        provenance = self._provenance()

        # units
        layer = write_units_layer(
            units,
            bags.bag_ids,
            self.genes,
            log_units,
            key_added=key_added,
            provenance=provenance,
            n_cells=bags.n_cells,
            overwrite=overwrite,
        )

        # cells: pseudo single-cell expression in count space, written chunk by chunk so that no
        # further cells x genes temporaries (float64 products, a NaN-padded copy) are held at once
        n_all = cells.n_obs
        if cells.n_vars == 0:
            new = ad.AnnData(
                X=sparse.csr_matrix((n_all, len(self.genes)), dtype=np.float32),
                obs=cells.obs,
                var=pd.DataFrame(index=pd.Index(self.genes, dtype=str)),
                obsm=dict(cells.obsm),
                obsp=dict(cells.obsp),
                uns=dict(cells.uns),
                layers={},
            )
            sdata.tables[self.keys["cells"]] = new
            cells = new
        cell_layer = np.full((n_all, cells.n_vars), np.nan, dtype=np.float32)
        normed = np.full((n_all, len(self.genes)), np.nan, dtype=np.float32)  # NaN outside every bag
        ccols = cells.var_names.get_indexer(self.genes)
        chave = ccols >= 0
        bag_of_cell = np.repeat(np.arange(bags.n_bags), bags.n_cells)
        for start in range(0, len(bags.cell_obs), _PREDICT_CHUNK):
            part = slice(start, start + _PREDICT_CHUNK)
            rows = bags.cell_obs[part]
            pseudo = (attn[part] * counts_units[bag_of_cell[part]]).astype(np.float32)  # (n, G)
            lib = np.nansum(pseudo, axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                normed[rows] = np.log1p(np.where(lib > 0, pseudo / lib * 1e4, np.nan))
            cell_layer[np.ix_(rows, ccols[chave])] = np.log1p(pseudo[:, chave])
        del attn
        cells.layers[key_added] = cell_layer
        cells.obsm[obsm_key] = normed
        cells.obs[f"{key_added}_in_bag"] = np.isin(np.arange(n_all), bags.cell_obs)
        cells.uns[key_added] = {**provenance, "genes": list(self.genes), "obsm_key": obsm_key}
        out = {"units": layer, "cells": cell_layer}

        if self.level == "bulk" and self.keys["bulk"] in sdata.tables:
            bulk = sdata.tables[self.keys["bulk"]]
            tpm = counts_units.sum(axis=0)
            tpm = tpm / max(tpm.sum(), 1e-12) * 1e6
            blayer = np.full((bulk.n_obs, bulk.n_vars), np.nan, dtype=np.float32)
            bcols = bulk.var_names.get_indexer(self.genes)
            blayer[:, bcols[bcols >= 0]] = np.log1p(tpm[bcols >= 0])
            if key_added in bulk.layers and not overwrite:
                msg = f"bulk.layers[{key_added!r}] already exists; pass overwrite=True or another key_added."
                raise ValueError(msg)
            bulk.layers[key_added] = blayer
            bulk.uns[key_added] = provenance
            out["bulk"] = blayer
        return out

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
            "train_slides": list(getattr(self, "train_slides", [])),
            "weights_sha256": self.weights_hash(),
            "bitro_version": __version__,
            # only when set: AnnData cannot store None in .uns
            **({"transferred_from": self.source} if getattr(self, "source", None) else {}),
        }

    def weights_hash(self) -> str:
        """SHA-256 of the network weights (identifies the checkpoint in provenance)."""
        h = hashlib.sha256()
        for name, t in sorted(self.net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save as ``model.safetensors`` (weights, PCA, centroids, target statistics) + ``config.json``.

        Written to a temporary folder first and moved into place, so an interrupted save never leaves
        a half-written model. ``overwrite=True`` replaces only a bitro model folder (``config.json`` and
        ``model.safetensors``, nothing else); any other existing path is refused.
        """
        import shutil
        import tempfile

        from safetensors.numpy import save_file

        from bitro import __version__
        from bitro._files import check_replaceable, remove_path

        path = check_replaceable(path, kind="model", overwrite=overwrite)
        arrays = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        arrays.update({f"projection.{k}": np.asarray(v) for k, v in self.projection.arrays().items()})
        arrays.update({f"phenotypes.{k}": np.asarray(v) for k, v in self.phenotypes.arrays().items()})
        arrays.update({f"target.{k}": v for k, v in self.transform.arrays().items()})
        if self.level == "bulk" and hasattr(self, "bulk_targets"):
            arrays["bulk.targets"] = self.bulk_targets
        config = {
            "format": "bitro-model/1",
            "bitro_version": __version__,
            "level": self.level,
            "genes": list(self.genes),
            "net_config": self.config.to_dict(),
            "use_rep": self.use_rep,
            "k": self.k,
            "context_um": self.context_um,
            "keys": self.keys,
            "seed": self.seed,
            "cluster_weight": self.cluster_weight,
            "projection": self.projection.meta(),
            "phenotypes": self.phenotypes.meta(),
            "target": self.transform.meta(),
            "encoder": self.encoder_info,
            "history": self.history,
            "train_params": self.train_params,
            "train_slides": list(getattr(self, "train_slides", [])),
            "is_trained": self.is_trained,
            "lora": getattr(self, "lora_info", None),
            "transferred_from": getattr(self, "source", None),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=float))
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
        """Load a model saved with :meth:`save` (safetensors + JSON; no pickle is ever read)."""
        import torch
        from safetensors.numpy import load_file

        from bitro.models import BiTroConfig, BiTroNet
        from bitro.pp._reduce import FeatureProjection, PhenotypeModel

        path = Path(path)
        cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_file.is_file() or not w_file.is_file():
            msg = f"{str(path)!r} is not a bitro model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})."
            raise FileNotFoundError(msg)
        pickles = [p.name for p in path.iterdir() if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin")]
        if pickles:
            msg = f"{str(path)!r} contains pickle-based files {pickles}; bitro never loads pickles. Remove them."
            raise ValueError(msg)
        config = json.loads(cfg_file.read_text())
        if not str(config.get("format", "")).startswith("bitro-model/"):
            msg = f"{cfg_file} is not a bitro model config."
            raise ValueError(msg)
        arrays = load_file(str(w_file))
        self = cls(
            None,
            level=config["level"],
            use_rep=config["use_rep"],
            k=config["k"],
            seed=config["seed"],
            _setup=False,
        )
        self.keys = config["keys"]
        self.context_um = config.get("context_um")
        self.cluster_weight = config["cluster_weight"]
        self.genes = list(config["genes"])
        self.encoder_info = config.get("encoder", {})
        self.history = config.get("history", self.history)
        self.train_params = config.get("train_params", {})
        self.train_slides = config.get("train_slides", [])
        self.is_trained = config.get("is_trained", True)
        pick = lambda prefix: {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}  # noqa: E731
        self.projection = FeatureProjection.from_arrays(pick("projection."), config["projection"])
        self.phenotypes = PhenotypeModel.from_arrays(pick("phenotypes."), config["phenotypes"])
        self.transform = TargetTransform.from_arrays(pick("target."), config["target"])
        if "bulk.targets" in arrays:
            self.bulk_targets = arrays["bulk.targets"]
        if list(self.transform.genes) != self.genes:
            msg = "Corrupt model folder: the gene list of the targets differs from the model's."
            raise ValueError(msg)
        self.config = BiTroConfig.from_dict(config["net_config"])
        if self.config.n_genes != len(self.genes):
            msg = (
                f"Corrupt model folder: config has {self.config.n_genes} genes, gene list {len(self.genes)}."
            )
            raise ValueError(msg)
        self.net = BiTroNet(self.config)
        self.lora_info = config.get("lora")
        self.source = config.get("transferred_from")
        if self.lora_info:
            from bitro.models import apply_lora

            self.net = apply_lora(self.net, **self.lora_info)
        state = {k: torch.from_numpy(v.copy()) for k, v in pick("net.").items()}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            msg = (
                f"Weights in {w_file.name} do not match the architecture in {CONFIG_FILE} "
                f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})."
            )
            raise ValueError(msg)
        return self

    def __repr__(self) -> str:
        status = "trained" if self.is_trained else "untrained"
        return (
            f"BiTroModel(level={self.level!r}, genes={len(self.genes)}, features={self.use_rep!r}→"
            f"{self.projection.n_components}, phenotypes={self.phenotypes.n_clusters}, {status})"
        )
