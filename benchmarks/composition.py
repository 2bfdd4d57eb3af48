"""Cell resolution on real data: typed predicted cells per spot vs the study's deconvolution (issue 13).

Protocol: leave one section out within HER2ST patient C (C2–C6). bitro is trained on four sections
(the accuracy benchmark's settings and cache: watershed nuclei, EfficientNet-Lite0 tile features) and
predicts the fifth. Every predicted cell of the held-out section is typed by literature marker genes
of the 8 major types (``bt.tl.type_cells`` on ``cells.layers["bitro"]``, library-size normalised),
each spot's composition is its fraction of cells per type (``bt.tl.spot_composition``), and that is
compared per type with the original study's stereoscope proportions
(``bt.datasets.her2st_proportions``) by Spearman correlation across the held-out spots
(``bt.tl.compare_composition``).

Beside it:

- **equal split of bitro's spots**: every cell of a spot gets the spot's predicted profile, so every
  cell of a spot gets one type and the composition is one-hot per spot (it cannot produce mixtures);
- **morphology phenotypes → types**: cells typed from nuclear morphology alone. The training
  sections' cells (``obsm["X_morphology"]``, standardised) are clustered by k-means into
  ``N_PHENOTYPES`` phenotypes; each training spot's phenotype fractions ``F`` are regressed on its
  deconvolution proportions ``P`` by non-negative least squares (``P ≈ F M``, one NNLS per type), so
  row ``M[k]`` is phenotype ``k``'s type profile learned from the training sections only. A held-out
  cell is assigned its phenotype's most likely type (``argmax_t M[k, t]``) — cells typed — and, as a
  softer reference, each held-out spot's expected composition ``F M`` (rows normalised) is reported too;
- **spot marker score**: each spot's marker score (the same markers and scoring as for cells) from
  its observed counts, and from bitro's predicted spot expression, turned into a composition by a
  softmax over types — the upper reference that needs no cells (observed) and the same without cells
  from the model (predicted).

Heads (:func:`heads`): the paper's attention split of the spot (Eq. 10) on the GAT + Transformer trunk,
the per-cell count head on that trunk, and the count head without it (bitro's default). ``--quick``: one fold
(C2 held out), central ``2 × QUICK_WINDOW`` px windows of every section, few epochs.
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

import numpy as np
from benchmarks._common import (
    PREPROCESS,
    SECTIONS,
    SEED,
    SETTINGS,
    cached_section,
    features_label,
    is_default_network,
    kit_genes,
    md_table,
    metadata,
)

from bitro._logging import logger

ENCODERS = ("efficientnet_lite0", "morphology")
#: Half-size (px) of the central windows of ``--quick``: 3,000 px (about 2 mm) hold 60–90 spots, enough
#: for a rank correlation (the accuracy benchmark's 1,600 px windows hold about 25).
QUICK_WINDOW = 1500
N_PHENOTYPES = 16
TYPES = ("B-cells", "CAFs", "Endothelial", "Epithelial", "Myeloid", "Plasma Cells", "PVL", "T-cells")
EQUAL = "equal split of bitro's spots"
MORPH_CELLS = "morphology phenotypes → types (cells)"
MORPH_SOFT = "morphology phenotypes, expected composition"
SPOT_OBS = "spot marker score (observed counts)"
SPOT_PRED = "spot marker score (bitro's predicted spots)"
#: Target of the issue: the cell-resolved prediction beats the equal split on at least this many types.
TARGET_TYPES = 5


def heads() -> list[tuple[str, dict[str, Any] | None]]:
    """The heads to compare, each with its trunk named (so a head means the same whatever the defaults).

    ``paper attention``: the attention split (Eq. 10) on the GAT + Transformer trunk, the paper's network;
    ``cell_counts + trunk``: the per-cell count head on that trunk; ``cell_counts``: the count head without
    it, bitro's default.
    """
    from bitro.models import BiTroConfig

    if "head" not in {f.name for f in fields(BiTroConfig)}:
        return [("attention", None)]
    trunk = {"use_gat": True, "use_transformer": True}
    return [
        ("paper attention", {"head": "attention", **trunk}),
        ("cell_counts + trunk", {"head": "cell_counts", **trunk}),
        ("cell_counts", {"head": "cell_counts", "use_gat": False, "use_transformer": False}),
    ]


def _model_run(head: str) -> str:
    return f"bitro ({head} head) cells"


def load_sections(quick: bool) -> dict[str, Any]:
    """Cached, preprocessed sections (tables only), as in the accuracy benchmark."""
    window = QUICK_WINDOW if quick else SETTINGS["window"]
    return {s: cached_section(s, encoders=ENCODERS, window=window) for s in SECTIONS}


def _spot_table(values: np.ndarray, spot_ids: Any, genes: list[str]) -> Any:
    import anndata as ad
    import pandas as pd

    return ad.AnnData(
        X=np.asarray(values, dtype=np.float64),
        obs=pd.DataFrame(index=pd.Index(spot_ids, dtype=str)),
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
    )


def _softmax_composition(scores: Any) -> Any:
    """Spot marker scores (spots × types) → a composition by a softmax over types (NaN rows stay NaN)."""
    import pandas as pd

    s = scores.to_numpy(dtype=np.float64)
    ok = np.isfinite(s).all(axis=1)
    out = np.full_like(s, np.nan)
    e = np.exp(s[ok] - s[ok].max(axis=1, keepdims=True))
    out[ok] = e / e.sum(axis=1, keepdims=True)
    return pd.DataFrame(out, index=scores.index, columns=scores.columns)


def spot_marker_composition(values: np.ndarray, spot_ids: Any, genes: list[str]) -> Any:
    """Softmax composition of each spot's marker scores from its log1p expression (spots × genes)."""
    import bitro as bt

    scores = bt.tl.type_cells(_spot_table(values, spot_ids, genes), layer=None, inplace=False)
    return _softmax_composition(scores.drop(columns="marker_type"))


