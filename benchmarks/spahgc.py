"""SpaHGC beside the retrieval baseline, BiTro and the spot baselines, leave one HER2ST section out (issue 15).

Protocol: each of C2–C6 is held out in turn; every model is trained on the other four sections only —
exemplars, target statistics, the feature projection and the early-stopping validation spots come
from those four, never from the held-out one — and predicts the held-out section's spots. Genes: the
785-gene HER2ST list. Cells: the accuracy benchmark's cache (watershed nuclei, EfficientNet-Lite0 tile
features). Every prediction is scored by ``bt.tl.evaluate(normalize="both")``; genes whose correlation
is undefined (a constant observed or predicted vector) are counted as such (``n_constant``) — the
page's PCC_gene counts them as 0, and the mean over the defined genes is given beside it.

Runs: SpaHGC and the retrieval baseline on both target scales with seeds 0, 1, 2; the ablations
"no contrastive loss", "no exemplars" and "exemplar residual from 1" (normalised target, three seeds); ridge, depth and cell
count (deterministic fits, seed 0). BiTro, ridge, depth and cell count are taken from
``results/accuracy.json`` when it holds a standard run of the same protocol (whole sections, the
same genes; BiTro seed 0) and fitted here otherwise. Training time and peak RSS of every fit are
recorded (``Steps``: sampled RSS of this process, which also holds the five cached sections).

Also measured: the exemplar index's build and query time at 10^3, 10^4 and 10^5 reference spots,
exact (chunked) and ball-tree search, on synthetic 129-d vectors with a 16-d structure (as PCA
features have).

Environment: ``BITRO_SPAHGC_FOLDS`` (comma list of held-out sections) and ``BITRO_SPAHGC_RUNS`` (comma
list of run names) run only those folds and runs and keep the stored standard run's other rows, so two
processes can share the five folds, or a new run can be added to a stored result;
``BITRO_SPAHGC_SCALING=0`` skips the index timings (the stored ones are kept).

``--quick``: central 3,000 px windows of every section (about 113 spots each), all five folds, at
most 10 SpaHGC epochs, BiTro with the accuracy benchmark's quick settings; 10^5 index queries cut.
Outside the standard set: ``python -m benchmarks --only spahgc`` (part of ``--full``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from benchmarks._common import (
    RESULTS_DIR,
    SECTIONS,
    SEED,
    SETTINGS,
    Steps,
    cached_section,
    kit_genes,
    md_table,
    metadata,
    write_result,
)

from bitro._logging import logger

ENCODERS = ("efficientnet_lite0", "morphology")
QUICK_WINDOW = 1500
SEEDS = (0, 1, 2)
METRICS = ("pcc_gene", "pcc_gene_top50_var", "pcc_overall")
LIB, RAW = "library_size", "raw"
SPAHGC_KW: dict[str, Any] = {
    "max_epochs": 30,
    "lr": 1e-3,
    "batch_size": 32,
    "patience": 6,
    "validation_fraction": 0.1,
    "n_components": 128,
    "n_exemplars": 8,
}
QUICK_SPAHGC_KW: dict[str, Any] = {**SPAHGC_KW, "max_epochs": 10}
ABLATIONS = {
    "spahgc no contrastive": {"target_contrast_weight": 0.0, "reference_contrast_weight": 0.0},
    "spahgc no exemplars": {"use_exemplars": False},
    "spahgc exemplar residual from 1": {"exemplar_residual_init": 1.0},
    "spahgc k = 32": {"n_exemplars": 32},
}
#: A stronger retrieval baseline: the similarity-weighted mean of more neighbours (on 3000 px windows,
#: seed 0, k = 8 / 16 / 32 / 64 gave 0.095 / 0.111 / 0.122 / 0.128 normalised PCC_gene).
RETRIEVAL_K = 32
#: Models whose numbers may come from ``results/accuracy.json`` (same protocol, whole sections).
FROM_ACCURACY = ("bitro", "ridge", "depth", "cell_count")
INDEX_SIZES = (1_000, 10_000, 100_000)


def runs() -> list[dict[str, Any]]:
    """The model configurations: name, model, target, seeds, config and group."""
    out = []
    for target in (LIB, RAW):
        out.append({"name": "spahgc", "model": "spahgc", "target": target, "seeds": SEEDS, "group": "main"})
        out.append(
            {"name": "retrieval", "model": "retrieval", "target": target, "seeds": SEEDS, "group": "main"}
        )
        out.append({"name": f"retrieval k = {RETRIEVAL_K}", "model": "retrieval", "target": target, "seeds": SEEDS,
                    "group": "main", "config": {"n_exemplars": RETRIEVAL_K}})  # fmt: skip
        out.append({"name": "bitro", "model": "bitro", "target": target, "seeds": (SEED,), "group": "main"})
        out.append({"name": "ridge", "model": "ridge", "target": target, "seeds": (SEED,), "group": "main"})
    out.append({"name": "depth", "model": "depth", "target": RAW, "seeds": (SEED,), "group": "main"})
    out.append(
        {"name": "cell_count", "model": "cell_count", "target": RAW, "seeds": (SEED,), "group": "main"}
    )
    for name, config in ABLATIONS.items():
        out.append(
            {
                "name": name,
                "model": "spahgc",
                "target": LIB,
                "seeds": SEEDS,
                "group": "ablation",
                "config": config,
            }
        )
    return out


def load_sections(quick: bool) -> dict[str, Any]:
    """Cached, preprocessed sections (tables only)."""
    window = QUICK_WINDOW if quick else SETTINGS["window"]
    return {s: cached_section(s, encoders=ENCODERS, window=window) for s in SECTIONS}


def _fit(cfg: dict[str, Any], train: list, genes: list[str], seed: int, quick: bool) -> Any:
    from benchmarks.accuracy import BITRO_KW, QUICK_BITRO_KW

    import bitro as bt
    from bitro.tl._cross_slice_config import CrossSliceConfig

    common = {"genes": genes, "target": cfg["target"], "seed": seed}
    config = dict(cfg.get("config") or {})
    # CrossSliceConfig fields (n_exemplars, ...) override the fit options; the rest is the network's
    cross = {k: config.pop(k) for k in list(config) if k in CrossSliceConfig.__dataclass_fields__}
    kw = {**(QUICK_SPAHGC_KW if quick else SPAHGC_KW), **cross}
    if cfg["model"] == "spahgc":
        return bt.tl.fit(train, model="spahgc", config=config or None, device="cpu", **common, **kw)
    if cfg["model"] == "retrieval":
        return bt.tl.fit(
            train, model="retrieval", n_components=kw["n_components"], n_exemplars=kw["n_exemplars"], **common
        )
    if cfg["model"] == "bitro":
        return bt.tl.fit(train, device="cpu", **common, **(QUICK_BITRO_KW if quick else BITRO_KW))
    return bt.tl.fit(train, model=cfg["model"], **common)


def fit_and_score(cfg, seed, fold, test_name, sections, genes, quick) -> tuple[list[dict], dict]:
    """Fit ``cfg`` with ``seed`` on every section but ``test_name``, predict it and score it."""
    import bitro as bt
    from bitro.tl._cv import light_copy

    train = [sections[n] for n in sections if n != test_name]
    steps = Steps()
    with steps("fit"):
        model = _fit(cfg, train, genes, seed, quick)
    test = light_copy(sections[test_name])
    with steps("predict"):
        model.predict(test, key_added="cv")
    res = bt.tl.evaluate(test, table_key="spots", layer="cv", normalize="both", inplace=False)
    res = res[res["metric"].isin(METRICS)]
    base = {
        "fold": fold,
        "test": test_name,
        "run": cfg["name"],
        "target": cfg["target"],
        "group": cfg["group"],
        "seed": seed,
    }
    rows = [
        {
            **base,
            "metric": r.metric,
            "scale": r.scale,
            "value": float(r.value),
            "n_genes": int(r.n_genes),
            "n_constant": int(r.n_constant),
        }
        for r in res.itertuples()
    ]
    hist = getattr(model, "history", None) or {}
    fit = steps.records["fit"]
    record = {
        **base,
        "fit_seconds": fit["seconds"],
        "fit_cpu_seconds": fit["cpu_seconds"],
        "fit_peak_rss_mb": fit["peak_rss_mb"],
        "fit_rss_increase_mb": round(fit["peak_rss_mb"] - fit["start_rss_mb"], 1),
        "predict_seconds": steps.records["predict"]["seconds"],
        "epochs": len(hist.get("epoch", [])) or None,
        "n_train_spots": int(sum(s["spots"].n_obs for s in train)),
        "n_test_spots": int(test["spots"].n_obs),
    }
    return rows, record


def accuracy_rows(quick: bool, n_genes: int) -> tuple[dict[tuple, list[dict]], dict[tuple, dict], str | None]:
    """Rows and speed records of ``results/accuracy.json`` for :data:`FROM_ACCURACY`, if its protocol matches.

    Returns ``(rows by (run, target, test), speed by (run, target, test), commit)``; empty when the stored
    run is a quick one, used windows, or scored other genes.
    """
    path = RESULTS_DIR / "accuracy.json"
    if quick or not path.exists():
        return {}, {}, None
    acc = json.loads(path.read_text())
    p = acc.get("protocol", {})
    if (
        acc["meta"].get("quick")
        or p.get("window_half_px") != SETTINGS["window"]
        or p.get("n_genes") != n_genes
    ):
        return {}, {}, None
    rows: dict[tuple, list[dict]] = {}
    for r in acc["rows"]:
        if r["group"] == "main" and r["run"] in FROM_ACCURACY and r["metric"] in METRICS:
            rows.setdefault((r["run"], r["target"], r["test"]), []).append(
                {**r, "seed": SEED, "n_constant": None, "from": "accuracy.json"}
            )
    speed = {(s["run"], s["target"], s["test"]): s for s in acc.get("speed", []) if s["run"] in FROM_ACCURACY}
    return rows, speed, acc["meta"]["git"]["commit"]


def index_scaling(quick: bool) -> list[dict[str, Any]]:
    """Build and query time of the exemplar index at :data:`INDEX_SIZES` references, exact vs ball tree."""
    import sklearn.neighbors  # noqa: F401  (imported before timing: its import is not build time)

    from bitro.tl._exemplars import ExemplarIndex

    rng = np.random.default_rng(SEED)
    d, latent, k, n_slides = 129, 16, 8, 5
    n_queries = 200 if quick else 1000
    mixing = rng.normal(size=(latent, d))
    out = []
    for n in INDEX_SIZES:
        x = rng.normal(size=(n, latent)) @ mixing + 0.3 * rng.normal(size=(n, d))
        q = rng.normal(size=(n_queries, latent)) @ mixing + 0.3 * rng.normal(size=(n_queries, d))
        slides = np.repeat([f"S{i}" for i in range(n_slides)], -(-n // n_slides))[:n]
        spots = np.arange(n).astype(str)
        found = {}
        for method in ("exact", "ball_tree"):
            t0 = time.perf_counter()
            index = ExemplarIndex.build(x, slides, spots, method=method)
            _ = index.unit
            if method == "ball_tree":
                for code in range(n_slides):
                    index._tree(code)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = index.query(q, k, query_slides="held_out")
            query = time.perf_counter() - t0
            found[method] = res.index
            out.append(
                {
                    "n_references": n,
                    "method": method,
                    "dim": d,
                    "k": k,
                    "n_queries": n_queries,
                    "build_seconds": round(build, 3),
                    "query_seconds": round(query, 3),
                    "queries_per_s": round(n_queries / max(query, 1e-9), 1),
                }
            )
        same = np.mean([set(a) == set(b) for a, b in zip(found["exact"], found["ball_tree"], strict=True)])
        out[-1]["same_neighbours_as_exact"] = float(same)
        logger.info("spahgc: index of %d references timed", n)
    return out


def run(quick: bool) -> dict[str, Any]:
    """Every configuration over the five folds; return tidy rows, speed records and the Markdown section."""
    import bitro as bt

    bt.settings.progress = False
    t0 = time.perf_counter()
    sections = load_sections(quick)
    names = list(sections)
    genes = kit_genes(sections)
    reused_rows, reused_speed, reused_commit = accuracy_rows(quick, len(genes))
    rows, speed = [], []
    out: dict[str, Any] = {}
    visit = _folds_to_run(names)
    selected = _runs_to_run()
    visited = {(t, cfg["name"], cfg["target"]) for t in visit for cfg in selected}
    for fold, test_name in enumerate(names):
        if test_name not in visit:
            continue
        for cfg in selected:
            key = (cfg["name"], cfg["target"], test_name)
            if key in reused_rows:
                rows += reused_rows[key]
                sp = reused_speed.get(key, {})
                speed.append(
                    {
                        "fold": fold,
                        "test": test_name,
                        "run": cfg["name"],
                        "target": cfg["target"],
                        "group": "main",
                        "seed": SEED,
                        "fit_seconds": sp.get("fit_seconds"),
                        "epochs": sp.get("epochs"),
                        "from": "accuracy.json",
                    }
                )
                continue
            for seed in cfg["seeds"]:
                fold_rows, record = fit_and_score(cfg, seed, fold, test_name, sections, genes, quick)
                rows += fold_rows
                speed.append(record)
                logger.info(
                    "spahgc: %s %s %s seed %d: fit %.0f s",
                    test_name,
                    cfg["name"],
                    cfg["target"],
                    seed,
                    record["fit_seconds"],
                )
        out = _result(quick, t0, names, genes, sections, rows, speed, [], reused_commit)
        if not quick:
            write_result("spahgc", _with_stored_rows(out, visited))  # partial results survive an interrupted run
    run_scaling = os.environ.get("BITRO_SPAHGC_SCALING", "1") != "0"
    scaling = index_scaling(quick) if run_scaling else []
    out = _result(quick, t0, names, genes, sections, rows, speed, scaling, reused_commit)
    return out if quick else _with_stored_rows(out, visited)


def _folds_to_run(names: list[str]) -> list[str]:
    """The held-out sections of this run: ``BITRO_SPAHGC_FOLDS`` (comma list) or all."""
    given = os.environ.get("BITRO_SPAHGC_FOLDS")
    if not given:
        return list(names)
    folds = [f.strip() for f in given.split(",") if f.strip()]
    unknown = sorted(set(folds) - set(names))
    if unknown:
        msg = f"BITRO_SPAHGC_FOLDS: unknown section(s) {unknown}; choose from {names}."
        raise ValueError(msg)
    return folds


def _runs_to_run() -> list[dict[str, Any]]:
    """The configurations of this run: ``BITRO_SPAHGC_RUNS`` (comma list of run names) or all."""
    every = runs()
    given = os.environ.get("BITRO_SPAHGC_RUNS")
    if not given:
        return every
    names = [n.strip() for n in given.split(",") if n.strip()]
    known = list(dict.fromkeys(c["name"] for c in every))
    unknown = sorted(set(names) - set(known))
    if unknown:
        msg = f"BITRO_SPAHGC_RUNS: unknown run(s) {unknown}; choose from {known}."
        raise ValueError(msg)
    return [c for c in every if c["name"] in names]


def _with_stored_rows(out: dict[str, Any], visited: set[tuple[str, str, str]]) -> dict[str, Any]:
    """``out`` plus the stored standard run's rows of the (section, run, target) this run does not visit.

    Runs on different ``BITRO_SPAHGC_FOLDS`` (e.g. one per core) or ``BITRO_SPAHGC_RUNS`` then fill one
    result; each write re-reads the stored file. A stored run of other settings (quick, other windows or genes) is not
    mixed in, and its index timings are kept only when this run timed none.
    """
    path = RESULTS_DIR / "spahgc.json"
    if not path.exists():
        return out
    old = json.loads(path.read_text())
    same = (
        not old.get("meta", {}).get("quick")
        and old.get("protocol", {}).get("window_half_px") == out["protocol"]["window_half_px"]
        and old.get("protocol", {}).get("n_genes") == out["protocol"]["n_genes"]
        and old.get("protocol", {}).get("spahgc_fit_kwargs") == out["protocol"]["spahgc_fit_kwargs"]
    )
    if not same:
        return out
    merged = dict(out)
    def kept(r: dict[str, Any]) -> bool:
        return (r["test"], r["run"], r["target"]) not in visited

    merged["rows"] = [r for r in old.get("rows", []) if kept(r)] + out["rows"]
    merged["speed"] = [r for r in old.get("speed", []) if kept(r)] + out["speed"]
    if not out["index_scaling"]:
        merged["index_scaling"] = old.get("index_scaling", [])
    merged["markdown"] = markdown(merged)
    return merged


def _result(quick, t0, names, genes, sections, rows, speed, scaling, reused_commit) -> dict[str, Any]:
    out = {
        "name": "spahgc",
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seeds": list(SEEDS)}),
        "protocol": {
            "sections": names,
            "n_genes": len(genes),
            "window_half_px": QUICK_WINDOW if quick else SETTINGS["window"],
            "spahgc_fit_kwargs": QUICK_SPAHGC_KW if quick else SPAHGC_KW,
            "spahgc_config": "SpaHGCConfig defaults (hidden 128, 2 HeteroConv layers, 4 attention heads, mask "
            "ratios 0.1 target / 0.5 reference, edge drop 0.2, EMA 0.99, MSE + 0.5 (1 - PCC) + 0.1 per contrastive term, "
            "exemplar residual from 0)",
            "seeds": list(SEEDS),
            "reused_from_accuracy": {"models": list(FROM_ACCURACY), "commit": reused_commit}
            if reused_commit
            else None,
            "spots": {n: int(s["spots"].n_obs) for n, s in sections.items()},
            "cells": {n: int(s["cells"].n_obs) for n, s in sections.items()},
        },
        "rows": rows,
        "speed": speed,
        "index_scaling": scaling,
    }
    out["markdown"] = markdown(out)
    return out


# --------------------------------------------------------------------------- page
def _fold_means(rows: list[dict[str, Any]]):
    """Per (run, target, metric, scale, section): mean over seeds, the sd between seeds, undefined genes."""
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in ("n_constant", "n_genes"):
        if col not in df:
            df[col] = np.nan
    g = df.groupby(["run", "target", "metric", "scale", "test"], sort=False)
    return g.agg(
        value=("value", "mean"),
        seed_sd=("value", "std"),
        seeds=("value", "size"),
        n_constant=("n_constant", "mean"),
        n_genes=("n_genes", "mean"),
    ).reset_index()


def _summary(rows):
    """Per (run, target, metric, scale): mean and sd over sections of the seed means, mean seed sd."""
    g = _fold_means(rows).groupby(["run", "target", "metric", "scale"], sort=False)
    return g.agg(
        mean=("value", "mean"),
        sd=("value", "std"),
        folds=("value", "size"),
        seed_sd=("seed_sd", "mean"),
        seeds=("seeds", "max"),
        n_constant=("n_constant", "mean"),
        n_genes=("n_genes", "mean"),
    ).reset_index()


def _cell(summary, run, target, metric, scale) -> str | None:
    hit = summary[
        (summary.run == run)
        & (summary.target == target)
        & (summary.metric == metric)
        & (summary.scale == scale)
    ]
    if hit.empty:
        return None
    r = hit.iloc[0]
    return f"{r['mean']:.3f}" + (f" ± {r['sd']:.3f}" if r["folds"] > 1 and r["sd"] == r["sd"] else "")


def _table(summary, order) -> str:
    cols = [(m, LIB) for m in METRICS] + [(m, RAW) for m in ("pcc_gene", "pcc_overall")]
    header = [
        "model",
        "trained on",
        *[f"{m} ({'norm' if s == LIB else 'raw'})" for m, s in cols],
        "seed sd (norm PCC_gene)",
        "undefined genes (norm)",
        "norm PCC_gene over defined genes",
    ]
    body = []
    for run, target in order:
        sub = summary[(summary.run == run) & (summary.target == target)]
        if sub.empty:
            continue
        main = sub[(sub.metric == "pcc_gene") & (sub.scale == LIB)]
        seed_sd = n_const = defined = None
        if not main.empty:
            m = main.iloc[0]
            seed_sd = float(m["seed_sd"]) if m["seeds"] > 1 else None
            if m["n_constant"] == m["n_constant"]:
                n_const = f"{m['n_constant']:.1f} of {m['n_genes']:.0f}"
                kept = m["n_genes"] - m["n_constant"]
                defined = float(m["mean"] * m["n_genes"] / kept) if kept > 0 else float("nan")
        body.append(
            [
                run,
                "norm" if target == LIB else "raw",
                *[_cell(summary, run, target, mm, s) for mm, s in cols],
                seed_sd,
                n_const,
                defined,
            ]
        )
    return md_table(header, body)


def _value(summary, run, target, metric="pcc_gene", scale=LIB) -> float | None:
    hit = summary[
        (summary.run == run)
        & (summary.target == target)
        & (summary.metric == metric)
        & (summary.scale == scale)
    ]
    return None if hit.empty else float(hit["mean"].iloc[0])


def _paired(rows, run: str, base: str) -> str | None:
    """``run − base`` on normalised PCC_gene per held-out section (seed means): mean ± sd and sections above."""
    fm = _fold_means(rows)
    fm = fm[(fm.target == LIB) & (fm.metric == "pcc_gene") & (fm.scale == LIB)]
    a = fm[fm.run == run].set_index("test")["value"]
    b = fm[fm.run == base].set_index("test")["value"]
    both = a.index.intersection(b.index)
    if len(both) < 2:
        return None
    d = (a[both] - b[both]).to_numpy()
    return f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}, higher on {int((d > 0).sum())} of {len(d)}"


def _reading(summary, quick: bool, rows: list[dict[str, Any]]) -> str:
    """Plain sentences: SpaHGC against ridge, retrieval and BiTro on normalised PCC_gene; the ablations.

    In a quick run BiTro is a 3-epoch fit, so a win over it is not claimed as BiTro losing.
    """
    lines = []
    for target in (LIB, RAW):
        label = "normalised" if target == LIB else "raw-count"
        scale = LIB if target == LIB else RAW
        s = _value(summary, "spahgc", target, scale=scale)
        if s is None:
            continue
        parts = []
        for other in ("ridge", "retrieval", f"retrieval k = {RETRIEVAL_K}", "bitro"):
            o = _value(summary, other, target, scale=scale)
            if o is None:
                continue
            if other == "bitro" and s > o + 0.005 and quick:
                parts.append(f"above bitro ({o:.3f}; a 3-epoch quick fit, not a fair comparison)")
            elif other == "bitro" and s > o + 0.005:
                parts.append(f"above bitro ({o:.3f}): **bitro loses here** to SpaHGC")
            elif s > o + 0.005:
                parts.append(f"above {other} ({o:.3f})")
            elif s < o - 0.005:
                parts.append(f"below {other} ({o:.3f}) — SpaHGC does not beat {other} here")
            else:
                parts.append(f"level with {other} ({o:.3f})")
        lines.append(
            f"- Trained and scored on the {label} scale, SpaHGC's PCC_gene is {s:.3f}: "
            + "; ".join(parts)
            + "."
        )
    full = _value(summary, "spahgc", LIB)
    for name, what in (
        ("spahgc no contrastive", "Without the contrastive loss"),
        ("spahgc no exemplars", "Without exemplars"),
        ("spahgc exemplar residual from 1", "With the exemplar residual starting at 1 (the earlier default)"),
        ("spahgc k = 32", "With 32 exemplars per spot instead of 8"),
    ):
        v = _value(summary, name, LIB)
        if v is None or full is None:
            continue
        diff = _paired(rows, name, "spahgc")
        paired = f"; per section {diff}" if diff else ""
        if v >= full - 0.005:
            lines.append(
                f"- {what}, normalised PCC_gene is {v:.3f} (main SpaHGC row {full:.3f}{paired}): the main row "
                "does not beat it on these folds."
            )
        else:
            lines.append(f"- {what}, normalised PCC_gene is {v:.3f}, below the main SpaHGC row's {full:.3f}{paired}.")
    return "**Reading.**\n\n" + "\n".join(lines) + "\n" if lines else ""


def _default_k_note(k: int) -> str:
    """Where this run's ``k`` differs from today's ``CrossSliceConfig`` default, say so."""
    from bitro.tl._cross_slice_config import CrossSliceConfig

    default = CrossSliceConfig().n_exemplars
    if default == k:
        return ""
    return (
        f" (the library default is now {default}, chosen by the *retrieval k = {default}* and *spahgc k = {default}* "
        "rows)"
    )


def markdown(res: dict[str, Any]) -> str:
    """Main table, ablations, time and memory, index scaling, and a plain reading."""
    import pandas as pd

    p, rows = res["protocol"], res["rows"]
    title = "## SpaHGC and exemplar retrieval (HER2ST patient C, leave one section out)"
    if not rows:
        return f"{title}\n\nNo results.\n"
    summary = _summary(rows)
    df = pd.DataFrame(rows)
    order = list(
        dict.fromkeys(zip(df[df.group == "main"]["run"], df[df.group == "main"]["target"], strict=True))
    )
    ab_order = [("spahgc", LIB), *[(n, LIB) for n in ABLATIONS]]
    kw = p["spahgc_fit_kwargs"]
    where = "whole sections" if not p["window_half_px"] else f"central {2 * p['window_half_px']} px windows"
    done = list(dict.fromkeys(df["test"]))
    reused = p.get("reused_from_accuracy")
    reuse_txt = (
        f"BiTro, ridge, depth and cell count are the accuracy benchmark's numbers (`results/accuracy.json`, commit "
        f"{reused['commit'][:10]}, seed 0), not refitted. "
        if reused
        else "BiTro (seed 0, the accuracy benchmark's "
        + ("quick settings: 3 epochs, PCA 32" if res["meta"].get("quick") else "settings")
        + "), ridge, depth and cell count (seed 0) are fitted here. "
    )
    lines = [
        title,
        "",
        f"**Protocol.** Leave-one-section-out over {', '.join(p['sections'])} ({where}); held-out folds "
        f"{', '.join(done)}. {p['n_genes']} genes. Exemplars, feature projection, target statistics and early-stopping "
        "spots come from the four training sections only; a held-out section is never an exemplar source. SpaHGC: "
        f"{p['spahgc_config']}; spot features = mean projected cell features (PCA {kw['n_components']}) + log1p(cells); "
        f"k = {kw['n_exemplars']} exemplars{_default_k_note(kw['n_exemplars'])}; at most {kw['max_epochs']} epochs, lr {kw['lr']}, {kw['batch_size']} target "
        f"spots per step, patience {kw['patience']} on {kw['validation_fraction']:.0%} of the training spots. retrieval: "
        f"similarity-weighted mean of the k = {kw['n_exemplars']} most similar training spots (same features). "
        + reuse_txt
        + f"SpaHGC, its ablations and retrieval: seeds {', '.join(map(str, p['seeds']))}. Values: mean ± sd over "
        "held-out sections of the seed means; *seed sd* = mean over sections of the sd between seeds. *Undefined "
        "genes*: genes whose PCC is undefined (constant observed or predicted values), counted as 0 in PCC_gene, "
        "not as −1; the last column averages over the defined genes only.",
        "",
        _table(summary, order),
        "",
    ]
    if (df["group"] == "ablation").any():
        lines += [
            "### Ablations (normalised target)",
            "",
            "*no contrastive*: both contrastive weights 0 (no views, no target encoder); *no exemplars*: no reference "
            "nodes, only the spatial graph of the section's own spots; *exemplar residual from 1*: the per-gene scale "
            "of the pooled exemplar expression added to the prediction starts at 1 (the net starts at the "
            "similarity-weighted exemplar mean) instead of the default 0; *k = 32*: 32 exemplars per spot instead "
            "of 8.",
            "",
            _table(summary, ab_order),
            "",
        ]
    sp = pd.DataFrame(res["speed"])
    sp = sp[sp["from"].isna()] if "from" in sp else sp
    if not sp.empty:
        agg = (
            sp.groupby(["run", "target"], sort=False)
            .agg(
                fit_s=("fit_seconds", "mean"),
                cpu_s=("fit_cpu_seconds", "mean"),
                epochs=("epochs", "mean"),
                peak=("fit_peak_rss_mb", "max"),
                inc=("fit_rss_increase_mb", "max"),
                predict_s=("predict_seconds", "mean"),
            )
            .reset_index()
        )
        lines += [
            "### Training time and memory (fits made in this run)",
            "",
            "Mean over sections and seeds; RSS = resident memory of the benchmark process (which holds all five "
            "sections), peak sampled during the fit and its increase over the start of the fit (max over fits).",
            "",
            md_table(
                [
                    "model",
                    "trained on",
                    "fit (s)",
                    "fit CPU (s)",
                    "epochs",
                    "peak RSS (MB)",
                    "RSS increase (MB)",
                    "predict (s / section)",
                ],
                [
                    [
                        r.run,
                        "norm" if r.target == LIB else "raw",
                        r.fit_s,
                        r.cpu_s,
                        None if r.epochs != r.epochs else r.epochs,
                        r.peak,
                        r.inc,
                        r.predict_s,
                    ]
                    for r in agg.itertuples()
                ],
                digits=1,
            ),
            "",
        ]
    if res.get("index_scaling"):
        sc = res["index_scaling"]
        lines += [
            "### Exemplar index: build and query time",
            "",
            f"Synthetic {sc[0]['dim']}-d reference vectors with a 16-d structure, split over 5 slides; "
            f"{sc[0]['n_queries']} queries from a held-out slide, k = {sc[0]['k']}. *exact*: chunked cosine against every "
            "reference (memory: at most 4·10⁶ similarities at once); *ball_tree*: scikit-learn ball tree per slide on "
            "unit vectors. Build includes normalising (and the trees).",
            "",
            md_table(
                ["references", "method", "build (s)", "query (s)", "queries/s", "same neighbours as exact"],
                [
                    [
                        r["n_references"],
                        r["method"],
                        r["build_seconds"],
                        r["query_seconds"],
                        r["queries_per_s"],
                        r.get("same_neighbours_as_exact"),
                    ]
                    for r in sc
                ],
            ),
            "",
        ]
    lines.append(_reading(summary, bool(res["meta"].get("quick")) and not reused, rows))
    if float(np.median(list(p["spots"].values()))) < 150:
        lines.append(
            f"**Caution.** About {int(np.median(list(p['spots'].values())))} spots per held-out section: per-gene PCCs "
            "over so few spots carry a standard error near 0.1, so differences of a few hundredths are noise.\n"
        )
    return "\n".join(lines)
