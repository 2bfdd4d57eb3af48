"""Component ablations with spread: every held-out HER2ST section × several seeds (issue 13, item 6).

Protocol: leave one section out over C2–C6 (whole sections, 785 genes, EfficientNet-Lite0 tile features,
the accuracy benchmark's cache and its training settings: ``benchmarks.accuracy.BITRO_KW``); each variant
is trained on four sections with seeds 0, 1, 2 (network initialisation, validation split, batches) and
scored on the fifth with ``bt.tl.evaluate`` on both scales. Variants change one thing of the current
default at a time: the head (attention vs per-cell counts), the skip of the cells' own features, the
GAT, the Transformer, the loss, the pooling of the attention head, the target scale. Reported: mean ±
sd over folds × seeds and, per variant, the paired difference to the default (same fold and seed) with
its sd — a component carries its weight only when that difference is clearly above zero.

``--quick``: central windows of one fold, one seed, 3 epochs (checks the harness).
Environment: ``BITRO_COMPONENTS_SEEDS`` (e.g. ``0,1``) and ``BITRO_COMPONENTS_VARIANTS`` (comma list of
names; no name contains a comma) restrict a run; results of an interrupted run of the same protocol are reused.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from benchmarks._common import (
    PREPROCESS,
    RESULTS_DIR,
    SECTIONS,
    features_label,
    kit_genes,
    md_table,
    metadata,
    write_result,
)

from bitro._logging import logger

NAME = "components"
SEEDS = (0, 1, 2)
METRICS = ("pcc_gene", "pcc_gene_top50_var", "pcc_overall")
#: variant -> (network config changes, setup/train option changes); "default" is BiTro's defaults.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "attention head (paper)": ({"head": "attention"}, {}),
    "no skip": ({"skip": False}, {}),
    "poisson loss": ({}, {"loss": "poisson"}),
    "no GAT": ({"use_gat": False}, {}),
    "no Transformer": ({"use_transformer": False}, {}),
    "neither GAT nor Transformer": ({"use_gat": False, "use_transformer": False}, {}),
    "attention head, mean pooling": ({"head": "attention", "pooling": "mean"}, {}),
    "raw-count targets": ({}, {"target": "raw"}),
}


#: Variants that remove part of the trunk (the GAT, the Transformer, or both).
TRUNK_VARIANTS = ("no GAT", "no Transformer", "neither GAT nor Transformer")


def _plan(quick: bool) -> tuple[list[int], list[int], list[str]]:
    folds = [0] if quick else list(range(len(SECTIONS)))
    seeds = [0] if quick else [int(s) for s in os.environ.get("BITRO_COMPONENTS_SEEDS", "0,1,2").split(",")]
    names = os.environ.get("BITRO_COMPONENTS_VARIANTS")
    variants = [v for v in VARIANTS if names is None or v in names.split(",")]
    if "default" not in variants:
        variants.insert(0, "default")
    return folds, seeds, variants


def _reusable(kw: dict[str, Any]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    import json

    path = RESULTS_DIR / f"{NAME}.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    from benchmarks.accuracy import bitro_defaults

    p = old.get("protocol", {})
    if (
        old.get("meta", {}).get("quick")
        or p.get("fit_kwargs") != kw
        or p.get("bitro_defaults") != bitro_defaults()
        or p.get("context_um", []) != list(PREPROCESS["context_um"])  # rows of other cell features
    ):
        return {}
    out: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in old.get("rows", []):
        out.setdefault((r["variant"], r["test"], r["seed"]), []).append(r)
    return out


def run(quick: bool) -> dict[str, Any]:
    """Fit every variant on every fold and seed; return rows, fit times and the Markdown section."""
    from benchmarks.accuracy import BITRO_KW, QUICK_BITRO_KW, load_sections

    import bitro as bt
    from bitro.tl._cv import light_copy

    bt.settings.progress = False
    t0 = time.perf_counter()
    sections = load_sections(quick)
    names = list(sections)
    genes = kit_genes(sections)
    kw = {k: v for k, v in (QUICK_BITRO_KW if quick else BITRO_KW).items()}
    if quick:
        kw["max_epochs"] = 3
    folds, seeds, variants = _plan(quick)
    reused = {} if quick else _reusable(kw)
    rows: list[dict[str, Any]] = []
    times: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    for f in folds:
        test_name = names[f]
        train = [sections[n] for n in names if n != test_name]
        for seed in seeds:
            for variant in variants:
                if (variant, test_name, seed) in reused:
                    rows += reused[(variant, test_name, seed)]
                    continue
                config, opts = VARIANTS[variant]
                t = time.perf_counter()
                model = bt.tl.fit(
                    train, genes=genes, config=config or None, seed=seed, device="cpu", **{**kw, **opts}
                )
                fit_s = time.perf_counter() - t
                test = light_copy(sections[test_name])
                model.predict(test, key_added="cv")
                res = bt.tl.evaluate(test, table_key="spots", layer="cv", normalize="both", inplace=False)
                for r in res[res["metric"].isin(METRICS)].itertuples():
                    rows.append({"variant": variant, "test": test_name, "seed": seed, "metric": r.metric,
                                 "scale": r.scale, "value": float(r.value)})  # fmt: skip
                times.append({"variant": variant, "test": test_name, "seed": seed, "fit_seconds": round(fit_s, 1),
                              "epochs": len(model.history["epoch"])})  # fmt: skip
                logger.info("components: %s seed %d %s: fit %.0f s", test_name, seed, variant, fit_s)
                out = _result(quick, t0, names, folds, seeds, variants, kw, genes, rows, times)
                if not quick:
                    write_result(NAME, out)
    return out


def _defaults() -> dict[str, Any]:
    from benchmarks.accuracy import bitro_defaults

    return bitro_defaults()


def _result(quick, t0, names, folds, seeds, variants, kw, genes, rows, times) -> dict[str, Any]:
    out = {
        "name": NAME,
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seeds": seeds}),
        "protocol": {
            "sections": names,
            "held_out": [names[f] for f in folds],
            "seeds": seeds,
            "variants": {v: {"config": VARIANTS[v][0], "options": VARIANTS[v][1]} for v in variants},
            "context_um": list(PREPROCESS["context_um"]),
            "fit_kwargs": kw,
            "bitro_defaults": _defaults(),
            "n_genes": len(genes),
        },
        "rows": rows,
        "times": times,
    }
    out["markdown"] = markdown(out)
    return out


def summary(
    rows: list[dict[str, Any]], metric: str = "pcc_gene", scale: str = "library_size"
) -> list[dict[str, Any]]:
    """Per variant: mean ± sd over folds × seeds, and the paired difference to the default."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        return []
    df = df[(df["metric"] == metric) & (df["scale"] == scale)]
    base = df[df["variant"] == "default"].set_index(["test", "seed"])["value"]
    out = []
    for variant, part in df.groupby("variant", sort=False):
        vals = part.set_index(["test", "seed"])["value"]
        paired = (vals - base.reindex(vals.index)).dropna()
        out.append({
            "variant": variant, "mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals), "diff": float(paired.mean()) if len(paired) else float("nan"),
            "diff_sd": float(paired.std(ddof=1)) if len(paired) > 1 else 0.0,
            "wins": int((paired > 0).sum()), "n_paired": len(paired),
        })  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> str:
    """The benchmarks-page section."""
    p = result["protocol"]
    rows = result["rows"]
    lines = [
        "## Component ablations with spread (HER2ST, all folds × seeds)",
        "",
        f"**Protocol.** Leave one section out over {', '.join(p['sections'])} (held out: "
        f"{', '.join(p['held_out'])}), seeds {p['seeds']}, {p['n_genes']} genes, the accuracy benchmark's cache "
        f"({features_label(p.get('context_um', []))}) and settings ({p['fit_kwargs']}). Each variant changes one thing of BiTro's current default; "
        "values are mean ± sd over folds × seeds; *Δ default* is the paired difference (same fold, same seed) "
        "with its sd, and *wins* how many of the paired runs the variant beat the default in.",
        "",
    ]
    table = []
    for scale in ("library_size", "raw"):
        for s in summary(rows, "pcc_gene", scale):
            table.append([
                s["variant"], "norm" if scale == "library_size" else "raw", f"{s['mean']:.3f} ± {s['sd']:.3f}",
                "–" if s["variant"] == "default" else f"{s['diff']:+.3f} ± {s['diff_sd']:.3f}",
                "–" if s["variant"] == "default" else f"{s['wins']}/{s['n_paired']}", s["n"],
            ])  # fmt: skip
    lines.append(md_table(["variant", "scale", "PCC_gene", "Δ default", "wins", "runs"], table))
    lines += ["", "**Reading.**", ""]
    norm = summary(rows, "pcc_gene", "library_size")
    for s in norm:
        if s["variant"] == "default" or not s["n_paired"]:
            continue
        clear = abs(s["diff"]) > 2 * s["diff_sd"] / max(np.sqrt(s["n_paired"]), 1)
        verdict = (
            ("better than" if s["diff"] > 0 else "worse than") + " the default"
            if clear
            else "not distinguishable from the default"
        )
        lines.append(
            f"- {s['variant']}: normalised PCC_gene {s['mean']:.3f} ± {s['sd']:.3f}, Δ {s['diff']:+.3f} ± "
            f"{s['diff_sd']:.3f} over {s['n_paired']} paired runs ({s['wins']} wins): {verdict}."
        )
    trunk = {s["variant"]: s for s in norm if s["variant"] in TRUNK_VARIANTS and s["n_paired"]}
    if trunk and all(
        abs(s["diff"]) <= 2 * s["diff_sd"] / max(np.sqrt(s["n_paired"]), 1) or s["diff"] > 0
        for s in trunk.values()
    ):
        better = [
            v for v, s in trunk.items() if s["diff"] > 2 * s["diff_sd"] / max(np.sqrt(s["n_paired"]), 1)
        ]
        tail = (
            f" Without them bitro scores **higher** ({', '.join(better)}): on these sections the trunk costs "
            "accuracy. The default still has them (the paper's architecture) until the cell-level benchmarks "
            "are re-run without them."
            if better
            else " They stay in the default as the paper's architecture that is not worse; a model without them "
            "is the simpler equivalent on these sections."
        )
        lines.append(
            "- **The GAT and the Transformer do not carry their weight here**: no variant without them ("
            + ", ".join(v for v in TRUNK_VARIANTS if v in trunk)
            + ") lowers normalised PCC_gene beyond the spread."
            + tail
        )
    times = result.get("times", [])
    if times:
        mean_fit = np.mean([t["fit_seconds"] for t in times])
        lines += ["", f"Mean fit time {mean_fit:.0f} s per run ({len(times)} runs, one core)."]
    return "\n".join(lines) + "\n"
