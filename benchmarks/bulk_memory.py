"""Peak memory of bulk-level training against slide size, with and without chunking (issue 7).

Protocol: for each slide size (about 10k, 25k, 50k and 100k cells; ``--quick``: 5k and 10k) and each
``max_cells_per_step`` (``None`` = the whole slide in one forward pass; 5,000 and the default 20,000
cells per checkpointed chunk, when smaller than the slide), a fresh subprocess builds one synthetic bulk slide directly as SpatialData
tables — random 64-d cell features (no image, no segmentation), cells uniform on a square at
1 µm/px, 100 µm patches holding about 64 cells each, a random bulk profile over 250 genes — sets up
a ``BiTroModel(level="bulk")`` with the default network (hidden 128, 2 GAT + 2 Transformer layers,
dropout 0.1; PCA to 32, 8 phenotypes, cluster loss λ = 0.1) and trains one epoch (one slide = one
step, no validation) on one torch thread. Recorded: the RSS sampled during the epoch (peak, and the
increase over the RSS at its start, i.e. what training adds on top of the data and the model) and
the epoch's wall time; then the same for ``predict_bags`` (no gradients, batches of 64 patches).
One-pass runs projected to exceed 50 % of the available memory are skipped (see :func:`run`).
Run alone with ``python -m benchmarks.bulk_memory`` (``--quick`` for the small sizes).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from benchmarks._common import SEED, Steps, max_rss_mb, md_table, metadata, run_worker, write_result

SIZES = (10_000, 25_000, 50_000, 100_000)
QUICK_SIZES = (5_000, 10_000)
CHUNKS: tuple[int | None, ...] = (None, 5_000, 20_000)  # 20,000 = the default of train()
N_GENES, N_FEAT, CELLS_PER_PATCH, PATCH_UM = 250, 64, 64, 100.0


def synthetic_bulk_slide(n_cells: int, *, seed: int = SEED) -> Any:
    """One slide as tables only: ``cells`` (features, ``patch_id``), ``patches`` and a one-row ``bulk``."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import TableModel

    from bitro.io._build import set_scale

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_cells / CELLS_PER_PATCH)))
    xy = rng.uniform(0, side * PATCH_UM, size=(n_cells, 2))
    gx, gy = np.minimum((xy // PATCH_UM).astype(int), side - 1).T
    names = np.array([f"p{i}" for i in range(side * side)])
    centres = (np.column_stack(np.divmod(np.arange(side * side), side))[:, ::-1] + 0.5) * PATCH_UM
    cells = ad.AnnData(
        obs=pd.DataFrame(
            {"patch_id": pd.Categorical(names[gy * side + gx], categories=names)},
            index=[f"c{i}" for i in range(n_cells)],
        )
    )
    cells.obsm["spatial"] = xy
    cells.obsm["X_bitro"] = rng.normal(size=(n_cells, N_FEAT)).astype(np.float32)
    cells.uns["X_bitro"] = {"encoder": "random", "dim": N_FEAT}
    patches = ad.AnnData(obs=pd.DataFrame(index=names), obsm={"spatial": centres})
    genes = [f"G{i}" for i in range(N_GENES)]
    counts = rng.gamma(2.0, 50.0, size=(1, N_GENES))
    bulk = ad.AnnData(X=counts, obs=pd.DataFrame(index=["slide"]), var=pd.DataFrame(index=genes))
    bulk.layers["counts"] = counts.copy()
    tables = {k: TableModel.parse(v) for k, v in (("cells", cells), ("patches", patches), ("bulk", bulk))}
    sdata = sd.SpatialData(tables=tables)
    set_scale(sdata, mpp=1.0, spot_diameter_um=PATCH_UM, spot_spacing_um=PATCH_UM, sample_id=f"bulk{n_cells}")
    return sdata


def worker(n_cells: int, max_cells: int | None) -> dict[str, Any]:
    """Build one slide, set up a bulk model and train one epoch; return RSS and time records."""
    import torch

    import bitro as bt
    from bitro.tl._model import BiTroModel

    torch.set_num_threads(1)
    bt.settings.progress = False
    steps = Steps()
    with steps("data and setup"):
        sdata = synthetic_bulk_slide(n_cells)
        model = BiTroModel(sdata, level="bulk", n_components=32, n_phenotypes=8, seed=SEED)
    with steps("train one epoch") as rec:
        model.train(max_epochs=1, validation_fraction=0.0, device="cpu", max_cells_per_step=max_cells)
    rec["added_rss_mb"] = round(rec["peak_rss_mb"] - rec["start_rss_mb"], 1)
    with steps("predict_bags") as rec:
        model.predict_bags(sdata, device="cpu")
    rec["added_rss_mb"] = round(rec["peak_rss_mb"] - rec["start_rss_mb"], 1)
    return {
        "n_cells": n_cells,
        "n_patches": int(model.train_bags.n_bags),
        "max_cells_per_step": max_cells,
        "steps": steps.records,
        "worker_max_rss_mb": round(max_rss_mb(), 1),
    }


def _available_mb() -> float:
    """``MemAvailable`` of the machine in MB (inf when unknown)."""
    from pathlib import Path

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("inf")


def _projected_mb(rows: list[dict[str, Any]], n_cells: int, chunk: int | None) -> float | None:
    """Peak RSS of a one-pass run at ``n_cells``: start RSS plus the added RSS scaled linearly in cells."""
    done = [r for r in rows if "error" not in r and "skipped" not in r and r["max_cells_per_step"] == chunk]
    if not done or chunk is not None:  # chunked runs are bounded by construction
        return None
    r = done[-1]["steps"]["train one epoch"]
    return r["start_rss_mb"] + r["added_rss_mb"] * n_cells / done[-1]["n_cells"]


def run(quick: bool) -> dict[str, Any]:
    """Every (size, chunking) pair in its own subprocess; stop growing a mode once it fails.

    A one-pass run whose extrapolated peak exceeds 50 % of the machine's available memory is skipped
    (recorded with the projection) rather than risking the out-of-memory killer on a shared machine.
    """
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    failed: set[Any] = set()
    res: dict[str, Any] = {}
    for n in QUICK_SIZES if quick else SIZES:
        for chunk in CHUNKS:
            if chunk in failed or (chunk is not None and chunk >= n):  # a chunk ≥ the slide is one pass
                continue
            projected, available = _projected_mb(rows, n, chunk), _available_mb()
            if projected is not None and projected > 0.5 * available:
                rows.append(
                    {
                        "n_cells": n,
                        "max_cells_per_step": chunk,
                        "skipped": f"projected peak {projected:,.0f} MB > 50 % of {available:,.0f} MB available",
                    }
                )
                failed.add(chunk)
                continue
            r = run_worker("benchmarks.bulk_memory", "--worker", str(n), str(chunk), timeout=900)
            r.setdefault("n_cells", n)
            r.setdefault("max_cells_per_step", chunk)
            rows.append(r)
            if "error" in r:
                failed.add(chunk)
            res = {
                "name": "bulk_memory",
                "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seed": SEED}),
                "protocol": {"n_genes": N_GENES, "n_features": N_FEAT, "cells_per_patch": CELLS_PER_PATCH},
                "rows": rows,
            }
            res["markdown"] = markdown(res)
            write_result("bulk_memory", res)  # partial results survive an interrupted run
    return res


