"""Simulated domain shifts on HER2ST patient C: depth, stain, scale, and all three (issue 18).

A model trained on some patients must work on the next one, but the kit holds images of one patient
only. So the shifts a new patient brings are simulated, one at a time, on the held-out section of a
leave-one-section-out split of C2–C6 (the training sections are never shifted):

- **depth**: the test section's counts binomially thinned to a median of 650 UMI per spot (the
  held-out patient of the issue; patient C has about 10,000) and to 10 % (``bt.datasets.thin_counts``);
- **stain**: the test image re-painted with the stains of the kit's TCGA tile and of its stain
  target image (``bt.datasets.restain``, Macenko, bitro's own stain estimates);
- **scale**: the test image resampled ×0.8 and ×1.2 with the recorded µm per pixel kept
  (``bt.datasets.rescale``): nuclei look 0.8×/1.2× as long and about 1.56×/0.69× as many fall in
  a spot;
- **all**: ×1.2, the TCGA stain and 650 UMI together.

Each image-shifted test section is preprocessed again exactly as the benchmark cache preprocesses
every section (``_common.preprocess``: Macenko normalisation, tissue, watershed, EfficientNet-Lite0
tile features, assignment) and cached in ``benchmarks/cache``. Depth shifts change only the truth
(thinned after preprocessing, seed 0). Models are trained once per fold on the unshifted training
sections: bitro, ridge and MLP on the library-size target, depth and cell_count on raw counts, with
the accuracy benchmark's settings. A sixth predictor is log(1 + nuclei per spot) alone, from bitro's
segmentation of the (shifted) test section: every gene is scored by its correlation with that one
number. Two more bitro models test training-time augmentation (issue 18, item 3): "bitro, augmented" is
trained on the training windows plus copies of each at ×0.8 and ×1.2 with a mild stain jitter
(``bt.pp.augment_slide``, preprocessed like every section and cached; never a copy of the held-out
section), and "bitro, repeated", its control, on the training windows repeated as often, unchanged.
Both keep the copies of an early-stopping validation spot out of training (``bt.tl.fit`` draws
validation spots by source spot).
All are scored against the same truth with ``bt.tl.evaluate`` (PCC_gene on library-size
normalised and on raw-count log1p; spots with at least one nucleus).

Also reported: the noise ceiling of each thinned truth (PCC_gene between two independent thinnings
of the same section, seeds 1 and 2) and each model as a fraction of it; the genes on which each
predictor's output is constant (a baseline that collapses to a constant); and the domain report
(``bt.tl.domain_report`` at its default tolerance) of each shifted test section against the
training sections.

``--quick``: central 1,600 px windows, the first fold only (C2 held out), 3 bitro epochs.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
from benchmarks._common import (
    DATA_DIR,
    SECTIONS,
    SEED,
    SETTINGS,
    Steps,
    cache_key,
    cached_section,
    cached_tables,
    kit_genes,
    load_section,
    max_rss_mb,
    md_table,
    metadata,
    preprocess,
    write_result,
)

from bitro._logging import logger

#: Encoders of the unshifted sections (the accuracy benchmark's, so the cache is shared).
ENCODERS = ("efficientnet_lite0", "morphology")
#: Encoders of the shifted test sections (only the features the models use).
SHIFT_ENCODERS = ("efficientnet_lite0",)
QUICK_WINDOW = 800
REFERENCES = {"tcga": "TCGA-HE-7130-01Z-00-DX1.png", "target": "target_image.png"}
DEPTH_MEDIAN_UMI = 650.0
DEPTH_FRACTION = 0.1
CEILING_SEEDS = (1, 2)
#: Shift name → what is done to the test section (image steps in the order rescale, restain; then thin).
SHIFTS: dict[str, dict[str, Any]] = {
    "none": {},
    "depth_650": {"thin": {"median_umi": DEPTH_MEDIAN_UMI}},
    "depth_10pct": {"thin": {"fraction": DEPTH_FRACTION}},
    "stain_tcga": {"restain": REFERENCES["tcga"]},
    "stain_target": {"restain": REFERENCES["target"]},
    "scale_0.8": {"rescale": 0.8},
    "scale_1.2": {"rescale": 1.2},
    "all": {"rescale": 1.2, "restain": REFERENCES["tcga"], "thin": {"median_umi": DEPTH_MEDIAN_UMI}},
}
LABELS = {
    "none": "in-distribution",
    "depth_650": "depth: median 650 UMI",
    "depth_10pct": "depth: 10 % of molecules",
    "stain_tcga": "stain: TCGA tile",
    "stain_target": "stain: target image",
    "scale_0.8": "scale ×0.8",
    "scale_1.2": "scale ×1.2",
    "all": "all: ×1.2 + TCGA stain + 650 UMI",
}
#: (run name, model, target) trained once per fold on the unshifted training sections.
MODELS = (
    ("bitro", "bitro", "library_size"),
    # item 3 of issue 18: the same model on per-slide z-scored cell features (bt.pp.standardize_features)
    ("bitro, slide z-scores", "bitro", "library_size", "X_bitro_slide"),
    # item 3 of issue 18: the default bitro trained on the training windows plus augmented copies of each
    ("bitro, augmented", "bitro", "library_size"),
    # its control: the training windows repeated as often (same spots per epoch and steps), not augmented
    ("bitro, repeated", "bitro", "library_size"),
    ("ridge", "ridge", "library_size"),
    ("mlp", "mlp", "library_size"),
    ("depth", "depth", "raw"),
    ("cell_count", "cell_count", "raw"),
)
NUCLEI = "log1p(nuclei)"
SLIDE_REP = "X_bitro_slide"
SCALES = ("library_size", "raw")
#: Relative fall of bitro's normalised PCC_gene the issue allows under stain or scale shift.
ALLOWED_FALL = 0.10
AUGMENTED = "bitro, augmented"
#: Augmented copies of every training window (``bt.pp.augment_slide``): the ±20 % of scale a new scanner
#: may bring, each with a mild stain jitter (every H/E/DAB concentration ×0.9–×1.1). The seed of copy ``i``
#: of section ``j`` is ``AUGMENT_SEED + 10 j + i`` (every copy draws its own stain factors).
AUGMENTS: tuple[dict[str, float], ...] = (
    {"scale": 0.8, "hed_jitter": 0.1, "hed_shift": 0.0},
    {"scale": 1.2, "hed_jitter": 0.1, "hed_shift": 0.0},
)
AUGMENT_SEED = 1
REPEATED = "bitro, repeated"


# --------------------------------------------------------------------------- shifted sections
def _image_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("rescale", "restain") if k in spec}


def shifted_name(section: str, spec: dict[str, Any], window: int | None) -> str:
    """Cache folder of a section with the image shifts of ``spec``, preprocessed."""
    image = json.dumps(_image_spec(spec), sort_keys=True)
    digest = hashlib.sha1(image.encode()).hexdigest()[:8]
    return f"{cache_key(section, SHIFT_ENCODERS, 'tile', window)}_shift_{digest}"


def _shift_image(sdata: Any, spec: dict[str, Any]) -> Any:
    import bitro as bt

    if "rescale" in spec:
        sdata = bt.datasets.rescale(sdata, spec["rescale"])
    if "restain" in spec:
        reference = DATA_DIR / "stain" / spec["restain"]
        sdata = bt.datasets.restain(sdata, reference=reference, method="macenko", seed=SEED)
    return sdata


def _materialise(sdata: Any) -> Any:
    """Compute the shifted (lazy) image once: preprocessing reads each of its tiles several times."""
    from bitro.io._build import get_image, image_element

    data = get_image(sdata, "he").data
    sdata.images["he"] = image_element(np.asarray(data.compute()), chunks=int(data.chunksize[1]))
    return sdata


def shifted_section(section: str, spec: dict[str, Any], window: int | None, base: Any) -> tuple[Any, Any]:
    """Tables of ``section`` under ``spec``: image shifts preprocessed (cached), then counts thinned.

    Returns the tables before and after the thinning (the same object without a depth shift).
    """
    import bitro as bt

    if _image_spec(spec):

        def build(steps: Steps) -> Any:
            with steps("load"):
                sdata = load_section(section, window=window)
            with steps("shift"):
                sdata = _materialise(_shift_image(sdata, spec))
            return preprocess(sdata, encoders=SHIFT_ENCODERS, steps=steps)

        tables = cached_tables(shifted_name(section, spec, window), build)
    else:
        tables = base
    if "thin" not in spec:
        return tables, tables
    return tables, bt.datasets.thin_counts(tables, **spec["thin"], seed=SEED)


# --------------------------------------------------------------------------- augmented training windows
def augment_spec(section: str, index: int) -> dict[str, Any]:
    """Arguments of ``bt.pp.augment_slide`` for copy ``index`` of ``section`` (with its own seed)."""
    return {**AUGMENTS[index], "seed": AUGMENT_SEED + 10 * SECTIONS.index(section) + index}


def augmented_name(section: str, spec: dict[str, Any], window: int | None) -> str:
    """Cache folder of an augmented copy of ``section``, preprocessed (distinct from the shifted ones)."""
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cache_key(section, SHIFT_ENCODERS, 'tile', window)}_augment_{digest}"


def augmented_section(section: str, index: int, window: int | None) -> Any:
    """Tables of augmented copy ``index`` of ``section``, preprocessed like every section (cached)."""
    import bitro as bt

    spec = augment_spec(section, index)

    def build(steps: Steps) -> Any:
        with steps("load"):
            sdata = load_section(section, window=window)
        with steps("augment"):
            sdata = _materialise(bt.pp.augment_slide(sdata, **spec))
        return preprocess(sdata, encoders=SHIFT_ENCODERS, steps=steps)

    return cached_tables(augmented_name(section, spec, window), build)


def training_copies(augmented: dict[str, list[Any]], test_name: str) -> list[Any]:
    """The augmented copies of the training sections of a fold: never one of the held-out section."""
    out = []
    for name, copies in augmented.items():
        if name == test_name:
            continue
        for tables in copies:
            sources = {r["source_sample_id"] for r in tables.attrs.get("bitro_augment", [])}
            assert test_name not in sources, f"an augmented copy of the test section {test_name} in training"
            out.append(tables)
    return out


def fold_copies(names: list[str], test_name: str, window: int | None) -> list[Any]:
    """Augmented copies of a fold's training sections (cached; never a copy of the held-out section)."""
    augmented = {
        n: [augmented_section(n, i, window) for i in range(len(AUGMENTS))] for n in names if n != test_name
    }
    return training_copies(augmented, test_name)


