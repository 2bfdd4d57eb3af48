"""Pseudo single cells against known cell truth on synthetic tissue (issue #13 item 4; paper §4.3).

Protocol. Two layouts of ``bt.datasets.synthetic_tissue`` whose spots are exact sums of known cells
(``cells_truth``): a HER2ST-like legacy ST layout (100 µm spots on a 200 µm grid, about 24 cells of 4
types per spot) and a Visium-like layout with mixed-type spots (55 µm spots, about 8 cells of 3 types).
The slides of a layout differ in cell-type composition (``composition_sd=0.7``: each type's share of a slide
varies about twofold, as between patients), so a held-out slide's bulk deviates from the training mean in a
way its image shows.
The true nuclei are embedded with the ``morphology`` encoder, so cell identity is exact. Each slide is
held out once (trained on the others) and each fold is run with several seeds (network initialisation,
validation split and batches; the slides stay the same). Every model predicts the held-out slide and is
scored there, all on the same cells and genes:

- **pseudo-cells** of each BiTro head (``config={"head": ...}``: the gene-query attention split, and
  the per-cell count head with and without the skip connection, with MSE or Poisson loss), scored
  against the true counts of the cells under a spot (``bt.tl.score_cells``, raw and library-size
  normalised log1p; PCC_gene = correlation across cells per gene, averaged over genes);
- the **equal split of each model's own predicted spots** (what the model would give if it could not
  tell the cells of a spot apart), the ratio pseudo-cells / equal split (issue target: ≥ 1.2 on the
  normalised PCC_gene, on both layouts) and the model's **spot-level** PCC_gene;
- a **per-cell-sum baseline** (:mod:`benchmarks._cellsum`: an MLP on the raw morphology features whose
  non-negative outputs, summed over a spot, are fitted to the spot counts with a Poisson loss);
- the **oracle equal split** (true spot counts split equally) and the **type-aware oracle** (true spot
  counts split by the true types' mean profiles, estimated on the training slides' true cells);
- the **within-spot entropy** of each model's cell shares (normalised to 1 for an equal split; for
  the attention head it is the entropy of the attention weights) and the within-spot correlation of
  predicted and true cell shares;
- **bulk**: each held-out slide's predicted cells summed into one profile (every cell for a model that
  predicts every cell, else the cells under spots); its deviation from the training slides' mean bulk
  (log1p CPM) is correlated across genes with the true deviation (issue target: ≥ 0.3).

Generated and embedded slides are cached in ``benchmarks/cache/`` (tables only). ``BITRO_CELLS_VARIANTS``
(variant names separated by ";") fits only those variants and reuses the other variants' records from
the previous result when its protocol is the same (each reused record names the commit it came from).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from benchmarks import _cell_refs as C
from benchmarks._common import CACHE_DIR, md_table, metadata

#: The two layouts: generator knobs, and image size (px at 0.5 µm/px) for the quick and the full run.
LAYOUTS: dict[str, dict[str, Any]] = {
    "her2st": {
        "label": "HER2ST-like ST (100 µm spots, 200 µm pitch)",
        "technology": "ST",
        "domain_size_um": 110.0,
        "mixing": 0.2,
        "composition_sd": 0.7,
        "size": {"quick": 2400, "full": 3000},
    },
    "visium_mixed": {
        "label": "Visium-like, mixed-type spots (55 µm spots, 100 µm pitch)",
        "technology": "visium",
        "domain_size_um": 110.0,
        "mixing": 0.3,
        "composition_sd": 0.7,
        "size": {"quick": 1200, "full": 2000},
    },
}
FULL = {"n_slides": 4, "n_genes": 100, "max_epochs": 30, "seeds": [0, 1, 2], "folds": "all"}
QUICK = {"n_slides": 3, "n_genes": 60, "max_epochs": 4, "seeds": [0, 1], "folds": "last"}
DATA_SEED = 0
NETWORK = {"hidden_dim": 64, "ffn_dim": 128}
FIT = {"target": "raw", "lr": 1e-3, "n_components": 28, "device": "cpu"}
#: BiTro variants: name -> (network config, setup options). Each names its trunk (GAT and Transformer)
#: explicitly, so a variant means the same network whatever bitro's defaults are. Today's defaults
#: ("attention", "mse") are dropped when the installed bitro has no such option (older builds).
#: Skip is compared at the Poisson loss and the loss with the skip; the fourth corner (no skip, MSE)
#: is left out to keep the full run under an hour (add it here to run it).
_TRUNK = {"use_gat": True, "use_transformer": True}
_NO_TRUNK = {"use_gat": False, "use_transformer": False}
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "attention": ({"head": "attention", **_TRUNK}, {"loss": "mse"}),
    "cell_counts + skip, poisson": ({"head": "cell_counts", "skip": True, **_TRUNK}, {"loss": "poisson"}),
    "cell_counts, poisson": ({"head": "cell_counts", "skip": False, **_TRUNK}, {"loss": "poisson"}),
    "cell_counts + skip, mse": ({"head": "cell_counts", "skip": True, **_TRUNK}, {"loss": "mse"}),
    "cell_counts, mse, no GAT/Transformer": (
        {"head": "cell_counts", "skip": True, **_NO_TRUNK},
        {"loss": "mse"},
    ),
    "cell_counts, mse, no GAT/Transformer, no skip": (
        {"head": "cell_counts", "skip": False, **_NO_TRUNK},
        {"loss": "mse"},
    ),
}
#: The trunk every variant had before variants named it (bitro's defaults then): used to match the
#: records of an earlier result file to today's variants.
_OLD_IMPLICIT = _TRUNK
#: Environment: variant names to fit, separated by ";" (names contain commas); the other variants' records are reused from
#: ``results/cells.json`` when its protocol and the variant's network are the same (else refitted).
ENV_VARIANTS = "BITRO_CELLS_VARIANTS"
BASELINE = "per-cell sum (MLP on raw features)"
ORACLE_EQUAL = "oracle: equal split of true spots"
ORACLE_TYPE = "oracle: true spots split by true type profiles"
TYPE_BULK = "every cell's true type × its training profile, summed"
TARGET_RATIO = 1.2
TARGET_BULK = 0.3
#: Modules whose source keys the slide cache (generator and morphology encoder, as imported).
_GENERATOR_MODULES = (
    "bitro.datasets._synthetic",
    "bitro.datasets._synthetic_render",
    "bitro.pp._encoders_morphology",
)


# --------------------------------------------------------------------------- data
def _cache_path(layout: str, size: int, p: dict[str, Any]) -> Path:
    spec = {k: v for k, v in LAYOUTS[layout].items() if k not in ("label", "size")}
    spec |= {"size": size, "n_slides": p["n_slides"], "n_genes": p["n_genes"], "seed": DATA_SEED}
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for name in _GENERATOR_MODULES:
        h.update(Path(importlib.import_module(name).__file__ or "").read_bytes())
    return CACHE_DIR / f"cells_{layout}_{h.hexdigest()[:12]}"


def load_slides(layout: str, p: dict[str, Any], size: int) -> tuple[list[Any], dict[str, float]]:
    """The layout's slides as tables-only SpatialData (cells_truth with morphology features, spots, bulk)."""
    import anndata as ad
    import spatialdata as sd

    import bitro as bt
    from bitro._logging import logger

    path = _cache_path(layout, size, p)
    timing = {"generate_s": 0.0, "embed_s": 0.0, "cached": path.exists()}
    if not path.exists():
        spec = LAYOUTS[layout]
        logger.info(
            "benchmarks.cells: generating %d %s slides of %d px into %s", p["n_slides"], layout, size, path
        )
        t = time.perf_counter()
        knobs = {
            k: v for k, v in spec.items() if k not in ("label", "size")
        }  # every knob that keys the cache
        slides = bt.datasets.synthetic_tissue(
            p["n_slides"], size=size, n_genes=p["n_genes"], seed=DATA_SEED, **knobs
        )
        timing["generate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for s in slides:
            bt.pp.embed_cells(s, cells_key="cells_truth", encoder="morphology", seed=DATA_SEED)
        timing["embed_s"] = time.perf_counter() - t
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():  # left by an interrupted run
            shutil.rmtree(tmp)
        for i, s in enumerate(slides):
            for key in ("cells_truth", "spots", "bulk"):
                s.tables[key].write_zarr(tmp / str(i) / f"{key}.zarr")
            (tmp / str(i) / "attrs.json").write_text(json.dumps(dict(s.attrs), default=str))
        (tmp / "timing.json").write_text(json.dumps(timing))
        tmp.rename(path)
    else:
        timing = {**json.loads((path / "timing.json").read_text()), "cached": True}
    out = []
    for i in range(p["n_slides"]):
        tables = {k: ad.read_zarr(path / str(i) / f"{k}.zarr") for k in ("cells_truth", "spots", "bulk")}
        with warnings.catch_warnings():  # tables only: the shapes they annotate are not needed here
            warnings.filterwarnings("ignore", message=".*which is not present in the SpatialData")
            s = sd.SpatialData(tables=tables)
        s.attrs.update(json.loads((path / str(i) / "attrs.json").read_text()))
        out.append(s)
    return out, timing


def _fresh(sdata: Any) -> Any:
    """A copy of a tables-only slide to predict into (the cached slides stay as loaded)."""
    import spatialdata as sd

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*which is not present in the SpatialData")
        out = sd.SpatialData(tables={k: t.copy() for k, t in sdata.tables.items()})
    out.attrs.update(sdata.attrs)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence bitro's per-call INFO lines (each evaluate / predict logs its scores)."""
    log = logging.getLogger("bitro")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _spot_index(sdata: Any) -> np.ndarray:
    """Row in the spots table of each true cell's spot (-1 outside every spot)."""
    sid = sdata["cells_truth"].obs["spot_id"]
    codes = sdata["spots"].obs_names.get_indexer(sid.astype(object).where(sid.notna(), "\0"))
    return np.asarray(codes, dtype=np.int64)


def _truth(sdata: Any, genes: list[str]) -> dict[str, Any]:
    cells, spots, bulk = sdata["cells_truth"], sdata["spots"], sdata["bulk"]
    return {
        "cells": _dense(cells.layers["counts"][:, cells.var_names.get_indexer(genes)]),
        "spots": _dense(spots.layers["counts"][:, spots.var_names.get_indexer(genes)]),
        "bulk": _dense(bulk.layers["counts"][:, bulk.var_names.get_indexer(genes)])[0],
        "spot_index": _spot_index(sdata),
        "cell_type": cells.obs["cell_type"].cat.codes.to_numpy(),
        "n_types": len(cells.obs["cell_type"].cat.categories),
        "features": np.asarray(cells.obsm["X_bitro"], dtype=np.float64),
    }


# --------------------------------------------------------------------------- scoring
def _score(
    pred_counts: np.ndarray, true_counts: np.ndarray, rows: np.ndarray, *, cells: bool
) -> dict[str, float]:
    """PCC_gene (and PCC_overall) of ``log1p(pred)`` against the true counts on the rows given."""
    import anndata as ad

    import bitro as bt

    rows = np.asarray(rows, dtype=bool)
    if rows.sum() < 3:
        return {}
    pred = np.asarray(pred_counts[rows], dtype=np.float64)
    a = ad.AnnData(X=np.nan_to_num(true_counts[rows]).astype(np.float32))
    a.var_names = [f"g{i}" for i in range(a.n_vars)]
    a.layers["pred"] = np.log1p(np.clip(pred, 0, None)).astype(np.float32)
    a.layers["counts"] = a.X.copy()
    fn = bt.tl.score_cells if cells else bt.tl.evaluate
    key = "pred_layer" if cells else "layer"
    kwargs = {"inplace": False}
    with _quiet():
        ev = fn(a, truth_layer="counts", normalize="both", **{key: "pred"}, **kwargs)
    return {f"{r.metric}_{r.scale}": float(r.value) for r in ev.itertuples()}


def score_method(
    cell_counts: np.ndarray | None,
    spot_counts: np.ndarray,
    truth: dict[str, Any],
    train_bulks: np.ndarray,
    *,
    all_cells: bool,
    train_pred_bulks: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every metric of one method on the held-out slide (count-space predictions).

    ``train_bulks`` are the training slides' true bulks; ``train_pred_bulks`` the method's own
    summed predictions on the training slides (the reference of ``bulk_deviation_r_self``).
    """
    idx = truth["spot_index"]
    inside = idx >= 0
    n_spots = len(truth["spots"])
    occupied = np.bincount(idx[inside], minlength=n_spots) > 0  # spots without cells get no bag
    out: dict[str, Any] = {"spots": _score(spot_counts, truth["spots"], occupied, cells=False)}
    if cell_counts is None:
        return out
    under = np.where(inside[:, None], cell_counts, np.nan)
    out["cells"] = _score(under, truth["cells"], inside, cells=True)
    out["equal_split"] = _score(C.equal_split(spot_counts, idx), truth["cells"], inside, cells=True)
    if all_cells and (~inside).sum() >= 3:
        out["outside"] = _score(cell_counts, truth["cells"], ~inside, cells=True)
    out |= C.share_entropy(under, idx, n_spots)
    out["share_correlation"] = C.share_correlation(under, truth["cells"], idx, n_spots)
    sums = C.spot_sums(under, idx, n_spots)[occupied]
    scale = max(float(np.nanmax(spot_counts[occupied])), 1e-12)
    out["sum_gap"] = float(np.max(np.abs(sums - spot_counts[occupied])) / scale)
    bulk = np.nansum(cell_counts if all_cells else under, axis=0)
    out["bulk_deviation_r"] = C.bulk_deviation_correlation(bulk, truth["bulk"], train_bulks)
    if train_pred_bulks is not None:
        out["bulk_deviation_r_self"] = C.bulk_deviation_correlation(
            bulk, truth["bulk"], train_bulks, pred_train=train_pred_bulks
        )
    out["bulk_cells"] = "all" if all_cells else "under spots"
    return out


# --------------------------------------------------------------------------- models
def _options_of(cls: Any) -> set[str]:
    return {f.name for f in fields(cls)}


def _variant_args(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Network config and setup options of a variant, dropping today's defaults an older build lacks."""
    from bitro.models import BiTroConfig
    from bitro.tl import SetupConfig

    config, opts = (dict(d) for d in VARIANTS[name])
    if "head" not in _options_of(BiTroConfig) and config.get("head") == "attention":
        config.pop("head")
    if "loss" not in _options_of(SetupConfig) and opts.get("loss") == "mse":
        opts.pop("loss")
    return config, opts


def _predict(model: Any, sdata: Any, genes: list[str]) -> dict[str, Any]:
    """Cells and spots (count space) predicted by a BiTro model on a copy of ``sdata``."""
    import bitro as bt

    out = _fresh(sdata)
    with _quiet():
        bt.tl.predict(model, out)
    cells, spots = out["cells_truth"], out["spots"]
    cell_log = np.asarray(cells.layers["bitro"], dtype=np.float64)[:, cells.var_names.get_indexer(genes)]
    spot_log = np.asarray(spots.layers["bitro"], dtype=np.float64)[:, spots.var_names.get_indexer(genes)]
    cell_counts = np.expm1(cell_log)
    all_cells = bool(np.isfinite(cell_counts).all())
    in_bag = cells.obs["bitro_in_bag"].to_numpy(bool)
    return {
        "cells": cell_counts,
        "spots": np.expm1(spot_log),
        "all_cells": all_cells,
        "bulk": np.nansum(cell_counts if all_cells else cell_counts[in_bag], axis=0),
        "in_bag_matches_spots": bool(np.array_equal(in_bag, _spot_index(sdata) >= 0)),
    }


def _run_bitro(
    name: str, train: list[Any], test: Any, genes: list[str], p: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Fit one variant and return its predictions on ``test`` (or the reason it is not available)."""
    import bitro as bt

    config, opts = _variant_args(name)
    t = time.perf_counter()
    try:
        with _quiet():
            model = bt.tl.fit(
                train,
                genes=genes,
                cells_key="cells_truth",
                max_epochs=p["max_epochs"],
                config={**NETWORK, **config},
                seed=seed,
                **FIT,
                **opts,
            )
    except (TypeError, ValueError) as err:  # an option this build does not have (or a refused setting)
        return {"unavailable": f"{type(err).__name__}: {err}"}
    fit_s = time.perf_counter() - t
    res = _predict(model, test, genes)
    res["train_bulks"] = np.stack([_predict(model, s, genes)["bulk"] for s in train])
    return {**res, "fit_s": fit_s, "epochs": len(model.history["epoch"])}


def _run_cell_sum(train: list[dict[str, Any]], truth: dict[str, Any], seed: int) -> dict[str, Any]:
    from benchmarks._cellsum import fit_cell_sum

    offsets = np.cumsum([0] + [len(t["spots"]) for t in train[:-1]])
    idx = np.concatenate(
        [np.where(t["spot_index"] >= 0, t["spot_index"] + o, -1) for t, o in zip(train, offsets)]
    )
    t0 = time.perf_counter()
    model = fit_cell_sum(
        np.concatenate([t["features"] for t in train]),
        idx,
        np.concatenate([t["spots"] for t in train]),
        seed=seed,
    )
    fit_s = time.perf_counter() - t0
    cells = model.predict_cells(truth["features"])
    spots = C.spot_sums(cells, truth["spot_index"], len(truth["spots"]))
    train_bulks = np.stack([model.predict_cells(t["features"]).sum(axis=0) for t in train])
    return {"cells": cells, "spots": spots, "all_cells": True, "fit_s": fit_s, "train_bulks": train_bulks}


# --------------------------------------------------------------------------- run
def _folds(n_slides: int, how: str) -> list[int]:
    return [n_slides - 1] if how == "last" else list(range(n_slides))


def default_variant() -> str | None:
    """The variant that is bitro's default network and loss (``None`` when no variant is)."""
    from benchmarks._common import is_default_network

    from bitro.tl import SetupConfig

    loss = SetupConfig().loss
    for name, (config, opts) in VARIANTS.items():
        if is_default_network(config) and opts.get("loss", loss) == loss:
            return name
    return None


def _to_fit() -> list[str]:
    """Variants to fit in this run (``BITRO_CELLS_VARIANTS``, ";"-separated, default all); unknown names are refused."""
    names = os.environ.get(ENV_VARIANTS)
    if not names:
        return list(VARIANTS)
    chosen = [n.strip() for n in names.split(";") if n.strip()]
    unknown = [n for n in chosen if n not in VARIANTS]
    if unknown:
        msg = f"{ENV_VARIANTS}: unknown variant(s) {unknown}; choose from {list(VARIANTS)}."
        raise ValueError(msg)
    return chosen


def _same_network(old: dict[str, Any], name: str) -> bool:
    """Whether an earlier run's variant ``old`` (``{"config", "setup"}``) is today's variant ``name``."""
    config, opts = VARIANTS[name]
    return {**_OLD_IMPLICIT, **old.get("config", {})} == config and old.get("setup", {}) == opts


def _reusable(layout: str, p: dict[str, Any], mode: str) -> dict[tuple[int, int, str], dict[str, Any]]:
    """BiTro records of ``results/cells.json`` that today's protocol would reproduce, by (fold, seed, variant)."""
    from benchmarks._common import RESULTS_DIR

    path = RESULTS_DIR / "cells.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    proto = old.get("protocol", {})
    same = (
        proto.get("mode") == mode
        and all(proto.get(k) == v for k, v in p.items())
        and proto.get("network") == NETWORK
        and proto.get("fit") == FIT
        and proto.get("layouts", {}).get(layout) == {**LAYOUTS[layout], "size": LAYOUTS[layout]["size"][mode]}
    )
    if not same:
        return {}
    commit = old.get("meta", {}).get("git", {}).get("commit")
    out = {}
    for rec in old.get("layouts", {}).get(layout, {}).get("records", []):
        name, was = rec["method"], proto.get("variants", {}).get(rec["method"])
        if rec.get("kind") == "bitro" and name in VARIANTS and was is not None and _same_network(was, name):
            out[(rec["fold"], rec["seed"], name)] = {**rec, "reused_from": rec.get("reused_from", commit)}
    return out


def run_layout(layout: str, p: dict[str, Any], mode: str) -> dict[str, Any]:
    """All folds × seeds of one layout: per-fold/seed records and unavailable variants."""
    from bitro._logging import logger

    slides, timing = load_slides(layout, p, LAYOUTS[layout]["size"][mode])
    genes = list(slides[0]["spots"].var_names)
    truths = [_truth(s, genes) for s in slides]
    records: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    to_fit = _to_fit()
    reused = _reusable(layout, p, mode) if to_fit != list(VARIANTS) else {}
    for fold in _folds(len(slides), p["folds"]):
        train = [s for i, s in enumerate(slides) if i != fold]
        train_truth = [t for i, t in enumerate(truths) if i != fold]
        test, truth = slides[fold], truths[fold]
        train_bulks = np.stack([t["bulk"] for t in train_truth])
        profiles = C.type_profiles(
            np.concatenate([t["cells"] for t in train_truth]),
            np.concatenate([t["cell_type"] for t in train_truth]),
            truth["n_types"],
        )
        base = {"layout": layout, "fold": fold}
        idx, spots = truth["spot_index"], truth["spots"]
        for name, cells in (
            (ORACLE_EQUAL, C.equal_split(spots, idx)),
            (ORACLE_TYPE, C.type_aware_split(spots, idx, truth["cell_type"], profiles)),
        ):
            inside = idx >= 0
            records.append(
                {
                    **base,
                    "seed": None,
                    "method": name,
                    "kind": "oracle",
                    "cells": _score(cells, truth["cells"], inside, cells=True),
                    **C.share_entropy(np.where(inside[:, None], cells, np.nan), idx, len(spots)),
                }
            )
        in_spot_bulk = C.spot_sums(truth["cells"], idx, len(spots)).sum(axis=0)
        records.append(
            {
                **base,
                "seed": None,
                "method": "true cells under spots, summed",
                "kind": "bulk_reference",
                "bulk_deviation_r": C.bulk_deviation_correlation(in_spot_bulk, truth["bulk"], train_bulks),
            }
        )
        # what a model that knows every cell's true type (and nothing else) could reach at best
        typed_bulk = profiles[truth["cell_type"]].sum(axis=0)
        records.append(
            {
                **base,
                "seed": None,
                "method": TYPE_BULK,
                "kind": "bulk_reference",
                "bulk_deviation_r": C.bulk_deviation_correlation(typed_bulk, truth["bulk"], train_bulks),
            }
        )
        for seed in p["seeds"]:
            runs = {}
            for name in VARIANTS:
                if name not in to_fit and (fold, seed, name) in reused:
                    records.append(reused[(fold, seed, name)])
                    continue
                if name in unavailable or name not in to_fit:
                    continue
                logger.info("benchmarks.cells: %s fold %d seed %d: %s", layout, fold, seed, name)
                res = _run_bitro(name, train, test, genes, p, seed)
                if "unavailable" in res:
                    unavailable[name] = res["unavailable"]
                    logger.info("benchmarks.cells: %s not available: %s", name, res["unavailable"])
                    continue
                runs[name] = res
            runs[BASELINE] = _run_cell_sum(train_truth, truth, seed)
            for name, res in runs.items():
                rec = {
                    **base,
                    "seed": seed,
                    "method": name,
                    "kind": "baseline" if name == BASELINE else "bitro",
                }
                rec |= score_method(
                    res["cells"],
                    res["spots"],
                    truth,
                    train_bulks,
                    all_cells=res["all_cells"],
                    train_pred_bulks=res["train_bulks"],
                )
                rec |= {k: res[k] for k in ("fit_s", "epochs", "in_bag_matches_spots") if k in res}
                records.append(rec)
    return {
        "genes": len(genes),
        "n_cells_truth": [int(s["cells_truth"].n_obs) for s in slides],
        "n_spots": [int(s["spots"].n_obs) for s in slides],
        "cells_per_spot": round(float(np.mean([s["spots"].obs["n_cells_truth"].mean() for s in slides])), 1),
        "types_per_spot": round(float(np.mean([_types_per_spot(s) for s in slides])), 2),
        "dominant_type_share": round(float(np.mean([_dominant_share(s) for s in slides])), 2),
        "data_timing": timing,
        "records": records,
        "unavailable": unavailable,
    }


def _types_per_spot(sdata: Any) -> float:
    obs = sdata["cells_truth"].obs
    return float(obs[obs["spot_id"].notna()].groupby("spot_id", observed=True)["cell_type"].nunique().mean())


def _dominant_share(sdata: Any) -> float:
    obs = sdata["cells_truth"].obs
    inside = obs[obs["spot_id"].notna()]
    counts = inside.groupby(["spot_id", "cell_type"], observed=True).size()
    per_spot = counts.groupby(level=0, observed=True)
    return float((per_spot.max() / per_spot.sum()).mean())


def _get(rec: dict[str, Any], path: str) -> float | None:
    """``"cells.pcc_gene_library_size"`` → the nested value (None when absent)."""
    cur: Any = rec
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur if isinstance(cur, int | float) else None


#: summary columns: key -> record path (ratio is computed per fold/seed)
METRICS = {
    "cells_norm": "cells.pcc_gene_library_size",
    "cells_raw": "cells.pcc_gene_raw",
    "equal_split_norm": "equal_split.pcc_gene_library_size",
    "equal_split_raw": "equal_split.pcc_gene_raw",
    "ratio_norm": "ratio_norm",
    "spots_norm": "spots.pcc_gene_library_size",
    "spots_raw": "spots.pcc_gene_raw",
    "outside_norm": "outside.pcc_gene_library_size",
    "entropy": "entropy",
    "effective_cells": "effective_cells",
    "share_correlation": "share_correlation",
    "bulk_deviation_r": "bulk_deviation_r",
    "bulk_deviation_r_self": "bulk_deviation_r_self",
    "sum_gap": "sum_gap",
    "fit_s": "fit_s",
}


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean ± sd over folds × seeds of every metric, per method (in order of first appearance)."""
    for rec in records:
        c, e = _get(rec, METRICS["cells_norm"]), _get(rec, METRICS["equal_split_norm"])
        if c is not None and e is not None and e > 0:
            rec["ratio_norm"] = c / e
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        out[method] = {"kind": mine[0]["kind"]}  # type: ignore[dict-item]
        for key, path in METRICS.items():
            values = [_get(r, path) for r in mine]
            if any(v is not None for v in values):
                out[method][key] = C.mean_sd(v for v in values if v is not None)
    return out


def run(quick: bool) -> dict[str, Any]:
    """Both layouts, every fold and seed; see the module docstring."""
    import bitro as bt

    bt.settings.progress = False
    importlib.import_module("bitro.tl._model")  # import torch and the network before the first fit is timed
    p = QUICK if quick else FULL
    mode = "quick" if quick else "full"
    t0 = time.perf_counter()
    layouts = {}
    for name in LAYOUTS:
        t = time.perf_counter()
        layouts[name] = run_layout(name, p, mode)
        layouts[name]["seconds"] = round(time.perf_counter() - t, 1)
        layouts[name]["summary"] = summarise(layouts[name]["records"])
    res = {
        "name": "cells",
        "meta": metadata(
            quick=quick, seconds=time.perf_counter() - t0, seeds={"data": DATA_SEED, "models": p["seeds"]}
        ),
        "protocol": {
            **p,
            "mode": mode,
            "layouts": {k: {**v, "size": v["size"][mode]} for k, v in LAYOUTS.items()},
            "network": NETWORK,
            "fit": FIT,
            "variants": {k: {"config": v[0], "setup": v[1]} for k, v in VARIANTS.items()},
            "default_variant": default_variant(),
            "encoder": "morphology on the true nuclei",
            "mpp": 0.5,
        },
        "layouts": layouts,
    }
    res["markdown"] = markdown(res)
    return res


# --------------------------------------------------------------------------- page
def _ms(s: dict[str, Any] | None, digits: int = 3) -> str:
    if not s or s.get("n", 0) == 0 or not np.isfinite(s["mean"]):
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def _models(summary: dict[str, Any]) -> list[str]:
    return [m for m, s in summary.items() if s["kind"] in ("bitro", "baseline")]


def _mean(summary: dict[str, Any], method: str, key: str) -> float:
    s = summary.get(method, {}).get(key)
    return float(s["mean"]) if s and s.get("n") else float("nan")


def _paired(records: list[dict[str, Any]], a: str, b: str, path: str) -> list[float]:
    """``a - b`` of a metric for every fold and seed both methods ran."""
    by = {(r["fold"], r["seed"], r["method"]): _get(r, path) for r in records}
    out = []
    for (fold, seed, method), value in by.items():
        other = by.get((fold, seed, b))
        if method == a and value is not None and other is not None:
            out.append(value - other)
    return out


def readings(res: dict[str, Any]) -> list[str]:
    """Plain-sentence readings: which head wins, by how much, whether the issue's targets are met."""
    lines = []
    met_both: dict[str, list[bool]] = {}
    for name, lay in res["layouts"].items():
        summ, label = lay["summary"], res["protocol"]["layouts"][name]["label"]
        models = [m for m in _models(summ) if np.isfinite(_mean(summ, m, "cells_norm"))]
        if not models:
            continue
        ranked = sorted(models, key=lambda m: -_mean(summ, m, "cells_norm"))
        best = ranked[0]
        b = summ[best]
        text = (
            f"{label}: {best} gives the best pseudo-cells, normalised PCC_gene {_ms(b['cells_norm'])} "
            f"(mean ± sd over {b['cells_norm']['n']} fold × seed runs)"
        )
        if len(ranked) > 1:
            second = ranked[1]
            gap = _mean(summ, best, "cells_norm") - _mean(summ, second, "cells_norm")
            text += f", {gap:.3f} ahead of {second} ({_ms(summ[second]['cells_norm'])})"
        text += (
            f"; the equal split of its own spots gives {_ms(b.get('equal_split_norm'))}, a ratio of "
            f"{_ms(b.get('ratio_norm'), 2)}. The oracle equal split reaches {_ms(summ[ORACLE_EQUAL].get('cells_norm'))} "
            f"and the type-aware oracle {_ms(summ[ORACLE_TYPE].get('cells_norm'))}."
        )
        lines.append(text)
        for m in models:
            if summ[m]["kind"] != "bitro":
                continue
            met_both.setdefault(m, []).append(_mean(summ, m, "ratio_norm") >= TARGET_RATIO)
        if "attention" in summ and "entropy" in summ["attention"]:
            lines.append(
                f"{label}: the attention head's within-spot attention has normalised entropy "
                f"{_ms(summ['attention']['entropy'])} (1 = equal split; effective cells / cells "
                f"{_ms(summ['attention'].get('effective_cells'), 2)}); its cell shares correlate "
                f"{_ms(summ['attention'].get('share_correlation'))} with the true shares within a spot."
            )
        for a, b, what in (
            ("cell_counts + skip, poisson", "cell_counts, poisson", "the skip"),
            ("cell_counts + skip, poisson", "cell_counts + skip, mse", "the Poisson loss (vs MSE)"),
        ):
            if a in models and b in models:
                diff = C.mean_sd(_paired(lay["records"], a, b, METRICS["cells_norm"]))
                lines.append(
                    f"{label}: {what} changes pseudo-cell normalised PCC_gene by {_ms(diff)} "
                    f"(paired over folds × seeds; {a} {_ms(summ[a]['cells_norm'])}, {b} {_ms(summ[b]['cells_norm'])})."
                )
        spot_best = max(models, key=lambda m: _mean(summ, m, "spots_norm"))
        lines.append(
            f"{label}: spot level, {spot_best} is the most accurate (normalised PCC_gene "
            f"{_ms(summ[spot_best]['spots_norm'])}); "
            + ", ".join(f"{m} {_ms(summ[m].get('spots_norm'))}" for m in models if m != spot_best)
            + "."
        )
    n_layouts = len(res["layouts"])
    winners = [m for m, ok in met_both.items() if len(ok) == n_layouts and all(ok)]
    if winners:
        lines.append(
            f"Issue target (pseudo-cell normalised PCC_gene ≥ {TARGET_RATIO} × the equal split of the model's own "
            f"spots, on both layouts) is met by: {', '.join(winners)}."
        )
    elif met_both:
        lines.append(
            f"No BiTro head reaches the issue target (pseudo-cell normalised PCC_gene ≥ {TARGET_RATIO} × the equal "
            "split of the model's own spots on both layouts): BiTro's pseudo-cells do **not** yet separate the "
            "cells of a spot well enough."
        )
    return lines


def bulk_readings(res: dict[str, Any]) -> list[str]:
    """Sentences on the bulk deviation target (both references)."""
    lines = []
    for name, lay in res["layouts"].items():
        summ, label = lay["summary"], res["protocol"]["layouts"][name]["label"]
        models = [m for m in _models(summ) if "bulk_deviation_r" in summ[m]]
        if not models:
            continue
        ok = [m for m in models if _mean(summ, m, "bulk_deviation_r") >= TARGET_BULK]  # the reference
        lines.append(
            f"{label}: the summed cells follow the held-out slide's deviation from the training mean with r = "
            + ", ".join(
                f"{_ms(summ[m]['bulk_deviation_r'])} ({_ms(summ[m].get('bulk_deviation_r_self'))} against its "
                f"own training-slide mean) for {m}"
                for m in models
            )
            + (
                f"; the issue target (r ≥ {TARGET_BULK}) is met by {', '.join(ok)}."
                if ok
                else f"; none reaches the issue target of r ≥ {TARGET_BULK}."
            )
        )
        if TYPE_BULK in summ and "bulk_deviation_r" in summ[TYPE_BULK]:
            ceiling = _mean(summ, TYPE_BULK, "bulk_deviation_r")
            lines.append(
                f"{label}: a model that knew every cell's true type and predicted the training slides' mean "
                f"profile of that type would reach r = {_ms(summ[TYPE_BULK]['bulk_deviation_r'])}: "
                + (
                    "on these synthetic slides the held-out slide's deviation is mostly not its cell-type "
                    "composition, so a model that reads cell types from morphology cannot be expected to "
                    f"follow it, and the r ≥ {TARGET_BULK} target does not measure cell resolution here."
                    if ceiling < TARGET_BULK
                    else "the deviation is largely the slide's cell-type composition."
                )
            )
    return lines


def _sum_check(lay: dict[str, Any]) -> str:
    """One sentence: do each model's cells sum to its spots, and are the in-bag cells those under spots."""
    parts = []
    for m in _models(lay["summary"]):
        recs = [r for r in lay["records"] if r["method"] == m and r.get("sum_gap") is not None]
        if not recs:
            continue
        gap = max(r["sum_gap"] for r in recs)
        bag = all(r.get("in_bag_matches_spots", True) for r in recs)
        parts.append(f"{m} {gap:.1e}" + ("" if bag else " (in-bag cells differ from the cells under spots)"))
    return (
        "Largest gap between a spot's prediction and the sum of its predicted cells, relative to the largest "
        "spot value, over folds × seeds: " + "; ".join(parts) + "."
    )


def markdown(res: dict[str, Any]) -> str:
    """The cells section of the results page."""
    p = res["protocol"]
    lines = [
        "## Pseudo single cells vs known cell truth (synthetic tissue)",
        "",
        f"**Protocol.** Two layouts of `bt.datasets.synthetic_tissue` ({p['n_slides']} slides each, 0.5 µm/px, "
        f"{p.get('n_genes')} genes); spots are exact sums of the true cells. The true nuclei are embedded with "
        f"the morphology encoder. Each slide is held out once ({'last slide only' if p['folds'] == 'last' else 'all folds'}), "
        f"seeds {p['seeds']} (network initialisation, validation split and batches); BiTro is "
        f"hidden 64 / FFN 128, {p['fit']['target']} targets, at most {p['max_epochs']} epochs. Values are mean ± sd "
        "over folds × seeds (oracles: over folds). *Pseudo-cells* are scored on the cells under a spot against "
        "their true counts (PCC_gene across cells, averaged over genes); *equal split* = the model's own "
        "predicted spot divided equally among its cells; *ratio* = pseudo-cells / equal split (normalised; "
        f"issue target ≥ {TARGET_RATIO}); *outside* = cells under no spot (only models that predict every "
        "cell); *entropy* = normalised entropy of the cells' shares of their spot (1 = equal split; for the "
        "attention head, of the attention weights); *share r* = within-spot correlation of predicted and true "
        "cell shares.",
        "",
    ]
    for name, lay in res["layouts"].items():
        spec = p["layouts"][name]
        summ = lay["summary"]
        lines += [
            f"### {spec['label']}",
            "",
            f"{spec['technology']}, {spec['size']} px slides, domain size {spec['domain_size_um']:g} µm, mixing "
            f"{spec['mixing']:g}, slide composition sd {spec.get('composition_sd', 0.0):g}: {lay['cells_per_spot']} cells and {lay['types_per_spot']} types per spot "
            f"(dominant type {lay['dominant_type_share']:.0%} of a spot's cells), {lay['n_spots']} spots, "
            f"{lay['n_cells_truth']} true cells per slide; {lay['seconds']:.0f} s.",
            "",
        ]
        rows = []
        for m, s in summ.items():
            if s["kind"] == "bulk_reference":
                continue
            rows.append(
                [
                    f"{m} (bitro's default)" if m == p.get("default_variant") else m,
                    _ms(s.get("cells_norm")),
                    _ms(s.get("cells_raw")),
                    _ms(s.get("equal_split_norm")),
                    _ms(s.get("ratio_norm"), 2),
                    _ms(s.get("spots_norm")),
                    _ms(s.get("spots_raw")),
                    _ms(s.get("outside_norm")),
                    _ms(s.get("entropy")),
                    _ms(s.get("share_correlation")),
                    _ms(s.get("fit_s"), 1),
                ]
            )
        lines += [
            md_table(
                [
                    "method",
                    "pseudo-cells norm",
                    "pseudo-cells raw",
                    "equal split norm",
                    "ratio",
                    "spots norm",
                    "spots raw",
                    "outside norm",
                    "entropy",
                    "share r",
                    "fit (s)",
                ],
                rows,
            ),
            "",
        ]
        lines += [_sum_check(lay), ""]
        for variant, err in lay["unavailable"].items():
            what = "not available in this build" if "nknown" in err else "failed"
            lines.append(f"- *{variant}*: {what} ({err}).")
        if lay["unavailable"]:
            lines.append("")
    lines += ["**Reading.**", "", *[f"- {ln}" for ln in readings(res)], ""]
    lines += [
        "### Bulk from summed cells",
        "",
        "Each held-out slide's predicted cells summed into one profile (every cell for models that predict "
        "every cell, otherwise the cells under spots); its deviation from the training slides' mean bulk "
        "(log1p CPM over the genes) is correlated across genes with the slide's true deviation (issue target "
        f"r ≥ {TARGET_BULK}, judged on *r*). *r* takes the predicted deviation from the training slides' true "
        "mean; *r (own mean)* from the mean of the model's own summed predictions on the training slides, which "
        "removes a bias the model has on every slide. Two references: the *true* cells under spots summed (what a "
        "model limited to the spots could reach at best), and every cell's true type given the training slides' "
        "mean profile of that type, summed (what a model that reads exactly the cell type from morphology, and "
        "nothing else, would predict). A model stuck at the training mean has no deviation.",
        "",
    ]
    rows = []
    for name, lay in res["layouts"].items():
        for m, s in lay["summary"].items():
            if "bulk_deviation_r" not in s:
                continue
            per = []
            for r in lay["records"]:
                if r["method"] != m or r.get("bulk_deviation_r") is None:
                    continue
                where = str(r["fold"]) if r["seed"] is None else f"{r['fold']}/{r['seed']}"
                own = r.get("bulk_deviation_r_self")
                per.append(
                    f"{where}: {r['bulk_deviation_r']:.2f}" + (f" ({own:.2f})" if own is not None else "")
                )
            rows.append(
                [name, m, _ms(s["bulk_deviation_r"]), _ms(s.get("bulk_deviation_r_self")), ", ".join(per)]
            )
    header = ["layout", "method", "r", "r (own mean)", "per fold/seed: r (own mean)"]
    lines += [md_table(header, rows), ""]
    lines += [*[f"- {ln}" for ln in bulk_readings(res)], ""]
    return "\n".join(lines)
