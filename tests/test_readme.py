"""The README's Python code runs as written: every ```python block, in order, in one namespace.

The blocks are executed verbatim in a fresh interpreter (like a fresh notebook kernel). One thing
differs from a user's run, to keep CI fast: the environment variable ``BITRO_PREPARED_CROP_UM`` is
set, which makes ``bt.datasets.her2st(section, prepared=True)`` prepare a 1.1 mm window of each
section instead of the whole section (the README's testing note says so). Prepared windows go to
the test session's cache folder (``$BITRO_CACHE_DIR``), shared with the tutorials.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Window side (µm) of prepared sections in this test (the tutorials use the same windows).
CROP_UM = "1100"

_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

_RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    blocks, check = json.loads(sys.stdin.read())
    namespace = {"__name__": "__main__"}
    for i, code in enumerate(blocks, 1):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"README python block {i} of {len(blocks)} failed", file=sys.stderr)
            sys.exit(1)
        print(f"README python block {i} of {len(blocks)} ran", flush=True)
    exec(compile(check, "check", "exec"), namespace)  # not README code: reads what the blocks left
    """
)

#: Run after the README's blocks, in their namespace: what they computed, as one JSON line.
_CHECK = textwrap.dedent(
    """
    import json
    import numpy as np
    genes = bt.datasets.her2st_genes()
    predicted = np.asarray(test["spots"][:, genes].layers["bitro"])
    scores = bt.tl.evaluate(test, layer="bitro", inplace=False)  # the README wrote its own already
    print("CHECK " + json.dumps({
        "block1_cells": int(sdata["cells"].n_obs),
        "block1_features": int(sdata["cells"].obsm["X_bitro"].shape[1]),
        "block1_cells_in_spots": int(sdata["cells"].obs["spot_id"].notna().sum()),
        "train_sections": [str(s.attrs["bitro_prepared"]["key"]["section"]) for s in train],
        "test_section": str(test.attrs["bitro_prepared"]["key"]["section"]),
        "crop_um": test.attrs["bitro_prepared"]["key"]["crop_um"],
        "prediction_finite": bool(np.isfinite(predicted).all()),
        "pcc_gene": {s: float(v) for s, v in scores.query("metric == 'pcc_gene'").set_index("scale")["value"].items()},
    }))
    """
)


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return [m.group(1) for m in _BLOCK.finditer(text)]


def test_python_blocks_are_found():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    assert any("prepared=True" in b for b in blocks)  # the training block uses the prepared sections
    assert python_blocks("text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n") == [
        "x = 1\n",
        "y = x\n",
    ]


@pytest.mark.realdata
@pytest.mark.chain
def test_readme_python_runs_top_to_bottom(tmp_path):
    import json

    blocks = python_blocks(README.read_text())
    env = dict(os.environ)
    env["BITRO_PREPARED_CROP_UM"] = CROP_UM
    env.setdefault("MPLBACKEND", "Agg")
    res = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps([blocks, _CHECK]),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-6000:]}"
    assert res.stdout.count("ran") == len(blocks)
    [line] = [ln for ln in res.stdout.splitlines() if ln.startswith("CHECK ")]
    out = json.loads(line.removeprefix("CHECK "))
    # block 1: a window of C2 segmented and embedded (EfficientNet-Lite0: nucleus + neighbourhood), cells in its spots
    assert out["block1_cells"] > 500 and out["block1_features"] == 2 * 1280 and out["block1_cells_in_spots"] > 50
    # block 2: four prepared training sections and a fifth held out, windows of the CI size
    assert out["train_sections"] == ["C2", "C3", "C4", "C5"] and out["test_section"] == "C6"
    assert out["crop_um"] == float(CROP_UM)
    assert out["prediction_finite"]
    assert set(out["pcc_gene"]) == {"raw", "library_size"}
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in out["pcc_gene"].values())
