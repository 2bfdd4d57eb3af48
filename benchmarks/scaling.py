"""Time and peak memory against slide size: synthetic slides of about 10k, 30k and 100k cells (issue 6).

Protocol: a small bitro model (morphology features, hidden 32) is trained once on a small synthetic
slide and saved. For each size, a fresh subprocess generates ``synthetic_tissue(size=...)`` (not
timed as part of the pipeline) and runs segmentation (watershed) → ``morphology`` embedding →
``assign_cells`` → ``predict`` with the saved model, recording wall time and peak RSS per step
(sampled) and the worker's ``ru_maxrss``. Growth is reported as the ratio to the smallest size.
About 3,000 cells per 2,000 × 2,000 px at 0.5 µm/px, hence 3,600 / 6,300 / 11,500 px for 10k / 30k /
100k cells. ``--quick``: 1,500 and 3,000 px.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from benchmarks._common import (
    CACHE_DIR,
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
MODEL_DIR = CACHE_DIR / "scaling_model"
N_GENES = 100


def _train_model() -> None:
    import bitro as bt

    if MODEL_DIR.exists():
        return
    slides = bt.datasets.synthetic_tissue(2, size=1200, n_genes=N_GENES, technology="visium", seed=SEED)
    for s in slides:
        bt.pp.segment_cells(s, tissue_key=None)
        bt.pp.embed_cells(s, encoder="morphology", seed=SEED)
        bt.pp.assign_cells(s)
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


def worker(size: int) -> dict[str, Any]:
    """Generate one slide of ``size`` px and run the chain; return per-step records."""
    import bitro as bt
    from bitro.tl._model import BiTroModel

    bt.settings.progress = False
    steps = Steps()
    with steps("generate (not part of the pipeline)"):
        sdata = bt.datasets.synthetic_tissue(size=size, n_genes=N_GENES, technology="visium", seed=SEED)
    gen_rss = round(max_rss_mb(), 1)
    with steps("segmentation"):
        bt.pp.segment_cells(sdata, tissue_key=None, seed=SEED)
    with steps("embed_morphology"):
        bt.pp.embed_cells(sdata, encoder="morphology", seed=SEED)
    with steps("assign_cells"):
        bt.pp.assign_cells(sdata)
    with steps("predict"):
        model = BiTroModel.load(MODEL_DIR)
        bt.tl.predict(model, sdata, device="cpu")
    pipe = [k for k in steps.records if not k.startswith("generate")]
    return {
        "size_px": size,
        "n_cells_truth": int(sdata["cells_truth"].n_obs),
        "n_cells_segmented": int(sdata["cells"].n_obs),
        "n_spots": int(sdata["spots"].n_obs),
        "steps": steps.records,
        "pipeline_seconds": round(sum(steps.records[k]["seconds"] for k in pipe), 2),
        "pipeline_peak_rss_mb": max(steps.records[k]["peak_rss_mb"] for k in pipe),
        "rss_after_generation_mb": gen_rss,
        "worker_max_rss_mb": round(max_rss_mb(), 1),
    }


def run(quick: bool) -> dict[str, Any]:
    """Train the small model, then run every size in its own subprocess."""
    import bitro as bt

    bt.settings.progress = False
    t0 = time.perf_counter()
    _train_model()
    rows = []
    for size in QUICK_SIZES if quick else SIZES:
        r = run_worker("benchmarks.scaling", "--worker", str(size))
        r.setdefault("size_px", size)
        rows.append(r)
        res = {
            "name": "scaling",
            "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seed": SEED}),
            "rows": rows,
        }
        res["markdown"] = markdown(res)
        write_result("scaling", res)  # partial results survive an interrupted run
        if "error" in r:  # a larger size will not do better
            break
    return res


def markdown(res: dict[str, Any]) -> str:
    """Scaling table with growth ratios."""
    ok = [r for r in res["rows"] if "error" not in r]
    lines = [
        "## Memory and time against slide size (synthetic)",
        "",
        "**Protocol.** Synthetic slides (0.5 µm/px, Visium-like spots), each size in a fresh process: "
        "watershed segmentation → morphology embedding → assignment → prediction with a small saved bitro "
        "model (hidden 32). Generating the slide is timed separately and excluded; its memory is not (the "
        "slide is held in memory as an array by the generator), so the pipeline's own peak is the per-step "
        "sampled peak. Growth = value / value at the smallest size; cells grow by the 'cells ×' column.",
        "",
    ]
    if ok:
        base = ok[0]
        rows = []
        for r in ok:
            cg = r["n_cells_segmented"] / max(base["n_cells_segmented"], 1)
            rows.append(
                [
                    r["size_px"],
                    r["n_cells_truth"],
                    r["n_cells_segmented"],
                    r["steps"]["generate (not part of the pipeline)"]["seconds"],
                    r["pipeline_seconds"],
                    r["pipeline_peak_rss_mb"],
                    r["worker_max_rss_mb"],
                    round(cg, 2),
                    round(r["pipeline_seconds"] / base["pipeline_seconds"], 2),
                    round(r["pipeline_peak_rss_mb"] / base["pipeline_peak_rss_mb"], 2),
                ]
            )
        lines.append(
            md_table(
                [
                    "px",
                    "true cells",
                    "segmented",
                    "generate (s)",
                    "pipeline (s)",
                    "pipeline peak RSS (MB)",
                    "worker max RSS (MB)",
                    "cells ×",
                    "time ×",
                    "memory ×",
                ],
                rows,
                digits=1,
            )
        )
        lines.append("")
        steps = sorted(
            {k for r in ok for k in r["steps"] if not k.startswith("generate")},
            key=list(ok[0]["steps"]).index,
        )
        lines.append(
            md_table(
                ["px", *[f"{s} (s / MB)" for s in steps]],
                [
                    [
                        r["size_px"],
                        *[
                            f"{r['steps'][s]['seconds']:.1f} / {r['steps'][s]['peak_rss_mb']:.0f}"
                            for s in steps
                        ],
                    ]
                    for r in ok
                ],
            )
        )
        lines.append("")
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"Size {r['size_px']} px failed ({r['error']}); larger sizes were not tried.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        print(json.dumps(worker(int(sys.argv[sys.argv.index("--worker") + 1]))))
