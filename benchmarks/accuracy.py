"""Leave-one-section-out accuracy on HER2ST patient C (C2–C6), with baselines and ablations (issues 4, 6).

Protocol: each of C2–C6 is held out in turn; the model is trained on the other four (early-stopping
validation spots are drawn from the training sections only) and predicts the held-out section's
spots. Genes: the 785-gene HER2ST list (``bt.datasets.her2st_genes()``, those present in every
section). Cells: watershed nuclei of the Macenko-normalised image, embedded with EfficientNet-Lite0
in tile mode (``obsm["X_bitro"]``, 1,280-d) or with the ``morphology`` encoder, from the benchmark cache.
Every prediction is scored by ``bt.tl.evaluate(normalize="both")``: PCC_gene (all genes and the 50
most variable genes of the test section), PCC_overall, on raw-count log1p and on library-size
normalised log1p. ``target`` is the scale the model was trained on.

Main table: all folds. Ablations (costly): a subset of folds (``ABLATION_FOLDS``), stated in the page.
``--quick``: central windows of every section, one fold, few epochs, bitro + ridge + depth.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from benchmarks._common import (
    PREPROCESS,
    SECTIONS,
    SEED,
    SETTINGS,
    cached_section,
    features_label,
    kit_genes,
    md_table,
    metadata,
    write_result,
)

from bitro._logging import logger

ENCODERS = ("efficientnet_lite0", "morphology")
QUICK_WINDOW = 800
ABLATION_FOLDS = (0, 2)  # C2, C4 held out
BITRO_KW: dict[str, Any] = {
    "max_epochs": 30,
    "lr": 1e-3,
    "batch_size": 32,
    "patience": 6,
    "n_components": 128,
    "validation_fraction": 0.1,
}
#: Epochs of the pseudo-bulk stage of the transfer ablation (as in the bulk benchmark: four training
#: samples give four steps per epoch, and a whole-section bulk epoch costs about a spot-level fit's epoch).
TRANSFER_BULK_EPOCHS = 6
TRANSFER_RUN = "bitro pseudo-bulk → spot (LoRA)"
QUICK_BITRO_KW: dict[str, Any] = {**BITRO_KW, "max_epochs": 3, "n_components": 32}
METRICS = ("pcc_gene", "pcc_gene_top50_var", "pcc_overall")


def runs(quick: bool) -> list[dict[str, Any]]:
    """The model configurations; ``group`` is ``"main"`` (all folds) or ``"ablation"`` (subset)."""
    if quick:
        return [
            {"name": "bitro", "model": "bitro", "target": "raw", "group": "main"},
            {"name": "bitro", "model": "bitro", "target": "library_size", "group": "main"},
            {"name": "ridge", "model": "ridge", "target": "raw", "group": "main"},
            {"name": "ridge", "model": "ridge", "target": "library_size", "group": "main"},
            {"name": "depth", "model": "depth", "target": "raw", "group": "main"},
            {
                "name": "bitro + GAT",
                "model": "bitro",
                "target": "library_size",
                "group": "ablation",
                "config": {"use_gat": True},
            },
        ]
    lib = "library_size"
    out = [
        {"name": "bitro", "model": "bitro", "target": "raw", "group": "main"},
        {"name": "bitro", "model": "bitro", "target": lib, "group": "main"},
        {"name": "ridge", "model": "ridge", "target": "raw", "group": "main"},
        {"name": "ridge", "model": "ridge", "target": lib, "group": "main"},
        {"name": "mlp", "model": "mlp", "target": "raw", "group": "main"},
        {"name": "mlp", "model": "mlp", "target": lib, "group": "main"},
        {"name": "depth", "model": "depth", "target": "raw", "group": "main"},
        {"name": "cell_count", "model": "cell_count", "target": "raw", "group": "main"},
        {"name": "mean", "model": "mean", "target": "raw", "group": "main"},
    ]
    ab = [
        # the trunk and the head: the default leaves out the paper's GAT + Transformer (see components.py)
        ("bitro + GAT and Transformer (paper trunk)", {"config": {"use_gat": True, "use_transformer": True}}),
        (
            "bitro attention head (paper)",
            {"config": {"head": "attention", "use_gat": True, "use_transformer": True}},
        ),
        ("bitro + cluster loss 0.1", {"cluster_weight": 0.1}),
        ("bitro without z-score", {"fit": {"zscore": False}}),
        ("bitro lr 1e-4 (paper)", {"fit": {"lr": 1e-4}}),
        (
            "bitro dropout 0.3 + weight decay 1e-4",
            {"config": {"dropout": 0.3}, "fit": {"weight_decay": 1e-4}},
        ),
        ("bitro hidden 64", {"config": {"hidden_dim": 64, "ffn_dim": 128, "readout_hidden": 32}}),
        ("bitro morphology encoder", {"use_rep": "X_morphology"}),
        ("ridge morphology encoder", {"model": "ridge", "use_rep": "X_morphology"}),
        (TRANSFER_RUN, {"transfer": True}),
    ]
    out += [{"name": n, "model": "bitro", "target": lib, "group": "ablation", **kw} for n, kw in ab]
    return out


def _with_pseudo_bulk(sdata: Any) -> Any:
    """Add a one-row ``bulk`` table (summed spot counts; TPM in X) and spot-sized patches."""
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    import bitro as bt

    if "bulk" not in sdata.tables:
        counts = np.asarray(sdata["spots"].layers["counts"].sum(axis=0)).reshape(1, -1)
        bulk = ad.AnnData(
            X=(counts / counts.sum() * 1e6).astype(np.float32),
            obs=pd.DataFrame(index=[str(sdata.attrs["bitro_scale"]["sample_id"])]),
            var=pd.DataFrame(index=sdata["spots"].var_names),
        )
        bulk.layers["counts"] = counts.astype(np.float32)
        sdata.tables["bulk"] = TableModel.parse(bulk)
    if "patches" not in sdata.tables:
        bt.pp.make_patches(sdata, tissue_key=None)
    return sdata


def load_sections(quick: bool) -> dict[str, Any]:
    """Cached, preprocessed sections (tables only)."""
    window = QUICK_WINDOW if quick else SETTINGS["window"]
    return {s: cached_section(s, encoders=ENCODERS, window=window) for s in SECTIONS}


def seed_study_inputs(quick: bool) -> tuple[dict[str, Any], list[str], list[str], dict[str, Any]]:
    """``(sections, names, genes, fit kwargs)`` of the studies that refit the default over folds × seeds.

    The accuracy benchmark's sections and training settings; ``--quick`` trains 3 epochs.
    """
    sections = load_sections(quick)
    kw = dict(QUICK_BITRO_KW if quick else BITRO_KW)
    if quick:
        kw["max_epochs"] = 3
    return sections, list(sections), kit_genes(sections), kw


def _fit(run: dict[str, Any], train: list, genes: list[str], kw: dict[str, Any]):
    import bitro as bt

    use_rep = run.get("use_rep", "X_bitro")
    seed = run.get("seed", SEED)
    if run["model"] != "bitro":
        return bt.tl.fit(
            train, genes=genes, model=run["model"], target=run["target"], use_rep=use_rep, seed=seed
        )
    fit_kw = {
        **kw,
        **run.get("fit", {}),
        "config": run.get("config"),
        "cluster_weight": run.get("cluster_weight"),
    }
    if run.get("transfer"):
        bulk_train = [_with_pseudo_bulk(s) for s in train]
        base = bt.tl.fit(
            bulk_train,
            level="bulk",
            genes=genes,
            target=run["target"],
            use_rep=use_rep,
            seed=seed,
            device="cpu",
            **{k: v for k, v in fit_kw.items() if k != "cluster_weight"}
            | {"max_epochs": min(fit_kw["max_epochs"], TRANSFER_BULK_EPOCHS)},
        )
        return bt.tl.transfer(
            base,
            train,
            level="spot",
            method="lora",
            max_epochs=kw["max_epochs"],
            lr=kw["lr"],
            seed=seed,
            device="cpu",
        )
    return bt.tl.fit(
        train, genes=genes, target=run["target"], use_rep=use_rep, seed=seed, device="cpu", **fit_kw
    )


def run(quick: bool) -> dict[str, Any]:
    """Run all configurations over the folds; return tidy rows, speed records and the Markdown section."""
    import bitro as bt

    bt.settings.progress = False
    t0 = time.perf_counter()
    sections = load_sections(quick)
    names = list(sections)
    genes = kit_genes(sections)
    kw = dict(QUICK_BITRO_KW if quick else BITRO_KW)
    if SETTINGS["epochs"] and not quick:
        kw["max_epochs"] = int(SETTINGS["epochs"])
    folds_main = [0] if quick else list(range(len(names)))
    folds_ab = [0] if quick else list(SETTINGS["ablation_folds"] or ABLATION_FOLDS)
    groups = SETTINGS["groups"] or (("main", "ablation") if SETTINGS["full"] else ("main",))
    name = "accuracy" if "main" in groups or quick else "accuracy_ablations"
    plan = [
        (cfg, f)
        for group in ("main", "ablation")
        if group in groups or quick
        for cfg in runs(quick)
        if cfg["group"] == group
        for f in (folds_main if group == "main" else folds_ab)
    ]
    plan.sort(key=lambda cf: (cf[0]["group"] != "main", cf[1]))  # all main runs first, fold by fold
    rows, speed = [], []
    reused = _reusable(name, quick, kw, len(genes))
    out: dict[str, Any] = {}
    for cfg, f in plan:
        test_name = names[f]
        key = (cfg["name"], cfg["target"], test_name)
        if cfg["model"] == "bitro" and key in reused:  # a bitro fit of an interrupted run of this protocol
            rows += reused[key]["rows"]
            speed += reused[key]["speed"]
            logger.info(
                "accuracy: fold %d %s %s (%s): reused from %s", f, test_name, *key[:2], reused[key]["commit"]
            )
            continue
        fold_rows, record = fit_and_score(cfg, f, test_name, sections, genes, kw)
        rows += fold_rows
        speed.append(record)
        fit_s = record["fit_seconds"]
        logger.info(
            "accuracy: fold %d %s %s (%s): fit %.0f s", f, test_name, cfg["name"], cfg["target"], fit_s
        )
        out = _result(name, quick, t0, names, folds_main, folds_ab, genes, kw, sections, rows, speed)
        if not quick:
            write_result(name, out)  # partial results survive an interrupted run
    return out


def fit_and_score(
    cfg: dict[str, Any],
    fold: int,
    test_name: str,
    sections: dict[str, Any],
    genes: list[str],
    kw: dict[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Fit ``cfg`` on every section but ``test_name``, predict that one and score it.

    Returns tidy metric rows (both target scales) and a speed record (fit and prediction time).
    """
    import bitro as bt
    from bitro.tl._cv import light_copy

    train = [sections[n] for n in sections if n != test_name]
    t_fit = time.perf_counter()
    model = _fit(cfg, train, genes, kw)
    fit_s = time.perf_counter() - t_fit
    test = light_copy(sections[test_name])
    t_pred = time.perf_counter()
    model.predict(test, key_added="cv")
    pred_s = time.perf_counter() - t_pred
    res = bt.tl.evaluate(test, table_key="spots", layer="cv", normalize="both", inplace=False)
    res = res[res["metric"].isin(METRICS)]
    rows = [
        {"fold": fold, "test": test_name, "run": cfg["name"], "target": cfg["target"],
         "group": cfg["group"], "metric": r.metric, "scale": r.scale, "value": float(r.value)}
        for r in res.itertuples()
    ]  # fmt: skip
    hist = getattr(model, "history", None) or {}
    n_train = int(sum(s["spots"].n_obs for s in train))
    epochs = len(hist.get("epoch", [])) or None
    record = {
        "fold": fold, "test": test_name, "run": cfg["name"], "target": cfg["target"],
        "fit_seconds": round(fit_s, 2), "predict_seconds": round(pred_s, 3),
        "n_train_spots": n_train, "n_test_spots": int(test["spots"].n_obs), "epochs": epochs,
        "train_spots_per_s": round(n_train * epochs / fit_s, 1) if epochs else None,
    }  # fmt: skip
    return rows, record


