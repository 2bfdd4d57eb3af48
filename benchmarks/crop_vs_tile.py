"""Ablation: ``crop`` vs ``tile`` cell embeddings (EfficientNet-Lite0) on the same cells (issue 6).

Crop mode (the paper's: one 33 µm window per nucleus through the encoder) costs about fifty times
tile mode on the CPU (see the ``embedding`` benchmark), hours per whole HER2ST section, so this
ablation runs on a central window of ``2 * WINDOW_HALF`` px of each of C2–C6. Both modes start from
the same window, stain normalisation and segmentation (deterministic), so they embed identical
nuclei; the run checks that. Leave one section out over the five windows: bitro (normalised target,
the accuracy benchmark's settings) and the ridge probe, once on each embedding. Embedding times come
from the section cache's step records (measured when the cache was built).

Run: ``python -m benchmarks --only crop_vs_tile`` (part of ``--full``; the first run builds the crop
cache, about 5 min per section on one core).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from benchmarks._common import SECTIONS, SEED, cache_info, cached_section, md_table, metadata

from bitro._logging import logger

WINDOW_HALF = 1200
QUICK_WINDOW_HALF = 500
ENCODERS = ("efficientnet_lite0",)
MODES = ("tile", "crop")
MODELS = ("bitro", "ridge")


def _same_cells(a: Any, b: Any) -> bool:
    xa, xb = (np.asarray(s["cells"].obsm["spatial"]) for s in (a, b))
    return xa.shape == xb.shape and bool(np.allclose(xa, xb))


def run(quick: bool) -> dict[str, Any]:
    """Leave-one-section-out on the windows, bitro and ridge on crop and on tile embeddings."""
    from benchmarks.accuracy import BITRO_KW, METRICS, QUICK_BITRO_KW, fit_and_score

    import bitro as bt

    bt.settings.progress = False
    t0 = time.perf_counter()
    half = QUICK_WINDOW_HALF if quick else WINDOW_HALF
    sections = {
        mode: {s: cached_section(s, encoders=ENCODERS, mode=mode, window=half) for s in SECTIONS}
        for mode in MODES
    }
    names = list(SECTIONS)
    same = {s: _same_cells(sections["tile"][s], sections["crop"][s]) for s in names}
    if not all(same.values()):
        logger.warning(
            "crop_vs_tile: the two caches hold different cells for %s", [s for s, v in same.items() if not v]
        )
    genes = [
        g
        for g in bt.datasets.her2st_genes()
        if all(g in sec["spots"].var_names for by_mode in sections.values() for sec in by_mode.values())
    ]
    kw = dict(QUICK_BITRO_KW if quick else BITRO_KW)
    folds = [0] if quick else list(range(len(names)))
    rows, speed = [], []
    for f in folds:
        for mode in MODES:
            for model in MODELS:
                cfg = {
                    "name": f"{model} ({mode})",
                    "model": model,
                    "target": "library_size",
                    "group": "crop_vs_tile",
                }
                fold_rows, record = fit_and_score(cfg, f, names[f], sections[mode], genes, kw)
                rows += [{**r, "mode": mode, "model": model} for r in fold_rows]
                speed.append({**record, "mode": mode, "model": model})
                logger.info(
                    "crop_vs_tile: fold %s %s: fit %.0f s", names[f], cfg["name"], record["fit_seconds"]
                )
    embed = []
    for mode in MODES:
        for s in names:
            info = cache_info(s, encoders=ENCODERS, mode=mode, window=half)
            step = info.get("steps", {}).get(f"embed_{ENCODERS[0]}_{mode}", {})
            embed.append(
                {
                    "section": s,
                    "mode": mode,
                    "n_cells": int(sections[mode][s]["cells"].n_obs),
                    "n_spots": int(sections[mode][s]["spots"].n_obs),
                    "seconds": step.get("seconds"),
                    "cpu_seconds": step.get("cpu_seconds"),
                }
            )
    res = {
        "name": "crop_vs_tile",
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seed": SEED}),
        "protocol": {
            "sections": names,
            "window_half_px": half,
            "encoder": ENCODERS[0],
            "folds": [names[f] for f in folds],
            "n_genes": len(genes),
            "bitro_fit_kwargs": kw,
            "metrics": list(METRICS),
            "same_cells": same,
        },
        "rows": rows,
        "speed": speed,
        "embedding": embed,
    }
    res["markdown"] = markdown(res)
    return res


def markdown(res: dict[str, Any]) -> str:
    """Scores per embedding mode and model, embedding cost per mode, and a reading."""
    import pandas as pd

    p = res["protocol"]
    df = pd.DataFrame(res["rows"])
    table, means = [], {}
    for model in MODELS:
        for mode in MODES:
            sub = df[(df["model"] == model) & (df["mode"] == mode)]
            if sub.empty:
                continue
            vals = []
            for metric, scale in (
                ("pcc_gene", "library_size"),
                ("pcc_gene_top50_var", "library_size"),
                ("pcc_gene", "raw"),
            ):
                v = sub[(sub.metric == metric) & (sub.scale == scale)].groupby("test")["value"].mean()
                vals.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}")
                means[(model, mode, metric, scale)] = float(v.mean())
            table.append([model, mode, *vals, sub["test"].nunique()])
    emb = pd.DataFrame(res["embedding"])
    cost = []
    for mode in MODES:
        e = emb[emb["mode"] == mode]
        secs = e["seconds"].dropna()
        cells = int(e["n_cells"].sum())
        cost.append(
            [mode, cells, float(secs.sum()) if len(secs) else None, cells / secs.sum() if len(secs) else None]
        )
    same = all(p["same_cells"].values())
    lines = [
        "## Crop vs tile cell embeddings (ablation)",
        "",
        f"**Protocol.** Central {2 * p['window_half_px']} px windows of HER2ST {', '.join(p['sections'])} (crop mode "
        "costs hours per whole section on the CPU). Stain normalisation and watershed segmentation as in the "
        f"accuracy benchmark; the nuclei are then embedded with {p['encoder']} in *crop* mode (a 33 µm window "
        "per nucleus, resized to the encoder input — the paper's way) and in *tile* mode (one pass per 1,024 px "
        "tile, the feature map pooled under each nucleus). "
        + (
            "Both modes embed identical nuclei. "
            if same
            else "**The two caches hold different nuclei for some sections.** "
        )
        + f"Leave one window out (held out: {', '.join(p['folds'])}); bitro (normalised target, accuracy settings) and "
        "the ridge probe on each embedding. Values are mean ± sd over held-out windows.",
        "",
        md_table(
            ["model", "embedding", "PCC_gene norm", "PCC_gene top50 norm", "PCC_gene raw", "folds"], table
        ),
        "",
        "Embedding cost (all windows, measured when the cache was built; one process):",
        "",
        md_table(["mode", "cells", "seconds", "cells/s"], cost, digits=1),
        "",
    ]
    b_crop = means.get(("bitro", "crop", "pcc_gene", "library_size"))
    b_tile = means.get(("bitro", "tile", "pcc_gene", "library_size"))
    if b_crop is not None and b_tile is not None:
        if abs(b_crop - b_tile) < 0.01:
            verdict = "tile embeddings score the same as crop embeddings (within 0.01)"
        elif b_tile > b_crop:
            verdict = "tile embeddings score higher than crop embeddings"
        else:
            verdict = "crop embeddings score higher: tile embeddings do **not** match them"
        lines.append(
            f"**Reading.** For bitro on normalised PCC_gene, {verdict} ({b_tile:.3f} tile vs {b_crop:.3f} crop); "
            "tile mode is the default because it is far cheaper (table above)."
        )
        lines.append("")
    return "\n".join(lines)
