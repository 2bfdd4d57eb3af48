"""Entry point of the benchmark harness: ``python -m benchmarks [--quick | --full] [--only NAME ...]``.

Runs the selected benchmarks (default: the standard set, about half an hour on the 2-core reference
machine; ``--full`` adds the slow ones: the accuracy ablations, scaling, bulk memory and distributed
runs), writes ``benchmarks/results/<name>.json``
for each, then regenerates the results page (default ``docs/benchmarks.md``) from *all* JSON files
present, so a page always reflects the latest run of every benchmark. ``--page-only`` rebuilds the
page without running anything. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, ROOT, SETTINGS, features_label, md_table, write_result

# name -> module; order = run order and page order
BENCHMARKS = {
    "pipeline": "benchmarks.pipeline",
    "accuracy": "benchmarks.accuracy",
    "bulk": "benchmarks.bulk",
    "cells": "benchmarks.cells",
    "scaling": "benchmarks.scaling",
    "bulk_memory": "benchmarks.bulk_memory",
    "embedding": "benchmarks.embedding",
    "segmentation": "benchmarks.segmentation",
    "stain": "benchmarks.stain",
    "distributed": "benchmarks.distributed",
    "crop_vs_tile": "benchmarks.crop_vs_tile",
    "composition": "benchmarks.composition",
    "shift": "benchmarks.shift",
    "components": "benchmarks.components",
    "ensemble": "benchmarks.ensemble",
    "spahgc": "benchmarks.spahgc",
    "align": "benchmarks.align",
    "aligned_bitro": "benchmarks.aligned_bitro",
}
ALIASES = {"speed": "embedding"}
#: Benchmarks that only run with ``--full`` (or when named with ``--only``): each takes 10 min or more.
FULL_ONLY = (
    "scaling",
    "bulk_memory",
    "distributed",
    "crop_vs_tile",
    "composition",
    "shift",
    "components",
    "ensemble",
    "spahgc",
    "align",
    "aligned_bitro",
)
STANDARD = tuple(n for n in BENCHMARKS if n not in FULL_ONLY)
FULL = tuple(BENCHMARKS)


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """All harness result files (those with a ``markdown`` section), keyed by benchmark name."""
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(res, dict) and "markdown" in res and "meta" in res:
            out[res.get("name", path.stem)] = _rerender(res)
    return _merge_ablations(out)


def _rerender(res: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a result's Markdown with the current text of its benchmark (same numbers).

    Wording fixes then reach the page without re-running a benchmark; a result the current code
    cannot render (an older format) keeps the Markdown stored with it.
    """
    name = res.get("name")
    module = BENCHMARKS.get(name) or ("benchmarks.accuracy" if name == "accuracy_ablations" else None)
    render = getattr(importlib.import_module(module), "markdown", None) if module else None
    if render is None:
        return res
    try:
        return {**res, "markdown": render(res)}
    except Exception as err:  # presentation only: the stored text is a safe fallback
        from bitro._logging import logger

        logger.info("benchmarks: kept the stored Markdown of %s (%s: %s)", name, type(err).__name__, err)
        return res