def bitro_defaults() -> dict[str, Any]:
    """The network and setup defaults and the section-cache recipe a bitro fit here depends on.

    Stored fits are reused only when these are unchanged (a changed default head, loss or
    preprocessing recipe means every bitro fit is redone).
    """
    from dataclasses import asdict, fields

    from benchmarks._common import PREPROCESS, cache_key

    from bitro.models import BiTroConfig
    from bitro.tl import SetupConfig

    return {
        # the declared defaults, unresolved: an automatic field (skip=None) stays None
        "network": {f.name: f.default for f in fields(BiTroConfig) if f.name != "n_genes"},
        "setup": {k: v for k, v in asdict(SetupConfig()).items() if not callable(v)},
        "cache": cache_key("C2", ENCODERS, "tile", SETTINGS["window"]),
        "preprocess": PREPROCESS,
    }


def _reusable(name: str, quick: bool, kw: dict[str, Any], n_genes: int) -> dict[tuple, dict[str, Any]]:
    """bitro fits already in ``results/<name>.json`` from an interrupted run with the same protocol.

    Only the slow bitro fits are reused (baselines are refitted); every reused row keeps the commit it
    was computed at, and the result lists those commits.
    """
    import json

    from benchmarks._common import RESULTS_DIR

    path = RESULTS_DIR / f"{name}.json"
    if quick or not path.exists():
        return {}
    old = json.loads(path.read_text())
    p = old.get("protocol", {})
    if old.get("meta", {}).get("quick") or p.get("bitro_fit_kwargs") != kw or p.get("n_genes") != n_genes:
        return {}
    if p.get("window_half_px") != SETTINGS["window"] or p.get("bitro_defaults") != bitro_defaults():
        return {}  # another window, or fits of other network/setup defaults or another section cache
    commit = old["meta"]["git"]["commit"]
    out: dict[tuple, dict[str, Any]] = {}
    for r in old.get("rows", []):
        key = (r["run"], r["target"], r["test"])
        out.setdefault(key, {"rows": [], "speed": [], "commit": r.get("commit", commit)})
        out[key]["rows"].append({**r, "commit": r.get("commit", commit)})
    for sp in old.get("speed", []):
        key = (sp["run"], sp["target"], sp["test"])
        if key in out:
            out[key]["speed"].append(sp)
    return {k: v for k, v in out.items() if v["speed"] and not k[0].startswith(("ridge", "mlp", "depth"))}


