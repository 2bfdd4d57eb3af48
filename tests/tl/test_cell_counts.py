"""The per-cell count head through bt.tl: cells sum to spots, every cell is predicted, cells differ by type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _toy import GENES, N_GENES, N_TYPES, SMALL, make_toy_slide
from scipy import sparse

import bitro as bt
from bitro.tl._cv import light_copy
from bitro.tl._levels import _poisson

COUNTS = {**SMALL, "head": "cell_counts"}
PROFILES = np.random.default_rng(123).gamma(2.0, 2.0, size=(N_TYPES, N_GENES))


def _summed_slide(seed: int):
    """A toy slide whose spot counts are the sum of their cells' type profiles (cell truth known)."""
    s = make_toy_slide(seed)
    cells, spots = s["cells"], s["spots"]
    rng = np.random.default_rng(seed + 100)
    types = cells.obs["true_type"].to_numpy()
    spot_of = cells.obs["spot_id"].astype(object).to_numpy()
    counts = np.zeros((spots.n_obs, N_GENES))
    for j, sid in enumerate(spots.obs_names):
        counts[j] = rng.poisson(PROFILES[types[spot_of == sid]].sum(axis=0) * 3)
    spots.X = sparse.csr_matrix(counts.astype(np.float32))
    spots.layers["counts"] = spots.X.copy()
    return s


def _fit(slides, **kw):
    kw = {"genes": GENES, "config": COUNTS, "n_components": 8, "n_phenotypes": 3, "seed": 0, "lr": 3e-3,
          "batch_size": 8, "max_epochs": 40, "target": "raw", **kw}  # fmt: skip
    return bt.tl.fit(slides, **kw)


def _per_gene_corr(pred: np.ndarray, truth: np.ndarray) -> float:
    out = []
    for g in range(truth.shape[1]):
        if pred[:, g].std() > 0 and truth[:, g].std() > 0:
            out.append(np.corrcoef(pred[:, g], truth[:, g])[0, 1])
        else:
            out.append(0.0)
    return float(np.mean(out))


def test_cells_are_resolved_beyond_an_equal_split():
    train = [_summed_slide(s) for s in range(3)]
    model = _fit(train)
    test = _summed_slide(7)
    model.predict(test)
    cells = test["cells"]
    inside = cells.obs["bitro_in_bag"].to_numpy()
    cols = cells.var_names.get_indexer(GENES) if cells.n_vars else np.arange(len(GENES))
    pred = cells.layers["bitro"][inside][:, cols]
    truth = np.log1p(PROFILES[cells.obs["true_type"].to_numpy()[inside]] * 3)
    # an equal split gives every cell of a spot the same profile: its per-cell variation is spot-level only
    spots = test["spots"]
    row = spots.obs_names.get_indexer(cells.obs["spot_id"].astype(object)[inside])
    n = np.bincount(row, minlength=spots.n_obs)
    equal = np.log1p(np.expm1(spots.layers["bitro"][:, cols])[row] / n[row, None])
    head, split = _per_gene_corr(pred, truth), _per_gene_corr(equal, truth)
    assert head > split + 0.1, (head, split)
    # the cells of a spot sum to it exactly, in count space
    for sid in spots.obs_names[:5]:
        members = (cells.obs["spot_id"] == sid).to_numpy()
        np.testing.assert_allclose(
            np.expm1(cells.layers["bitro"][members][:, cols]).sum(axis=0),
            np.expm1(spots.layers["bitro"][spots.obs_names.get_loc(sid), cols]),
            rtol=1e-3,
        )


def test_a_slide_without_spots_gets_every_cell_and_a_bulk_profile(toy_slides):
    import anndata as ad
    import pandas as pd

    model = _fit([_summed_slide(0), _summed_slide(1)], max_epochs=2)
    he_only = light_copy(toy_slides[2])
    del he_only.tables["spots"]
    he_only["cells"].obs = he_only["cells"].obs.drop(columns=["spot_id"])
    bulk = ad.AnnData(
        X=np.ones((1, N_GENES)), obs=pd.DataFrame(index=["toy2"]), var=pd.DataFrame(index=GENES)
    )
    he_only.tables["bulk"] = bulk
    out = model.predict(he_only)
    cells = he_only["cells"]
    assert "units" not in out and np.isfinite(cells.obsm["X_bitro_expr"]).all()
    assert not cells.obs["bitro_in_bag"].any() and cells.layers["bitro"].shape[0] == cells.n_obs
    tpm = np.expm1(he_only["bulk"].layers["bitro"][0])
    assert tpm.sum() == pytest.approx(1e6, rel=1e-3)  # the whole slide, as TPM over the model genes


def test_spot_model_bulk_is_the_sum_of_every_cell():
    model = _fit([_summed_slide(0), _summed_slide(1)], max_epochs=2)
    test = light_copy(make_toy_slide(3, with_bulk=True), tables=("spots", "cells", "bulk"))
    model.predict(test)
    cells = test["cells"]
    cols = cells.var_names.get_indexer(GENES) if cells.n_vars else np.arange(len(GENES))
    summed = np.expm1(cells.layers["bitro"][:, cols]).sum(axis=0)
    expected = np.log1p(summed / summed.sum() * 1e6)
    np.testing.assert_allclose(
        test["bulk"].layers["bitro"][0, test["bulk"].var_names.get_indexer(GENES)], expected, rtol=1e-4
    )


def test_poisson_loss_with_library_size_offset_ignores_depth():
    counts = torch.tensor([[5.0, 3.0, 2.0], [1.0, 1.0, 8.0]])
    observed = torch.tensor([[50.0, 30.0, 20.0], [2.0, 3.0, 15.0]])
    same_composition = _poisson(counts, observed, "library_size")
    assert float(_poisson(counts * 7.0, observed, "library_size")) == pytest.approx(float(same_composition))
    assert float(_poisson(counts * 7.0, observed, "raw")) != pytest.approx(
        float(_poisson(counts, observed, "raw"))
    )
    # the observed composition itself scores better than a uniform one
    uniform = torch.ones_like(observed)
    assert float(_poisson(observed, observed, "library_size")) < float(_poisson(uniform, observed, "library_size"))


def test_poisson_training_runs_and_saves(tmp_path):
    model = _fit([_summed_slide(0), _summed_slide(1)], loss="poisson", target="library_size", max_epochs=3)
    assert model.history["train_loss"][-1] < model.history["train_loss"][0]
    loaded = bt.tl.BiTroModel.load(model.save(tmp_path / "m"))
    assert loaded.config.head == "cell_counts" and loaded.setup.loss == "poisson"
    a, b = light_copy(make_toy_slide(5)), light_copy(make_toy_slide(5))
    model.predict(a)
    loaded.predict(b)
    np.testing.assert_array_equal(a["cells"].layers["bitro"], b["cells"].layers["bitro"])
