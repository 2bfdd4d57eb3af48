"""Cost of ``segment_cells(scratch_dir=...)`` and the time a resume saves (issue 7).

One synthetic slide (``bt.datasets.synthetic_tissue``, 0.5 µm/px) is segmented in this process
(a) without scratch, (b) with a fresh ``scratch_dir``, (c) after deleting half of the tile files
(a crash half-way), (d) with every tile file present (assembly only). Outputs are compared with (a).

Outside the standard set; prints JSON: ``python -m benchmarks.scratch [--size 3000] [--tile 512]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _cells(sdata) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    t = sdata["cells"]
    return (
        np.asarray(t.obsm["spatial"]).copy(),
        t.obs["area_um2"].to_numpy().copy(),
        [g.wkb for g in sdata["cells_shapes"].geometry],
    )


def run(size: int, tile: int) -> dict:
    """Wall seconds of the four runs, scratch folder size, and whether outputs are identical."""
    import torch

    import bitro as bt

    torch.set_num_threads(1)
    bt.settings.progress = False
    sdata = bt.datasets.synthetic_tissue(size=size, seed=0, n_genes=5)
    out: dict = {"size_px": size, "tile_size": tile, "seconds": {}, "identical": {}}
    with tempfile.TemporaryDirectory(prefix="bitro-scratch-") as tmp:
        scratch = Path(tmp) / "scratch"

        def timed(label: str, **kwargs) -> None:
            t0 = time.perf_counter()
            bt.pp.segment_cells(sdata, tile_size=tile, seed=0, overwrite=True, **kwargs)
            out["seconds"][label] = round(time.perf_counter() - t0, 2)

        timed("memory")
        ref = _cells(sdata)
        out["n_cells"] = len(ref[0])
        for label in ("scratch_fresh", "resume_half", "resume_all"):
            if label == "resume_half":
                files = sorted(scratch.glob("tile_*.parquet"))
                out["n_tile_files"] = len(files)
                out["scratch_mb"] = round(sum(f.stat().st_size for f in files) / 1e6, 2)
                for f in files[::2]:
                    f.unlink()
            timed(label, scratch_dir=scratch, keep_scratch=True)
            got = _cells(sdata)
            out["identical"][label] = bool(
                np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]) and ref[2] == got[2]
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=3000)
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()
    print(json.dumps(run(args.size, args.tile), indent=1))


if __name__ == "__main__":
    main()
