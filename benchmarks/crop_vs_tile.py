"""Cell features side by side (issues 6 and 14): tile vs crop embeddings, each with and without context.

Crop mode (the paper's: one 33 µm window per nucleus through the encoder) costs about fifty times
tile mode on the CPU (see the ``embedding`` benchmark), hours per whole HER2ST section. Only cells
inside spots enter a spot-level model's bags, so this benchmark embeds just those (about a fifth of
the nuclei): it takes the whole-section cells of the accuracy benchmark's cache (same stain
normalisation and segmentation), keeps the cells assigned to a spot and embeds their centroids
again on the stain-normalised image. Four arms, identical cells:

- *tile*: the cached tile-mode features (one pass per 1,024 px tile, the map pooled over the
  33 µm window of each nucleus);
- *tile + context*: tile mode with ``context_um`` (the same map also pooled over a
  ``CONTEXT_UM`` window around each nucleus, appended);
- *crop*: crop mode;
- *tile ×2 + context*: tile mode with context at about twice the magnification (``tile_mpp=TILE_MPP``,
  0.345 µm/px: each tile upsampled before the forward pass, so a nucleus covers about four times as
  many cells of the feature map);
- *crop + context*: the crop features with the context block of the *tile + context* run appended
  (what ``embed_cells(mode="crop", context_um=...)`` computes: the context comes from a tile pass).

Leave one section out over C2–C6 with bitro (normalised target, the accuracy benchmark's settings,
seeds ``SEEDS``) and the ridge probe on each embedding. Because cells outside spots are left out
(they also inform the PCA and phenotype fit in the main table), the tile numbers here differ a
little from the main table.

Run: ``python -m benchmarks --only crop_vs_tile`` (part of ``--full``; the first run embeds the crop
features, about 4 min per section on one core, cached in ``benchmarks/cache``).
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
ZOOMED = "tile ×2 + context"
#: The arm that is bitro's default embedding (``bt.pp.embed_cells``: tile mode, context "auto").
DEFAULT_ARM = "tile + context"
MODES = ("tile", "tile + context", ZOOMED, "crop", "crop + context")
#: µm per pixel of the zoomed tile arm's pass (``bt.pp.embed_cells(tile_mpp=...)``): one value for every
#: section (fit refuses features of different magnifications), about half HER2ST's 0.69 µm/px, so about
#: four times the compute of the native pass.
TILE_MPP = 0.345
MODELS = ("bitro", "ridge")
#: Side (µm) of the neighbourhood window of the context arms (about two HER2ST spot diameters).
CONTEXT_UM = 200.0
SEEDS = (0, 1, 2)
QUICK_MAX_CELLS = 300  # per section with --quick (crop mode is slow)


def _in_spot_tables(sdata: Any, cells: Any) -> Any:
    """A tables-only SpatialData with ``sdata``'s spots, the given cells table and its scale."""
    import spatialdata as sd

    out = sd.SpatialData(tables={"spots": sdata["spots"], "cells": cells})
    out.attrs.update(sdata.attrs)
    return out


def embed_section(section: str, base: Any, quick: bool, arm: str) -> tuple[Any, dict[str, Any]]:
    """The in-spot cells of ``base`` embedded again (cached): ``arm`` ``"crop"``, ``"context"`` or ``"context_x2"``.

    ``"crop"``: crop mode, 33 µm windows. ``"context"``: tile mode with ``context_um=CONTEXT_UM``;
    ``"context_x2"``: the same with the tile pass at ``TILE_MPP`` µm per pixel.
    Returns the tables and the timing of the embedding.
    """
    from benchmarks.accuracy import QUICK_WINDOW

    import bitro as bt
    from bitro import _keys as K

    tag = {
        "crop": "crop_inspot",
        "context": f"tile_context{CONTEXT_UM:g}_inspot",
        "context_x2": f"tile_mpp{TILE_MPP:g}_context{CONTEXT_UM:g}_inspot",
    }[arm]
    path = CACHE_DIR / (cache_key(section, (ENCODER,), tag, QUICK_MAX_CELLS if quick else None))
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
    mode = "crop" if arm == "crop" else "tile"
    with steps(f"embed_{ENCODER}_{arm}"):
        bt.pp.embed_cells(
            sdata,
            image_key="he_normalized",
            encoder=ENCODER,
            mode=mode,
            tile_size=PREPROCESS["tile_size"],
            crop_um=PREPROCESS["crop_um"],
            context_um=None if arm == "crop" else CONTEXT_UM,
            tile_mpp=TILE_MPP if arm == "context_x2" else None,
            device="cpu",
            key_added="X_bitro",
            seed=SEED,
        )
    out = _in_spot_tables(base, sdata["cells"])
    extra = {"steps": steps.records, "n_cells": len(keep)}
    save_tables(out, path, extra=extra)
    return load_tables(path), extra


