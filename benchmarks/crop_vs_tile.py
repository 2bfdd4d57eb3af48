"""Ablation: ``crop`` vs ``tile`` cell embeddings (EfficientNet-Lite0) on the same cells (issue 6).

Crop mode (the paper's: one 33 µm window per nucleus through the encoder) costs about fifty times
tile mode on the CPU (see the ``embedding`` benchmark), hours per whole HER2ST section. Only cells
inside spots enter a spot-level model's bags, so this ablation embeds just those (about a fifth of
the nuclei) in crop mode: it takes the whole-section cells of the accuracy benchmark's cache
(same stain normalisation and segmentation), keeps the cells assigned to a spot and embeds their
centroids again with crop mode on the stain-normalised image. Both arms then see identical cells:
*tile* = the cached tile-mode features of those cells, *crop* = the new ones. Leave one section out
over C2–C6 with bitro (normalised target, the accuracy benchmark's settings) and the ridge probe on
each embedding. Because cells outside spots are left out (they also inform the PCA and phenotype
fit in the main table), the tile numbers here differ a little from the main table.

Run: ``python -m benchmarks --only crop_vs_tile`` (part of ``--full``; the first run embeds the crop
features, about 6 min per section on one core, cached in ``benchmarks/cache``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from benchmarks._common import (
    CACHE_DIR,
    DATA_DIR,
    PREPROCESS,
    SEED,
    Steps,
    cache_info,
    cache_key,
    crop_window,
    load_tables,
    md_table,
    metadata,
    save_tables,
)

from bitro._logging import logger

ENCODER = "efficientnet_lite0"
MODES = ("tile", "crop")
MODELS = ("bitro", "ridge")
QUICK_MAX_CELLS = 300  # per section with --quick (crop mode is slow)


def _in_spot_tables(sdata: Any, cells: Any) -> Any:
    """A tables-only SpatialData with ``sdata``'s spots, the given cells table and its scale."""
    import spatialdata as sd

    out = sd.SpatialData(tables={"spots": sdata["spots"], "cells": cells})
    out.attrs.update(sdata.attrs)
    return out


def crop_section(section: str, base: Any, quick: bool) -> tuple[Any, dict[str, Any]]:
    """The in-spot cells of ``base`` re-embedded in crop mode (cached); returns tables and timing."""
    from benchmarks.accuracy import QUICK_WINDOW

    import bitro as bt
    from bitro import _keys as K

    path = CACHE_DIR / (cache_key(section, (ENCODER,), "crop_inspot", QUICK_MAX_CELLS if quick else None))
    if path.exists():
        return load_tables(path), json.loads((path / "attrs.json").read_text())["extra"]
    cells = base["cells"]
    keep = np.flatnonzero(cells.obs[K.SPOT_ID].notna().to_numpy())
    if quick:
        keep = keep[:QUICK_MAX_CELLS]
    sub = cells[keep].copy()
    del sub.obsm["X_bitro"]
    steps = Steps()
    with steps("load_and_stain_norm"):
        sdata = bt.datasets.her2st(section, data_dir=DATA_DIR)
        if quick:  # the quick run's cells come from the accuracy benchmark's windows
            sdata = crop_window(sdata, QUICK_WINDOW)
        bt.pp.normalize_stains(sdata, method=PREPROCESS["stain_method"], seed=SEED)
        sdata.tables["cells"] = sub
    with steps(f"embed_{ENCODER}_crop"):
        bt.pp.embed_cells(
            sdata,
            image_key="he_normalized",
            encoder=ENCODER,
            mode="crop",
            tile_size=PREPROCESS["tile_size"],
            crop_um=PREPROCESS["crop_um"],
            device="cpu",
            key_added="X_bitro",
            seed=SEED,
        )
    out = _in_spot_tables(base, sdata["cells"])
    extra = {"steps": steps.records, "n_cells": len(keep)}
    save_tables(out, path, extra=extra)
    return load_tables(path), extra


def _same_cells(a: Any, b: Any) -> bool:
    xa, xb = (np.asarray(s["cells"].obsm["spatial"]) for s in (a, b))
    return xa.shape == xb.shape and bool(np.allclose(xa, xb))


