"""Contrastive image ↔ expression alignment (HESCAPE-style), leave one HER2ST section out (issue 14).

Protocol: each of C2–C6 is held out in turn; ``bt.tl.align_encoder(encoder="features")`` is trained on
the other four sections only (its PCA, expression statistics and early-stopping spots come from them)
and judged on the held-out one:

- **recall@1/5/10** image→expression and expression→image among the held-out spots (chance = k / n);
- **kNN regression**: each held-out spot's expression as the similarity-weighted mean of its 8 most
  similar training spots in the aligned space, against the same search in the unaligned spot features
  (``model="retrieval"``: pooled projected cells + log1p cell count) and a ridge probe on the unaligned
  features (``model="ridge"``); normalised PCC_gene by ``bt.tl.evaluate(normalize="both")``;
- **silhouette by slide** (scikit-learn, cosine) of training + held-out spots before and after alignment;
- the alignment's fit wall and CPU time, epochs.

Cell features: EfficientNet-Lite0 tile features (``X_bitro``) and nucleus morphology (``X_morphology``)
of the benchmark section cache. ``--quick``: central 3,000 px windows (about 113 spots each), all five
folds, seed 0, CLIP only; the full run adds SigLIP and seeds 0–2. Outside the standard set
(``python -m benchmarks --only align``; part of ``--full``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from benchmarks._common import SECTIONS, SETTINGS, Steps, cached_section, kit_genes, md_table, metadata

from bitro._logging import logger

ENCODERS = ("efficientnet_lite0", "morphology")
REPS = {"X_bitro": "efficientnet_lite0", "X_morphology": "morphology"}
QUICK_WINDOW = 1500
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
LOSSES, QUICK_LOSSES = ("clip", "siglip"), ("clip",)
N_NEIGHBORS = 8
ALIGN_KW: dict[str, Any] = {"n_components": 64, "embed_dim": 64, "hidden_dim": 256, "max_epochs": 100,
                            "batch_size": 128, "patience": 10, "validation_fraction": 0.15}  # fmt: skip
KS = (1, 5, 10)


def load_sections(quick: bool) -> dict[str, Any]:
    """Cached, preprocessed sections (tables only)."""
    window = QUICK_WINDOW if quick else SETTINGS["window"]
    return {s: cached_section(s, encoders=ENCODERS, window=window) for s in SECTIONS}


def _score(test: Any, layer: str) -> dict[str, Any]:
    import bitro as bt

    res = bt.tl.evaluate(test, table_key="spots", layer=layer, normalize="both", inplace=False)
    hit = res[(res.metric == "pcc_gene") & (res.scale == "library_size")].iloc[0]
    return {"value": float(hit.value), "n_constant": int(hit.n_constant)}


def fold(
    test_name: str, sections: dict[str, Any], genes: list[str], use_rep: str, loss: str, seed: int
) -> tuple[list[dict], dict]:
    """Align on every section but ``test_name``; recall, kNN and ridge PCC_gene, silhouettes, time."""
    import bitro as bt
    from bitro.tl._cv import light_copy
    from bitro.tl._write import write_units_layer

    train = [sections[n] for n in sections if n != test_name]
    base = {"test": test_name, "use_rep": use_rep, "loss": loss, "seed": seed}
    steps = Steps()
    with steps("align"):
        al = bt.tl.align_encoder(
            train, genes=genes, use_rep=use_rep, loss=loss, seed=seed, device="cpu", **ALIGN_KW
        )
    res = bt.tl.evaluate_alignment(al, sections[test_name], reference=train, ks=KS, n_neighbors=N_NEIGHBORS)
    rows = [{**base, **{k: (None if v != v else v) if isinstance(v, float) else v for k, v in r.items()}}
            for r in res.to_dict("records")]  # fmt: skip
    test = light_copy(sections[test_name])
    held = al.embed(test, i=len(train))
    refs = [al.embed(s, i=i) for i, s in enumerate(train)]
    pred = bt.tl.knn_expression(np.concatenate([r.image for r in refs]), np.concatenate([r.z for r in refs]),
                                held.image, k=N_NEIGHBORS)  # fmt: skip
    write_units_layer(test["spots"], held.spot_ids, al.genes, al.transform.to_log1p(pred), key_added="knn_aligned",
                      provenance={"model": "knn_aligned", "target_scale": al.transform.scale})  # fmt: skip
    fits = {"knn_unaligned": "retrieval", "ridge": "ridge"}
    for layer, model in fits.items():
        kw = {"n_exemplars": N_NEIGHBORS} if model == "retrieval" else {}
        fitted = bt.tl.fit(train, model=model, genes=genes, use_rep=use_rep, n_components=ALIGN_KW["n_components"],
                           target="library_size", seed=seed, **kw)  # fmt: skip
        fitted.predict(test, key_added=layer)
    for layer in ("knn_aligned", *fits):
        rows.append({**base, "metric": "pcc_gene_norm", "space": layer, **_score(test, layer)})
    rec = steps.records["align"]
    speed = {**base, "align_seconds": rec["seconds"], "align_cpu_seconds": rec["cpu_seconds"],
             "epochs": al.train_params["epochs_run"], "best_epoch": al.train_params["best_epoch"],
             "n_train_spots": al.train_params["n_train_spots"], "n_test_spots": len(held.spot_ids)}  # fmt: skip
    return rows, speed


def run(quick: bool) -> dict[str, Any]:
    """Every (cell features, loss, seed) over the five folds; return rows, speed and the Markdown section."""
    import bitro as bt

    bt.settings.progress = False
    t0 = time.perf_counter()
    sections = load_sections(quick)
    genes = kit_genes(sections)
    seeds, losses = (QUICK_SEEDS, QUICK_LOSSES) if quick else (SEEDS, LOSSES)
    rows, speed = [], []
    for test_name in sections:
        for use_rep in REPS:
            for loss in losses:
                for seed in seeds:
                    r, s = fold(test_name, sections, genes, use_rep, loss, seed)
                    rows += r
                    speed.append(s)
                    logger.info(
                        "align: %s %s %s seed %d: %.0f s", test_name, use_rep, loss, seed, s["align_seconds"]
                    )
    out = {
        "name": "align",
        "meta": metadata(quick=quick, seconds=time.perf_counter() - t0, seeds={"seeds": list(seeds)}),
        "protocol": {
            "sections": list(sections),
            "n_genes": len(genes),
            "window_half_px": QUICK_WINDOW if quick else SETTINGS["window"],
            "align_kwargs": ALIGN_KW,
            "losses": list(losses),
            "seeds": list(seeds),
            "n_neighbors": N_NEIGHBORS,
            "spots": {n: int(s["spots"].n_obs) for n, s in sections.items()},
        },
        "rows": rows,
        "speed": speed,
    }
    out["markdown"] = markdown(out)
    return out


# --------------------------------------------------------------------------- page
def _mean(df, **where) -> tuple[float | None, float | None]:
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    if sel.empty:
        return None, None
    per_fold = sel.groupby("test")["value"].mean()
    return float(per_fold.mean()), float(per_fold.std()) if len(per_fold) > 1 else None


def markdown(res: dict[str, Any]) -> str:
    """Recall with chance, kNN / ridge PCC_gene, silhouettes, time; and a plain reading."""
    import pandas as pd

    p, title = (
        res["protocol"],
        "## Contrastive image ↔ expression alignment (HESCAPE-style, leave one section out)",
    )
    if not res["rows"]:
        return f"{title}\n\nNo results.\n"
    df = pd.DataFrame(res["rows"])
    sp = pd.DataFrame(res["speed"])
    where = "whole sections" if not p["window_half_px"] else f"central {2 * p['window_half_px']} px windows"
    kw = p["align_kwargs"]
    lines = [
        title,
        "",
        f"**Protocol.** Leave-one-section-out over {', '.join(p['sections'])} ({where}), {p['n_genes']} genes. "
        "`bt.tl.align_encoder(encoder='features')` on the four training sections only: image tower = MLP on each cell's "
        f"PCA-projected features ({kw['n_components']} components) averaged per spot; gene tower = MLP on z-scored "
        f"library-size log1p expression; {kw['embed_dim']}-d space, hidden {kw['hidden_dim']}; batches of "
        f"{kw['batch_size']} spots, at most {kw['max_epochs']} epochs, patience {kw['patience']} on "
        f"{kw['validation_fraction']:.0%} of the training spots. Losses {', '.join(p['losses'])}; seeds "
        f"{', '.join(map(str, p['seeds']))}. Values: mean ± sd over held-out sections (seeds averaged first). "
        f"kNN: similarity-weighted mean of the {p['n_neighbors']} most similar training spots; *unaligned* = "
        "`model='retrieval'` on the cross-slice spot features; ridge = `model='ridge'` on the same cell features. "
        "PCC_gene: `bt.tl.evaluate(normalize='both')`, library-size scale. Silhouette by slide (cosine, scikit-learn) "
        "of training + held-out spots: near 0 = slides mixed, higher = slides apart.",
        "",
    ]
    table = []
    for (use_rep, loss), _ in df.groupby(["use_rep", "loss"], sort=False):
        d = df[(df.use_rep == use_rep) & (df.loss == loss)]
        rec = d[(d.metric == "recall") & (d.direction == "image→expression")]
        cells = [use_rep, loss]
        for k in KS:
            m, _ = _mean(rec, k=k)
            chance, _ = _mean(rec.assign(value=rec.chance), k=k)
            cells.append(None if m is None else f"{m:.3f} ({chance:.3f})")
        for space in ("knn_aligned", "knn_unaligned", "ridge"):
            m, s = _mean(d[d.metric == "pcc_gene_norm"], space=space)
            cells.append(None if m is None else f"{m:.3f}" + (f" ± {s:.3f}" if s is not None else ""))
        for space in ("unaligned", "aligned"):
            m, _ = _mean(d[d.metric == "silhouette_slide"], space=space)
            cells.append(m)
        t = sp[(sp.use_rep == use_rep) & (sp.loss == loss)]
        cells += [float(t.align_cpu_seconds.mean()), float(t.epochs.mean())]
        table.append(cells)
    lines += [
        md_table(
            [
                "cell features",
                "loss",
                "recall@1 img→expr (chance)",
                "recall@5 (chance)",
                "recall@10 (chance)",
                "kNN aligned PCC_gene",
                "kNN unaligned PCC_gene",
                "ridge PCC_gene",
                "silhouette before",
                "silhouette after",
                "align CPU (s)",
                "epochs",
            ],
            table,
        ),
        "",
    ]
    back = df[(df.metric == "recall") & (df.direction == "expression→image") & (df.k == 5)]
    if not back.empty:
        m, _ = _mean(back)
        c, _ = _mean(back.assign(value=back.chance))
        lines.append(f"Expression→image recall@5 over all runs: {m:.3f} (chance {c:.3f}).\n")
    lines.append(_reading(df))
    return "\n".join(lines)


def _reading(df) -> str:
    out = []
    for use_rep in dict.fromkeys(df.use_rep):
        d = df[df.use_rep == use_rep]
        a, _ = _mean(d[d.metric == "pcc_gene_norm"], space="knn_aligned")
        u, _ = _mean(d[d.metric == "pcc_gene_norm"], space="knn_unaligned")
        r, _ = _mean(d[d.metric == "pcc_gene_norm"], space="ridge")
        r5, _ = _mean(d[(d.metric == "recall") & (d.k == 5) & (d.direction == "image→expression")])
        c5, _ = _mean(d[(d.metric == "recall") & (d.k == 5)].assign(value=d.chance))
        if None in (a, u, r, r5, c5):
            continue
        best = max(u, r)
        if a > best + 0.005:
            verdict = "the aligned space predicts expression better than both baselines"
        elif a < best - 0.005:
            verdict = "kNN in the aligned space does **not** beat the unaligned baselines (HESCAPE's finding)"
        else:
            verdict = "kNN in the aligned space ties with the better baseline"
        out.append(
            f"- {use_rep}: recall@5 {r5:.3f} vs chance {c5:.3f}; kNN normalised PCC_gene {a:.3f} aligned, {u:.3f} "
            f"unaligned, {r:.3f} ridge: {verdict}."
        )
    return "**Reading.**\n\n" + "\n".join(out) + "\n" if out else ""