def _result(name, quick, t0, names, folds_main, folds_ab, genes, kw, sections, rows, speed) -> dict[str, Any]:
    out = {
        "name": name,
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seed": SEED}),
        "protocol": {
            "sections": names,
            "folds_main": [names[i] for i in folds_main],
            "folds_ablation": [names[i] for i in folds_ab],
            "transfer_bulk_epochs": min(kw["max_epochs"], TRANSFER_BULK_EPOCHS),
            "n_genes": len(genes),
            "bitro_fit_kwargs": kw,
            "bitro_config": "BiTroConfig defaults (hidden 128, 2 GAT layers × 4 heads, 2 Transformer layers, "
            "per-cell count head with the cells' own features skipped past the trunk)",
            "bitro_defaults": bitro_defaults(),
            "encoders": list(ENCODERS),
            "context_um": list(PREPROCESS["context_um"]),
            "window_half_px": QUICK_WINDOW if quick else SETTINGS["window"],
            "cells": {n: int(s["cells"].n_obs) for n, s in sections.items()},
            "spots": {n: int(s["spots"].n_obs) for n, s in sections.items()},
        },
        "rows": rows,
        "speed": speed,
        "reused_commits": sorted({r["commit"] for r in rows if "commit" in r}),
    }
    out["markdown"] = markdown(out)
    return out


