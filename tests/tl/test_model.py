"""BiTroModel on toy slides: training, prediction layout, save/load, baselines, transfer."""

from __future__ import annotations

import numpy as np
import pytest
from _toy import GENES, SMALL, make_toy_slide

import bitro as bt
from bitro.tl import BiTroModel
from bitro.tl._cv import light_copy


def _fit(slides, config=None, **kw):
    kw.setdefault("max_epochs", 25)
    return bt.tl.fit(
        slides,
        genes=GENES,
        config={**SMALL, **(config or {})},
        n_components=8,
        n_phenotypes=3,
        lr=3e-3,
        batch_size=8,
        seed=0,
        **kw,
    )


def test_fit_predict_layers_and_accuracy(toy_slides):
    train, test = toy_slides[:2], toy_slides[2]
    model = _fit(train)
    assert model.is_trained and len(model.history["train_loss"]) >= 1
    assert model.history["train_loss"][-1] < model.history["train_loss"][0]
    bt.tl.predict(model, test)
    spots, cells = test["spots"], test["cells"]
    layer = spots.layers["bitro"]
    assert layer.shape == spots.shape and layer.dtype == np.float32
    assert np.isfinite(layer).all()
    # pseudo-cells sum to their spot in count space
    pred_counts = np.expm1(layer)
    cell_counts = np.expm1(cells.layers["bitro"])
    for sid in spots.obs_names[:5]:
        members = (cells.obs["spot_id"] == sid).to_numpy()
        np.testing.assert_allclose(
            np.nansum(cell_counts[members], axis=0),
            pred_counts[spots.obs_names.get_loc(sid)],
            rtol=1e-3,
            atol=1e-3,
        )
    # cells outside every spot are predicted too (in bins), and flagged
    outside = cells.obs["spot_id"].isna().to_numpy()
    assert outside.sum() == 2 and np.isfinite(cells.layers["bitro"][outside]).all()
    assert (cells.obs["bitro_in_bag"].to_numpy() == ~outside).all()
    assert cells.obsm["X_bitro_expr"].shape == (cells.n_obs, len(GENES))
    assert spots.uns["bitro"]["model"] == "bitro" and cells.uns["bitro"]["genes"] == GENES
    # the model learned: better than the training mean on held-out spots
    res = bt.tl.evaluate(test, layer="bitro", inplace=False)
    pcc = res[(res.metric == "pcc_gene") & (res.scale == "raw")]["value"].iloc[0]
    assert pcc > 0.3


def test_predict_refuses_overwrite(toy_slides):
    model = _fit(toy_slides[:2], max_epochs=1)
    bt.tl.predict(model, toy_slides[2])
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.tl.predict(model, toy_slides[2])
    bt.tl.predict(model, toy_slides[2], overwrite=True)


def test_predict_chunked_cell_outputs_match_one_chunk(toy_slides, monkeypatch):
    """Writing the per-cell outputs in many small chunks gives exactly the one-chunk result."""
    import bitro.tl._predict as predict_mod

    model = _fit(toy_slides[:2], max_epochs=1)
    a, b = light_copy(toy_slides[2]), light_copy(toy_slides[2])
    model.predict(a)
    monkeypatch.setattr(predict_mod, "PREDICT_CHUNK", 7)
    assert a["cells"].obs["bitro_in_bag"].sum() > 7  # more than one chunk
    model.predict(b)
    for x, y in (
        (a["cells"].layers["bitro"], b["cells"].layers["bitro"]),
        (a["cells"].obsm["X_bitro_expr"], b["cells"].obsm["X_bitro_expr"]),
    ):
        assert x.dtype == y.dtype == np.float32
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a["cells"].obs["bitro_in_bag"], b["cells"].obs["bitro_in_bag"])
    # and equals attention x unit counts (paper Eq. 10) computed directly from the bags
    bags, _, z, attn = model.predict_bags(light_copy(toy_slides[2]))
    pseudo = attn * model.transform.to_counts(z)[np.repeat(np.arange(bags.n_bags), bags.n_cells)]
    cols = b["cells"].var_names.get_indexer(GENES)
    got = np.expm1(b["cells"].layers["bitro"][:, cols])
    np.testing.assert_allclose(got[bags.cell_obs], pseudo, rtol=1e-5, atol=1e-6)


