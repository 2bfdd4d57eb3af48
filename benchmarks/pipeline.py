"""Per-step wall time and peak RSS of the preprocessing chain on one whole HER2ST section (issue 3).

Protocol: section C2 of the kit (about 9,300 × 9,900 px at 0.696 µm/px) is loaded and run through
``normalize_stains`` (Macenko) → ``detect_tissue`` → ``segment_cells`` (watershed) →
``embed_cells`` (``efficientnet_lite0``, tile mode, CPU) → ``assign_cells`` → ``cell_graph`` (k = 8),
(the ``morphology`` encoder's throughput is measured by the embedding benchmark). The chain runs in a
fresh subprocess so its peak RSS is its own; a sampling thread records each step's peak RSS. The
tables it produces are stored in the benchmark cache, so the accuracy benchmark reuses them.
``--quick`` runs a central 3,000 × 3,000 px window instead of the whole section.

Run alone: ``python -m benchmarks --only pipeline``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from benchmarks._common import (
    SEED,
    Steps,
    max_rss_mb,
    md_table,
    metadata,
    preprocess_section,
    run_worker,
)

SECTION = "C2"
QUICK_WINDOW = 1500
CHAIN = (
    "load",
    "stain_norm",
    "tissue",
    "segmentation",
    "embed_efficientnet_lite0_tile",
    "assign_cells",
    "cell_graph",
)


def worker(quick: bool) -> dict[str, Any]:
    """Run the chain in this process and return the per-step records."""
    import torch

    import bitro as bt

    bt.settings.progress = False
    window = QUICK_WINDOW if quick else None
    steps = Steps()
    encoders = ("efficientnet_lite0",)  # the morphology encoder's throughput is in the embedding benchmark
    sdata = preprocess_section(SECTION, encoders=encoders, window=window, steps=steps, graph=True)
    cells, spots = sdata["cells"], sdata["spots"]
    n_in_spots = int(cells.obs["spot_id"].notna().sum()) if "spot_id" in cells.obs else None
    img = sdata.images["he"]
    shape = list(img.shape if hasattr(img, "shape") else img["scale0"]["image"].shape)
    return {
        "section": SECTION,
        "image_shape_cyx": shape,
        "window_half_px": window,
        "n_cells": int(cells.n_obs),
        "n_cells_in_spots": n_in_spots,
        "n_spots": int(spots.n_obs),
        "median_cells_per_spot": float(spots.obs["n_cells"].median()),
        "steps": steps.records,
        "chain_seconds": round(sum(steps.records[s]["seconds"] for s in CHAIN), 1),
        "chain_peak_rss_mb": max(steps.records[s]["peak_rss_mb"] for s in CHAIN),
        "worker_max_rss_mb": round(max_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
    }


def markdown(res: dict[str, Any]) -> str:
    """The Markdown section of the page."""
    r = res["results"]
    if "error" in r:
        return f"## Pipeline on one HER2ST section\n\nThe run failed: `{r['error']}`.\n"
    where = (
        "the whole section" if not r["window_half_px"] else f"a central {2 * r['window_half_px']} px window"
    )
    rows = [
        [name, rec["seconds"], rec.get("cpu_seconds"), rec["peak_rss_mb"]] for name, rec in r["steps"].items()
    ]
    cpu = [rec.get("cpu_seconds") for name, rec in r["steps"].items() if name in CHAIN]
    cpu_total = round(sum(cpu), 1) if None not in cpu else None
    rows.append(
        ["**chain total** (issue-3 target < 300 s)", r["chain_seconds"], cpu_total, r["chain_peak_rss_mb"]]
    )
    return "\n".join(
        [
            "## Pipeline on one HER2ST section (speed and memory)",
            "",
            f"**Protocol.** HER2ST {r['section']} ({where}; image {r['image_shape_cyx']} c×y×x) through stain "
            "normalisation (Macenko) → tissue detection → watershed segmentation → EfficientNet-Lite0 tile "
            "embedding (CPU) → assignment to spots → within-spot kNN graph, in a fresh process. Peak RSS per step "
            "is sampled every 50 ms by a thread (the process-wide maximum of the whole worker is "
            f"{r['worker_max_rss_mb']:.0f} MB). {r['n_cells']:,} nuclei, {r['n_cells_in_spots']:,} of them inside "
            f"{r['n_spots']} spots (median {r['median_cells_per_spot']:.0f} per spot).",
            "",
            md_table(["step", "wall (s)", "CPU (s, all threads)", "peak RSS (MB)"], rows, digits=1),
            "",
            f"Load average when the run ended: {res['meta']['machine']['load_average']} on "
            f"{res['meta']['machine']['cores']} cores — wall times include waiting for the CPU.",
            "",
        ]
    )


def run(quick: bool) -> dict[str, Any]:
    """Run the pipeline benchmark in a subprocess; return the result with its Markdown section."""
    t0 = time.perf_counter()
    results = run_worker("benchmarks.pipeline", "--worker", *(["--quick"] if quick else []))
    out = {
        "name": "pipeline",
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seed": SEED}),
        "results": results,
    }
    out["markdown"] = markdown(out)
    return out


if __name__ == "__main__":
    if "--worker" in sys.argv:
        print(json.dumps(worker("--quick" in sys.argv)))
