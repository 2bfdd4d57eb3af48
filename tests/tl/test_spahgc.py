"""SpaHGC and the retrieval baseline through bt.tl: graph, training, prediction, files, leakage, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _toy import GENES, make_toy_slide

import bitro as bt
from bitro.models._spahgc import EXEMPLAR_EDGE, REFERENCE_EDGE, SPATIAL_EDGE

NET = {"hidden_dim": 16, "heads": 2, "dropout": 0.0}
FIT = {"genes": GENES, "n_components": 6, "seed": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def slides():
    return [make_toy_slide(s) for s in range(3)]


@pytest.fixture(scope="module")
def trained(slides):
    return bt.tl.fit(slides, model="spahgc", config=NET, max_epochs=3, n_exemplars=4, batch_size=16, **FIT)


def _renamed(seed: int, name: str):
    sdata = make_toy_slide(seed)
    sdata.attrs["bitro_scale"]["sample_id"] = name
    return sdata


# ---------------------------------------------------------------------------------- graph
def test_hetero_graph_edge_sets():
    from bitro.tl._exemplars import ExemplarIndex
    from bitro.tl._hetero import build_hetero_graph, spatial_edges

    xs, ys = np.meshgrid(np.arange(3), np.arange(3))
    xy = np.column_stack([xs.ravel(), ys.ravel()]) * 200.0  # 3 × 3 grid, 200 µm apart
    near = spatial_edges(xy, radius=1.5 * 200, max_neighbours=8)
    pairs = set(map(tuple, near.T))
    assert all((b, a) in pairs for a, b in pairs) and not any(a == b for a, b in pairs)
    degree = np.bincount(near[1], minlength=9)
    np.testing.assert_array_equal(degree, [3, 5, 3, 5, 8, 5, 3, 5, 3])  # the 8-neighbourhood
    assert spatial_edges(xy, radius=1.1 * 200, max_neighbours=8).shape[1] == 24  # 4-neighbourhood
    assert (np.bincount(spatial_edges(xy, radius=1e4, max_neighbours=2)[1]) >= 2).all()

    rng = np.random.default_rng(0)
    bank = ExemplarIndex.build(rng.normal(size=(30, 5)), np.repeat(["A", "B"], 15), np.arange(30).astype(str),
                               values=rng.normal(size=(30, 3)))  # fmt: skip
    k = 4
    ex = bank.query(rng.normal(size=(9, 5)), k, query_slides="new")
    graph = build_hetero_graph(rng.normal(size=(9, 5)), xy, exemplars=ex, index=bank, radius_um=300,
                               max_neighbours=8, reference_k=2)  # fmt: skip
    data = graph.data
    assert data["target"].x.shape == (9, 5) and data["reference"].x.shape == (9 * k, 5 + 3)
    np.testing.assert_allclose(data["reference"].x[:, 5:].numpy(), bank.values[ex.index.ravel()])
    src, dst = data[EXEMPLAR_EDGE].edge_index.numpy()
    np.testing.assert_array_equal(np.bincount(dst), np.full(9, k))  # each target: its k exemplars
    np.testing.assert_array_equal(data["reference"].bank_row.numpy()[src], ex.index.ravel())
    np.testing.assert_allclose(data[EXEMPLAR_EDGE].similarity.numpy(), ex.similarity.ravel())
    r_src, r_dst = data[REFERENCE_EDGE].edge_index.numpy()
    assert len(r_src) == 9 * k * 2 and (r_src // k == r_dst // k).all() and (r_src != r_dst).all()
    np.testing.assert_array_equal(data[SPATIAL_EDGE].edge_index.numpy(), near)


def test_batches_give_the_whole_slide_prediction(trained, slides):
    from bitro.tl._spahgc_train import run_graph

    table = trained.state.features.table(slides[0], trained.setup)
    ex = trained.index.query(table.x, 4, query_slides="other")
    graph = trained._graph(table, ex)
    seeds = np.arange(len(table.x))
    whole = run_graph(trained.net, graph, seeds, batch_size=len(seeds), device="cpu")
    np.testing.assert_allclose(
        run_graph(trained.net, graph, seeds, batch_size=3, device="cpu"), whole, atol=1e-5
    )


# ---------------------------------------------------------------------------------- training
def test_training_exemplars_come_from_other_slides_and_never_from_validation(trained):
    from bitro.tl._data import validation_groups

    slides = trained._training_data(0.2)
    index = trained.index
    rng = np.random.default_rng(trained.seed)
    # no augmented copies: every spot is its own group, drawn one by one
    val_rows = np.flatnonzero(validation_groups(np.arange(index.n_references), 0.2, rng))
    start = 0
    for s, slide in enumerate(slides):
        rows = slide.graph.data["reference"].bank_row.numpy()
        assert not np.isin(rows, val_rows).any()
        assert (index.slide_codes[rows] != index.slide_names.index(trained.train_slides[s])).all()
        n = slide.graph.n_targets
        np.testing.assert_array_equal(np.sort(np.concatenate([slide.train, slide.val]) + start),
                                      np.arange(start, start + n))  # fmt: skip
        assert np.isin(slide.val + start, val_rows).all()
        start += n
    assert sum(len(s.val) for s in slides) == len(val_rows) > 0


def _copy_of(sdata, i: int):
    """What bt.pp.augment_slide records on a copy (its own sample id, its source), with shifted features."""
    from bitro.tl._cv import light_copy

    source = sdata.attrs["bitro_scale"]["sample_id"]
    copy = light_copy(sdata)
    copy.attrs["bitro_scale"] = {**copy.attrs["bitro_scale"], "sample_id": f"{source}_aug{i}"}
    copy.attrs["bitro_augment"] = [{"source_sample_id": source, "sample_id": f"{source}_aug{i}"}]
    copy["cells"].obsm["X_bitro"] = copy["cells"].obsm["X_bitro"] * (1.0 + 0.05 * (i + 1))
    return copy


def test_augmented_copies_are_never_exemplars_of_their_source_nor_split_from_it(slides):
    train = [slides[0], _copy_of(slides[0], 0), slides[1], _copy_of(slides[1], 0)]
    m = bt.tl.fit(train, model="spahgc", config=NET, max_epochs=1, n_exemplars=3, **FIT)
    data = m._training_data(0.3)
    index = m.index
    source = {0: 0, 1: 0, 2: 1, 3: 1}  # training slide -> its sample
    ref_sample = np.array([source[m.train_slides.index(index.slide_names[c])] for c in index.slide_codes])
    val_ids = [set(), set()]
    for s, slide in enumerate(data):
        rows = slide.graph.data["reference"].bank_row.numpy()
        assert (ref_sample[rows] != source[s]).all()  # never the slide itself nor a copy of it
        val_ids[source[s]] |= set(m._tables[s].spot_ids[slide.val])
    for s, slide in enumerate(data):  # a spot and its copy are on the same side of the split
        train_ids = set(m._tables[s].spot_ids[slide.train])
        assert not train_ids & val_ids[source[s]]
        assert set(m._tables[s].spot_ids[slide.val]) == val_ids[source[s]]
    assert all(val_ids)
    with pytest.raises(ValueError, match=r"all copies of one sample \('toy0'.*use_exemplars"):
        bt.tl.fit(train[:2], model="spahgc", config=NET, max_epochs=1, n_exemplars=3, **FIT)


def test_fit_records_history_and_training_options(trained):
    assert trained.is_trained and trained.history["epoch"] == [1, 2, 3]
    assert np.isfinite(trained.history["val_loss"]).all()
    assert np.isfinite(trained.history["contrastive_loss"]).all()
    assert trained.train_params["batch_size"] == 16 and trained.train_params["n_val_units"] > 0
    assert trained.config.in_dim == 6 + 1 and trained.config.n_genes == len(GENES)
    assert "SpaHGCModel(" in repr(trained)


def test_contrastive_ablation_builds_no_views(slides):
    off = {**NET, "target_contrast_weight": 0.0, "reference_contrast_weight": 0.0}
    m = bt.tl.fit(slides, model="spahgc", config=off, max_epochs=1, n_exemplars=2, **FIT)
    assert np.isnan(m.history["contrastive_loss"]).all()


def test_one_training_slide_is_refused_unless_exemplars_are_off(slides):
    with pytest.raises(
        ValueError, match=r"training set is one slide.*'toy0'.*no training spot has a cross-slide"
    ):
        bt.tl.fit(slides[:1], model="spahgc", config=NET, max_epochs=1, **FIT)
    m = bt.tl.fit(slides[:1], model="spahgc", config={**NET, "use_exemplars": False}, max_epochs=1, **FIT)
    out = m.predict(_renamed(4, "held_out"), key_added="noex")
    assert np.isfinite(out["units"]).all()


# ---------------------------------------------------------------------------------- prediction and files
def test_fit_predict_save_load_round_trip(trained, tmp_path):
    test = _renamed(7, "held_out")
    assert bt.tl.predict(trained, test, key_added="spahgc") is None  # writers return None
    out = trained.predict(test, key_added="spahgc", overwrite=True)
    layer = test["spots"].layers["spahgc"]
    assert layer.shape == (36, len(GENES)) and np.isfinite(layer).all() and (layer >= 0).all()
    assert test["spots"].uns["spahgc"]["model"] == "spahgc"
    assert test["spots"].uns["spahgc"]["train_slides"] == ["toy0", "toy1", "toy2"]
    assert (test["spots"].obs["spahgc_n_cells"] > 0).all()
    frame = out["exemplars"]
    assert len(frame) == 36 * 4 and set(frame["slide"]) <= {"toy0", "toy1", "toy2"}

    path = trained.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = bt.tl.SpaHGCModel.load(path)
    again = _renamed(7, "held_out")
    loaded.predict(again, key_added="spahgc")
    np.testing.assert_array_equal(again["spots"].layers["spahgc"], layer)
    assert loaded.history == trained.history and loaded.train_slides == trained.train_slides
    with pytest.raises(ValueError, match="already exists"):
        loaded.predict(again, key_added="spahgc")
    loaded.predict(again, key_added="spahgc", overwrite=True)
    with pytest.raises(FileExistsError):
        trained.save(path)
    trained.save(path, overwrite=True)
    with pytest.raises(RuntimeError, match="loaded from disk"):
        loaded.train(max_epochs=1)


def test_edited_files_and_other_model_kinds_are_refused(trained, slides, tmp_path):
    path = trained.save(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["state"]["cross_slice"]["n_exemplars"] = 2
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="changed after the model was saved"):
        bt.tl.SpaHGCModel.load(path)
    retr = bt.tl.fit(slides, model="retrieval", **{k: v for k, v in FIT.items() if k != "device"})
    rpath = retr.save(tmp_path / "r")
    with pytest.raises(
        ValueError, match=r"holds a 'retrieval' model; load it with bt\.tl\.RetrievalModel\.load"
    ):
        bt.tl.SpaHGCModel.load(rpath)
    with pytest.raises(ValueError, match="not a cross-slice model"):
        bt.tl.RetrievalModel.load(_bitro_model(slides, tmp_path))
    (rpath / "extra.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="never loads pickles"):
        bt.tl.RetrievalModel.load(rpath)


def _bitro_model(slides, tmp_path):
    m = bt.tl.fit(slides[:2], genes=GENES, n_components=4, max_epochs=1, seed=0, device="cpu",
                  config={"hidden_dim": 8, "ffn_dim": 8, "readout_hidden": 8, "pos_bins": 4, "gat_heads": 1,
                          "transformer_heads": 1})  # fmt: skip
    return m.save(tmp_path / "bitro")


def test_retrieval_known_answer_identical_spot_gets_its_expression(slides, tmp_path):
    model = bt.tl.fit(slides, model="retrieval", genes=GENES, target="raw", n_exemplars=1, n_components=6)
    test = make_toy_slide(0)  # slide toy0's spots ...
    test.attrs["bitro_scale"]["sample_id"] = "copy"
    cells = test["cells"]
    first = (cells.obs["spot_id"] == "s0").to_numpy()
    cells.obsm["X_bitro"][first] += 3.0  # ... with spot s0 changed, so it is not the same slide
    out = model.predict(test, key_added="r")
    counts = slides[0]["spots"].layers["counts"].toarray()
    expected = np.log1p(counts)  # raw scale: log1p of the matched spot's counts
    np.testing.assert_allclose(out["units"][1:], expected[1:], atol=1e-4)
    ex = out["exemplars"].set_index("query")
    assert (ex.loc["s1":, "slide"] == "toy0").all() and (ex.loc["s1":, "spot"] == ex.loc["s1":].index).all()
    loaded = bt.tl.RetrievalModel.load(model.save(tmp_path / "r"))
    again = make_toy_slide(0)
    again.attrs["bitro_scale"]["sample_id"] = "copy"
    again["cells"].obsm["X_bitro"][first] += 3.0
    np.testing.assert_array_equal(loaded.predict(again, key_added="r")["units"], out["units"])


def test_retrieval_weights_by_clipped_similarity():
    from bitro.tl._retrieval import weighted_mean

    values = np.array([[[1.0], [3.0], [9.0]], [[2.0], [4.0], [6.0]]])
    sim = np.array([[0.75, 0.25, -0.5], [-0.1, -0.2, 0.0]])
    np.testing.assert_allclose(weighted_mean(values, sim), [[1.5], [4.0]])


# ---------------------------------------------------------------------------------- bad input
def test_predicting_a_training_slide_is_refused(trained, slides):
    with pytest.raises(ValueError, match=r"is training slide 'toy1'.*leakage"):
        trained.predict(slides[1], key_added="x")
    with pytest.raises(ValueError, match=r"\('renamed'\) holds the same spots as training slide 'toy2'"):
        trained.predict(_renamed(2, "renamed"), key_added="x")
    assert "x" not in slides[1]["spots"].layers


def test_genes_missing_in_a_slide_are_named(slides):
    broken = make_toy_slide(1)
    broken.tables["spots"] = broken["spots"][:, 2:].copy()
    with pytest.raises(ValueError, match=r"2 of 10 genes are missing from slide 'toy1'.*'G0', 'G1'"):
        bt.tl.fit([slides[0], broken], model="spahgc", **FIT)
    with pytest.raises(ValueError, match="missing from slide 'toy1'"):
        bt.tl.fit([slides[0], broken], model="retrieval", genes=GENES)


def test_different_encoders_are_refused(slides, trained):
    other = make_toy_slide(1)
    other["cells"].uns["X_bitro"] = {"encoder": "uni", "dim": 12}
    with pytest.raises(ValueError, match=r"embedded differently.*encoder: 'toy' vs 'uni'"):
        bt.tl.fit([slides[0], other], model="spahgc", **FIT)
    test = _renamed(6, "held_out")
    test["cells"].uns["X_bitro"] = {"encoder": "uni", "dim": 12}
    with pytest.raises(ValueError, match="embedded with encoder 'uni' but the model was trained on 'toy'"):
        trained.predict(test)
    narrow = _renamed(6, "held_out")
    narrow["cells"].obsm["X_bitro"] = narrow["cells"].obsm["X_bitro"][:, :5]
    with pytest.raises(ValueError, match="has 5 features but the model was trained on 12"):
        trained.predict(narrow)


def test_duplicate_training_slides_are_refused(slides):
    with pytest.raises(ValueError, match="share the sample id"):
        bt.tl.fit([slides[0], slides[0]], model="retrieval", genes=GENES)
    with pytest.raises(ValueError, match="hold the same spots"):
        bt.tl.fit([slides[0], _renamed(0, "again")], model="retrieval", genes=GENES)


def test_spot_patch_embedding_joins_the_features(slides):
    rng = np.random.default_rng(0)
    with_patch = [make_toy_slide(s) for s in range(2)]
    for s in with_patch:
        s["spots"].obsm["X_patch"] = rng.normal(size=(36, 9))
    m = bt.tl.fit(with_patch, model="retrieval", genes=GENES, n_components=4, spot_rep="X_patch")
    assert m.state.features.dim == 4 + 1 + 4 and m.state.features.spot_projection.n_features == 9
    with pytest.raises(KeyError, match=r"spots.obsm\['X_patch'\] is missing"):
        bt.tl.fit([with_patch[0], slides[2]], model="retrieval", genes=GENES, spot_rep="X_patch")
    with_patch[1]["spots"].obsm["X_patch"] = rng.normal(size=(36, 5))
    with pytest.raises(ValueError, match="different widths"):
        bt.tl.fit(with_patch, model="retrieval", genes=GENES, spot_rep="X_patch")


def test_fit_options_are_checked(slides, caplog):
    with pytest.raises(TypeError, match="Unknown option"):
        bt.tl.fit(slides, model="spahgc", n_exemplar=3, **FIT)
    with pytest.raises(ValueError, match="predicts spots"):
        bt.tl.fit(slides, model="spahgc", level="bulk", **FIT)
    with pytest.raises(ValueError, match="checkpoint_dir is not supported"):
        bt.tl.fit(slides, model="spahgc", config=NET, checkpoint_dir="ck", **FIT)
    with pytest.raises(ValueError, match="index must be one of"):
        bt.tl.fit(slides, model="retrieval", genes=GENES, index="faiss")
    with caplog.at_level("WARNING", logger="bitro"):
        bt.tl.fit(slides, model="retrieval", genes=GENES, n_components=4, max_epochs=3)
    assert "ignores ['max_epochs']" in caplog.text
    with pytest.raises(ValueError, match="'spahgc'"):
        bt.tl.fit(slides, model="spahgcc", genes=GENES)