def _merge_ablations(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fold an ablation-only accuracy result (run in a separate process) into the accuracy result."""
    ab = results.pop("accuracy_ablations", None)
    acc = results.get("accuracy")
    if ab is None:
        return results
    if acc is None or acc["meta"].get("quick") != ab["meta"].get("quick"):
        results["accuracy_ablations"] = ab
        return results
    if any(r["group"] == "ablation" for r in acc["rows"]):  # a --full run: its own ablations are newer
        return results
    from benchmarks.accuracy import markdown

    acc = {**acc, "rows": acc["rows"] + [r for r in ab["rows"] if r["group"] == "ablation"]}
    acc["speed"] = acc["speed"] + ab["speed"]
    ab_keys = ("folds_ablation", "transfer_bulk_epochs")
    acc["protocol"] = {**acc["protocol"], **{k: ab["protocol"][k] for k in ab_keys if k in ab["protocol"]}}
    acc["markdown"] = markdown(acc)
    results["accuracy"] = acc
    return results


def _headline(results: dict[str, dict[str, Any]]) -> list[str]:
    """The headline table: PCC_gene of bitro and the baselines on both scales (accuracy benchmark)."""
    acc = results.get("accuracy")
    if not acc or not acc.get("rows"):
        return ["_No accuracy results yet: run `python -m benchmarks --only accuracy`._", ""]
    agg: dict[tuple[str, str, str, str], list[float]] = {}
    for r in acc["rows"]:
        if r["group"] != "main":
            continue
        agg.setdefault((r["run"], r["target"], r["metric"], r["scale"]), []).append(r["value"])
    models = list(dict.fromkeys((k[0], k[1]) for k in agg))

    def mean(*key: str) -> float | None:
        v = agg.get(key)  # type: ignore[arg-type]
        return sum(v) / len(v) if v else None

    rows = [
        [
            m,
            "norm" if t == "library_size" else "raw",
            mean(m, t, "pcc_gene", "library_size"),
            mean(m, t, "pcc_gene_top50_var", "library_size"),
            mean(m, t, "pcc_gene", "raw"),
            mean(m, t, "pcc_overall", "raw"),
        ]
        for m, t in models
    ]
    p = acc["protocol"]
    quick = (
        " (**quick run: windows, one fold, few epochs — not the standard numbers**)"
        if acc["meta"]["quick"]
        else ""
    )
    done = list(dict.fromkeys(r["test"] for r in acc["rows"] if r["group"] == "main"))
    win = "" if not p.get("window_half_px") else f" (central {2 * p['window_half_px']} px windows)"
    return [
        f"Leave-one-section-out on HER2ST {', '.join(p['sections'])}{win}, held-out {', '.join(done)}, "
        f"{p['n_genes']} genes, {features_label(p.get('context_um', []))}; mean over held-out sections{quick}.",
        "",
        md_table(
            [
                "model",
                "trained on",
                "PCC_gene norm",
                "PCC_gene top50 norm",
                "PCC_gene raw",
                "PCC_overall raw",
            ],
            rows,
        ),
        "",
    ]


def _provenance(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, res in results.items():
        m = res["meta"]
        rows.append(
            [
                name,
                m.get("date_utc"),
                m["git"]["commit"][:10] + ("+dirty" if m["git"].get("dirty") else ""),
                "quick" if m["quick"] else ("full" if m.get("full") else "standard"),
                m["wall_seconds"],
                str(m["machine"]["load_average"]),
            ]
        )
    any_meta = next(iter(results.values()))["meta"]
    mach, ver = any_meta["machine"], any_meta["versions"]
    return [
        "## Provenance",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gb']} GB RAM ({mach['platform']}); shared "
        "with other jobs, so wall times are noisy — the 1/5/15-min load average at the end of each run is "
        f"recorded. Versions: {', '.join(f'{k} {v}' for k, v in ver.items())}.",
        "",
        md_table(["benchmark", "date (UTC)", "commit", "mode", "wall (s)", "load avg"], rows, digits=0),
        "",
    ]


def build_page(results: dict[str, dict[str, Any]]) -> str:
    """The results page (Markdown) from result dicts as written by the benchmarks."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks` from the JSON files in `benchmarks/results/` — do not edit by "
        "hand. Every number is measured by the harness on the machine in the provenance table; the protocol "
        "is given next to each table. *norm* = library-size normalised log1p, *raw* = raw-count log1p.",
        "",
    ]
    if not results:
        return "\n".join([*lines, "_No results yet: run `python -m benchmarks`._", ""])
    lines += ["## Headline", "", *_headline(results)]
    losses = [
        ln
        for res in results.values()
        for ln in res["markdown"].splitlines()
        if "**bitro loses" in ln or "do **not**" in ln or "does **not**" in ln
    ]
    if losses:
        lines += [
            "### Where bitro loses",
            "",
            *[ln if ln.startswith("-") else f"- {ln}" for ln in losses],
            "",
        ]
    order = [n for n in BENCHMARKS if n in results] + [n for n in results if n not in BENCHMARKS]
    for name in order:
        md = results[name]["markdown"].rstrip().split("\n", 1)
        if results[name]["meta"].get("quick"):
            md.insert(1, "\n_Quick run (`--quick`: small inputs, few epochs) — not the standard numbers._\n")
        lines += ["\n".join(md), ""]
    lines += _provenance(results)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run benchmarks, write JSON files and the page."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small inputs, one fold, few epochs (a few minutes)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"also run the slow set: accuracy ablations, {', '.join(FULL_ONLY)} (a few hours)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"run only these: {', '.join(BENCHMARKS)} (speed = embedding)",
    )
    parser.add_argument(
        "--out", default=str(ROOT / "docs" / "benchmarks.md"), help="results page to (re)write"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        metavar="HALF_PX",
        help="standard accuracy/bulk runs on central windows of 2*HALF_PX px instead of whole sections",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="override bitro's max_epochs (standard runs)"
    )
    parser.add_argument(
        "--ablation-folds", type=int, nargs="+", default=None, help="held-out fold indices of the ablations"
    )
    parser.add_argument(
        "--groups", nargs="+", choices=("main", "ablation"), help="accuracy: run only these groups"
    )
    parser.add_argument("--page-only", action="store_true", help="only rebuild the page from existing JSON")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run up to N benchmarks at once, each in its own process (longest first); 2 on a 2-core machine",
    )
    parser.add_argument("--no-page", action="store_true", help=argparse.SUPPRESS)  # children of --jobs
    args = parser.parse_args(argv)

    import logging

    from bitro._logging import logger

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logger.setLevel(logging.INFO)
    if args.quick and args.full:
        parser.error(
            "--quick and --full exclude each other: --quick shrinks every benchmark, --full adds the slow ones."
        )
    names = [ALIASES.get(n, n) for n in (args.only or (FULL if args.full else STANDARD))]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)} or 'speed'.")
    SETTINGS.update(
        window=args.window,
        epochs=args.epochs,
        ablation_folds=args.ablation_folds,
        groups=args.groups,
        full=args.full,
    )
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}.")
    if not args.page_only and args.jobs > 1 and len(set(names)) > 1:
        from benchmarks._jobs import run_parallel

        run_parallel(names, _child_args(args), args.jobs)
    elif not args.page_only:
        for name in dict.fromkeys(names):
            t0 = time.perf_counter()
            logger.info("benchmarks: running %s%s", name, " (quick)" if args.quick else "")
            try:
                res = importlib.import_module(BENCHMARKS[name]).run(args.quick)
            except Exception as err:  # keep the other benchmarks going; the failure is logged
                logger.exception("benchmarks: %s failed: %s", name, err)
                continue
            if not res or "meta" not in res:  # never replace a stored result with an empty one
                logger.error("benchmarks: %s measured nothing; its stored result is kept", name)
                continue
            path = write_result(res.get("name", name), res)
            logger.info("benchmarks: %s done in %.0f s -> %s", name, time.perf_counter() - t0, path)
    if args.no_page:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_page(load_results()))
    logger.info("benchmarks: page written to %s", out)


def _child_args(args: argparse.Namespace) -> list[str]:
    """The options a ``--jobs`` child needs to run one benchmark as the parent would."""
    out = [flag for flag, on in (("--quick", args.quick), ("--full", args.full)) if on]
    for flag, value in (("--window", args.window), ("--epochs", args.epochs)):
        if value is not None:
            out += [flag, str(value)]
    for flag, values in (("--ablation-folds", args.ablation_folds), ("--groups", args.groups)):
        if values:
            out += [flag, *map(str, values)]
    return out


if __name__ == "__main__":
    main()
