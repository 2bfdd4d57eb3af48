"""Peak memory of ``embed_cells`` against the size of its output, with and without ``scratch_dir`` (issue 7).

A synthetic slide (``--size`` px square at 0.5 µm/px, a uniform grey image) with ``--cells`` random
centroids is embedded in crop mode by a fake encoder, a numpy function returning ``--dim`` float32
features per crop (so that the features, not a network, dominate memory; its dimension is unknown
until its first call, as for any plain function). Recorded with :mod:`tracemalloc` (numpy arrays
are traced) around the ``embed_cells`` call only, after an untraced warm-up call: the peak of Python/numpy allocations, the size of
the output ``obsm`` matrix and their ratio; ``scratch_dir`` runs in a temporary folder.

Outside the standard set; prints JSON:
``python -m benchmarks.embed_memory [--cells 60000] [--dim 1280] [--size 4096] [--tile 1024]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc

import numpy as np


def _slide(n_cells: int, size: int, seed: int = 0):
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    from shapely.geometry import Point

    from bitro.io._build import image_element, polygons_element, set_scale, table_element

    rng = np.random.default_rng(seed)
    xy = rng.uniform(8, size - 8, (n_cells, 2))
    names = [f"cell_{i}" for i in range(n_cells)]
    image = np.full((3, size, size), 200, dtype=np.uint8)
    adata = ad.AnnData(obs=pd.DataFrame(index=names), obsm={"spatial": xy})
    sdata = sd.SpatialData(
        images={"he": image_element(image, chunks=1024)},
        shapes={"cells_shapes": polygons_element([Point(0, 0).buffer(1, 4)] * n_cells, names)},
        tables={"cells": table_element(adata, region="cells_shapes")},
    )
    set_scale(sdata, mpp=0.5)
    return sdata


def run(n_cells: int, dim: int, size: int, tile: int) -> dict:
    """tracemalloc peak of ``embed_cells`` (MB) and its ratio to the output, without and with scratch."""
    import bitro as bt

    bt.settings.progress = False
    columns = np.arange(dim) % 3

    def wide(crops: np.ndarray) -> np.ndarray:  # (n, h, w, 3) uint8 -> (n, dim) float32
        return crops.reshape(len(crops), -1, 3).mean(1, dtype=np.float32)[:, columns]

    sdata = _slide(n_cells, size)
    out: dict = {"n_cells": n_cells, "dim": dim, "size_px": size, "tile_size": tile, "runs": {}}
    small = _slide(100, 256)  # warm-up: the imports of the first call are not traced
    bt.pp.embed_cells(small, encoder=wide, mode="crop", crop_um=4.0, tile_size=tile)
    for label in ("no_scratch", "scratch"):
        with tempfile.TemporaryDirectory(prefix="bitro-embed-mem-") as tmp:
            extra = {"scratch_dir": f"{tmp}/embed"} if label == "scratch" else {}
            tracemalloc.start()
            t0 = time.perf_counter()
            bt.pp.embed_cells(
                sdata, encoder=wide, mode="crop", crop_um=4.0, tile_size=tile, batch_size=512,
                overwrite=True, **extra,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        feats = sdata.tables["cells"].obsm["X_bitro"]
        out["output_mb"] = round(feats.nbytes / 1e6, 1)
        out["runs"][label] = {
            "peak_mb": round(peak / 1e6, 1),
            "peak_over_output": round(peak / feats.nbytes, 3),
            "seconds": round(seconds, 1),
        }
        del sdata.tables["cells"].obsm["X_bitro"], feats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=1024)
    args = parser.parse_args()
    print(json.dumps(run(args.cells, args.dim, args.size, args.tile), indent=1))


if __name__ == "__main__":
    main()
