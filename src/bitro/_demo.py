"""``bitro demo``: the whole pipeline on the built-in synthetic tissue, with a report.

Every run writes into a fresh folder ``bitro_demo/<YYYYmmdd-HHMMSS>/`` unless ``out`` is given,
so the command can be run again and again. An explicit ``out`` must be absent or empty; with
``overwrite=True`` (``--overwrite``) it may also hold an earlier demo's output, which is then
replaced — a folder with anything else in it is never touched.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bitro._logging import logger

DEMO_ROOT = "bitro_demo"
"""Parent folder of the timestamped run folders when no ``out`` is given."""
REPORT_FORMAT = "bitro-demo/1"
"""``report.json["format"]``: how a folder is recognised as a demo's own output."""
FIGURES = ("spatial.png", "cells.png", "segmentation.png", "history.png", "gene_correlations.png")
"""Figures the demo writes (those that fail are skipped with a warning)."""
DEMO_FILES = frozenset({"report.md", "report.json", "metrics.csv", *FIGURES})
"""Every file a demo writes; a folder with other entries is not a demo output."""
FIGURE_DPI = 200
"""Resolution of the demo's figures (PNG)."""
TIE = 0.005
"""Differences in PCC_gene below this are called a tie in the headline."""
HEADLINE_METRIC = ("pcc_gene", "library_size")
"""The metric of the headline: PCC_gene after library-size normalisation (the gene-specific test)."""


class _Timer:
    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()
                logger.info("demo: %s …", name)

            def __exit__(self, *exc):
                timer.steps[name] = time.perf_counter() - self.t

        return _Ctx()


def default_out(root: str | Path = DEMO_ROOT, *, now: datetime | None = None) -> Path:
    """A fresh run folder ``<root>/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``… appended if it exists)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 2
    while path.exists():
        path = Path(root) / f"{stamp}-{n}"
        n += 1
    return path


def _foreign_entries(out: Path) -> str | None:
    """Why ``out`` is not an earlier demo's output (``None`` when it is one)."""
    if out.is_symlink() or not out.is_dir():
        return "it is not a folder"
    entries = {p.name for p in out.iterdir()}
    extra = sorted(entries - DEMO_FILES)
    if extra:
        return f"it holds files the demo does not write ({extra[:5]})"
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return "it has no readable report.json"
    if not isinstance(report, dict) or not str(report.get("format", "")).startswith("bitro-demo/"):
        return "its report.json is not a demo report"
    return None