def markdown(res: dict[str, Any]) -> str:
    """Peak RSS and time of one bulk epoch per slide size and chunking."""
    lines = [
        "## Bulk training memory against slide size (synthetic)",
        "",
        "**Protocol.** One synthetic bulk slide per run (random 64-d cell features, ~64 cells per 100 µm "
        "patch, 250 genes), default network, one training epoch = one step on one torch thread, each run "
        "in a fresh process. *one pass*: `max_cells_per_step=None`; *chunked (n)*: at most n cells per "
        "checkpointed chunk (bitro's default is 10,000). *added* = peak RSS during the epoch minus RSS at its start (data and model "
        "already loaded). Peaks are sampled every 50 ms.",
        "",
    ]
    ok = [r for r in res["rows"] if "error" not in r and "skipped" not in r]
    rows = [
        [
            r["n_cells"],
            r["n_patches"],
            "one pass" if r["max_cells_per_step"] is None else f"chunked ({r['max_cells_per_step']:,})",
            r["steps"]["train one epoch"]["seconds"],
            r["steps"]["train one epoch"]["peak_rss_mb"],
            r["steps"]["train one epoch"]["added_rss_mb"],
            r["steps"]["predict_bags"]["added_rss_mb"],
            r["worker_max_rss_mb"],
        ]
        for r in ok
    ]
    if rows:
        lines.append(
            md_table(
                [
                    "cells",
                    "patches",
                    "mode",
                    "epoch (s)",
                    "epoch peak RSS (MB)",
                    "added by training (MB)",
                    "added by predict_bags (MB)",
                    "worker max RSS (MB)",
                ],
                rows,
                digits=1,
            )
        )
        lines.append("")
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(
                f"{r['n_cells']} cells, max_cells_per_step={r['max_cells_per_step']}: not run, {r['skipped']} "
                "(extrapolated linearly from the largest finished run of that mode).\n"
            )
        if "error" in r:
            lines.append(
                f"{r['n_cells']} cells, max_cells_per_step={r['max_cells_per_step']} failed ({r['error']}); "
                "larger slides were not tried in that mode.\n"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        chunk_arg = sys.argv[i + 2]
        print(json.dumps(worker(int(sys.argv[i + 1]), None if chunk_arg == "None" else int(chunk_arg))))
    else:  # this benchmark alone, without rebuilding docs/benchmarks.md
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        out = run("--quick" in sys.argv)
        print(out["markdown"])