def test_save_load_reproduces(tmp_path, toy_slides):
    model = _fit(toy_slides[:2], max_epochs=3)
    a = light_copy(toy_slides[2])
    b = light_copy(toy_slides[2])
    model.predict(a)
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    loaded = BiTroModel.load(tmp_path / "m")
    loaded.predict(b)
    np.testing.assert_array_equal(a["spots"].layers["bitro"], b["spots"].layers["bitro"])
    np.testing.assert_array_equal(a["cells"].layers["bitro"], b["cells"].layers["bitro"])
    assert loaded.history == model.history
    assert not list(tmp_path.glob("m/*.pkl"))


def test_save_overwrite_replaces_only_a_bitro_model_folder(tmp_path, toy_slides):
    model = _fit(toy_slides[:2], max_epochs=1)
    home = tmp_path / "home"
    home.mkdir()
    (home / "data.csv").write_text("precious")
    with pytest.raises(FileExistsError, match="not a model folder written by bitro"):
        model.save(home, overwrite=True)
    assert (home / "data.csv").read_text() == "precious" and sorted(p.name for p in home.iterdir()) == [
        "data.csv"
    ]
    model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)  # its own earlier output
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_load_rejects_pickles_and_mismatch(tmp_path, toy_slides):
    model = _fit(toy_slides[:2], max_epochs=1)
    model.save(tmp_path / "m")
    (tmp_path / "m" / "extra.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        BiTroModel.load(tmp_path / "m")
    (tmp_path / "m" / "extra.pkl").unlink()
    loaded = BiTroModel.load(tmp_path / "m")
    other = light_copy(toy_slides[2])
    other["cells"].obsm["X_bitro"] = np.zeros((other["cells"].n_obs, 5), np.float32)
    with pytest.raises(ValueError, match="same encoder"):
        loaded.predict(other)
    other["cells"].obsm["X_bitro"] = toy_slides[2]["cells"].obsm["X_bitro"]
    other["cells"].uns["X_bitro"] = {"encoder": "efficientnet_lite0"}
    with pytest.raises(ValueError, match="encoder"):
        loaded.predict(other)


def test_bad_inputs(toy_slides):
    with pytest.raises(ValueError, match="missing from the spots"):
        bt.tl.fit(toy_slides[:2], genes=[*GENES, "NOPE"], max_epochs=1)
    s = light_copy(toy_slides[0])
    s["cells"].obsm["X_bitro"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        bt.tl.fit([s], genes=GENES, max_epochs=1)
    with pytest.raises(ValueError, match="level"):
        bt.tl.fit(toy_slides[:1], genes=GENES, level="cell")
    with pytest.raises(ValueError, match="Unknown model"):
        bt.tl.fit(toy_slides[:1], genes=GENES, model="xgboost")


def test_single_training_section_and_empty_spots(toy_slides):
    s = toy_slides[0]
    cells = s["cells"]
    cells.obs.loc[cells.obs["spot_id"] == "s0", "spot_id"] = None
    model = _fit([s], max_epochs=2)  # one section: validation spots come from it
    assert model.train_params["n_val_units"] >= 1
    test = toy_slides[1]
    test["cells"].obs.loc[test["cells"].obs["spot_id"] == "s3", "spot_id"] = None
    bt.tl.predict(model, test)
    row = test["spots"].obs_names.get_loc("s3")
    assert np.isnan(test["spots"].layers["bitro"][row]).all()
    assert test["spots"].obs["bitro_n_cells"].iloc[row] == 0


@pytest.mark.parametrize("kind", ["ridge", "mlp", "depth", "cell_count", "mean"])
def test_baselines_share_predict_path(kind, toy_slides):
    model = bt.tl.fit(toy_slides[:2], genes=GENES, model=kind, seed=0)
    test = light_copy(toy_slides[2])
    model.predict(test, key_added="base")
    layer = test["spots"].layers["base"]
    assert layer.shape == test["spots"].shape and np.isfinite(layer).all()
    if kind == "mean":
        assert np.allclose(layer, layer[0])
    if kind == "depth":
        # depth spreads one total over fixed gene fractions: rows differ only by a scale in count space
        c = np.expm1(layer)
        frac = c / c.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(frac, np.broadcast_to(frac[0], frac.shape), atol=1e-4)


@pytest.mark.parametrize("kind", ["ridge", "depth"])
def test_baselines_extrapolate_without_clip_and_without_overflow(kind, toy_slides):
    """Shifted features move the prediction beyond the training range (no collapse to a clip) and
    absurd ones stay finite (the overflow guard), also through evaluate's count-space metrics."""
    model = bt.tl.fit(toy_slides[:2], genes=GENES, model=kind, seed=0, target="raw")
    train_max = max(np.log1p(s["spots"].layers["counts"].toarray()).max() for s in toy_slides[:2])
    shifted = light_copy(toy_slides[2])
    x = shifted["cells"].obsm["X_bitro"]
    shifted["cells"].obsm["X_bitro"] = x + 3 * (x - x.mean(axis=0))  # a strong shift, same direction
    model.predict(shifted, key_added="base")
    layer = shifted["spots"].layers["base"]
    assert np.isfinite(layer).all() and layer.std(axis=0).min() > 0  # not constant
    absurd = light_copy(toy_slides[2])
    absurd["cells"].obsm["X_bitro"] = x * 1e4
    model.predict(absurd, key_added="base")
    layer = absurd["spots"].layers["base"]
    assert np.isfinite(layer).all() and layer.max() > train_max  # beyond the training range: not clipped
    res = bt.tl.evaluate(absurd, layer="base", normalize="both", inplace=False)
    assert np.isfinite(res["value"]).all()


def test_target_library_size(toy_slides):
    model = _fit(toy_slides[:2], max_epochs=2, target="library_size")
    assert model.transform.scale == "library_size" and model.transform.target_sum > 0


def test_without_zscore_and_weight_decay(tmp_path, toy_slides):
    model = _fit(toy_slides[:2], max_epochs=2, zscore=False, weight_decay=1e-3)
    assert not model.transform.zscore and model.train_params["weight_decay"] == 1e-3
    np.testing.assert_array_equal(model.transform.mean, 0)
    model.save(tmp_path / "m")
    assert BiTroModel.load(tmp_path / "m").transform.zscore is False
    a = light_copy(toy_slides[2])
    model.predict(a)
    assert np.isfinite(a["spots"].layers["bitro"]).all() and (a["spots"].layers["bitro"] >= 0).all()


def test_bulk_fit_and_transfer(toy_bulk_slides):
    train = toy_bulk_slides[:3]
    bulk = _fit(train, level="bulk", max_epochs=3)
    assert bulk.level == "bulk" and bulk.setup.cluster_weight == pytest.approx(0.1)
    test = light_copy(toy_bulk_slides[3], tables=("spots", "cells", "patches", "bulk"))
    bulk.predict(test)
    assert np.isfinite(test["bulk"].layers["bitro"]).all()
    assert test["patches"].layers["bitro"].shape[0] == test["patches"].n_obs
    # bulk -> spot with LoRA: the base stays frozen
    spot = bt.tl.transfer(bulk, train, level="spot", method="lora", max_epochs=2)
    from bitro.models import lora_trainable_summary

    summary = lora_trainable_summary(spot.net)
    trainable = [n for n, p in spot.net.named_parameters() if p.requires_grad]
    assert summary["lora"] > 0 and summary["frozen"] > 0
    assert all("lora_" in n or n.startswith("head.") for n in trainable)  # only adapters and the gene head
    test2 = light_copy(toy_bulk_slides[3])
    spot.predict(test2)
    assert np.isfinite(test2["spots"].layers["bitro"]).all()
    # spot -> bulk with LoRA, and a saved LoRA model reloads identically
    spot_model = _fit(train, max_epochs=2)
    to_bulk = bt.tl.transfer(spot_model, train, level="bulk", method="lora", max_epochs=2)
    assert to_bulk.level == "bulk" and to_bulk.state.lora["rank"] == 8


def test_transfer_new_genes_copies_shared_queries(toy_slides):
    model = _fit(toy_slides[:2], max_epochs=2)
    new_genes = GENES[:5]
    t = bt.tl.transfer(model, toy_slides[:2], level="spot", genes=new_genes, method="full", max_epochs=1)
    assert t.genes == new_genes


def test_prediction_independent_of_batch(toy_slides):
    model = _fit(toy_slides[:2], max_epochs=2)
    a, b = light_copy(toy_slides[2]), light_copy(toy_slides[2])
    model.predict(a, batch_size=1)
    model.predict(b, batch_size=64)
    np.testing.assert_allclose(a["spots"].layers["bitro"], b["spots"].layers["bitro"], atol=1e-4)


def test_make_toy_slide_sanity():
    s = make_toy_slide(0)
    assert s["spots"].n_obs == 36 and s["cells"].obs["spot_id"].isna().sum() == 2


def test_resume_from_checkpoint_is_exact(tmp_path, toy_slides):
    def model():
        return BiTroModel(toy_slides[:2], genes=GENES, config=SMALL, n_components=8, n_phenotypes=3, seed=3)

    full = model().train(max_epochs=4, lr=3e-3, batch_size=8, patience=50, checkpoint_dir=tmp_path / "a")
    interrupted = model().train(
        max_epochs=2, lr=3e-3, batch_size=8, patience=50, checkpoint_dir=tmp_path / "b"
    )
    assert len(interrupted.history["epoch"]) == 2
    resumed = model().train(max_epochs=4, lr=3e-3, batch_size=8, patience=50, checkpoint_dir=tmp_path / "b")
    assert resumed.history["epoch"] == [1, 2, 3, 4]
    np.testing.assert_array_equal(resumed.history["train_loss"], full.history["train_loss"])
    for (k, a), (_, b) in zip(full.net.state_dict().items(), resumed.net.state_dict().items()):
        assert (a == b).all(), k
    assert not list((tmp_path / "b").glob("*.pkl")) and (tmp_path / "b" / "train_state.safetensors").is_file()
    # a checkpoint of another run is refused
    other = BiTroModel(toy_slides[:2], genes=GENES, config=SMALL, n_components=8, n_phenotypes=3, seed=4)
    with pytest.raises(ValueError, match="another training run"):
        other.train(max_epochs=4, checkpoint_dir=tmp_path / "b")


def test_context_ring(tmp_path, toy_slides):
    from bitro.tl._data import collate

    with pytest.raises(ValueError, match="only the Transformer"):  # the default network has none
        _fit(toy_slides[:2], max_epochs=2, context_um=120.0)
    model = _fit(toy_slides[:2], max_epochs=2, context_um=120.0, config={"use_transformer": True})
    bags = model.train_bags
    assert bags.ctx_ptr is not None and bags.ctx_ptr[-1] > 0
    # context cells are outside their bag but within radius + ring of its centre
    sdata = toy_slides[0]
    cells = sdata["cells"]
    b = int(np.argmax(np.diff(bags.ctx_ptr)[: (bags.bag_slide == 0).sum()]))
    batch = collate(bags, np.array([b]))
    assert batch["ctx_x"].shape[0] == bags.ctx_ptr[b + 1] - bags.ctx_ptr[b]
    centre = sdata["spots"][bags.bag_ids[b]].obsm["spatial"][0]
    d = np.linalg.norm(cells.obsm["spatial"] - centre, axis=1)
    outside = (cells.obs["spot_id"].astype(object) != bags.bag_ids[b]).to_numpy()
    assert batch["ctx_x"].shape[0] == int(((d <= 50 + 120) & outside).sum())
    test = light_copy(toy_slides[2])
    model.predict(test)
    assert np.isfinite(test["spots"].layers["bitro"]).all()
    model.save(tmp_path / "ctx")
    assert BiTroModel.load(tmp_path / "ctx").setup.context_um == 120.0


def test_predicted_cells_cluster_with_scanpy(toy_slides):
    import scanpy as sc

    model = _fit(toy_slides[:2], max_epochs=3)
    test = toy_slides[2]
    bt.tl.predict(model, test)
    cells = test["cells"]
    # every cell has a prediction, so the whole table goes to scanpy as it is (no NaN rows to drop)
    assert np.isfinite(cells.obsm["X_bitro_expr"]).all() and (~cells.obs["bitro_in_bag"]).sum() == 2
    sub = cells.copy()
    sc.pp.neighbors(sub, use_rep="X_bitro_expr", n_neighbors=10)
    sc.tl.leiden(sub, flavor="igraph", n_iterations=2, random_state=0)
    assert sub.obs["leiden"].nunique() >= 2


def test_predict_follows_the_inplace_rule(toy_slides):
    model = _fit(toy_slides[:2], max_epochs=1)
    test = light_copy(toy_slides[2])
    arrays = bt.tl.predict(model, test, inplace=False)
    assert "bitro" not in test["spots"].layers and "bitro" not in test["cells"].layers  # nothing written
    assert bt.tl.predict(model, test) is None
    np.testing.assert_array_equal(arrays["units"], test["spots"].layers["bitro"])
    np.testing.assert_array_equal(arrays["cells"], test["cells"].layers["bitro"])