def prepare_out(out: str | Path | None, *, overwrite: bool = False) -> Path:
    """The folder a demo run writes into, checked (and emptied of an earlier demo's files) before any work.

    Parameters
    ----------
    out
        ``None``: a fresh ``bitro_demo/<YYYYmmdd-HHMMSS>`` folder. Otherwise a folder that must be
        absent or empty, or — with ``overwrite`` — hold only an earlier demo's output.
    overwrite
        Replace an earlier demo's output in ``out``.

    Returns
    -------
    The folder, created and empty.

    Raises
    ------
    FileExistsError
        ``out`` is a file, or a non-empty folder without ``overwrite``, or a folder with anything
        but a demo's output (never touched, whatever ``overwrite`` says).
    """
    from bitro._files import remove_path

    path = default_out() if out is None else Path(out)
    if path.exists() and not path.is_dir():
        msg = f"Output {str(path)!r} is a file, not a folder; choose another --out."
        raise FileExistsError(msg)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            msg = (
                f"Output folder {str(path)!r} exists and is not empty. Leave out --out (each run gets a fresh "
                f"folder {DEMO_ROOT}/<date-time>), choose another --out, or pass --overwrite to replace an "
                "earlier demo's output there."
            )
            raise FileExistsError(msg)
        why = _foreign_entries(path)
        if why is not None:
            msg = (
                f"{str(path)!r} is not the output of an earlier bitro demo ({why}); the demo replaces only its "
                "own files, even with --overwrite. Choose another --out."
            )
            raise FileExistsError(msg)
        logger.info("demo: replacing the earlier demo output in %s.", path)
        for entry in path.iterdir():
            remove_path(entry)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_demo(
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    size: int = 1600,
    n_slides: int = 3,
    epochs: int = 30,
    encoder: str = "morphology",
    technology: str = "visium",
) -> Path:
    """Run stain normalisation → segmentation → embedding → fit → predict → evaluate on synthetic slides.

    The last slide is held out for testing; the others train bitro and three baselines (ridge
    regression on the mean-pooled cell features, cell count, mean). Writes figures, ``metrics.csv``,
    ``report.json`` and ``report.md`` into the output folder; the report opens with a headline
    that says whether bitro or ridge wins on this run and what to try when bitro loses.

    Parameters
    ----------
    out
        Output folder; default: a fresh ``bitro_demo/<YYYYmmdd-HHMMSS>`` (so reruns never collide).
        A given folder must be absent or empty (see ``overwrite``).
    overwrite
        Let ``out`` hold an earlier demo's output and replace it (only a demo's own files are
        ever removed; any other file makes the run refuse).
    seed
        Random seed of the tissue and the models.
    size
        Slide size in pixels.
    n_slides
        Number of synthetic slides (≥ 2).
    epochs
        Maximum training epochs.
    encoder
        Cell encoder (``"morphology"`` is fastest; ``"efficientnet_lite0"`` uses ImageNet weights).
    technology
        Spot layout of the synthetic slides: ``"visium"`` (55 µm spots, more of them) or ``"ST"``.

    Returns
    -------
    Path of the Markdown report.
    """
    if n_slides < 2:
        msg = (
            f"The demo needs at least 2 slides (train on all but the last, test on the last); got {n_slides}."
        )
        raise ValueError(msg)
    if epochs < 1:
        msg = f"epochs must be at least 1, got {epochs}."
        raise ValueError(msg)
    out = prepare_out(out, overwrite=overwrite)  # before the heavy imports: a bad --out fails at once
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import bitro as bt

    logger.info("demo: writing into %s", out)
    timer = _Timer()
    with timer("synthetic tissue"):
        slides = bt.datasets.synthetic_tissue(n_slides, size=size, technology=technology, seed=seed)
    for i, sdata in enumerate(slides):
        with timer(f"preprocess slide {i}"):
            bt.pp.normalize_stains(sdata, image_key="he", method="macenko")
            bt.pp.segment_cells(sdata, image_key="he_normalized")
            bt.pp.embed_cells(sdata, image_key="he_normalized", encoder=encoder, mode="tile")
            bt.pp.assign_cells(sdata)
    train, test = slides[:-1], slides[-1]
    n_table = int(train[0]["spots"].n_vars)
    n_top = min(100, n_table)
    genes = bt.pp.select_genes(train, n_top=n_top)
    logger.info(
        "demo: %d of the %d genes chosen by bt.pp.select_genes(n_top=%d) (in both the top %d by mean and by "
        "spread); every model predicts and is scored on these %d genes.",
        len(genes),
        n_table,
        n_top,
        n_top,
        len(genes),
    )
    with timer("fit bitro"):
        model = bt.tl.fit(
            train,
            genes=genes,
            max_epochs=epochs,
            lr=1e-3,
            n_components=min(32, train[0]["cells"].obsm["X_bitro"].shape[1]),
            config={"hidden_dim": 64, "ffn_dim": 128},
            seed=seed,
        )
    with timer("predict"):
        bt.tl.predict(model, test)
    with timer("baselines"):
        results = [bt.tl.evaluate(test, layer="bitro", genes=genes, inplace=True).assign(model="bitro")]
        from bitro._settings import settings
        from bitro.tl._cv import light_copy

        verbosity = settings.verbosity
        settings.verbosity = min(verbosity, 1)  # the baselines' scoring would repeat the lines above
        try:
            for name in ("ridge", "cell_count", "mean"):
                base = bt.tl.fit(train, genes=genes, model=name, seed=seed)
                copy = light_copy(test)
                base.predict(copy, key_added="base")
                results.append(
                    bt.tl.evaluate(copy, layer="base", genes=genes, inplace=False).assign(model=name)
                )
        finally:
            settings.verbosity = verbosity
    import pandas as pd

    metrics = pd.concat(results, ignore_index=True)
    metrics.to_csv(out / "metrics.csv", index=False)
    cell_scores = _score_cells(test, genes)
    with timer("figures"):
        figures = _figures(test, model, genes, out, plt)
    epochs_run = len(model.history["epoch"])
    headline = _headline(metrics, epochs=epochs, epochs_run=epochs_run, n_slides=n_slides, size=size)
    report = {
        "format": REPORT_FORMAT,
        "headline": headline,
        "seed": seed,
        "slides": n_slides,
        "size_px": size,
        "encoder": encoder,
        "n_cells_segmented": [int(s["cells"].n_obs) for s in slides],
        "n_cells_truth": [int(s["cells_truth"].n_obs) for s in slides],
        "genes_in_table": n_table,
        "genes_n_top": n_top,
        "genes": len(genes),
        "epochs_max": epochs,
        "epochs_run": epochs_run,
        "timings_s": {k: round(v, 2) for k, v in timer.steps.items()},
        "cell_level": cell_scores,
        "bitro_version": bt.__version__,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    path = out / "report.md"
    path.write_text(_markdown(report, metrics, figures))
    logger.info("demo: %s", headline)
    return path


def _score_cells(test: Any, genes: list[str]) -> dict[str, float]:
    """Pseudo-cell predictions vs the nearest true cell's expression (synthetic truth)."""
    from scipy.spatial import cKDTree

    from bitro.tl._metrics import pcc_gene, pcc_overall

    cells, truth = test["cells"], test["cells_truth"]
    pred = cells.layers["bitro"]
    inside = np.isfinite(pred).all(axis=1)
    dist, idx = cKDTree(truth.obsm["spatial"]).query(cells.obsm["spatial"][inside])
    keep = dist < 6.0 / test.attrs["bitro_scale"]["mpp"]
    gcols = truth.var_names.get_indexer(genes)
    x = truth.layers["counts"]
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    obs = np.log1p(x[idx[keep]][:, gcols])
    p = pred[inside][keep][:, cells.var_names.get_indexer(genes)]
    return {
        "matched_cells": int(keep.sum()),
        "pcc_gene": float(pcc_gene(obs, p)),
        "pcc_overall": float(pcc_overall(obs, p)),
    }


def _value(metrics, model: str, metric: str, scale: str) -> float:
    rows = metrics[(metrics["model"] == model) & (metrics["metric"] == metric) & (metrics["scale"] == scale)]
    return float(rows["value"].iloc[0]) if len(rows) else float("nan")


def _headline(metrics, *, epochs: int, epochs_run: int, n_slides: int, size: int) -> str:
    """One sentence: bitro against ridge on the held-out slide, who wins, and what to try when bitro loses."""
    metric, scale = HEADLINE_METRIC
    ours, ridge = _value(metrics, "bitro", metric, scale), _value(metrics, "ridge", metric, scale)
    score = f"bitro {ours:.3f} vs ridge {ridge:.3f} normalised PCC_gene on the held-out slide"
    if not (np.isfinite(ours) and np.isfinite(ridge)):
        return f"{score}: no comparison (a score is missing; see metrics.csv)."
    if ours - ridge >= TIE:
        return f"{score}: bitro wins on this synthetic run (by {ours - ridge:.3f})."
    verdict = (
        "a tie on this synthetic run"
        if abs(ours - ridge) < TIE
        else f"ridge wins on this synthetic run (by {ridge - ours:.3f})"
    )
    tries = [f"more training tissue (--slides {max(n_slides + 2, 5)} --size {max(size, 2400)})"]
    if epochs_run >= epochs:  # training stopped at the limit, not early: it may not have converged
        tries.append(f"more epochs (--epochs {2 * epochs}; all {epochs} were used)")
    tries.append("other seeds (--seed 1, 2, …) to see how much the scores move")
    return (
        f"{score}: {verdict}. To try: {', '.join(tries)}; "
        "on real data, a pretrained encoder (bt.pp.embed_cells(encoder=...))."
    )


def _figures(test, model, genes, out: Path, plt) -> list[str]:
    """Write the demo figures at :data:`FIGURE_DPI`; a figure that fails is skipped with a warning."""
    import bitro as bt
    from bitro.pl._utils import save_figure

    names = []
    pcc = test["spots"].var.get("bitro_pcc_library_size")
    top = list(pcc.dropna().sort_values(ascending=False).index[:2]) if pcc is not None else genes[:2]
    xy = test["cells"].obsm["spatial"]
    cx, cy = np.median(xy, axis=0)
    half = 200.0  # a 400 px window: nuclei outlines stay readable
    window = (cx - half, cy - half, cx + half, cy + half)
    figs = {
        "spatial.png": lambda: bt.pl.spatial(
            test, genes=top, scale_bar_um="auto", return_fig=True, show=False
        ),
        "cells.png": lambda: bt.pl.cells(test, color=top[0], ax=_big_axes(plt), return_fig=True, show=False),
        "segmentation.png": lambda: bt.pl.segmentation(
            test, image_key="he_normalized", crop=window, return_fig=True, show=False
        ),
        "history.png": lambda: bt.pl.history(model, return_fig=True, show=False),
        "gene_correlations.png": lambda: bt.pl.gene_correlations(
            test, key="bitro_pcc_library_size", return_fig=True, show=False
        ),
    }
    for name, make in figs.items():
        try:
            fig = make()
        except Exception as err:  # a figure must not cost the report
            logger.warning("demo: figure %s failed: %s", name, err)
            continue
        save_figure(fig, out / name, dpi=FIGURE_DPI)
        plt.close(fig)
        names.append(name)
    return names


def _big_axes(plt):
    """One large panel (a whole slide of cells needs more room than a default panel)."""
    _, ax = plt.subplots(figsize=(7.5, 6.5), layout="constrained")
    return ax


def _markdown(report: dict, metrics, figures: list[str]) -> str:
    main = metrics[metrics["metric"].isin(["pcc_gene", "pcc_overall", "mse"])]
    table = main.pivot_table(index="model", columns=["metric", "scale"], values="value").round(3)
    table.columns = [f"{m} ({'norm' if sc == 'library_size' else sc})" for m, sc in table.columns]
    order = [m for m in ("bitro", "ridge", "cell_count", "mean") if m in table.index]
    table = table.loc[order]
    lines = [
        "# bitro demo report",
        "",
        f"**{report['headline']}**",
        "",
        f"Synthetic tissue, {report['slides']} slides of {report['size_px']} px (seed {report['seed']}); "
        f"trained on all but the last slide, tested on the last. Encoder: `{report['encoder']}`. "
        f"Genes: {report['genes']} of the table's {report['genes_in_table']}, chosen by "
        f"`bt.pp.select_genes(n_top={report['genes_n_top']})` (genes in both the top {report['genes_n_top']} "
        "by mean and by spread); every model predicts and is scored on these genes. "
        f"Training ran {report['epochs_run']} of at most {report['epochs_max']} epochs (early stopping).",
        "",
        "## Spot-level accuracy on the held-out slide",
        "",
        "*raw* = log1p of raw counts (spot depth moves every gene together and inflates PCC_gene); "
        "*norm* = log1p after library-size normalisation (the gene-specific test, used in the headline). "
        "Baselines: *ridge* = ridge regression on the spot's mean-pooled cell features (the HEST-Benchmark "
        "probe); *cell_count* = a per-gene linear model on the number of cells; *mean* = the training mean. "
        "All metrics are in `metrics.csv`.",
        "",
        table.to_markdown() if hasattr(table, "to_markdown") else table.to_string(),
        "",
        "## Pseudo single cells vs the synthetic truth",
        "",
        f"- matched cells: {report['cell_level']['matched_cells']}",
        f"- PCC_gene: {report['cell_level']['pcc_gene']:.3f}",
        f"- PCC_overall: {report['cell_level']['pcc_overall']:.3f}",
        "",
        "## Timings (s)",
        "",
        *[f"- {k}: {v}" for k, v in report["timings_s"].items()],
        "",
        "## Figures",
        "",
        "Grey spots or cells have no prediction (a spot without segmented cells; a cell outside every spot).",
        "",
        *[f"![{f}]({f})" for f in figures],
        "",
    ]
    return "\n".join(lines)
