"""Cross-validation across slides: leave-one-section-out and leave-one-patient-out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from bitro import _keys as K
from bitro._logging import logger
from bitro.io._build import get_scale

if TYPE_CHECKING:
    import spatialdata as sd

PROTOCOLS = ("leave_one_section_out", "leave_one_patient_out")


def light_copy(sdata: sd.SpatialData, tables: Sequence[str] = (K.SPOTS, K.CELLS)) -> sd.SpatialData:
    """A SpatialData holding copies of ``tables`` and the scale — predictions go there, not into user data."""
    import spatialdata as sd

    out = sd.SpatialData(tables={k: sdata.tables[k].copy() for k in tables if k in sdata.tables})
    out.attrs.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in sdata.attrs.items()})
    return out


def cross_validate(
    sdatas: Sequence[sd.SpatialData],
    *,
    protocol: str = "leave_one_section_out",
    patients: Sequence[str] | None = None,
    models: Sequence[str] = ("bitro", "ridge", "depth", "cell_count", "mean"),
    genes: list[str] | None = None,
    target: str | None = None,
    folds: Sequence[int] | None = None,
    fit_kwargs: dict[str, Any] | None = None,
    seed: int | None = None,
) -> pd.DataFrame:
    """Train on all slides but one group, test on the held-out group, for every group.

    Validation for early stopping is drawn inside the training slides (never the held-out
    slides). Predictions are written into copies; the input objects are not modified.

    Parameters
    ----------
    sdatas
        Preprocessed slides (cells embedded and assigned to spots).
    protocol
        ``"leave_one_section_out"`` (each slide is a fold) or ``"leave_one_patient_out"``
        (slides of one patient are held out together; needs ``patients``).
    patients
        Patient of each slide (same order as ``sdatas``).
    models
        Models to compare: ``"bitro"`` and any of the baselines of :func:`bitro.tl.fit`.
    genes
        Genes (default: selected on all slides' spots with :func:`bitro.pp.select_genes`).
    target
        Training target scale, ``"raw"`` or ``"library_size"`` (default: :class:`~bitro.tl.SetupConfig`'s,
        the benchmark's best); evaluation always reports both scales.
    folds
        Run only these fold indices (default: all).
    fit_kwargs
        Extra arguments for :func:`bitro.tl.fit` of ``"bitro"``.
    seed
        Random seed.

    Returns
    -------
    Tidy DataFrame: ``protocol, fold, test, model, target, metric, scale, value, n_units, n_genes, n_constant``.
    """
    from bitro.tl._api import fit
    from bitro.tl._configs import SetupConfig
    from bitro.tl._metrics import evaluate

    sdatas = list(sdatas)
    target = SetupConfig.defaults()["target"] if target is None else target
    if protocol not in PROTOCOLS:
        msg = f"protocol must be one of {PROTOCOLS}, got {protocol!r}."
        raise ValueError(msg)
    names = [str(get_scale(s).get("sample_id", f"slide{i}")) for i, s in enumerate(sdatas)]
    if protocol == "leave_one_patient_out":
        if patients is None or len(patients) != len(sdatas):
            msg = "leave_one_patient_out needs patients= with one patient label per slide."
            raise ValueError(msg)
        groups = list(dict.fromkeys(patients))
        fold_members = [[i for i, p in enumerate(patients) if p == g] for g in groups]
    else:
        fold_members = [[i] for i in range(len(sdatas))]
    if len(fold_members) < 2:
        msg = f"{protocol} needs at least two groups of slides; got {len(fold_members)}."
        raise ValueError(msg)
    if genes is None:
        from bitro.pp._genes import select_genes

        genes = list(select_genes(sdatas, table_key=K.SPOTS))
    rows = []
    for f, test_idx in enumerate(fold_members):
        if folds is not None and f not in folds:
            continue
        train = [sdatas[i] for i in range(len(sdatas)) if i not in test_idx]
        test_name = "+".join(names[i] for i in test_idx)
        for model_name in models:
            kwargs = dict(fit_kwargs or {}) if model_name == "bitro" else {}
            logger.info("Fold %d (%s): fitting %s", f, test_name, model_name)
            model = fit(
                train, level="spot", genes=genes, model=model_name, target=target, seed=seed, **kwargs
            )
            for i in test_idx:
                test = light_copy(sdatas[i])
                model.predict(test, key_added="cv")
                res = evaluate(test, table_key=K.SPOTS, layer="cv", normalize="both", inplace=False)
                res = res.assign(protocol=protocol, fold=f, test=names[i], model=model_name, target=target)
                rows.append(res)
    out = pd.concat(rows, ignore_index=True)
    front = ["protocol", "fold", "test", "model", "target", "metric", "scale", "value"]
    return out[front + [c for c in out.columns if c not in front]]


def summarize_cv(cv: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over folds of each model × target × metric × scale."""
    g = cv.groupby(["protocol", "model", "target", "metric", "scale"])["value"]
    return g.agg(mean="mean", sd="std", n_folds="count").reset_index()