def run(quick: bool) -> dict[str, Any]:
    """Leave-one-section-out, bitro and ridge on crop and on tile embeddings of the in-spot cells."""
    from benchmarks.accuracy import BITRO_KW, METRICS, QUICK_BITRO_KW, fit_and_score, load_sections
    from benchmarks.accuracy import ENCODERS as ACC_ENCODERS

    import bitro as bt

    bt.settings.progress = False
    t0 = time.perf_counter()
    base = load_sections(quick)
    names = list(base)
    sections: dict[str, dict[str, Any]] = {"tile": {}, "crop": {}}
    crop_info = {}
    for s in names:
        crop, crop_info[s] = crop_section(s, base[s], quick)
        sections["crop"][s] = crop
        keep = base[s]["cells"].obs_names.get_indexer(crop["cells"].obs_names)
        sections["tile"][s] = _in_spot_tables(base[s], base[s]["cells"][keep].copy())
        logger.info("crop_vs_tile: %s: %d in-spot cells", s, crop["cells"].n_obs)
    same = {s: _same_cells(sections["tile"][s], sections["crop"][s]) for s in names}
    if not all(same.values()):
        logger.warning(
            "crop_vs_tile: the two arms hold different cells for %s", [s for s, v in same.items() if not v]
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
    for s in names:
        step = crop_info[s].get("steps", {}).get(f"embed_{ENCODER}_crop", {})
        tile_step = cache_info(s, encoders=ACC_ENCODERS, mode="tile", window=None).get("steps", {})
        embed.append(
            {
                "section": s,
                "n_cells_in_spots": int(sections["crop"][s]["cells"].n_obs),
                "n_cells_section": int(base[s]["cells"].n_obs),
                "n_spots": int(base[s]["spots"].n_obs),
                "crop_seconds": step.get("seconds"),
                "crop_cpu_seconds": step.get("cpu_seconds"),
                "tile_seconds_all_cells": tile_step.get(f"embed_{ENCODER}_tile", {}).get("seconds"),
            }
        )
    res = {
        "name": "crop_vs_tile",
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seed": SEED}),
        "protocol": {
            "sections": names,
            "cells": "in-spot cells only" + (f" (first {QUICK_MAX_CELLS} per section)" if quick else ""),
            "encoder": ENCODER,
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
    crop_s = emb["crop_seconds"].dropna()
    tile_s = emb["tile_seconds_all_cells"].dropna()
    n_in, n_all = int(emb["n_cells_in_spots"].sum()), int(emb["n_cells_section"].sum())
    cost = [
        ["crop (in-spot cells)", n_in, float(crop_s.sum()) if len(crop_s) else None,
         n_in / crop_s.sum() if len(crop_s) else None],
        ["tile (all cells of the sections)", n_all, float(tile_s.sum()) if len(tile_s) else None,
         n_all / tile_s.sum() if len(tile_s) else None],
    ]  # fmt: skip
    same = all(p["same_cells"].values())
    lines = [
        "## Crop vs tile cell embeddings (ablation)",
        "",
        f"**Protocol.** HER2ST {', '.join(p['sections'])}, whole sections, {p['cells']} ({n_in:,} of {n_all:,} "
        "nuclei; cells outside spots never enter a spot's bag, and crop mode costs hours per whole section "
        "on the CPU). The accuracy benchmark's cached cells (Macenko, watershed) are embedded with "
        f"{p['encoder']} in *crop* mode (a 33 µm window per nucleus, resized to the encoder input — the "
        "paper's way) and compared with their cached *tile*-mode features (one pass per 1,024 px tile, the "
        "feature map pooled under each nucleus). "
        + (
            "Both arms hold identical cells. "
            if same
            else "**The two arms hold different cells for some sections.** "
        )
        + f"Leave one section out (held out: {', '.join(p['folds'])}); bitro (normalised target, accuracy "
        "settings) and the ridge probe on each embedding; mean ± sd over held-out sections. Without the "
        "out-of-spot cells the PCA and phenotypes are fitted on fewer cells, so the tile row differs a little "
        "from the main table.",
        "",
        md_table(
            ["model", "embedding", "PCC_gene norm", "PCC_gene top50 norm", "PCC_gene raw", "folds"], table
        ),
        "",
        "Embedding cost (one process, measured when the caches were built):",
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
        sub = df[(df["model"] == "bitro") & (df["metric"] == "pcc_gene") & (df["scale"] == "library_size")]
        per = sub.pivot_table(index="test", columns="mode", values="value")
        wins = int((per["crop"] > per["tile"]).sum()) if {"crop", "tile"} <= set(per.columns) else 0
        lines.append(
            f"**Reading.** For bitro on normalised PCC_gene, {verdict} ({b_tile:.3f} tile vs {b_crop:.3f} crop; "
            f"crop is higher on {wins} of {len(per)} held-out sections). Tile mode stays the default because it "
            "is about ten times cheaper per cell (table above); use `mode='crop'` when accuracy matters more "
            "than time."
        )
        lines.append("")
    return "\n".join(lines)
