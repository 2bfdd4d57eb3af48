"""Contrastive image ↔ expression alignment through bt.tl: training, metrics, files, leakage, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitro as bt
from bitro.tl._cv import light_copy

pytestmark = pytest.mark.filterwarnings("ignore:The table is annotating:UserWarning")

CELLS = "cells_truth"
FIT = {"cells_key": CELLS, "n_components": 16, "seed": 0, "device": "cpu", "batch_size": 32}


def _tables(sdata):
    return light_copy(sdata, tables=("spots", CELLS))


@pytest.fixture(scope="module")
def slides():
    """Four small synthetic Visium slides (about 39 spots each), cells embedded by their morphology."""
    raw = bt.datasets.synthetic_tissue(4, size=1200, technology="visium", seed=5)
    for s in raw:
        bt.pp.embed_cells(s, cells_key=CELLS, encoder="morphology", device="cpu")
    return [_tables(s) for s in raw]


@pytest.fixture(scope="module")
def aligned(slides):
    return bt.tl.align_encoder(slides[:3], max_epochs=40, **FIT)


def test_loss_decreases_and_held_out_recall_beats_chance(aligned, slides):
    h = aligned.history
    assert h["train_loss"][-1] < 0.5 * h["train_loss"][0]
    assert aligned.train_params["n_val_spots"] > 0 and aligned.train_slides == [
        s.attrs["bitro_scale"]["sample_id"] for s in slides[:3]
    ]
    res = bt.tl.evaluate_alignment(aligned, slides[3], reference=slides[:3])
    recall = res[(res.metric == "recall") & (res.k == 5)]
    assert len(recall) == 2
    n = int(recall.n_spots.iloc[0])
    assert n == int((slides[3]["spots"].layers["counts"].sum(axis=1) > 0).sum())
    np.testing.assert_allclose(recall.chance, 5 / n)
    assert (recall.value > 2 * recall.chance).all()
    assert set(res.metric) == {"recall", "knn_pcc_gene", "silhouette_slide"}
    assert set(res[res.metric == "knn_pcc_gene"].space) == {"aligned", "unaligned"}


def test_cross_modal_recall_known_answer():
    eye = np.eye(4)
    res = bt.tl.cross_modal_recall(eye, eye[[0, 1, 3, 2]], ks=(1, 2))
    r1 = res[(res.k == 1)].set_index("direction").recall
    assert r1["image→expression"] == 0.5 and r1["expression→image"] == 0.5
    assert (res[res.k == 2].recall == 0.5).all()  # the swapped pair's partner is orthogonal: not in the top 2
    assert (res.chance == res.k / 4).all()


def test_knn_expression_and_silhouette_known_answers():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    values = np.array([[1.0], [5.0], [3.0]])
    pred = bt.tl.knn_expression(ref, values, np.array([[0.0, 2.0]]), k=1)
    np.testing.assert_allclose(pred, [[5.0]])
    apart = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    assert bt.tl.batch_silhouette(apart, ["a", "a", "b", "b"]) > 0.9
    assert bt.tl.batch_silhouette(apart, ["a", "b", "a", "b"]) < 0.1
    with pytest.raises(ValueError, match="2 batches"):
        bt.tl.batch_silhouette(apart, ["a"] * 4)


def test_apply_alignment_writes_cells_and_spots(aligned, slides):
    sdata = _tables(slides[3])
    out = bt.tl.apply_alignment(sdata, aligned, key_added="X_al")
    cells, spots = sdata[CELLS], sdata["spots"]
    d = aligned.config.embed_dim
    assert cells.obsm["X_al"].shape == (cells.n_obs, d) and spots.obsm["X_al"].shape == (spots.n_obs, d)
    # a spot's embedding is the normalised mean of its cells' embeddings
    spot = out.spot_ids[0]
    mean = cells.obsm["X_al"][(cells.obs["spot_id"] == spot).to_numpy()].mean(axis=0)
    row = spots.obs_names.get_loc(spot)
    np.testing.assert_allclose(spots.obsm["X_al"][row], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5)
    empty = ~np.isin(spots.obs_names, out.spot_ids)
    assert np.isnan(spots.obsm["X_al"][empty]).all()
    np.testing.assert_allclose(np.linalg.norm(spots.obsm["X_al_expression"][out.rows], axis=1), 1, rtol=1e-5)
    assert spots.uns["X_al"]["train_slides"] == aligned.train_slides
    with pytest.raises(ValueError, match="overwrite=True"):
        bt.tl.apply_alignment(sdata, aligned, key_added="X_al")


def test_save_load_round_trip_and_encoder_hook(aligned, slides, tmp_path):
    path = aligned.save(tmp_path / "aligned")
    a, b = _tables(slides[3]), _tables(slides[3])
    bt.tl.apply_alignment(a, aligned)
    bt.tl.apply_alignment(b, path)
    for table in ("spots", CELLS):
        np.testing.assert_array_equal(a[table].obsm["X_aligned"], b[table].obsm["X_aligned"])
    np.testing.assert_array_equal(
        a["spots"].obsm["X_aligned_expression"], b["spots"].obsm["X_aligned_expression"]
    )
    loaded = bt.tl.Alignment.load(path)
    assert loaded.genes == aligned.genes and loaded.history == aligned.history
    # a features alignment is not an image encoder: embed_cells explains where it goes
    small = bt.datasets.synthetic_tissue(1, size=300, seed=1)
    with pytest.raises(ValueError, match="apply_alignment"):
        bt.pp.embed_cells(small, cells_key=CELLS, encoder=str(path), mode="crop")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        aligned.save(path)
    aligned.save(path, overwrite=True)


def test_tampered_files_refused(aligned, tmp_path):
    path = aligned.save(tmp_path / "aligned")
    config = json.loads((path / "config.json").read_text())
    config["input_scale"] = config["input_scale"] * 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="changed after"):
        bt.tl.Alignment.load(path)
    path = aligned.save(tmp_path / "other")
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-8:] = bytes(8)  # the last weights zeroed
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="content hash"):
        bt.tl.Alignment.load(path)


def test_leakage_refused(aligned, slides):
    with pytest.raises(ValueError, match="leakage"):
        bt.tl.evaluate_alignment(aligned, slides[0], reference=slides[1:3])
    renamed = _tables(slides[1])
    renamed.attrs["bitro_scale"] = {**renamed.attrs.get("bitro_scale", {}), "sample_id": "new_name"}
    with pytest.raises(ValueError, match="same cells"):
        bt.tl.evaluate_alignment(aligned, renamed, reference=[slides[0]])


def test_siglip_option_trains(slides):
    al = bt.tl.align_encoder(slides[:2], loss="siglip", max_epochs=3, validation_fraction=0.0, **FIT)
    assert al.config.loss == "siglip" and al.train_params["epochs_run"] == 3
    assert np.isfinite(al.history["train_loss"]).all() and al.train_params["best_val_loss"] is None


def test_bad_inputs(slides):
    with pytest.raises(ValueError, match="two or more training slides"):
        bt.tl.align_encoder(slides[:1], **FIT)
    with pytest.raises(ValueError, match="missing from slide"):
        bt.tl.align_encoder(slides[:2], genes=["not_a_gene"], **FIT)
    fewer = _tables(slides[1])
    fewer.tables["spots"] = fewer["spots"][:, 1:].copy()
    with pytest.raises(ValueError, match="different genes"):
        bt.tl.align_encoder([slides[0], fewer], **FIT)
    no_cells = light_copy(slides[1], tables=("spots",))
    with pytest.raises(KeyError, match=CELLS):
        bt.tl.align_encoder([slides[0], no_cells], **FIT)
    no_spots = light_copy(slides[1], tables=(CELLS,))
    with pytest.raises(KeyError, match="spots"):
        bt.tl.align_encoder([slides[0], no_spots], **FIT)
    unassigned = _tables(slides[1])
    unassigned[CELLS].obs["spot_id"] = np.nan
    with pytest.raises(ValueError, match="No spot of slide"):
        bt.tl.align_encoder([slides[0], unassigned], **FIT)
    with pytest.raises(ValueError, match="clip"):
        bt.tl.align_encoder(slides[:2], loss="triplet", **FIT)
    with pytest.raises(ValueError, match="not available yet"):
        bt.tl.align_encoder(slides[:2], encoder="efficientnet_lite0", **FIT)
    with pytest.raises(TypeError, match="Unknown option"):
        bt.tl.align_encoder(slides[:2], n_epochs=3, **FIT)