def equal_split_composition(test: Any, genes: list[str]) -> Any:
    """Every cell of a spot gets the spot's predicted profile; type the cells; one type per spot."""
    import anndata as ad
    import pandas as pd

    import bitro as bt

    spots, cells = test["spots"], test["cells"]
    pred = spots[:, genes].layers["bitro"]
    has = np.isfinite(pred).all(axis=1)
    row = spots.obs_names.get_indexer(cells.obs["spot_id"].astype(str))  # outside spots: "nan" -> -1
    keep = (row >= 0) & has[np.clip(row, 0, None)]
    split = ad.AnnData(
        X=pred[row[keep]],
        obs=pd.DataFrame({"spot_id": spots.obs_names[row[keep]].to_numpy()}, index=cells.obs_names[keep]),
        var=pd.DataFrame(index=pd.Index(genes)),
    )
    bt.tl.type_cells(split, layer=None)
    return bt.tl.spot_composition(split, inplace=False)


def _standardise(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return (x - mean) / np.where(sd > 0, sd, 1.0)


def morphology_compositions(train: dict[str, Any], test: Any, props: dict[str, Any]) -> dict[str, Any]:
    """Cells typed from morphology phenotypes mapped to types by NNLS on the training spots' proportions."""
    import anndata as ad
    import pandas as pd
    from scipy.optimize import nnls
    from sklearn.cluster import KMeans

    import bitro as bt

    def features(sdata: Any) -> np.ndarray:
        return np.asarray(sdata["cells"].obsm["X_morphology"], dtype=np.float64)

    x_train = np.concatenate([features(s) for s in train.values()])
    mean, sd = x_train.mean(axis=0), x_train.std(axis=0)
    km = KMeans(n_clusters=N_PHENOTYPES, n_init=4, random_state=SEED).fit(_standardise(x_train, mean, sd))

    def typed_cells(sdata: Any, labels: np.ndarray, categories: list[str]) -> Any:
        cells = sdata["cells"]
        obs = pd.DataFrame(
            {
                "spot_id": cells.obs["spot_id"].to_numpy(),
                "type": pd.Categorical.from_codes(labels, categories),
            },
            index=cells.obs_names,
        )
        return ad.AnnData(obs=obs)

    phenotypes = [str(k) for k in range(N_PHENOTYPES)]
    f_rows, p_rows = [], []
    for name, s in train.items():
        labels = km.predict(_standardise(features(s), mean, sd))
        frac = bt.tl.spot_composition(
            typed_cells(s, labels, phenotypes), type_key="type", inplace=False
        ).dropna()
        shared = frac.index.intersection(props[name].index)
        f_rows.append(frac.loc[shared].to_numpy())
        p_rows.append(props[name].loc[shared, list(TYPES)].to_numpy())
    f, p = np.concatenate(f_rows), np.concatenate(p_rows)
    m = np.column_stack([nnls(f, p[:, t])[0] for t in range(len(TYPES))])  # phenotypes × types
    fallback = int(np.argmax(p.mean(axis=0)))
    phen_type = np.where(m.sum(axis=1) > 0, np.argmax(m, axis=1), fallback)
    labels = km.predict(_standardise(features(test), mean, sd))
    hard = bt.tl.spot_composition(
        typed_cells(test, phen_type[labels], list(TYPES)), type_key="type", inplace=False
    )
    frac_test = bt.tl.spot_composition(typed_cells(test, labels, phenotypes), type_key="type", inplace=False)
    soft = frac_test.to_numpy() @ m
    total = soft.sum(axis=1, keepdims=True)
    soft = pd.DataFrame(soft / np.where(total > 0, total, np.nan), index=frac_test.index, columns=list(TYPES))
    mapping = {k: TYPES[int(t)] for k, t in zip(phenotypes, phen_type, strict=True)}
    return {MORPH_CELLS: hard, MORPH_SOFT: soft, "phenotype_types": mapping}


def within_spot_share(cells: Any, scores_key: str = "marker_type_scores") -> float:
    """Share of the typed cells' marker-score variance that lies within spots (0 for an equal split).

    Mean over types of ``sum (score - spot mean)² / sum (score - mean)²`` over cells in spots.
    """
    import pandas as pd

    scores = cells.obsm[scores_key]
    spot = cells.obs["spot_id"]
    ok = spot.notna().to_numpy() & np.isfinite(scores.to_numpy()).all(axis=1)
    df = pd.DataFrame(scores.to_numpy()[ok], columns=scores.columns).assign(spot=spot.to_numpy()[ok])
    centred = df[list(scores.columns)] - df.groupby("spot", observed=True)[list(scores.columns)].transform(
        "mean"
    )
    total = ((df[list(scores.columns)] - df[list(scores.columns)].mean()) ** 2).sum()
    return float(((centred**2).sum() / total.where(total > 0)).mean())


def _mixture_share(comp: Any) -> float:
    """Share of spots whose composition holds more than one type (NaN rows left out)."""
    c = comp.dropna().to_numpy()
    return float(((c > 0).sum(axis=1) > 1).mean()) if len(c) else float("nan")


def run_fold(
    test_name: str,
    sections: dict[str, Any],
    props: dict[str, Any],
    genes: list[str],
    kw: dict[str, Any],
    morph: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fit every head on the other sections, type the held-out cells and compare with the deconvolution."""
    import bitro as bt
    from bitro.tl._cv import light_copy

    train = {n: s for n, s in sections.items() if n != test_name}
    ref = props[test_name]
    comps: dict[str, Any] = {}
    records = []
    spots = sections[test_name]["spots"]
    counts = spots[:, genes].layers["counts"]
    counts = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=np.float64)
    comps[SPOT_OBS] = spot_marker_composition(np.log1p(counts), spots.obs_names, genes)
    morph = morph or morphology_compositions(train, sections[test_name], props)
    comps[MORPH_CELLS], comps[MORPH_SOFT] = morph[MORPH_CELLS], morph[MORPH_SOFT]
    for head, config in heads():
        t_fit = time.perf_counter()
        model = bt.tl.fit(list(train.values()), genes=genes, config=config, seed=SEED, device="cpu", **kw)
        fit_s = time.perf_counter() - t_fit
        test = light_copy(sections[test_name])
        bt.tl.predict(model, test)
        model_genes = list(test["cells"].uns["bitro"]["genes"])
        bt.tl.type_cells(test)
        bt.tl.spot_composition(test)
        comps[_model_run(head)] = test["spots"].obsm["marker_composition"]
        if is_default_network(config):  # the default model's own spots: equal split and spot marker score
            comps[EQUAL] = equal_split_composition(test, model_genes)
            pred = test["spots"][:, model_genes].layers["bitro"]
            ok = np.isfinite(pred).all(axis=1)
            comps[SPOT_PRED] = spot_marker_composition(pred[ok], test["spots"].obs_names[ok], model_genes)
        typed = test["cells"].obs["marker_type"]
        hist = getattr(model, "history", None) or {}
        records.append(
            {
                "test": test_name,
                "head": head,
                "target": getattr(getattr(model, "setup", None), "target", None),
                "fit_seconds": round(fit_s, 1),
                "epochs": len(hist.get("epoch", [])) or None,
                "typed_cells": int(typed.notna().sum()),
                "within_spot_score_share": round(within_spot_share(test["cells"]), 4),
                "cell_types": {str(k): int(v) for k, v in typed.value_counts().items()},
                "markers": test["cells"].uns["marker_type"]["markers"],
                "markers_missing": test["cells"].uns["marker_type"]["markers_missing"],
            }
        )
        logger.info("composition: %s held out, %s head fitted in %.0f s", test_name, head, fit_s)
    # every method is compared on the same spots: those where the model typed cells
    common = comps[_model_run(heads()[0][0])].dropna().index
    rows = []
    for method, comp in comps.items():
        comp = comp.reindex(common)
        res = bt.tl.compare_composition(comp, ref, types=list(TYPES))
        mix = _mixture_share(comp)
        rows += [
            {
                "test": test_name,
                "method": method,
                "type": t,
                "spearman": float(r.spearman),
                "pvalue": float(r.pvalue),
                "n_spots": int(r.n_spots),
                "mixture_share": mix,
            }
            for t, r in res.iterrows()
        ]
    records[0]["phenotype_types"] = morph["phenotype_types"]
    return rows, records


def run(quick: bool) -> dict[str, Any]:
    """Leave one section out over patient C; per-type Spearman of each method's compositions."""
    from benchmarks.accuracy import BITRO_KW, QUICK_BITRO_KW

    import bitro as bt

    bt.settings.progress = False
    t0 = time.perf_counter()
    sections = load_sections(quick)
    names = list(sections)
    props = {n: bt.datasets.her2st_proportions(n) for n in names}
    genes = kit_genes(sections)
    kw = dict(QUICK_BITRO_KW if quick else BITRO_KW)
    if SETTINGS["epochs"] and not quick:
        kw["max_epochs"] = int(SETTINGS["epochs"])
    folds = [names[0]] if quick else names
    rows, records = [], []
    for test_name in folds:
        fold_rows, fold_records = run_fold(test_name, sections, props, genes, kw)
        rows += fold_rows
        records += fold_records
    out = {
        "name": "composition",
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seed": SEED}),
        "protocol": {
            "sections": names,
            "folds": folds,
            "heads": [h for h, _ in heads()],
            "n_genes": len(genes),
            "bitro_fit_kwargs": kw,
            "encoders": list(ENCODERS),
            "context_um": list(PREPROCESS["context_um"]),
            "window_half_px": QUICK_WINDOW if quick else SETTINGS["window"],
            "n_phenotypes": N_PHENOTYPES,
            "cells": {n: int(s["cells"].n_obs) for n, s in sections.items()},
            "spots": {n: int(s["spots"].n_obs) for n, s in sections.items()},
        },
        "rows": rows,
        "fits": records,
    }
    out["markdown"] = markdown(out)
    return out


def summary(rows: list[dict[str, Any]]) -> Any:
    """Mean Spearman (and sd over folds) per method and type; the mixture share per method."""
    import pandas as pd

    df = pd.DataFrame(rows)
    return df.groupby(["method", "type"], sort=False)["spearman"].agg(["mean", "std", "count"]).reset_index()


def beats(summ: Any, method: str, reference: str = EQUAL) -> tuple[int, int]:
    """``(wins, n_types)``: types where ``method``'s mean Spearman exceeds ``reference``'s (NaN counts as 0)."""
    a = summ[summ.method == method].set_index("type")["mean"].fillna(0.0)
    b = summ[summ.method == reference].set_index("type")["mean"].fillna(0.0)
    shared = a.index.intersection(b.index)
    return int((a[shared] > b[shared]).sum()), len(shared)


def markdown(res: dict[str, Any]) -> str:
    """Per-type table, the count of types beaten and an honest reading."""
    import pandas as pd

    p, rows = res["protocol"], res["rows"]
    title = "## Cell types per spot on HER2ST vs the study's deconvolution (cell resolution on real data)"
    if not rows:
        return f"{title}\n\nNo results.\n"
    summ = summary(rows)
    df = pd.DataFrame(rows)
    mix = df.groupby("method", sort=False)["mixture_share"].mean()
    methods = list(dict.fromkeys(df["method"]))
    model_runs = [m for m in methods if m.startswith("bitro (")]
    order = [*model_runs, *[m for m in methods if m not in model_runs]]
    body = []
    for m in order:
        sub = summ[summ.method == m].set_index("type")
        cells = []
        for t in TYPES:
            mean, sd, n = (sub.loc[t, k] if t in sub.index else np.nan for k in ("mean", "std", "count"))
            cells.append(
                None if mean != mean else f"{mean:.2f}" + (f" ± {sd:.2f}" if n > 1 and sd == sd else "")
            )
        wins = "/".join(map(str, beats(summ, m))) if m != EQUAL else "–"
        body.append([m, *cells, f"{mix[m]:.2f}", wins])
    where = "whole sections" if not p["window_half_px"] else f"central {2 * p['window_half_px']} px windows"
    n_spots = df[df.method == order[0]].groupby("test")["n_spots"].max().to_dict()
    kw = p["bitro_fit_kwargs"]
    lines = [
        title,
        "",
        f"**Protocol.** Leave one section out within patient C ({', '.join(p['sections'])}, {where}); held out: "
        f"{', '.join(p['folds'])} (spots compared: {', '.join(f'{k} {v}' for k, v in n_spots.items())}). bitro "
        f"is trained on the other four sections ({p['n_genes']} genes, max {kw['max_epochs']} epochs, PCA to "
        f"{kw['n_components']}, {features_label(p.get('context_um', []))}) and predicts every cell of the held-out "
        "section. Heads: *paper attention* = the attention split (Eq. 10) on the GAT + Transformer trunk; "
        "*cell_counts + trunk* = the per-cell count head on that trunk; *cell_counts* = the count head without it "
        "(bitro's default since 0.2; runs made before then name their heads differently). "
        "Cells are typed by literature marker genes of the 8 major types (`bt.tl.type_cells`, markers in "
        "`bitro.tl._composition.MARKERS` restricted to the 785 genes), each spot's composition is its fraction of "
        "cells per type, and it is compared with the original study's stereoscope proportions (not cell truth) by "
        "Spearman across the held-out spots, per type. **Equal split**: every cell of a spot gets the default model's "
        "predicted profile of the spot, hence one type per spot (a one-hot composition; it cannot produce mixtures). "
        f"**Morphology phenotypes**: k-means ({p['n_phenotypes']} phenotypes) of the training cells' nuclear "
        "morphology features, mapped to types by non-negative least squares of the training spots' proportions on "
        "their phenotype fractions; cells take their phenotype's most likely type (*cells*), or spots take the "
        "fitted mixture (*expected composition*). **Spot marker score**: the spot's marker scores from its observed "
        "counts or the default model's predicted spot, softmax over types — needs no cells. Values: Spearman, mean ± sd over "
        "held-out sections; NaN when a method gives a type to no spot or to every spot. *mixtures*: share of spots "
        "with more than one type; *> equal split*: types where the mean Spearman exceeds the equal split's "
        "(NaN counted as 0).",
        "",
        md_table(["composition from", *TYPES, "mixtures", "> equal split"], body, digits=2),
        "",
    ]
    fits = pd.DataFrame(res.get("fits", []))
    within = (
        fits.groupby("head", sort=False)["within_spot_score_share"].mean().to_dict()
        if "within_spot_score_share" in fits
        else {}
    )
    for m in model_runs:
        wins, n = beats(summ, m)
        verdict = "reaches" if wins >= TARGET_TYPES else "does **not** reach"
        head = m.removeprefix("bitro (").split(" head")[0]
        share = (
            f"; {within[head]:.0%} of its cells' marker-score variance lies within spots (equal split: 0%)"
            if head in within
            else ""
        )
        lines.append(
            f"- {m}: above the equal split on {wins} of {n} types; {verdict} the issue-13 target "
            f"(≥ {TARGET_TYPES} of 8){share}{' — quick run' if res['meta']['quick'] else ''}."
        )
    lines.append("")
    return "\n".join(lines)
