"""Time and peak memory against slide size (issues 6 and 7), in two parts.

**Preprocessing + prediction from a disk-backed slide.** Synthetic slides of about 10k / 30k / 100k cells
(``synthetic_tissue(size=...)``, 0.5 µm/px, Visium-like spots; about 3,000 cells per 2,000 × 2,000 px, hence
3,600 / 6,300 / 11,500 px) are generated once per size in a separate process and written as a zarr
SpatialData (image ``he`` + spots) under ``benchmarks/cache/`` (reused by later runs; not measured). A fresh
worker then opens the zarr lazily — the image is a disk-backed dask array as for a real slide — and runs
watershed segmentation → ``morphology`` embedding → ``assign_cells`` → ``cell_graph`` → ``predict`` with a
small saved bitro model (hidden 32, 100 genes), recording wall time and peak RSS per step (sampled) and the
worker's ``ru_maxrss``.

**Prediction only.** Cell tables of 100k / 300k / 1M cells without an image: uniform random centroids at
the synthetic slides' cell density, morphology features resampled from the training slides' cells, a
Visium hex grid of spots over the same area. A fresh worker per size runs ``assign_cells`` →
``cell_graph`` → ``predict`` (per-cell memory of the model side; the outputs themselves are two
cells × genes float32 arrays).

Growth is reported as the ratio to the smallest size. ``--quick``: 1,500 / 3,000 px and 20k / 60k cells.
Run: ``python -m benchmarks scaling`` (or ``python -c "from benchmarks import scaling; scaling.run(False)"``);
``BITRO_SCALING_PARTS=pre`` or ``=pred`` runs one part only, ``BITRO_SCALING_SIZES`` / ``BITRO_SCALING_CELLS``
(comma-separated) override the sizes; rows of sizes not run are kept from the previous result file (same
mode), so sizes can be added one at a time. Slides above 6,300 px are generated as a mosaic of blocks
(seeds 0, 1, …) written into zarr one block at a time, so the generator never holds the whole slide.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    CACHE_DIR,
    RESULTS_DIR,
    SEED,
    Steps,
    max_rss_mb,
    md_table,
    metadata,
    run_worker,
    write_result,
)

SIZES = (3600, 6300, 11500)
QUICK_SIZES = (1500, 3000)
N_CELLS = (100_000, 300_000, 1_000_000)
QUICK_N_CELLS = (20_000, 60_000)
MODEL_DIR = CACHE_DIR / "scaling_model"
FEATURES = CACHE_DIR / "scaling_features.npy"
N_GENES = 100
MPP = 0.5
#: cells per px² of the synthetic slides (about 3,000 per 2,000 × 2,000 px; measured 11,039 in 3,600²)
CELL_DENSITY = 11039 / 3600**2
#: Visium geometry in px at 0.5 µm/px: 55 µm spots on a 100 µm hexagonal grid
SPOT_DIAMETER_UM, SPOT_SPACING_UM = 55.0, 100.0
#: largest slide (px) generated in one piece; larger ones are a mosaic of blocks (bounded generator memory)
MAX_BLOCK = 6300


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def _train_model() -> None:
    """Train and save the small model once; also keep its training cells' features for part 2."""
    import numpy as np

    import bitro as bt

    if MODEL_DIR.exists() and FEATURES.exists():
        return
    slides = bt.datasets.synthetic_tissue(2, size=1200, n_genes=N_GENES, technology="visium", seed=SEED)
    for s in slides:
        bt.pp.segment_cells(s, tissue_key=None)
        bt.pp.embed_cells(s, encoder="morphology", seed=SEED)
        bt.pp.assign_cells(s)
    if not MODEL_DIR.exists():
        model = bt.tl.fit(
            slides,
            genes=list(slides[0]["spots"].var_names),
            max_epochs=2,
            lr=1e-3,
            n_components=16,
            config={"hidden_dim": 32, "ffn_dim": 64, "readout_hidden": 32},
            seed=SEED,
            device="cpu",
        )
        model.save(MODEL_DIR)
    feats = np.concatenate([np.asarray(s["cells"].obsm["X_bitro"], dtype=np.float32) for s in slides])
    np.save(FEATURES, feats)


