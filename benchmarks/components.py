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
    SETTINGS,
    features_label,
    md_table,
    metadata,
    write_result,
)

from bitro._logging import logger
from bitro.models._config import automatic_skip

NAME = "components"
SEEDS = (0, 1, 2)
METRICS = ("pcc_gene", "pcc_gene_top50_var", "pcc_overall")
#: Benchmark-only option of a variant (not passed to ``bt.tl.fit``): train on the training sections plus
#: their augmented copies, ``benchmarks.shift.AUGMENTS`` (×0.8 and ×1.2 with a mild stain jitter), each
#: copy preprocessed like a section and cached; never a copy of the held-out section.
AUGMENT_OPTION = "augmented_copies"
#: variant -> (network config changes, setup/train option changes); "default" is BiTro's defaults.
_PAPER_TRUNK = {"use_gat": True, "use_transformer": True}
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "attention head (paper)": ({"head": "attention", **_PAPER_TRUNK}, {}),
    "+ skip": ({"skip": True}, {}),
    "poisson loss": ({}, {"loss": "poisson"}),
    "+ GAT": ({"use_gat": True}, {}),
    "+ Transformer": ({"use_transformer": True}, {}),
    "+ GAT and Transformer (paper trunk)": (dict(_PAPER_TRUNK), {}),
    "attention head (paper) with mean pooling": (
        {"head": "attention", "pooling": "mean", **_PAPER_TRUNK},
        {},
    ),
    "raw-count targets": ({}, {"target": "raw"}),
    # a data variant: the training sections plus augmented copies of each (the shift benchmark's recipe)
    "+ augmented copies (×0.8 and ×1.2 with stain jitter)": ({}, {AUGMENT_OPTION: True}),
}


#: Variants that add the paper's trunk (the GAT, the Transformer, or both) to the trunk-free default.
TRUNK_VARIANTS = ("+ GAT", "+ Transformer", "+ GAT and Transformer (paper trunk)")


def _plan(quick: bool) -> tuple[list[int], list[int], list[str]]:
    folds = [0] if quick else list(range(len(SECTIONS)))
    seeds = [0] if quick else [int(s) for s in os.environ.get("BITRO_COMPONENTS_SEEDS", "0,1,2").split(",")]
    names = os.environ.get("BITRO_COMPONENTS_VARIANTS")
    chosen = None if names is None else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen or [] if n not in VARIANTS]
    if unknown:  # a typo (or a name split at a comma) would silently drop a variant
        msg = f"BITRO_COMPONENTS_VARIANTS: unknown variant(s) {unknown}; choose from {list(VARIANTS)}."
        raise ValueError(msg)
    variants = [v for v in VARIANTS if chosen is None or v in chosen]
    if "default" not in variants:
        variants.insert(0, "default")
    return folds, seeds, variants


def _effective(defaults: dict[str, Any], config: dict[str, Any], opts: dict[str, Any]) -> str:
    """A variant's whole network and setup (the defaults of its run with its changes) as one key."""
    import json

    network = {**defaults.get("network", {}), **config}
    if network.get("skip", False) is None:
        network["skip"] = automatic_skip(network.get("use_gat"), network.get("use_transformer"))
    setup = {**defaults.get("setup", {}), **opts}
    rest = {k: v for k, v in defaults.items() if k not in ("network", "setup")}
    return json.dumps({"network": network, "setup": setup, **rest}, sort_keys=True, default=str)