def _summary(rows: list[dict[str, Any]], group: str, folds: list[str] | None = None):
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[df["group"].isin([group] if group == "main" else ["main", "ablation"])]
    if folds is not None:
        df = df[df["test"].isin(folds)]
    g = df.groupby(["run", "target", "metric", "scale"], sort=False)["value"]
    return g.agg(["mean", "std", "count"]).reset_index()


def _table(summary, order: list[tuple[str, str]]) -> str:
    cols = [(m, s) for s in ("library_size", "raw") for m in METRICS]
    header = ["model", "trained on"] + [f"{m} ({'norm' if s == 'library_size' else 'raw'})" for m, s in cols]
    body = []
    for run_name, target in order:
        sub = summary[(summary["run"] == run_name) & (summary["target"] == target)]
        if sub.empty:
            continue
        row: list[Any] = [run_name, "norm" if target == "library_size" else "raw"]
        for m, s in cols:
            hit = sub[(sub["metric"] == m) & (sub["scale"] == s)]
            if hit.empty:
                row.append(None)
            else:
                mean, sd = float(hit["mean"].iloc[0]), hit["std"].iloc[0]
                row.append(
                    f"{mean:.3f}" + (f" ± {float(sd):.3f}" if sd == sd and hit["count"].iloc[0] > 1 else "")
                )
        body.append(row)
    return md_table(header, body)


