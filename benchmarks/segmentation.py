"""Score nucleus segmentation on the MICCAI 2015 images of the real-data kit (``nuclei/miccai2015``).

Each ``imageNN.png`` has an instance mask ``imageNN_mask.png`` (uint16). Two methods are scored:

- ``otsu``: Otsu threshold on the hematoxylin channel (``skimage.color.rgb2hed``) + connected components;
- ``bitro``: :func:`bitro.pp._watershed.segment_tile` with its default parameters (the method
  behind ``bt.pp.segment_cells``).

Metrics: pixel Dice, object F1 at IoU 0.5, AJI (:mod:`bitro.pp._segment_metrics`).

The kit gives no scale. The images are 20x or 40x; images whose median annotated nucleus area exceeds
300 px² are taken as 40x (0.25 µm/px, images 08–10), the others as 20x (0.5 µm/px): at 0.5 µm/px the
median nucleus of 08–10 would be 100–150 µm² (≥ 11 µm across), far above the 20–60 µm² of the others.

The default parameters were chosen on these same ten images (a small grid over smoothing, threshold
rule, marker depth, opening and solidity, all in µm), so the numbers are training-set numbers.

Run: ``python -m benchmarks --only segmentation`` (harness) or ``python -m benchmarks.segmentation`` (``BITRO_DATA_DIR`` overrides ``../shared/data``); writes
``benchmarks/results/segmentation.json`` and prints a Markdown table.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BITRO_DATA_DIR", ROOT.parent / "shared" / "data")) / "nuclei" / "miccai2015"
OUT = ROOT / "benchmarks" / "results" / "segmentation.json"
METRICS = ("dice", "f1", "aji")


def estimate_mpp(mask: np.ndarray) -> float:
    """0.25 µm/px (40x) when the median object area exceeds 300 px², else 0.5 µm/px (20x)."""
    areas = np.bincount(mask.ravel())[1:]
    return 0.25 if np.median(areas[areas > 0]) > 300 else 0.5


def otsu_baseline(rgb: np.ndarray) -> np.ndarray:
    """Otsu on hematoxylin optical density, then connected components."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from bitro.pp._watershed import hematoxylin

    h = hematoxylin(rgb)
    return ndi.label(h > threshold_otsu(h))[0]


def score(limit: int | None = None) -> dict:
    """Score both methods on the kit images (the first ``limit`` only when given)."""
    from dataclasses import asdict

    from skimage.io import imread

    from bitro.pp._segment_metrics import segmentation_scores
    from bitro.pp._watershed import WatershedParams, segment_tile

    rows = []
    for path in sorted(DATA_DIR.glob("image??.png"))[:limit]:
        rgb = imread(path)[..., :3]
        truth = imread(path.with_name(f"{path.stem}_mask.png"))
        mpp = estimate_mpp(truth)
        for method, pred in (("otsu", otsu_baseline(rgb)), ("bitro", segment_tile(rgb, mpp))):
            s = segmentation_scores(truth, pred)
            rows.append(
                {
                    "image": path.stem,
                    "mpp": mpp,
                    "method": method,
                    **{k: s[k] for k in (*METRICS, "n_true", "n_pred")},
                }
            )
    if not rows:
        msg = f"No images found in {DATA_DIR}; set BITRO_DATA_DIR."
        raise FileNotFoundError(msg)
    means = {
        m: {k: float(np.mean([r[k] for r in rows if r["method"] == m])) for k in METRICS}
        for m in ("otsu", "bitro")
    }
    return {"per_image": rows, "mean": means, "params": asdict(WatershedParams())}


def table(res: dict) -> str:
    """Per-image Markdown table with the means."""
    rows, means = res["per_image"], res["mean"]
    lines = [
        "| image | mpp | Otsu Dice | Otsu F1 | Otsu AJI | bitro Dice | bitro F1 | bitro AJI |",
        "|---" * 8 + "|",
    ]
    for image in sorted({r["image"] for r in rows}):
        o = next(r for r in rows if r["image"] == image and r["method"] == "otsu")
        b = next(r for r in rows if r["image"] == image and r["method"] == "bitro")
        vals = " | ".join(f"{r[k]:.3f}" for r in (o, b) for k in METRICS)
        lines.append(f"| {image} | {o['mpp']} | {vals} |")
    vals = " | ".join(f"{means[m][k]:.3f}" for m in ("otsu", "bitro") for k in METRICS)
    lines.append(f"| **mean** | | {vals} |")
    return "\n".join(lines)


def run(quick: bool) -> dict:
    """Harness entry point (``python -m benchmarks --only segmentation``); quick = first 3 images."""
    import time

    from benchmarks._common import metadata

    t0 = time.perf_counter()
    res = score(3 if quick else None)
    out = {"name": "segmentation", "meta": metadata(quick=quick, seconds=time.perf_counter() - t0), **res}
    out["markdown"] = "\n".join(
        [
            "## Nucleus segmentation (MICCAI 2015 images of the kit)",
            "",
            "**Protocol.** Built-in watershed (`bt.pp.segment_cells`' tile function, default parameters) and a "
            "plain Otsu threshold on the hematoxylin channel, scored against the instance masks: pixel Dice, "
            "object F1 at IoU 0.5, AJI. Scale from the median annotated nucleus area (0.25 µm/px when > 300 px², "
            "else 0.5). The defaults were tuned on these same images, so these are training-set numbers.",
            "",
            table(res),
            "",
        ]
    )
    return out


def main() -> None:
    from benchmarks._common import write_result

    res = run(quick=False)
    write_result("segmentation", res)
    print(table(res))


if __name__ == "__main__":
    main()