def _reusable(kw: dict[str, Any]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    """Rows of ``results/components.json`` that today's variants would reproduce.

    A row is matched by its variant's *effective* network and setup (the defaults of its run with the
    variant's changes), not by its name: after a default changes, the old "neither GAT nor Transformer"
    rows are today's "default" rows. Each reused row keeps the commit it was computed at.
    """
    import json

    path = RESULTS_DIR / f"{NAME}.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    from benchmarks.accuracy import bitro_defaults

    p = old.get("protocol", {})
    old_defaults = p.get("bitro_defaults")
    if (
        old.get("meta", {}).get("quick")
        or p.get("fit_kwargs") != kw
        or old_defaults is None
        or p.get("context_um", []) != list(PREPROCESS["context_um"])  # rows of other cell features
    ):
        return {}
    now = bitro_defaults()
    today = {_effective(now, *VARIANTS[v]): v for v in VARIANTS}
    rename = {}
    for name, spec in p.get("variants", {}).items():
        key = _effective(old_defaults, spec.get("config", {}), spec.get("options", {}))
        if key in today:
            rename[name] = today[key]
    commit = old.get("meta", {}).get("git", {}).get("commit")
    out: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in old.get("rows", []):
        if r["variant"] in rename:
            row = {**r, "variant": rename[r["variant"]], "reused_from": r.get("reused_from", commit)}
            out.setdefault((row["variant"], r["test"], r["seed"]), []).append(row)
    for t in old.get("times", []):  # the fit time of a reused row travels with it
        if t["variant"] in rename and (rename[t["variant"]], t["test"], t["seed"]) in out:
            out[(rename[t["variant"]], t["test"], t["seed"])][0].setdefault("fit_seconds", t["fit_seconds"])
    return out


def run(quick: bool) -> dict[str, Any]:
    """Fit every variant on every fold and seed; return rows, fit times and the Markdown section."""
    from benchmarks.accuracy import QUICK_WINDOW, seed_study_inputs
    from benchmarks.shift import fold_copies

    import bitro as bt
    from bitro.tl._cv import light_copy

    bt.settings.progress = False
    t0 = time.perf_counter()
    sections, names, genes, kw = seed_study_inputs(quick)
    folds, seeds, variants = _plan(quick)
    reused = {} if quick else _reusable(kw)
    # stored rows this run does not visit (other variants, folds or seeds) stay in the result: a run of a
    # subset adds to the table, it never drops the rest of it
    visited = {(v, names[f], s) for f in folds for s in seeds for v in variants}
    rows, times = _unpack({k: v for k, v in reused.items() if k not in visited})
    out: dict[str, Any] = {}
    for f in folds:
        test_name = names[f]
        train = [sections[n] for n in names if n != test_name]
        copies = None  # the fold's augmented copies, loaded when a variant first needs them, dropped after
        for seed in seeds:
            for variant in variants:
                if (variant, test_name, seed) in reused:
                    got_rows, got_times = _unpack(
                        {(variant, test_name, seed): reused[(variant, test_name, seed)]}
                    )
                    rows += got_rows
                    times += got_times
                    continue
                config, opts = VARIANTS[variant]
                slides = train
                if opts.get(AUGMENT_OPTION):
                    if copies is None:
                        copies = fold_copies(names, test_name, QUICK_WINDOW if quick else SETTINGS["window"])
                    slides = [*train, *copies]
                fit_opts = {k: v for k, v in opts.items() if k != AUGMENT_OPTION}
                t = time.perf_counter()
                model = bt.tl.fit(
                    slides, genes=genes, config=config or None, seed=seed, device="cpu", **{**kw, **fit_opts}
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
    # every row may have been reused (nothing fitted): the result is still the whole table
    return _result(quick, t0, names, folds, seeds, variants, kw, genes, rows, times)


def _unpack(stored: dict[tuple[str, str, int], list[dict[str, Any]]]) -> tuple[list[dict], list[dict]]:
    """Rows and fit-time records of stored runs (the fit time travels on the first row of a run)."""
    rows, times = [], []
    for (variant, test, seed), got in stored.items():
        got = [dict(r) for r in got]
        fit_s = next((r.pop("fit_seconds") for r in got if "fit_seconds" in r), None)
        rows += got
        if fit_s is not None:
            times.append(
                {"variant": variant, "test": test, "seed": seed, "fit_seconds": fit_s, "reused": True}
            )
    return rows, times


def _defaults() -> dict[str, Any]:
    from benchmarks.accuracy import bitro_defaults

    return bitro_defaults()


def _result(quick, t0, names, folds, seeds, variants, kw, genes, rows, times) -> dict[str, Any]:
    # the table may hold more than this run visited (rows kept from earlier runs)
    present = {r["variant"] for r in rows}
    variants = [v for v in VARIANTS if v in variants or v in present]
    seeds = sorted(set(seeds) | {r["seed"] for r in rows})
    held = {names[f] for f in folds} | {r["test"] for r in rows}
    folds = [i for i, n in enumerate(names) if n in held]
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
    order = list(VARIANTS)  # the table's order, whatever order the rows were stored in
    return sorted(out, key=lambda s: order.index(s["variant"]) if s["variant"] in order else len(order))


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
    if trunk:
        margin = {v: 2 * s["diff_sd"] / max(np.sqrt(s["n_paired"]), 1) for v, s in trunk.items()}
        helps = [v for v, s in trunk.items() if s["diff"] > margin[v]]
        hurts = [v for v, s in trunk.items() if s["diff"] < -margin[v]]
        if helps:
            lines.append(
                "- **Adding the paper's trunk raises normalised PCC_gene beyond the spread** ("
                + ", ".join(helps)
                + "): on these sections the trunk carries its weight at spot level; the default leaves it "
                "out for the cell-level benchmarks (pseudo single cells), which it costs."
            )
        else:
            lines.append(
                "- **The GAT and the Transformer do not carry their weight here**: adding them to the "
                "trunk-free default ("
                + ", ".join(trunk)
                + ") does not raise normalised PCC_gene beyond the spread"
                + (f"; {', '.join(hurts)} lower{'s' if len(hurts) == 1 else ''} it." if hurts else ".")
                + " They stay available (`config={'use_gat': True, 'use_transformer': True}`) as the paper's "
                "network."
            )
    times = result.get("times", [])
    if times:
        mean_fit = np.mean([t["fit_seconds"] for t in times])
        lines += ["", f"Mean fit time {mean_fit:.0f} s per run ({len(times)} runs, one core)."]
    return "\n".join(lines) + "\n"