def markdown(res: dict[str, Any]) -> str:
    """Main table, ablation table, speed table and an honest reading of them."""
    import pandas as pd

    p, rows = res["protocol"], res["rows"]
    if not rows:
        return "## Accuracy (HER2ST)\n\nNo results.\n"
    df = pd.DataFrame(rows)
    main_order = list(
        dict.fromkeys(zip(df[df.group == "main"]["run"], df[df.group == "main"]["target"], strict=True))
    )
    ab = df[df.group == "ablation"]
    ab_order = [("bitro", "library_size"), *dict.fromkeys(zip(ab["run"], ab["target"], strict=True))]
    kw = p["bitro_fit_kwargs"]
    done = list(dict.fromkeys(df[df.group == "main"]["test"]))
    where = (
        "whole sections"
        if not p["window_half_px"]
        else f"central {2 * p['window_half_px']} px windows of the sections"
    )
    lines = [
        "## Spot-level accuracy on HER2ST patient C (leave one section out)",
        "",
        f"**Protocol.** Leave-one-section-out over {', '.join(p['sections'])} ({where}); held-out folds: "
        f"{', '.join(done)}{' (run incomplete)' if len(done) < len(p['folds_main']) else ''}. {p['n_genes']} genes (HER2ST 785-gene list). Cells: watershed nuclei, "
        f"{features_label(p.get('context_um', []))} (cached). bitro: "
        f"{p['bitro_config']}; max {kw['max_epochs']} epochs, lr {kw['lr']}, batch {kw['batch_size']}, early-stopping "
        f"patience {kw['patience']} on {kw['validation_fraction']:.0%} of the training spots, PCA to "
        f"{kw['n_components']}. Ridge/MLP: mean-pooled cell features per spot. depth: the spot's log total count "
        "predicted from its features, spread over genes by training fractions. cell_count: log(1 + cells in the "
        "spot). mean: training mean. Values are mean ± sd over held-out sections; *norm* = library-size "
        "normalised log1p, *raw* = raw-count log1p; top50 = the 50 most variable genes of the test section.",
        "",
        _table(_summary(rows, "main"), main_order),
        "",
    ]
    if len(ab_order) > 1:
        # compare on the folds that every ablation finished (a run cut short leaves partial folds)
        ab_runs = set(zip(ab["run"], ab["target"], strict=True))
        complete = [
            t for t in p["folds_ablation"]
            if ab_runs <= set(zip(ab[ab.test == t]["run"], ab[ab.test == t]["target"], strict=True))
        ]  # fmt: skip
        folds_ab = complete or list(p["folds_ablation"])
        skipped = sorted(set(p["folds_ablation"]) - set(folds_ab))
        lines += [
            "### Ablations",
            "",
            f"**Protocol.** Same as above but only held-out folds {', '.join(folds_ab)} (CPU time"
            + (
                f"; fold(s) {', '.join(skipped)} did not finish for every variant and are left out"
                if skipped
                else ""
            )
            + "); every "
            "variant is trained on the normalised target and compared with the full model on the same folds "
            "(first row). 'pseudo-bulk → spot' trains a bulk-level model on the pseudo-bulk of the four training "
            f"sections (at most {p.get('transfer_bulk_epochs', kw['max_epochs'])} epochs), then adapts it to "
            "spots with LoRA (rank 8).",
            "",
            _table(_summary(rows, "ablation", folds_ab), ab_order),
            "",
            _ablation_reading(_summary(rows, "ablation", folds_ab)),
        ]
    else:
        lines += [
            "_Ablations belong to the full set: `python -m benchmarks --full`, or "
            "`python -m benchmarks --only accuracy --groups ablation` for them alone._",
            "",
        ]
    sp = pd.DataFrame(res["speed"])
    sp = (
        sp.groupby(["run", "target"], sort=False)
        .agg(
            fit_s=("fit_seconds", "mean"),
            epochs=("epochs", "mean"),
            spots_per_s=("train_spots_per_s", "mean"),
            predict_s=("predict_seconds", "mean"),
            test_spots=("n_test_spots", "mean"),
        )
        .reset_index()
    )
    lines += [
        "### Training and prediction speed (from the same runs)",
        "",
        "Mean over folds; spots/s = training spots × epochs run / fit time (includes validation and setup); "
        "prediction time is for one held-out section (spots and pseudo-cells).",
        "",
        md_table(
            [
                "model",
                "trained on",
                "fit (s)",
                "epochs",
                "train spots/s",
                "predict (s / section)",
                "test spots",
            ],
            [
                [
                    r.run,
                    "norm" if r.target == "library_size" else "raw",
                    r.fit_s,
                    None if r.epochs != r.epochs else r.epochs,
                    None if r.spots_per_s != r.spots_per_s else r.spots_per_s,
                    r.predict_s,
                    r.test_spots,
                ]
                for r in sp.itertuples()
            ],
            digits=1,
        ),
        "",
        _reading(_summary(rows, "main")),
        _noise_note(sp),
    ]
    return "\n".join(lines)


