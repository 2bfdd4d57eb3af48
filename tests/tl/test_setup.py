"""From slides to a model: what bt.pp wrote is reused, bad training sets are refused or warned about."""

from __future__ import annotations

import numpy as np
import pytest
from _toy import GENES, SMALL, make_toy_slide

import bitro as bt
from bitro.tl._cv import light_copy

FIT = {"genes": GENES, "config": SMALL, "n_components": 8, "n_phenotypes": 3, "seed": 0, "lr": 3e-3}


def _fit(slides, **kw):
    return bt.tl.fit(slides, **{**FIT, "max_epochs": 3, **kw})


def test_what_pp_wrote_is_used_and_gives_the_same_model(toy_slides, caplog):
    plain = [make_toy_slide(s) for s in range(2)]
    prepared = [make_toy_slide(s) for s in range(2)]
    projection = bt.pp.reduce_features(prepared, n_components=8, seed=0)
    phenotypes = bt.pp.cluster_phenotypes(prepared, n_clusters=3, seed=0)
    for s in prepared:
        bt.pp.cell_graph(s, k=8)
    with caplog.at_level("INFO", logger="bitro"):
        a = _fit(prepared)
    assert "Using the FeatureProjection that bt.pp stored" in caplog.text
    assert "Using the PhenotypeModel that bt.pp stored" in caplog.text
    assert "Using the cell graph of bt.pp.cell_graph on 2 slide(s)" in caplog.text
    np.testing.assert_array_equal(a.projection.components, projection.components)
    np.testing.assert_array_equal(a.phenotypes.centroids, phenotypes.centroids)
    b = _fit(plain)  # fits its own projection, phenotypes and graph with the same functions
    np.testing.assert_array_equal(a.projection.components, b.projection.components)
    np.testing.assert_array_equal(a.phenotypes.centroids, b.phenotypes.centroids)
    for key in ("features", "edges", "edge_ptr", "pos", "phenotype"):
        np.testing.assert_array_equal(getattr(a.train_bags, key), getattr(b.train_bags, key), err_msg=key)
    assert a.weights_hash() == b.weights_hash() and a.history == b.history


def test_a_projection_fitted_on_other_slides_is_not_reused(toy_slides, caplog):
    slides = [make_toy_slide(s) for s in range(3)]
    bt.pp.reduce_features(slides, n_components=8, seed=0)  # fitted on three slides, trained on two
    with caplog.at_level("INFO", logger="bitro"):
        model = _fit(slides[:2], max_epochs=1)
    assert "fitting one on the training slides" in caplog.text
    assert model.projection.n_cells_fit == sum(s["cells"].n_obs for s in slides[:2])


def test_a_stored_graph_for_other_bags_is_not_used(caplog):
    s = make_toy_slide(0)
    bt.pp.cell_graph(s, k=4)  # another k
    with caplog.at_level("INFO", logger="bitro"):
        _fit([s], max_epochs=1)
    assert "Using the cell graph" not in caplog.text


def test_fit_refuses_slides_embedded_with_different_encoders(toy_slides):
    other = light_copy(toy_slides[1])
    other["cells"].uns["X_bitro"] = {"encoder": "morphology", "dim": 12}  # same width, other encoder
    with pytest.raises(
        ValueError, match=r"embedded differently \(toy0 vs toy1: encoder: 'toy' vs 'morphology'\)"
    ):
        _fit([toy_slides[0], other])


def test_context_windows_are_part_of_the_encoder(toy_slides):
    a, b = (light_copy(s) for s in toy_slides[:2])
    for s, ctx in ((a, [100.0]), (b, [200.0])):  # same width, other neighbourhood windows
        s["cells"].uns["X_bitro"] = {**s["cells"].uns["X_bitro"], "context_um": ctx}
    with pytest.raises(ValueError, match=r"context_um: \[100.0\] vs \[200.0\]"):
        _fit([a, b])
    model = _fit([a, light_copy(a)], max_epochs=1)
    with pytest.raises(
        ValueError, match=r"embedded with context_um \[200.0\] but the model was trained on \[100.0\]"
    ):
        model.predict(light_copy(b))


