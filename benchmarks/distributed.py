"""Tiled segmentation + morphology embedding: one process vs a dask ``LocalCluster`` of 2 worker processes.

One synthetic slide (``bt.datasets.synthetic_tissue``, 0.5 µm/px) sized for the target number of
cells is written to zarr and read back, so that the workers read image chunks from disk as they
would on a real slide. Then ``bt.pp.segment_cells`` and ``bt.pp.embed_cells(encoder="morphology")``
run (a) in the local loop of this process and (b) with ``client=`` a ``distributed.LocalCluster``
of 2 worker processes × 1 thread; wall times are recorded and the outputs compared (cell
centroids, areas and polygons must be identical, features equal to 1e-6).

Quick: ~20k cells (measured: 370 s for the whole benchmark on the shared 2-core machine at load ~9).
Standard (``--full`` set): the scaling benchmark's 11,500 px slide (~112k cells; a mosaic of blocks
generated once and cached as zarr, shared with ``scaling``), about 20 min. ``BITRO_DISTRIBUTED_CELLS``
sets another target number of cells.

Run: ``python -m benchmarks --quick --only distributed`` (or ``python -m benchmarks.distributed``).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Nuclei per level-0 pixel² of the synthetic slides at 0.5 µm/px (measured: 3026 cells on 2000²).
CELL_DENSITY = 7.57e-4
N_CELLS = {True: 20_000, False: 100_000}
N_WORKERS = 2
TILE_SIZE = 1024


def _slide(n_cells: int, folder: Path) -> tuple[Any, int]:
    import spatialdata as sd
    from benchmarks import scaling

    import bitro as bt

    size = int(math.sqrt(n_cells / CELL_DENSITY))
    if size > scaling.MAX_BLOCK:  # the scaling benchmark's cached mosaic (bounded generator memory)
        size = next((s for s in scaling.SIZES if abs(s - size) <= 0.1 * s), size)  # reuse its cache if close
        scaling.synthesize(size)
        return sd.read_zarr(scaling._slide_path(size)), size
    sdata = bt.datasets.synthetic_tissue(size=size, seed=0, n_genes=20)
    path = folder / "slide.zarr"
    sdata.write(path)
    return sd.read_zarr(path), size


def _run(sdata: Any, steps: Any, prefix: str, **kwargs: Any) -> dict[str, Any]:
    import bitro as bt

    with steps(f"{prefix}_segmentation"):
        bt.pp.segment_cells(sdata, tile_size=TILE_SIZE, seed=0, overwrite=True, **kwargs)
    with steps(f"{prefix}_embed_morphology"):
        bt.pp.embed_cells(sdata, encoder="morphology", tile_size=TILE_SIZE, overwrite=True, **kwargs)
    table = sdata["cells"]
    return {
        "xy": np.asarray(table.obsm["spatial"]).copy(),
        "area": table.obs["area_um2"].to_numpy().copy(),
        "polygons": [g.wkt for g in sdata["cells_shapes"].geometry],
        "features": np.asarray(table.obsm["X_bitro"]).copy(),
        "n_tiles": table.uns["cells"]["n_tiles_processed"],
    }


def _warm_up() -> None:
    import importlib

    for name in ("bitro.pp._segment", "bitro.pp._embed", "skimage.measure", "skimage.draw", "shapely"):
        importlib.import_module(name)


def run(quick: bool) -> dict:
    """Harness entry point (``python -m benchmarks --only distributed``)."""
    import torch
    from benchmarks._common import Steps, metadata
    from distributed import Client, LocalCluster

    import bitro as bt

    torch.set_num_threads(1)
    bt.settings.progress = False
    t0 = time.perf_counter()
    steps = Steps()
    with tempfile.TemporaryDirectory(prefix="bitro-bench-") as tmp:
        with steps("make_slide"):
            n_target = int(os.environ.get("BITRO_DISTRIBUTED_CELLS", N_CELLS[quick]))
            sdata, size = _slide(n_target, Path(tmp))
        local = _run(sdata, steps, "local")
        with steps("cluster_start"):
            cluster = LocalCluster(
                n_workers=N_WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
            client = Client(cluster)
            client.wait_for_workers(N_WORKERS)
            client.run(_warm_up)  # import bitro and its image libraries once per worker
        try:
            dist = _run(sdata, steps, "cluster", client=client)
        finally:
            client.close()
            cluster.close()
    same = {
        "centroids": bool(np.array_equal(local["xy"], dist["xy"])),
        "areas": bool(np.array_equal(local["area"], dist["area"])),
        "polygons": local["polygons"] == dist["polygons"],
        "features_max_abs_diff": float(np.max(np.abs(local["features"] - dist["features"])))
        if local["features"].shape == dist["features"].shape and local["features"].size
        else None,
    }
    rec = steps.records
    timing = {
        mode: {
            "segmentation_s": rec[f"{mode}_segmentation"]["seconds"],
            "embed_morphology_s": rec[f"{mode}_embed_morphology"]["seconds"],
            "total_s": round(
                rec[f"{mode}_segmentation"]["seconds"] + rec[f"{mode}_embed_morphology"]["seconds"], 2
            ),
        }
        for mode in ("local", "cluster")
    }
    speedup = timing["local"]["total_s"] / max(timing["cluster"]["total_s"], 1e-9)
    out = {
        "name": "distributed",
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0),
        "slide": {"size_px": size, "mpp": 0.5, "n_cells": len(local["xy"]), "n_tiles": local["n_tiles"]},
        "n_workers": N_WORKERS,
        "steps": rec,
        "timing": timing,
        "cluster_start_s": rec["cluster_start"]["seconds"],
        "speedup": round(speedup, 2),
        "identical": same,
    }
    out["markdown"] = markdown(out)
    return out


def markdown(res: dict) -> str:
    """The results section."""
    from benchmarks._common import md_table

    s, t, same = res["slide"], res["timing"], res["identical"]
    rows = [
        [
            "1 process (local loop)",
            t["local"]["segmentation_s"],
            t["local"]["embed_morphology_s"],
            t["local"]["total_s"],
        ],
        [
            f"LocalCluster, {res['n_workers']} worker processes × 1 thread",
            t["cluster"]["segmentation_s"],
            t["cluster"]["embed_morphology_s"],
            t["cluster"]["total_s"],
        ],
    ]
    ok = same["centroids"] and same["areas"] and same["polygons"]
    return "\n".join(
        [
            "## Tiled execution on a dask cluster",
            "",
            f"**Protocol.** One synthetic slide of {s['size_px']}² px at {s['mpp']} µm/px ({s['n_cells']} cells, "
            f"{s['n_tiles']} tiles of {TILE_SIZE} px) written to zarr and read back; `bt.pp.segment_cells` then "
            "`bt.pp.embed_cells(encoder='morphology')` in one process vs with `client=` a `distributed.LocalCluster` "
            f"(cluster start-up with the workers' imports, {res['cluster_start_s']} s, not included). Wall seconds on a shared machine.",
            "",
            md_table(["run", "segmentation (s)", "morphology embedding (s)", "total (s)"], rows, digits=1),
            "",
            f"Speed-up {res['speedup']}×. Outputs identical: centroids {same['centroids']}, areas {same['areas']}, "
            f"polygons {same['polygons']}; features max |Δ| = {same['features_max_abs_diff']}"
            + ("." if ok else " — **outputs differ**."),
            "",
        ]
    )


def main() -> None:
    import json

    from benchmarks._common import write_result

    res = run(quick=True)
    write_result("distributed", res)
    print(json.dumps({k: res[k] for k in ("slide", "timing", "speedup", "identical")}, indent=1))


if __name__ == "__main__":
    main()