#: Ablations that add one of the paper's components back to the default: run -> what it adds.
COMPONENTS = {
    "bitro + GAT and Transformer (paper trunk)": "the paper's GAT + Transformer trunk",
    "bitro attention head (paper)": "the paper's network (gene-query attention head on that trunk)",
}


def _ablation_reading(summary) -> str:
    """Say plainly when adding one of the paper's components back does not raise normalised PCC_gene."""
    sub = summary[(summary["metric"] == "pcc_gene") & (summary["scale"] == "library_size")]
    full = sub[(sub["run"] == "bitro") & (sub["target"] == "library_size")]["mean"]
    if full.empty:
        return ""
    full_v, out = float(full.iloc[0]), []
    for run, what in COMPONENTS.items():
        hit = sub[sub["run"] == run]["mean"]
        if hit.empty:
            continue
        v = float(hit.iloc[0])
        if v <= full_v + 0.01:
            out.append(
                f"- Adding {what} does **not** raise normalised PCC_gene ({v:.3f} with it, {full_v:.3f} for the "
                "default): on these folds it does not carry its weight."
            )
        else:
            out.append(f"- Adding {what} raises normalised PCC_gene from {full_v:.3f} to {v:.3f}.")
    hit = sub[sub["run"] == TRANSFER_RUN]["mean"]
    if not hit.empty:
        v = float(hit.iloc[0])
        verdict = "does **not** reach" if v < full_v - 0.01 else "matches or beats"
        out.append(
            f"- Pre-training on the training sections' pseudo-bulk and adapting to spots with LoRA {verdict} "
            f"a model trained on the spots directly ({v:.3f} vs {full_v:.3f} normalised PCC_gene)."
        )
    return ("**Reading.**\n\n" + "\n".join(out) + "\n") if out else ""


def _noise_note(speed) -> str:
    """Warn when the held-out sections have too few spots for PCC_gene to mean much."""
    n = float(speed["test_spots"].median()) if len(speed) else 0.0
    if n >= 100:
        return ""
    return (
        f"**Caution.** Only about {n:.0f} spots per held-out section: a per-gene PCC over so few spots has a "
        f"standard error near 1/√{n:.0f} ≈ {1 / max(n, 1) ** 0.5:.2f}, so differences of a few hundredths "
        "between models here are noise. Whole-section runs (`python -m benchmarks` without `--window`) are "
        "needed to rank the models.\n"
    )


def _reading(summary) -> str:
    """One honest sentence per scale: who wins PCC_gene."""
    out = []
    for scale, label in (("library_size", "normalised"), ("raw", "raw-count")):
        sub = summary[(summary["metric"] == "pcc_gene") & (summary["scale"] == scale)]
        if sub.empty:
            continue
        best = sub.sort_values("mean", ascending=False).iloc[0]
        bitro = sub[sub["run"] == "bitro"]["mean"].max()
        msg = (
            f"On the {label} scale the best PCC_gene is {best['mean']:.3f} ({best['run']}, trained on "
            f"{'norm' if best['target'] == 'library_size' else 'raw'})"
        )
        if best["run"] != "bitro" and bitro == bitro:
            msg += f"; bitro's best is {bitro:.3f}, so **bitro loses here**."
        else:
            msg += "; bitro wins here."
        out.append(f"- {msg}")
    return "**Reading.**\n\n" + "\n".join(out) + "\n"