# --------------------------------------------------------------------------- part 1: disk-backed slides
def _slide_path(size: int) -> Path:
    return CACHE_DIR / f"scaling_slide_{size}_seed{SEED}.zarr"


def _blocks(size: int) -> int:
    """Blocks per side: slides larger than ``MAX_BLOCK`` px are a mosaic of independently generated blocks."""
    return max(1, -(-size // MAX_BLOCK))


def _generate(size: int) -> tuple[Any, dict[str, Any]]:
    """The slim slide (image + spots) of ``size`` px and its facts; a mosaic above ``MAX_BLOCK`` px.

    A mosaic's blocks (seeds ``SEED``, ``SEED + 1``, …) are generated one at a time and written into a
    zarr array on disk, so the generator holds one block in memory, not the whole slide.
    """
    import anndata as ad
    import dask.array as da
    import numpy as np
    import pandas as pd
    import spatialdata as sd
    import zarr
    from scipy import sparse

    import bitro as bt
    from bitro.io._build import circles_element, get_image, image_element, set_scale, table_element

    n = _blocks(size)
    if n == 1:
        full = bt.datasets.synthetic_tissue(size=size, n_genes=N_GENES, technology="visium", seed=SEED)
        slim = sd.SpatialData(
            images={"he": full.images["he"]},
            shapes={"spots_shapes": full.shapes["spots_shapes"]},
            tables={"spots": full.tables["spots"]},
        )
        slim.attrs.update(full.attrs)
        return slim, {"n_cells_truth": int(full["cells_truth"].n_obs), "blocks": 1}
    block = -(-size // n)
    raw = zarr.open_array(
        str(_slide_path(size).with_name(f"scaling_raw_{size}.zarr")),
        mode="w",
        shape=(3, block * n, block * n),
        chunks=(3, 1024, 1024),
        dtype="uint8",
    )
    xy, ids, n_cells, var, attrs = [], [], 0, None, None
    for i in range(n * n):
        y0, x0 = (i // n) * block, (i % n) * block
        part = bt.datasets.synthetic_tissue(size=block, n_genes=N_GENES, technology="visium", seed=SEED + i)
        raw[:, y0 : y0 + block, x0 : x0 + block] = np.asarray(get_image(part, "he").data)
        spots = part.tables["spots"]
        xy.append(np.asarray(spots.obsm["spatial"], dtype=np.float64) + np.array([x0, y0]))
        ids += [f"b{i}_{name}" for name in spots.obs_names]
        n_cells += int(part["cells_truth"].n_obs)
        var = spots.var[[]] if var is None else var
        attrs = attrs or dict(part.attrs)
        radius = float(part.shapes["spots_shapes"]["radius"].iloc[0])
        del part, spots
    xy_all = np.concatenate(xy)
    spots = ad.AnnData(
        X=sparse.csr_matrix((len(ids), len(var)), dtype=np.float32),
        obs=pd.DataFrame(index=pd.Index(ids, dtype=str)),
        var=var,
    )
    spots.obsm["spatial"] = xy_all
    slim = sd.SpatialData(
        images={"he": image_element(da.from_zarr(raw), chunks=1024)},
        shapes={"spots_shapes": circles_element(xy_all, radius, ids)},
        tables={"spots": table_element(spots, region="spots_shapes")},
    )
    set_scale(slim, **attrs["bitro_scale"])
    return slim, {"n_cells_truth": n_cells, "blocks": n * n, "block_px": block}


def synthesize(size: int) -> dict[str, Any]:
    """Generate one slide and write image + spots as zarr (run once per size, in its own process)."""
    path = _slide_path(size)
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    slim, facts = _generate(size)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    slim.write(tmp)
    tmp.rename(path)
    raw = path.with_name(f"scaling_raw_{size}.zarr")
    if raw.exists():
        shutil.rmtree(raw)
    info = {
        "size_px": size,
        **facts,
        "n_spots": int(slim["spots"].n_obs),
        "generate_seconds": round(time.perf_counter() - t0, 1),
        "generate_max_rss_mb": round(max_rss_mb(), 1),
        "zarr_mb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1),
        "attrs": dict(slim.attrs),
    }
    info_path.write_text(json.dumps(info, default=str))
    return info


def worker(size: int) -> dict[str, Any]:
    """Open the cached slide lazily and run the chain; return per-step records."""
    import spatialdata as sd

    import bitro as bt
    from bitro.io._build import get_image
    from bitro.tl._model import BiTroModel

    _threads()
    bt.settings.progress = False
    info = json.loads(_slide_path(size).with_suffix(".json").read_text())
    steps = Steps()
    with steps("open (lazy zarr)"):
        sdata = sd.read_zarr(_slide_path(size))
        if "bitro_scale" not in sdata.attrs:  # older spatialdata writers drop attrs
            sdata.attrs.update(info["attrs"])
        model = BiTroModel.load(MODEL_DIR)
    lazy = type(get_image(sdata, "he").data).__module__.startswith("dask")
    with steps("segmentation"):
        bt.pp.segment_cells(sdata, tissue_key=None, seed=SEED)
    with steps("embed_morphology"):
        bt.pp.embed_cells(sdata, encoder="morphology", seed=SEED)
    with steps("assign_cells"):
        bt.pp.assign_cells(sdata)
    with steps("cell_graph"):
        bt.pp.cell_graph(sdata)
    with steps("predict"):
        bt.tl.predict(model, sdata, device="cpu")
    return {
        "size_px": size,
        "n_cells_truth": info["n_cells_truth"],
        "n_cells_segmented": int(sdata["cells"].n_obs),
        "n_spots": int(sdata["spots"].n_obs),
        "image_lazy": lazy,
        "blocks": info.get("blocks", 1),
        "generate_seconds": info["generate_seconds"],
        "generate_max_rss_mb": info["generate_max_rss_mb"],
        "zarr_mb": info["zarr_mb"],
        "steps": steps.records,
        "pipeline_seconds": steps.total_seconds(),
        "pipeline_peak_rss_mb": max(r["peak_rss_mb"] for r in steps.records.values()),
        "worker_max_rss_mb": round(max_rss_mb(), 1),
    }


# --------------------------------------------------------------------------- part 2: prediction only
def _cell_tables(n_cells: int, genes: list[str]) -> Any:
    """Tables-only slide: ``n_cells`` uniform random cells with resampled features, Visium spots."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import spatialdata as sd
    from scipy import sparse

    from bitro.datasets._synthetic import _spot_grid
    from bitro.io._build import circles_element, set_scale, table_element

    rng = np.random.default_rng(SEED)
    side = int(np.ceil(np.sqrt(n_cells / CELL_DENSITY)))
    radius_px = SPOT_DIAMETER_UM / 2 / MPP
    spot_xy, spot_ids = _spot_grid(side, side, radius_px, SPOT_SPACING_UM / MPP, "hex")
    spots = ad.AnnData(
        X=sparse.csr_matrix((len(spot_ids), len(genes)), dtype=np.float32),
        obs=pd.DataFrame(index=pd.Index(spot_ids, dtype=str)),
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
    )
    spots.obsm["spatial"] = spot_xy.astype(np.float64)
    pool = np.load(FEATURES)
    cells = ad.AnnData(obs=pd.DataFrame(index=pd.Index([f"cell_{i}" for i in range(n_cells)], dtype=str)))
    cells.obsm["spatial"] = (rng.random((n_cells, 2)) * (side - 1)).astype(np.float32)
    cells.obsm["X_bitro"] = pool[rng.integers(0, len(pool), n_cells)]
    cells.uns["X_bitro"] = {"encoder": "morphology", "mode": "tile"}
    out = sd.SpatialData(
        shapes={"spots_shapes": circles_element(spot_xy, radius_px, spot_ids)},
        tables={"spots": table_element(spots, region="spots_shapes"), "cells": cells},
    )
    set_scale(
        out,
        mpp=MPP,
        spot_diameter_um=SPOT_DIAMETER_UM,
        spot_spacing_um=SPOT_SPACING_UM,
        technology="visium",
        sample_id=f"cells_{n_cells}",
    )
    return out, side


def predict_worker(n_cells: int) -> dict[str, Any]:
    """Build a tables-only slide of ``n_cells`` cells (not measured), then assign → graph → predict."""
    import bitro as bt
    from bitro.tl._model import BiTroModel

    _threads()
    bt.settings.progress = False
    model = BiTroModel.load(MODEL_DIR)
    steps = Steps()
    with steps("build tables (not part of the pipeline)"):
        sdata, side = _cell_tables(n_cells, list(model.genes))
    with steps("assign_cells"):
        bt.pp.assign_cells(sdata)
    with steps("cell_graph"):
        bt.pp.cell_graph(sdata)
    with steps("predict"):
        bt.tl.predict(model, sdata, device="cpu")
    cells = sdata["cells"]
    pipe = [k for k in steps.records if not k.startswith("build")]
    return {
        "n_cells": n_cells,
        "side_px": side,
        "n_spots": int(sdata["spots"].n_obs),
        "n_cells_in_spots": int(cells.obs["bitro_in_bag"].sum()),
        "n_genes": len(model.genes),
        "output_mb": round((cells.layers["bitro"].nbytes + cells.obsm["X_bitro_expr"].nbytes) / 1e6, 1),
        "steps": steps.records,
        "tables_rss_mb": steps.records["build tables (not part of the pipeline)"]["peak_rss_mb"],
        "pipeline_seconds": round(sum(steps.records[k]["seconds"] for k in pipe), 2),
        "pipeline_peak_rss_mb": max(steps.records[k]["peak_rss_mb"] for k in pipe),
        "worker_max_rss_mb": round(max_rss_mb(), 1),
    }


# --------------------------------------------------------------------------- driver
def _env_sizes(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = os.environ.get(name)
    return tuple(int(v) for v in raw.split(",")) if raw else default


def run(quick: bool) -> dict[str, Any]:
    """Train the small model, then run every size of both parts in its own subprocess."""
    import bitro as bt

    bt.settings.progress = False
    t0 = time.perf_counter()
    _train_model()
    parts = os.environ.get("BITRO_SCALING_PARTS", "pre,pred").split(",")
    sizes = _env_sizes("BITRO_SCALING_SIZES", QUICK_SIZES if quick else SIZES)
    n_cells = _env_sizes("BITRO_SCALING_CELLS", QUICK_N_CELLS if quick else N_CELLS)
    res: dict[str, Any] = {"name": "scaling", "rows": [], "predict_rows": []}
    # rows of sizes not run now are kept from the previous result of the same mode (partial reruns)
    previous = RESULTS_DIR / "scaling.json"
    old = json.loads(previous.read_text()) if previous.exists() else {}
    if old.get("meta", {}).get("quick") != quick:
        old = {}
    keep = {
        "rows": ("size_px", sizes if "pre" in parts else ()),
        "predict_rows": ("n_cells", n_cells if "pred" in parts else ()),
    }
    kept = {
        k: [r for r in old.get(k, []) if "error" not in r and r.get(key) not in run_now]
        for k, (key, run_now) in keep.items()
    }

    def save() -> None:
        merged = dict(res)
        for k, (key, _) in keep.items():
            merged[k] = sorted(kept[k] + res[k], key=lambda r: r.get(key, 0))
        merged["meta"] = metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seed": SEED})
        merged["markdown"] = markdown(merged)
        write_result("scaling", merged)  # partial results survive an interrupted run
        out.clear()
        out.update(merged)

    out: dict[str, Any] = {}

    if "pre" in parts:
        for size in sizes:
            gen = run_worker("benchmarks.scaling", "--synth", str(size))
            r = gen if "error" in gen else run_worker("benchmarks.scaling", "--worker", str(size))
            r.setdefault("size_px", size)
            res["rows"].append(r)
            save()
            if "error" in r:  # a larger size will not do better
                break
    if "pred" in parts:
        for n in n_cells:
            r = run_worker("benchmarks.scaling", "--predict", str(n))
            r.setdefault("n_cells", n)
            res["predict_rows"].append(r)
            save()
            if "error" in r:
                break
    save()
    return out


def _cpu(row: dict[str, Any]) -> float:
    """CPU seconds of the measured steps (user + system, all threads; less load-sensitive than wall time)."""
    return round(
        sum(v.get("cpu_seconds", 0.0) for k, v in row["steps"].items() if not k.startswith("build")), 1
    )


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def _per_cell_reading(ok: list[dict[str, Any]]) -> str:
    """CPU ms per segmented cell of each image step, smallest vs largest slide; flags steps that grow."""
    first, last = ok[0], ok[-1]
    parts, grows = [], []
    for step in ("segmentation", "embed_morphology"):
        if step not in first["steps"] or step not in last["steps"]:
            continue
        a, b = (
            r["steps"][step]["cpu_seconds"] * 1000 / max(r["n_cells_segmented"], 1) for r in (first, last)
        )
        parts.append(f"{step} {a:.2f} → {b:.2f} ms")
        if b > 1.25 * a:
            grows.append(step)
    if not parts:
        return ""
    text = f"**Reading.** CPU per cell from {first['size_px']} to {last['size_px']} px: {'; '.join(parts)}."
    if grows:
        text += f" {', '.join(grows)} does **not** scale linearly with the number of cells here."
    return text


def markdown(res: dict[str, Any]) -> str:
    """Scaling tables with growth ratios."""
    lines = [
        "## Memory and time against slide size (synthetic)",
        "",
        "**Protocol.** Synthetic slides (0.5 µm/px, Visium-like spots) generated once per size and written "
        "as zarr (not measured); each size then runs in a fresh process that opens the zarr lazily (a "
        "disk-backed dask image, as for a real slide): watershed segmentation → morphology embedding → "
        "assignment → cell graph → prediction with a small saved bitro model (hidden 32, 100 genes). "
        "Peak RSS is sampled per step (every 50 ms); worker max RSS is the process's `ru_maxrss` (it includes "
        "imports and the model). Growth = value / value at the smallest size; cells grow by the 'cells ×' "
        "column. One thread for torch; the machine is shared with other jobs (load about 2–2.5 per core), so wall "
        "times are upper bounds and the CPU-time columns are the fairer growth measure.",
        "",
    ]
    ok = [r for r in res.get("rows", []) if "error" not in r]
    if ok:
        base = ok[0]
        rows = [
            [
                r["size_px"],
                r["n_cells_truth"],
                r["n_cells_segmented"],
                r["pipeline_seconds"],
                _cpu(r),
                r["pipeline_peak_rss_mb"],
                r["worker_max_rss_mb"],
                _ratio(r["n_cells_segmented"], base["n_cells_segmented"]),
                _ratio(r["pipeline_seconds"], base["pipeline_seconds"]),
                _ratio(_cpu(r), _cpu(base)),
                _ratio(r["pipeline_peak_rss_mb"], base["pipeline_peak_rss_mb"]),
                r["generate_seconds"],
                r["generate_max_rss_mb"],
            ]
            for r in ok
        ]
        header = [
            "px",
            "true cells",
            "segmented",
            "pipeline (s)",
            "pipeline CPU (s)",
            "pipeline peak RSS (MB)",
        ]
        header += ["worker max RSS (MB)", "cells ×", "time ×", "CPU ×", "memory ×"]
        header += ["generate once (s, not measured)", "generator RSS (MB)"]
        lines += [md_table(header, rows, digits=1), ""]
        mosaics = [f"{r['size_px']} px: {r['blocks']} blocks" for r in ok if r.get("blocks", 1) > 1]
        if mosaics:
            lines += [
                "Mosaic slides ("
                + ", ".join(mosaics)
                + ") are generated block by block (seeds 0, 1, …) into "
                "zarr, so their generator RSS is that of one block.",
                "",
            ]
        steps = list(ok[0]["steps"])
        lines.append(
            md_table(
                ["px", *[f"{s} (s / CPU s / MB)" for s in steps]],
                [
                    [
                        r["size_px"],
                        *[
                            f"{r['steps'][s]['seconds']:.1f} / {r['steps'][s]['cpu_seconds']:.1f} / "
                            f"{r['steps'][s]['peak_rss_mb']:.0f}"
                            if s in r["steps"]
                            else "–"
                            for s in steps
                        ],
                    ]
                    for r in ok
                ],
            )
        )
        lines += ["", _per_cell_reading(ok), ""]
    for r in res.get("rows", []):
        if "error" in r:
            lines.append(f"Size {r['size_px']} px failed ({r['error']}); larger sizes were not tried.\n")

    pok = [r for r in res.get("predict_rows", []) if "error" not in r]
    if pok:
        lines += [
            "### Prediction only (no image)",
            "",
            "Tables-only slides: uniform random cells at the synthetic density, morphology features resampled "
            "from the training cells, Visium spots over the same area; assign → cell graph → predict in a fresh "
            "process per size. 'outputs' = the two cells × genes float32 arrays predict must write "
            "(`layers['bitro']`, `obsm['X_bitro_expr']`); 'tables' = RSS after building the input tables.",
            "",
        ]
        base = pok[0]
        rows = [
            [
                r["n_cells"],
                r["n_spots"],
                r["n_cells_in_spots"],
                r["pipeline_seconds"],
                r["tables_rss_mb"],
                r["pipeline_peak_rss_mb"],
                r["output_mb"],
                round((r["pipeline_peak_rss_mb"] - r["tables_rss_mb"]) / r["n_cells"] * 1e6 / 1e3, 2),
                _ratio(r["n_cells"], base["n_cells"]),
                _ratio(r["pipeline_seconds"], base["pipeline_seconds"]),
                _ratio(r["pipeline_peak_rss_mb"], base["pipeline_peak_rss_mb"]),
                *[
                    f"{r['steps'][s]['seconds']:.1f} / {r['steps'][s]['peak_rss_mb']:.0f}"
                    for s in ("assign_cells", "cell_graph", "predict")
                ],
            ]
            for r in pok
        ]
        header = ["cells", "spots", "in spots", "pipeline (s)", "tables RSS (MB)", "peak RSS (MB)"]
        header += ["outputs (MB)", "kB / cell above tables", "cells ×", "time ×", "memory ×"]
        header += ["assign (s / MB)", "graph (s / MB)", "predict (s / MB)"]
        lines += [md_table(header, rows, digits=1), ""]
    for r in res.get("predict_rows", []):
        if "error" in r:
            lines.append(f"{r['n_cells']} cells failed ({r['error']}); larger sizes were not tried.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    for flag, func in (("--synth", synthesize), ("--worker", worker), ("--predict", predict_worker)):
        if flag in sys.argv:
            print(json.dumps(func(int(sys.argv[sys.argv.index(flag) + 1])), default=str))
            break
