"""Compare bitro's stain normalisation with tiatoolbox's expected outputs (real-data kit ``stain/``).

``source_image.png`` is normalised to ``target_image.png`` with each method through the public
SpatialData API and compared with tiatoolbox's ``norm_<method>.png``: mean absolute pixel difference
(MAE, 0–255), PSNR and SSIM; the same numbers for the unnormalised source give the scale. For the
stain-matrix methods, the stain vectors fitted (by us) on tiatoolbox's output are compared, by cosine
similarity, with the target's vectors and with those fitted on our output.

Run: ``python -m benchmarks --only stain`` (harness) or ``python -m benchmarks.stain`` (``BITRO_DATA_DIR`` overrides ``../shared/data``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BITRO_DATA_DIR", ROOT.parent / "shared" / "data")) / "stain"


def _read(name: str) -> np.ndarray:
    from skimage.io import imread

    return imread(DATA_DIR / name)[..., :3]


def _metrics(ours: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    return {
        "mae": float(np.abs(ours.astype(float) - expected.astype(float)).mean()),
        "psnr": float(peak_signal_noise_ratio(expected, ours, data_range=255)),
        "ssim": float(structural_similarity(expected, ours, channel_axis=-1, data_range=255)),
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i])) for i in range(2)]


def normalise(source: np.ndarray, target: np.ndarray, method: str) -> np.ndarray:
    """Normalise ``source`` to ``target`` through ``bt.pp.normalize_stains`` and return the RGB result."""
    import spatialdata as sd

    import bitro as bt
    from bitro.io._build import get_image, image_element, set_scale

    sdata = sd.SpatialData(images={"he": image_element(source, dims=("y", "x", "c"), chunks=128)})
    set_scale(sdata, mpp=0.5)
    reference = bt.pp.fit_stain_reference(target, method=method, seed=0)
    bt.pp.normalize_stains(sdata, reference=reference, method=method, seed=0)
    return np.moveaxis(np.asarray(get_image(sdata, "he_normalized").data.compute()), 0, -1)


def compare() -> list[dict]:
    """Per method: our output vs tiatoolbox's (MAE, PSNR, SSIM), the unnormalised source as scale, time."""
    import bitro as bt

    source, target = _read("source_image.png"), _read("target_image.png")
    rows = []
    for method in ("vahadane", "macenko", "reinhard"):
        expected = _read(f"norm_{method}.png")
        start = time.perf_counter()
        ours = normalise(source, target, method)
        seconds = time.perf_counter() - start
        row = {
            "method": method,
            "seconds": round(seconds, 2),
            "ours": _metrics(ours, expected),
            "source": _metrics(source, expected),
        }
        if method != "reinhard":
            target_ref = bt.pp.fit_stain_reference(target, method=method, seed=0).stain_matrix
            theirs = bt.pp.fit_stain_reference(expected, method=method, seed=0).stain_matrix
            mine = bt.pp.fit_stain_reference(ours, method=method, seed=0).stain_matrix
            row["cos_tia_vs_target"] = _cosines(theirs, target_ref)
            row["cos_tia_vs_ours"] = _cosines(theirs, mine)
        rows.append(row)
    return rows


def run(quick: bool) -> dict:
    """Harness entry point (``python -m benchmarks --only stain``); the images are small, quick = full."""
    from benchmarks._common import md_table, metadata

    t0 = time.perf_counter()
    rows = compare()
    table = md_table(
        [
            "method",
            "MAE ours",
            "PSNR ours",
            "SSIM ours",
            "MAE source",
            "PSNR source",
            "SSIM source",
            "stain cos (tia out vs our out, H/E)",
            "s",
        ],
        [
            [
                r["method"],
                r["ours"]["mae"],
                r["ours"]["psnr"],
                r["ours"]["ssim"],
                r["source"]["mae"],
                r["source"]["psnr"],
                r["source"]["ssim"],
                ", ".join(f"{c:.3f}" for c in r.get("cos_tia_vs_ours", [])) or None,
                r["seconds"],
            ]
            for r in rows
        ],
        digits=2,
    )
    md = "\n".join(
        [
            "## Stain normalisation vs tiatoolbox",
            "",
            "**Protocol.** The kit's `source_image.png` normalised to `target_image.png` with each method through "
            "`bt.pp.normalize_stains`, compared with tiatoolbox's output of the same method (MAE in 0–255, PSNR, "
            "SSIM); the same numbers for the unnormalised source give the scale.",
            "",
            table,
            "",
        ]
    )
    return {
        "name": "stain",
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0),
        "rows": rows,
        "markdown": md,
    }


def main() -> None:
    print(
        f"{'method':10s} {'MAE':>6s} {'PSNR':>6s} {'SSIM':>6s} | source vs expected: MAE/PSNR/SSIM | stain cosines"
    )
    for r in compare():
        m, s = r["ours"], r["source"]
        line = (
            f"{r['method']:10s} {m['mae']:6.2f} {m['psnr']:6.2f} {m['ssim']:6.3f} | "
            f"{s['mae']:6.2f} {s['psnr']:6.2f} {s['ssim']:6.3f} |"
        )
        if "cos_tia_vs_ours" in r:
            tt = ", ".join(f"{c:.4f}" for c in r["cos_tia_vs_target"])
            to = ", ".join(f"{c:.4f}" for c in r["cos_tia_vs_ours"])
            line += f" tia-output vs target H,E: {tt}; tia-output vs our output H,E: {to}"
        print(line + f"  ({r['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