def test_the_tile_magnification_is_part_of_the_encoder(toy_slides):
    a, b = (light_copy(s) for s in toy_slides[:2])
    a["cells"].uns["X_bitro"] = {**a["cells"].uns["X_bitro"], "tile_mpp": 0.25}  # b: the slide's own scale
    with pytest.raises(ValueError, match=r"tile_mpp: 0.25 vs None"):
        _fit([a, b])
    model = _fit([a, light_copy(a)], max_epochs=1)
    with pytest.raises(
        ValueError, match=r"embedded with tile_mpp None but the model was trained on tile_mpp 0.25"
    ):
        model.predict(light_copy(b))


def test_transfer_keeps_the_table_keys(toy_slides):
    slides = []
    for s in toy_slides[:2]:
        c = light_copy(s)
        c.tables["nuclei"] = c.tables.pop("cells")
        slides.append(c)
    model = _fit(slides, cells_key="nuclei", max_epochs=1)
    moved = bt.tl.transfer(model, slides, level="spot", method="full", max_epochs=1)
    assert moved.setup.cells_key == "nuclei" and moved.setup.k == model.setup.k
    test = light_copy(toy_slides[2])
    test.tables["nuclei"] = test.tables.pop("cells")
    moved.predict(test)
    assert "bitro" in test["nuclei"].layers


def test_bulk_level_on_spot_only_slides_names_make_patches(toy_slides):
    model = _fit(toy_slides[:2], max_epochs=1)
    with pytest.raises(KeyError, match=r"bt\.pp\.make_patches"):
        bt.tl.transfer(model, toy_slides[:2], level="bulk")


def test_one_spot_fit_warns_that_it_learns_nothing(toy_slides, caplog):
    one = light_copy(toy_slides[0])
    keep = one["spots"].obs_names[:1]
    one["cells"].obs["spot_id"] = one["cells"].obs["spot_id"].where(one["cells"].obs["spot_id"].isin(keep))
    with caplog.at_level("WARNING", logger="bitro"):
        _fit([one], max_epochs=1)
    assert "Training on 1 spot" in caplog.text and "same expression everywhere" in caplog.text


def test_predict_warns_when_the_table_has_none_of_the_genes(toy_slides, caplog):
    model = _fit(toy_slides[:2], max_epochs=1)
    test = light_copy(toy_slides[2])
    spots = test["spots"]
    spots.var_names = [f"other{i}" for i in range(spots.n_vars)]
    with caplog.at_level("WARNING", logger="bitro"):
        out = model.predict(test)
    assert "None of the model's 10 genes" in caplog.text
    assert (
        np.isnan(out["units"]).all()
        and np.isfinite(test["cells"].obsm["X_bitro_expr"][test["cells"].obs["bitro_in_bag"]]).all()
    )


def test_device_none_follows_bt_settings(toy_slides):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    old = bt.settings.device
    bt.settings.device = "cuda"
    try:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            _fit(toy_slides[:2], max_epochs=1)
        assert _fit(toy_slides[:2], max_epochs=1, device="cpu").is_trained  # an explicit device wins
    finally:
        bt.settings.device = old


def test_predict_reports_how_far_a_slide_sits_from_training(toy_slides, caplog, tmp_path):
    model = _fit(toy_slides[:2], max_epochs=1)
    assert len(model.state.domain) == 2 and "median_umi_per_spot" in model.state.domain[0]["stats"]
    same = light_copy(toy_slides[0])  # a training slide lies inside the training range by definition
    with caplog.at_level("INFO", logger="bitro"):
        model.predict(same)
    assert "Domain report" in caplog.text and same["spots"].uns["bitro"]["domain_outside"] == []
    thin = bt.datasets.thin_counts(light_copy(toy_slides[0]), fraction=0.1, seed=0)
    report = model.domain_report(thin)
    assert (
        report.loc["median_umi_per_spot", "outside"]
        and report.loc["median_umi_per_spot", "direction"] == "below"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="bitro"):
        model.predict(thin)
    assert "median_umi_per_spot" in caplog.text
    assert "median_umi_per_spot" in thin["spots"].uns["bitro"]["domain_outside"]
    # the statistics travel with the saved model and the provenance with the stored slide
    loaded = bt.tl.BiTroModel.load(model.save(tmp_path / "m"))
    assert loaded.state.domain == model.state.domain
    bt.io.write_zarr(same, tmp_path / "s.zarr")
    assert list(bt.io.read_zarr(tmp_path / "s.zarr")["spots"].uns["bitro"]["domain_outside"]) == []
