"""Regenerate the example figures of the ``bt.pl`` reference (``docs/figures/pl/<function>.png``).

Run from the repository root: ``python docs/pl_examples/make_figures.py`` (about one CPU minute).
``_setup.py`` builds the example data (synthetic tissue, a small model, predictions, scores);
then each ``<function>.py`` snippet — the code shown on the function's reference page — draws
its figure, which is saved as a palette PNG under 150 kB. Commit the PNGs with the snippets.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "figures" / "pl"
DPI = 100
MAX_BYTES = 150_000


def write_small_png(fig, path: Path) -> int:
    """Save ``fig`` as a 256-colour PNG (small enough to commit); returns the size in bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    image.save(path, optimize=True)
    return path.stat().st_size


def main() -> int:
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    import bitro as bt

    bt.settings.progress = False
    namespace: dict = {}
    exec(compile((HERE / "_setup.py").read_text(), "_setup.py", "exec"), namespace)
    OUT.mkdir(parents=True, exist_ok=True)
    too_big = []
    for name in sorted(bt.pl.__all__):
        snippet = HERE / f"{name}.py"
        if not snippet.is_file():
            too_big.append(f"{name}: no example {snippet.name}")
            continue
        plt.close("all")
        exec(compile(snippet.read_text(), snippet.name, "exec"), namespace)
        size = write_small_png(plt.gcf(), OUT / f"{name}.png")
        print(f"{name}.png: {size / 1000:.0f} kB")
        if size > MAX_BYTES:
            too_big.append(f"{name}.png is {size / 1000:.0f} kB (limit {MAX_BYTES / 1000:.0f} kB)")
    for problem in too_big:
        print("problem:", problem)
    return 1 if too_big else 0


if __name__ == "__main__":
    raise SystemExit(main())
