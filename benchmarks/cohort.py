"""Wall time of ``bt.pp.run_pipeline`` on a synthetic cohort: sequential vs a local dask cluster.

Standalone (not in the harness's standard set)::

    python -m benchmarks.cohort [--slides 4] [--size 1000] [--workers 2]

Prints one JSON object: seconds of the sequential run, of the cluster start, of a first distributed
run (workers import bitro and its dependencies on their first task) and of a second one (warm workers),
each into a fresh output folder; plus whether every run wrote the same cells.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _cells(out: Path, names: list[str]) -> list:
    import numpy as np
    import spatialdata as sd

    return [np.asarray(sd.read_zarr(out / f"{n}.zarr").tables["cells"].obsm["X_bitro"]) for n in names]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from distributed import Client, LocalCluster

    import bitro as bt

    torch.set_num_threads(1)
    bt.settings.progress = False
    options = {"encoder": "morphology", "stain_method": "macenko"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slides = bt.datasets.synthetic_tissue(args.slides, size=args.size, technology="visium", seed=0)
        paths = []
        for i, sdata in enumerate(slides):
            paths.append(root / f"s{i}.zarr")
            sdata.write(paths[-1])
        names = [p.stem for p in paths]
        result: dict = {"slides": args.slides, "size": args.size, "workers": args.workers}

        t = time.perf_counter()
        seq = bt.pp.run_pipeline(paths, out=root / "seq", client=False, **options)
        result["sequential_s"] = round(time.perf_counter() - t, 1)
        result["n_cells"] = int(seq["n_cells"].sum())
        result["per_slide_s"] = [float(s) for s in seq["seconds"]]

        t = time.perf_counter()
        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            result["cluster_start_s"] = round(time.perf_counter() - t, 1)
            for run in ("cold", "warm"):
                t = time.perf_counter()
                report = bt.pp.run_pipeline(paths, out=root / run, client=client, **options)
                result[f"distributed_{run}_s"] = round(time.perf_counter() - t, 1)
                assert (report["status"] == "done").all(), report
        reference = _cells(root / "seq", names)
        result["same_cells"] = all(
            all(np.allclose(a, b) for a, b in zip(reference, _cells(root / run, names), strict=True))
            for run in ("cold", "warm")
        )
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