def _with_features(sdata: Any, x: np.ndarray | None, width: int | None = None) -> Any:
    """``sdata`` with ``cells.obsm["X_bitro"]`` replaced by ``x`` (``None``: its own first ``width`` columns)."""
    cells = sdata["cells"].copy()
    if x is None:
        x = np.asarray(cells.obsm["X_bitro"])[:, :width]
        info = dict(cells.uns.get("X_bitro", {}))
        info.pop("context_um", None), info.pop("blocks", None)
        cells.uns["X_bitro"] = info
    cells.obsm["X_bitro"] = np.asarray(x, dtype=np.float32)
    return _in_spot_tables(sdata, cells)


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
    sections: dict[str, dict[str, Any]] = {m: {} for m in MODES}
    info: dict[str, dict[str, Any]] = {"crop": {}, "context": {}, "context_x2": {}}
    for s in names:
        crop, info["crop"][s] = embed_section(s, base[s], quick, "crop")
        ctx, info["context"][s] = embed_section(s, base[s], quick, "context")
        sections[ZOOMED][s], info["context_x2"][s] = embed_section(s, base[s], quick, "context_x2")
        keep = base[s]["cells"].obs_names.get_indexer(crop["cells"].obs_names)
        x_ctx = np.asarray(ctx["cells"].obsm["X_bitro"])
        width = np.asarray(crop["cells"].obsm["X_bitro"]).shape[1]
        # the cached features' nucleus block (the cache may hold context windows after it)
        tile = _with_features(_in_spot_tables(base[s], base[s]["cells"][keep].copy()), None, width)
        sections["tile"][s], sections["crop"][s], sections["tile + context"][s] = tile, crop, ctx
        sections["crop + context"][s] = _with_features(
            crop, np.concatenate([crop["cells"].obsm["X_bitro"], x_ctx[:, width:]], axis=1)
        )
        logger.info("crop_vs_tile: %s: %d in-spot cells", s, crop["cells"].n_obs)
    same = {s: all(_same_cells(sections["tile"][s], sections[m][s]) for m in MODES) for s in names}
    if not all(same.values()):
        logger.warning(
            "crop_vs_tile: the arms hold different cells for %s", [s for s, v in same.items() if not v]
        )
    genes = [
        g
        for g in bt.datasets.her2st_genes()
        if all(g in sec["spots"].var_names for by_mode in sections.values() for sec in by_mode.values())
    ]
    kw = dict(QUICK_BITRO_KW if quick else BITRO_KW)
    folds = [0] if quick else list(range(len(names)))
    seeds = SEEDS[:1] if quick else SEEDS
    rows, speed = [], []
    for f in folds:
        for mode in MODES:
            for model in MODELS:
                for seed in seeds if model == "bitro" else seeds[:1]:
                    cfg = {
                        "name": f"{model} ({mode})",
                        "model": model,
                        "target": "library_size",
                        "group": "crop_vs_tile",
                        "seed": seed,
                    }
                    fold_rows, record = fit_and_score(cfg, f, names[f], sections[mode], genes, kw)
                    rows += [{**r, "mode": mode, "model": model, "seed": seed} for r in fold_rows]
                    speed.append({**record, "mode": mode, "model": model, "seed": seed})
                    logger.info(
                        "crop_vs_tile: fold %s %s seed %d: fit %.0f s",
                        names[f], cfg["name"], seed, record["fit_seconds"],
                    )  # fmt: skip
    embed = []
    for s in names:
        crop_step = info["crop"][s].get("steps", {}).get(f"embed_{ENCODER}_crop", {})
        ctx_step = info["context"][s].get("steps", {}).get(f"embed_{ENCODER}_context", {})
        zoom_step = info["context_x2"][s].get("steps", {}).get(f"embed_{ENCODER}_context_x2", {})
        tile_step = cache_info(s, encoders=ACC_ENCODERS, mode="tile", window=None).get("steps", {})
        embed.append(
            {
                "section": s,
                "n_cells_in_spots": int(sections["crop"][s]["cells"].n_obs),
                "n_cells_section": int(base[s]["cells"].n_obs),
                "n_spots": int(base[s]["spots"].n_obs),
                "crop_seconds": crop_step.get("seconds"),
                "crop_cpu_seconds": crop_step.get("cpu_seconds"),
                "context_seconds": ctx_step.get("seconds"),
                "context_x2_seconds": zoom_step.get("seconds"),
                "tile_seconds_all_cells": tile_step.get(f"embed_{ENCODER}_tile", {}).get("seconds"),
            }
        )
    res = {
        "name": "crop_vs_tile",
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"bitro": list(seeds)}),
        "protocol": {
            "sections": names,
            "cells": "in-spot cells only" + (f" (first {QUICK_MAX_CELLS} per section)" if quick else ""),
            "encoder": ENCODER,
            "context_um": CONTEXT_UM,
            "tile_mpp": TILE_MPP,
            "cache_context_um": list(PREPROCESS["context_um"]),
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
    """Scores per embedding and model (spread over sections and seeds), embedding cost, and a reading."""
    import pandas as pd

    p = res["protocol"]
    df = pd.DataFrame(res["rows"])
    if "seed" not in df:
        df["seed"] = 0
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
            norm = sub[(sub.metric == "pcc_gene") & (sub.scale == "library_size")]
            by_seed = norm.groupby("seed")["value"].mean()
            seed_sd = f"{by_seed.std(ddof=1):.3f}" if len(by_seed) > 1 else "–"
            table.append([model, mode, *vals, seed_sd, f"{sub['test'].nunique()} × {sub['seed'].nunique()}"])
    emb = pd.DataFrame(res["embedding"])
    n_in, n_all = int(emb["n_cells_in_spots"].sum()), int(emb["n_cells_section"].sum())

    def rate(col: str, n: int) -> list[Any]:
        s = emb[col].dropna() if col in emb else pd.Series(dtype=float)
        return [float(s.sum()) if len(s) else None, n / s.sum() if len(s) else None]

    cost = [
        ["crop (in-spot cells)", n_in, *rate("crop_seconds", n_in)],
        [
            f"tile + context {p.get('context_um', 0):g} µm (in-spot cells)",
            n_in,
            *rate("context_seconds", n_in),
        ],
        [
            f"tile at {p.get('tile_mpp', TILE_MPP):g} µm/px + context {p.get('context_um', 0):g} µm (in-spot cells)",
            n_in,
            *rate("context_x2_seconds", n_in),
        ],
        [
            f"{_cache_label(p)} (all cells of the sections, cache build)",
            n_all,
            *rate("tile_seconds_all_cells", n_all),
        ],
    ]
    same = all(p["same_cells"].values())
    lines = [
        "## Cell features side by side: tile, crop, with and without context",
        "",
        f"**Protocol.** HER2ST {', '.join(p['sections'])}, whole sections, {p['cells']} ({n_in:,} of {n_all:,} "
        "nuclei; cells outside spots never enter a spot's bag, and crop mode costs hours per whole section "
        "on the CPU). The accuracy benchmark's cached cells (Macenko, watershed) embedded with "
        f"{p['encoder']}: *tile* = one pass per 1,024 px tile, the map pooled over each nucleus's 33 µm window "
        "(the cached features); *crop* = a 33 µm window per nucleus resized to the encoder input (the paper's "
        f"way); *+ context* = the tile map also pooled over a {p.get('context_um', 0):g} µm window around each "
        "nucleus and appended (`bt.pp.embed_cells(context_um=...)`; for crop + context the context block of "
        "the tile run is appended to the crop features, which is what crop mode with `context_um` computes); "
        f"*tile ×2* = the tile pass at {p.get('tile_mpp', TILE_MPP):g} µm per pixel, about twice the sections' "
        "magnification (`bt.pp.embed_cells(tile_mpp=...)`: tiles upsampled before the forward pass). "
        + (
            "All arms hold identical cells. "
            if same
            else "**The arms hold different cells for some sections.** "
        )
        + f"Leave one section out (held out: {', '.join(p['folds'])}); bitro (normalised target, accuracy "
        f"settings, seeds {', '.join(str(s) for s in res['meta']['seeds'].get('bitro', [0]))}) and the ridge "
        "probe on each embedding. Values: mean ± sd over held-out sections (seeds averaged first); *seed sd* = "
        "sd over seeds of the mean over sections. Without the out-of-spot cells the PCA and phenotypes are "
        "fitted on fewer cells, so the tile row differs a little from the main table.",
        "",
        md_table(
            [
                "model",
                "embedding",
                "PCC_gene norm",
                "PCC_gene top50 norm",
                "PCC_gene raw",
                "seed sd",
                "sections × seeds",
            ],
            table,
        ),
        "",
        "Embedding cost (one process, measured when the caches were built; the context run only visits the "
        "tiles holding in-spot cells):",
        "",
        md_table(["embedding", "cells", "seconds", "cells/s"], cost, digits=1),
        "",
    ]
    lines += _reading(df, means, cost)
    return "\n".join(lines)


def _cache_label(p: dict[str, Any]) -> str:
    """The accuracy cache's embedding: tile, with the context windows the run recorded."""
    ctx = p.get("cache_context_um") or []
    return "tile" + "".join(f" + context {c:g} µm" for c in ctx)


def _reading(df: Any, means: dict[tuple, float], cost: list[list[Any]]) -> list[str]:
    """Plain statements: each arm against crop, and the issue-14 targets."""
    get = {m: means.get(("bitro", m, "pcc_gene", "library_size")) for m in MODES}
    if get["crop"] is None or get["tile"] is None:
        return []
    sub = df[(df["model"] == "bitro") & (df["metric"] == "pcc_gene") & (df["scale"] == "library_size")]
    per = sub.groupby(["test", "mode"])["value"].mean().unstack()
    out = ["**Reading.**", ""]
    for mode in ("tile", "tile + context", ZOOMED, "crop + context"):
        if get.get(mode) is None:
            continue
        ratio = get[mode] / get["crop"]
        wins = int((per[mode] > per["crop"]).sum())
        verb = "reaches" if ratio >= 0.95 else "does **not** reach"
        out.append(
            f"- bitro on *{mode}*: {get[mode]:.3f} normalised PCC_gene, {ratio:.2f} × crop's {get['crop']:.3f} "
            f"(higher than crop on {wins} of {len(per)} held-out sections); it {verb} the issue's 0.95 × crop."
        )
    like = get.get("crop + context")
    for mode in ("tile + context", ZOOMED):  # like with like: both with the same context block
        if get.get(mode) is not None and like:
            ratio = get[mode] / like
            wins = int((per[mode] > per["crop + context"]).sum())
            out.append(
                f"- Like with like, *{mode}* against *crop + context*: {ratio:.2f} × ({get[mode]:.3f} vs "
                f"{like:.3f}; higher on {wins} of {len(per)} sections); "
                + ("it reaches 0.95 ×." if ratio >= 0.95 else "it does **not** reach 0.95 ×.")
            )
    crop_rate, ctx_rate, zoom_rate, all_rate = cost[0][3], cost[1][3], cost[2][3], cost[3][3]
    if crop_rate and ctx_rate:
        whole = (
            f"; on whole sections (every nucleus, dense tiles) {cost[3][0]} embeds {all_rate:.0f} cells/s, "
            f"{all_rate / crop_rate:.1f} × crop"
            if all_rate
            else ""
        )
        zoom = (
            f"; {ZOOMED} embeds {zoom_rate:.0f} cells/s ({zoom_rate / crop_rate:.1f} × crop)"
            if zoom_rate
            else ""
        )
        out.append(
            f"- Speed: tile + context embeds {ctx_rate:.0f} cells/s on the in-spot cells against crop's "
            f"{crop_rate:.0f} ({ctx_rate / crop_rate:.1f} ×; the issue asks ≥ 10 ×){zoom}{whole}."
        )
    best = max((v, m) for m, v in get.items() if v is not None)
    default = get.get(DEFAULT_ARM)
    out.append(
        f"- Best arm: *{best[1]}* at {best[0]:.3f}"
        + ("" if best[0] >= 0.18 else " (below 0.18)")
        + (
            f"; one bitro model on the default features (*{DEFAULT_ARM}*) reaches {default:.3f}: "
            + (
                "the issue's target of 0.18 normalised PCC_gene with the default features is met by one model."
                if default >= 0.18
                else "below the issue's 0.18 for one model (the README's path, three seeds on the default "
                "features, is measured in the \"Seed ensembles\" section)."
            )
            if default is not None
            else "."
        )
    )
    out.append("")
    return out