def repeated_copies(train: list[Any], n: int) -> list[Any]:
    """``n`` plain copies of every training window under new sample ids: the control of augmentation.

    Each copy names its source the way ``bt.pp.augment_slide`` does, so the validation split treats it
    like an augmented copy (a validation spot's copies stay out of training).
    """
    from bitro import _keys as K
    from bitro.tl._cv import light_copy

    out = []
    for i in range(n):
        for tables in train:
            copy = light_copy(tables)
            scale = dict(copy.attrs["bitro_scale"])
            sample_id = f"{scale['sample_id']}_repeat{i}"
            copy.attrs["bitro_scale"] = {**scale, "sample_id": sample_id}
            copy.attrs[K.AUGMENT] = [{"source_sample_id": scale["sample_id"], "sample_id": sample_id}]
            out.append(copy)
    return out


# --------------------------------------------------------------------------- scoring
def _truth(spots: Any, genes: list[str], rows: np.ndarray) -> np.ndarray:
    from bitro.io._counts import count_matrix
    from bitro.tl._targets import dense

    idx = spots.var_names.get_indexer(genes)
    return dense(count_matrix(spots)[:, idx])[rows].astype(np.float64)


def _on_scale(counts: np.ndarray, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """``(log1p values, rows kept)`` of counts on ``scale`` as ``bt.tl.evaluate`` puts them."""
    from bitro.tl._metrics import _normalise_log

    if scale == "raw":
        return np.log1p(counts), np.ones(len(counts), dtype=bool)
    lib = counts.sum(axis=1)
    ok = lib > 0
    return _normalise_log(counts[ok], float(np.median(lib[ok]))), ok


def score_one_number(counts: np.ndarray, x: np.ndarray) -> dict[str, dict[str, float]]:
    """PCC_gene of every gene against one number per spot ``x`` (e.g. log(1 + nuclei)), per scale."""
    import bitro as bt

    out = {}
    for scale in SCALES:
        obs, ok = _on_scale(counts, scale)
        res = bt.tl.pcc_gene(obs, np.broadcast_to(np.asarray(x, float)[ok, None], obs.shape))
        out[scale] = {
            "pcc_gene": float(res.value),
            "n_units": int(ok.sum()),
            "n_constant": int(res.n_constant),
        }
    return out


def noise_ceiling(counts_a: np.ndarray, counts_b: np.ndarray) -> dict[str, float]:
    """PCC_gene between two independent thinnings of the same spots, per scale."""
    import bitro as bt

    out = {}
    for scale in SCALES:
        a, ok_a = _on_scale(counts_a, scale)
        b, ok_b = _on_scale(counts_b, scale)
        if not (ok_a.all() and ok_b.all()):  # keep the spots with molecules in both
            ok = ok_a & ok_b
            a, _ = _on_scale(counts_a[ok], scale)
            b, _ = _on_scale(counts_b[ok], scale)
        out[scale] = float(bt.tl.pcc_gene(a, b).value)
    return out


def constant_columns(values: np.ndarray) -> int:
    """Columns whose finite values are constant (the rule of ``bt.tl.pcc_gene``)."""
    from bitro.tl._metric_fns import CONSTANT_RTOL

    mean, sd = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    return int((sd <= CONSTANT_RTOL * (1 + np.abs(mean))).sum())


def _constant_predictions(spots: Any, genes: list[str], layer: str) -> dict[str, int]:
    """Genes on which a model's prediction is constant across the scored spots, per scale."""
    from bitro.tl._metrics import _counts, _normalise_log
    from bitro.tl._targets import dense

    idx = spots.var_names.get_indexer(genes)
    pred = dense(spots.layers[layer][:, idx]).astype(np.float64)
    pred = pred[np.isfinite(pred).all(axis=1)]
    counts = _counts(pred)
    return {
        "raw": constant_columns(pred),
        "library_size": constant_columns(_normalise_log(counts, float(np.median(counts.sum(axis=1))))),
    }


def _use_rep(model: Any) -> str | None:
    setup = getattr(model, "setup", None)
    return getattr(setup, "use_rep", None) or getattr(model, "use_rep", None)


def score_shift(
    models: dict[str, Any], unthinned: Any, tables: Any, genes: list[str], spec: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per predictor × scale) for one shifted test section, and its noise ceiling.

    ``tables`` is the shifted section, ``unthinned`` the same before its counts were thinned (the
    ceiling thins it twice more with other seeds).
    """
    import bitro as bt
    from bitro.tl._cv import light_copy

    rows = []
    for name, model in models.items():
        test = light_copy(tables)
        if _use_rep(model) == SLIDE_REP:  # z-score the (shifted) test slide's own cells, as for training
            test.tables["cells"] = test["cells"].copy()
            bt.pp.standardize_features(test, overwrite=True)
        t0 = time.perf_counter()
        model.predict(test, key_added="cv")
        seconds = time.perf_counter() - t0
        res = bt.tl.evaluate(test, table_key="spots", layer="cv", normalize="both", inplace=False)
        constant = _constant_predictions(test["spots"], genes, "cv")
        for r in res[res["metric"] == "pcc_gene"].itertuples():
            rows.append(
                {"model": name, "scale": r.scale, "pcc_gene": float(r.value), "n_units": int(r.n_units),
                 "n_constant_pred": constant[r.scale], "n_constant_scored": int(r.n_constant),
                 "predict_seconds": round(seconds, 2)}
            )  # fmt: skip
    spots = tables["spots"]
    n = spots.obs["n_cells"].to_numpy(dtype=np.float64)
    with_cells = n > 0
    counts = _truth(spots, genes, with_cells)
    for scale, r in score_one_number(counts, np.log1p(n[with_cells])).items():
        rows.append(
            {"model": NUCLEI, "scale": scale, "pcc_gene": r["pcc_gene"], "n_units": r["n_units"],
             "n_constant_pred": 0, "n_constant_scored": r["n_constant"], "predict_seconds": 0.0}
        )  # fmt: skip
    ceiling = {}
    if "thin" in spec:
        a, b = (bt.datasets.thin_counts(unthinned, **spec["thin"], seed=s) for s in CEILING_SEEDS)
        ceiling = noise_ceiling(_truth(a["spots"], genes, with_cells), _truth(b["spots"], genes, with_cells))
    return rows, ceiling


# --------------------------------------------------------------------------- the run
def run(quick: bool) -> dict[str, Any]:
    """Train per fold on unshifted sections, score every shift of the held-out section."""
    from benchmarks.accuracy import BITRO_KW, QUICK_BITRO_KW, _fit

    import bitro as bt

    bt.settings.progress = False
    t0 = time.perf_counter()
    window = QUICK_WINDOW if quick else SETTINGS["window"]
    sections = {s: cached_section(s, encoders=ENCODERS, window=window) for s in SECTIONS}
    names = list(sections)
    genes = kit_genes(sections)
    kw = dict(QUICK_BITRO_KW if quick else BITRO_KW)
    if SETTINGS["epochs"] and not quick:
        kw["max_epochs"] = int(SETTINGS["epochs"])
    folds = [0] if quick else list(range(len(names)))
    rows, ceilings, domains, speed = [], [], [], []
    out: dict[str, Any] = {}
    for f in folds:
        test_name = names[f]
        train = [sections[n] for n in names if n != test_name]
        models = {}
        for run_name, model, target, *rep in MODELS:
            t_fit = time.perf_counter()
            cfg = {"name": run_name, "model": model, "target": target, **({"use_rep": rep[0]} if rep else {})}
            if rep and rep[0] == SLIDE_REP:
                for s in train:
                    bt.pp.standardize_features(s, overwrite=True)
            slides = train
            if run_name == AUGMENTED:  # the fold's copies only, loaded for this fit and dropped after it
                t_aug = time.perf_counter()
                slides = [*train, *fold_copies(names, test_name, window)]
                speed.append({"fold": f, "test": test_name, "what": "augmented copies (preprocessing when not cached)",
                              "seconds": round(time.perf_counter() - t_aug, 2)})  # fmt: skip
                t_fit = time.perf_counter()  # the fit alone (the loading has its own row)
            elif run_name == REPEATED:
                slides = [*train, *repeated_copies(train, len(AUGMENTS))]
            models[run_name] = _fit(cfg, slides, genes, kw)
            del slides
            if rep and rep[0] == SLIDE_REP:  # a second copy of every training cell's features: not kept
                for s in train:
                    del s["cells"].obsm[SLIDE_REP]
            speed.append({"fold": f, "test": test_name, "what": f"fit {run_name}",
                          "seconds": round(time.perf_counter() - t_fit, 2), "peak_rss_mb": round(max_rss_mb(), 1)})  # fmt: skip
        train_stats = [bt.tl.domain_stats(s) for s in train]
        for shift, spec in SHIFTS.items():
            t_shift = time.perf_counter()
            unthinned, tables = shifted_section(test_name, spec, window, sections[test_name])
            prep_s = time.perf_counter() - t_shift
            shift_rows, ceiling = score_shift(models, unthinned, tables, genes, spec)
            rows += [{"fold": f, "test": test_name, "shift": shift, **r} for r in shift_rows]
            if ceiling:
                ceilings += [{"fold": f, "test": test_name, "shift": shift, "scale": s, "ceiling": v}
                             for s, v in ceiling.items()]  # fmt: skip
            report = bt.tl.domain_report(train_stats, bt.tl.domain_stats(tables))
            domains.append(
                {"fold": f, "test": test_name, "shift": shift,
                 "flagged": [str(i) for i in report.index[report["outside"]]],
                 "values": {k: float(v) for k, v in report["value"].items() if np.isfinite(v)},
                 "train_median": {k: float(v) for k, v in report["train_median"].items() if np.isfinite(v)}}
            )  # fmt: skip
            speed.append({"fold": f, "test": test_name, "what": f"load/preprocess {shift}",
                          "seconds": round(prep_s, 2)})  # fmt: skip
            logger.info(
                "shift: fold %d %s %s done (%.0f s)", f, test_name, shift, time.perf_counter() - t_shift
            )
        del models  # the next fold fits its own; the process's peak memory so far goes with each speed row
        out = _result(quick, t0, names, folds, genes, kw, window, sections, rows, ceilings, domains, speed)
        if not quick:
            write_result("shift", out)  # partial results survive an interrupted run
    return out


def _result(
    quick, t0, names, folds, genes, kw, window, sections, rows, ceilings, domains, speed
) -> dict[str, Any]:
    out = {
        "name": "shift",
        "meta": metadata(
            quick=quick,
            seconds=time.perf_counter() - t0,
            seeds={"seed": SEED, "ceiling": list(CEILING_SEEDS)},
        ),
        "protocol": {
            "sections": names,
            "folds": [names[i] for i in folds],
            "n_genes": len(genes),
            "window_half_px": window,
            "bitro_fit_kwargs": kw,
            "models": [list(m) for m in MODELS],
            "augments": {n: [augment_spec(n, i) for i in range(len(AUGMENTS))] for n in names},
            "shifts": SHIFTS,
            "labels": LABELS,
            "spots": {n: int(s["spots"].n_obs) for n, s in sections.items()},
        },
        "rows": rows,
        "ceilings": ceilings,
        "domains": domains,
        "speed": speed,
    }
    out["markdown"] = markdown(out)
    return out


# --------------------------------------------------------------------------- the page
def _mean_table(rows: list[dict[str, Any]]):
    import pandas as pd

    df = pd.DataFrame(rows)
    return df.groupby(["shift", "model", "scale"], sort=False)["pcc_gene"].mean()


def markdown(res: dict[str, Any]) -> str:
    """Tables per scale (shifts × predictors), the noise ceiling, constant predictions, domain reports, reading."""
    import pandas as pd

    p, rows = res["protocol"], res["rows"]
    if not rows:
        return "## Domain shift (simulated on HER2ST patient C)\n\nNo results.\n"
    mean = _mean_table(rows)
    shifts = [s for s in p["shifts"] if s in {r["shift"] for r in rows}]
    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = p["labels"]
    where = "whole sections" if not p["window_half_px"] else f"central {2 * p['window_half_px']} px windows"
    kw = p["bitro_fit_kwargs"]
    lines = [
        "## Domain shift (simulated on HER2ST patient C)",
        "",
        f"**Protocol.** Leave one section out over {', '.join(p['sections'])} ({where}); held out: "
        f"{', '.join(p['folds'])}. Models are trained once per fold on the unshifted training sections "
        f"(bitro, ridge and MLP on the library-size target, depth and cell_count on raw counts; bitro max "
        f"{kw['max_epochs']} epochs, lr {kw['lr']}, PCA to {kw['n_components']}); only the held-out section is "
        "shifted: counts thinned to a median of 650 UMI per spot or to 10 % (the truth gets noisier), the image "
        "re-stained to the kit's TCGA tile or stain target (Macenko), resampled ×0.8 / ×1.2 with the recorded "
        "µm per pixel kept, or all three (×1.2, TCGA, 650 UMI). Image-shifted sections are preprocessed again "
        f"exactly as the benchmark cache does (Macenko normalisation, watershed, EfficientNet-Lite0 tiles). "
        f"{p['n_genes']} genes; PCC_gene over the spots with at least one nucleus; mean over held-out sections. "
        f"{NUCLEI}: every gene scored by its correlation with log(1 + nuclei in the spot) alone.",
        "",
        *_augment_protocol(p, models),
    ]
    for scale, label in (("library_size", "normalised"), ("raw", "raw-count")):
        header = ["shift", *models, "bitro vs in-distribution"]
        body = []
        base = mean.get(("none", "bitro", scale))
        for s in shifts:
            values = [mean.get((s, m, scale)) for m in models]
            bitro = mean.get((s, "bitro", scale))
            change = None if base in (None, 0) or bitro is None else f"{(bitro - base) / abs(base):+.0%}"
            body.append([labels.get(s, s), *[None if v is None else float(v) for v in values], change])
        lines += [f"**PCC_gene, {label} log1p.**", "", md_table(header, body), ""]
    lines += _ceiling_lines(res, mean)
    lines += _constant_lines(rows, shifts, models, labels, p["n_genes"])
    lines += _domain_lines(res, shifts, labels)
    fit_seconds = (
        pd.DataFrame(res["speed"] or [{"what": "", "seconds": 0.0}]).groupby("what")["seconds"].mean()
    )
    lines += [
        _reading(mean, shifts, models, labels),
        *_augment_reading(mean, shifts, models, labels, fit_seconds),
    ]
    lines += [_noise_note(rows)]
    speed = pd.DataFrame(res["speed"])
    if len(speed):
        total = speed.groupby("what", sort=False)["seconds"].mean()
        fits = ", ".join(
            f"{k.removeprefix('fit ')} {v:.0f} s" for k, v in total.items() if k.startswith("fit ")
        )
        prep = ", ".join(
            f"{k.removeprefix('load/preprocess ')} {v:.0f} s"
            for k, v in total.items()
            if k.startswith("load/")
        )
        lines += [f"_Time per fold (mean): fits {fits}; shifted test section (preprocessing when not cached, "
                  f"prediction excluded) {prep}._", ""]  # fmt: skip
    return "\n".join(lines)


def _ceiling_lines(res: dict[str, Any], mean) -> list[str]:
    import pandas as pd

    if not res["ceilings"]:
        return []
    ceil = pd.DataFrame(res["ceilings"]).groupby(["shift", "scale"], sort=False)["ceiling"].mean()
    models = list(dict.fromkeys(r["model"] for r in res["rows"]))
    labels = res["protocol"]["labels"]
    body = []
    for (shift, scale), c in ceil.items():
        fractions = [
            None if mean.get((shift, m, scale)) is None else float(mean[(shift, m, scale)] / c)
            for m in models
        ]
        body.append(
            [labels.get(shift, shift), "norm" if scale == "library_size" else "raw", float(c), *fractions]
        )
    return [
        "**Noise ceiling of the thinned truth.** PCC_gene between two independent thinnings of the same "
        "section (seeds 1, 2), and each predictor's PCC_gene as a fraction of it. With independent noise the "
        "best any predictor can reach against one thinning is about √ceiling, so fractions above 1 are possible.",
        "",
        md_table(["shift", "scale", "ceiling", *[f"{m} / ceiling" for m in models]], body),
        "",
    ]


def _constant_lines(rows, shifts, models, labels, n_genes) -> list[str]:
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[df["model"] != NUCLEI]
    if df.empty:
        return []
    agg = df.groupby(["shift", "model", "scale"], sort=False)["n_constant_pred"].max()
    ms = [m for m in models if m != NUCLEI]
    body = [
        [
            labels.get(s, s),
            *[f"{agg.get((s, m, 'raw'), 0)} / {agg.get((s, m, 'library_size'), 0)}" for m in ms],
        ]
        for s in shifts
    ]
    return [
        f"**Constant predictions.** Genes (of {n_genes}) on which a predictor's output is constant across the "
        "scored spots, raw / normalised scale (worst fold). depth predicts one number per spot spread by fixed "
        "gene fractions, so it is constant on the normalised scale by construction.",
        "",
        md_table(["shift", *ms], body),
        "",
    ]


def _domain_lines(res, shifts, labels) -> list[str]:
    if not res["domains"]:
        return []
    keys = ("median_umi_per_spot", "median_nuclei_per_spot", "median_nucleus_area_um2")
    body = []
    for s in shifts:
        entries = [d for d in res["domains"] if d["shift"] == s]
        vals = [float(np.mean([d["values"].get(k, np.nan) for d in entries])) for k in keys]
        flagged = sorted({f for d in entries for f in d["flagged"]})
        body.append([labels.get(s, s), *vals, ", ".join(flagged) or "none"])
    angles = any("angle_deg" in f for d in res["domains"] for f in d["flagged"]) or not any(
        "_od_" in f for d in res["domains"] for f in d["flagged"]
    )
    rule = (
        "stain vectors flagged by angle: more than 6° beyond the widest training angle"
        if angles
        else "stain vectors compared per RGB component, the rule before the angle test; these flags were "
        "computed with it — a rerun of this benchmark reports the angle rows"
    )
    return [
        "**Domain report of the shifted test section** (`bt.tl.domain_report` against the training sections, "
        f"default tolerance: beyond the training range by more than 10 % of the training median; {rule}).",
        "",
        md_table(
            ["shift", "median UMI / spot", "median nuclei / spot", "median nucleus area (µm²)", "flagged"],
            body,
            digits=1,
        ),
        "",
    ]


def _reading(mean, shifts, models, labels) -> str:
    """Does bitro stay above every baseline and log(1 + nuclei)? Does it hold within 10 % under stain/scale?"""
    out = []
    others = [m for m in models if not m.startswith("bitro")]
    for s in shifts:
        for scale, label in (("library_size", "normalised"), ("raw", "raw")):
            bitro = mean.get((s, "bitro", scale))
            if bitro is None:
                continue
            beaten = [
                m for m in others if mean.get((s, m, scale)) is not None and mean[(s, m, scale)] >= bitro
            ]
            if beaten:
                best = max(beaten, key=lambda m: mean[(s, m, scale)])
                out.append(
                    f"- {labels.get(s, s)}, {label}: **bitro loses** to {', '.join(beaten)} "
                    f"(bitro {bitro:.3f}, {best} {mean[(s, best, scale)]:.3f})."
                )
    if not out:
        out.append(
            "- bitro stays above every baseline and log(1 + nuclei) under every shift, on both scales."
        )
    for b in [m for m in models if m.startswith("bitro") and m != REPEATED]:  # the control: see augmentation
        base = mean.get(("none", b, "library_size"))
        for s in shifts:
            if (
                not s.startswith(("stain", "scale"))
                or base is None
                or mean.get((s, b, "library_size")) is None
            ):
                continue
            v = mean[(s, b, "library_size")]
            fall = (base - v) / abs(base) if base else 0.0
            if fall > ALLOWED_FALL:
                out.append(
                    f"- {labels.get(s, s)}, {b}: normalised PCC_gene falls by {fall:.0%} ({base:.3f} → {v:.3f}); "
                    f"it does **not** hold within the {ALLOWED_FALL:.0%} the issue asks."
                )
            else:
                out.append(
                    f"- {labels.get(s, s)}, {b}: normalised PCC_gene changes by {-fall:+.0%} ({base:.3f} → "
                    f"{v:.3f}), within the {ALLOWED_FALL:.0%} the issue allows."
                )
    return "**Reading.**\n\n" + "\n".join(out) + "\n"


def _augment_protocol(p: dict[str, Any], models: list[str]) -> list[str]:
    """How the augmented copies of the training windows were made (when the run has them)."""
    if AUGMENTED not in models or not p.get("augments"):
        return []
    specs = next(iter(p["augments"].values()))
    copies = "; ".join(
        f"×{s['scale']:g}, stain factors ×{1 - s['hed_jitter']:g}–×{1 + s['hed_jitter']:g}"
        + (f" and offsets ±{s['hed_shift']:g}" if s.get("hed_shift") else "")
        for s in specs
    )
    return [
        f"**{AUGMENTED}** is the default bitro trained on the training windows plus {len(specs)} augmented "
        f"copies of each (`bt.pp.augment_slide`: {copies}; every copy draws its own stain factors, "
        "seeds in the result's protocol), each copy preprocessed again exactly like a section. Only the "
        "training windows of a fold are augmented, never the held-out one. Early-stopping validation spots "
        "are drawn by source spot: a validation spot's copies are validation spots too, never training spots."
        + (
            f" **{REPEATED}** is its control: the training windows repeated as often, unchanged (the same "
            "number of spots per epoch and the same validation split, no augmentation)."
            if REPEATED in models
            else ""
        ),
        "",
    ]


def _augment_reading(mean, shifts, models, labels, fit_seconds=None) -> list[str]:
    """Does augmentation hold each stain and scale shift within 10 %, and what does it cost in distribution?"""
    if AUGMENTED not in models or mean.get(("none", AUGMENTED, "library_size")) is None:
        return []
    out = []
    for scale, label in (("library_size", "normalised"), ("raw", "raw-count")):
        a, b = mean.get(("none", AUGMENTED, scale)), mean.get(("none", "bitro", scale))
        r = mean.get(("none", REPEATED, scale))
        if a is not None and b is not None:
            out.append(
                f"- In distribution, {label}: {AUGMENTED} {a:.3f} against bitro {b:.3f} "
                f"({a - b:+.3f}, {(a - b) / abs(b):+.0%})"
                + ("." if r is None else f"; {REPEATED} {r:.3f} ({r - b:+.3f}, {(r - b) / abs(b):+.0%}).")
            )
    held, missed = [], []
    for s in shifts:
        if s == "none" or (s, AUGMENTED, "library_size") not in mean:
            continue
        a0, a = mean[("none", AUGMENTED, "library_size")], mean[(s, AUGMENTED, "library_size")]
        b0, b = mean[("none", "bitro", "library_size")], mean[(s, "bitro", "library_size")]
        fall_a, fall_b = (a0 - a) / abs(a0), (b0 - b) / abs(b0)
        r0, r = mean.get(("none", REPEATED, "library_size")), mean.get((s, REPEATED, "library_size"))
        control = "" if r is None or not r0 else f", {REPEATED} {r:.3f} ({(r - r0) / abs(r0):+.0%})"
        out.append(
            f"- {labels.get(s, s)}: {AUGMENTED} {a:.3f} ({-fall_a:+.0%} of its own in-distribution value), "
            f"bitro {b:.3f} ({-fall_b:+.0%}){control}."
        )
        if s.startswith(("stain", "scale")):
            (held if fall_a <= ALLOWED_FALL else missed).append(labels.get(s, s))
    verdict = (
        f"- **Target (a fall of at most {ALLOWED_FALL:.0%} under stain and ±20 % scale shift):** "
        f"{AUGMENTED} meets it on {', '.join(held) or 'none of them'}"
        + (f"; it does **not** on {', '.join(missed)}." if missed else ".")
    )
    fits = {} if fit_seconds is None else fit_seconds.to_dict()
    if f"fit {AUGMENTED}" in fits and "fit bitro" in fits:
        verdict += (
            f" Its cost: training takes {fits[f'fit {AUGMENTED}']:.0f} s per fold against {fits['fit bitro']:.0f} s, "
            "and every copy is preprocessed like a section (segmentation and embedding)."
        )
    return ["**Augmentation** (normalised PCC_gene unless said).", "", *out, verdict, ""]


def _noise_note(rows) -> str:
    n = float(np.median([r["n_units"] for r in rows])) if rows else 0.0
    if n >= 100:
        return ""
    return (
        f"**Caution.** About {n:.0f} scored spots per section: a per-gene PCC over so few spots has a standard "
        f"error near {1 / max(n, 1) ** 0.5:.2f}; differences of a few hundredths here are noise.\n"
    )
