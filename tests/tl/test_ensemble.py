"""Several BiTro models in one prediction: bt.tl.predict([m0, m1, ...], sdata)."""

from __future__ import annotations

import numpy as np
import pytest
from _toy import GENES, make_toy_slide

import bitro as bt
from bitro.tl._cv import light_copy

FIT = {"genes": GENES, "n_components": 8, "n_phenotypes": 3, "lr": 3e-3, "max_epochs": 3}


@pytest.fixture(scope="module")
def members():
    train = [make_toy_slide(s) for s in range(2)]
    return [bt.tl.fit(train, seed=seed, **FIT) for seed in (0, 1)]


def _arrays(model, slide):
    return bt.tl.predict(model, light_copy(slide), inplace=False)


def test_an_ensemble_of_one_model_twice_is_that_model(members):
    test = make_toy_slide(2)
    alone, twice = _arrays(members[0], test), _arrays([members[0], members[0]], test)
    for key in ("units", "cells"):
        np.testing.assert_allclose(twice[key], alone[key], rtol=1e-5, atol=1e-6)


def test_the_ensemble_averages_the_members_and_its_cells_sum_to_its_spots(members):
    test = make_toy_slide(2)
    a, b = (light_copy(test) for _ in range(2))
    members[0].predict(a, key_added="m")
    members[1].predict(b, key_added="m")
    ens = light_copy(test)
    bt.tl.predict(members, ens, key_added="ens")
    spots, cells = ens["spots"], ens["cells"]
    genes = list(members[0].genes)
    idx = spots.var_names.get_indexer(genes)
    pa, pb, pe = (s["spots"].layers[k][:, idx] for s, k in ((a, "m"), (b, "m"), (ens, "ens")))
    ok = np.isfinite(pe).all(axis=1)
    assert ok.sum() > 5
    # on the target scale the ensemble's spot is the mean of the members' (z-scoring is the same affine map)
    np.testing.assert_allclose(pe[ok], (pa[ok] + pb[ok]) / 2, rtol=1e-4, atol=1e-4)
    assert not np.allclose(pa[ok], pb[ok])  # the members differ, so averaging does something
    # the cells of a spot sum to the ensemble's spot exactly, in count space
    cols = cells.var_names.get_indexer(genes)
    for sid in spots.obs_names[ok][:5]:
        under = (cells.obs["spot_id"] == sid).to_numpy()
        np.testing.assert_allclose(
            np.expm1(np.asarray(cells.layers["ens"][under][:, cols], dtype=np.float64)).sum(axis=0),
            np.expm1(np.asarray(spots.layers["ens"][spots.obs_names.get_loc(sid), idx], dtype=np.float64)),
            rtol=1e-3,
        )
    prov = spots.uns["ens"]["ensemble"]
    assert prov["n_models"] == 2 and list(prov["seeds"]) == [0, 1]
    assert len(set(prov["weights_sha256"])) == 2


def test_models_that_cannot_be_averaged_are_refused(members):
    test = make_toy_slide(2)
    with pytest.raises(ValueError, match="at least one model"):
        bt.tl.predict([], light_copy(test))
    other_genes = bt.tl.fit([make_toy_slide(0), make_toy_slide(1)], seed=0, **{**FIT, "genes": GENES[:-1]})
    with pytest.raises(ValueError, match="differs from model 0 in its genes"):
        bt.tl.predict([members[0], other_genes], light_copy(test))
    ridge = bt.tl.fit([make_toy_slide(0), make_toy_slide(1)], model="ridge", genes=GENES)
    with pytest.raises(TypeError, match="Only BiTro models"):
        bt.tl.predict([members[0], ridge], light_copy(test))
    untouched = light_copy(test)
    with pytest.raises(ValueError):
        bt.tl.predict([members[0], other_genes], untouched)
    assert "bitro" not in untouched["spots"].layers  # nothing written on a refusal


# ---------------------------------------------------------------------------------- fit(n_models=...) and files
@pytest.fixture(scope="module")
def ensemble():
    train = [make_toy_slide(s) for s in range(2)]
    return bt.tl.fit(train, seed=0, n_models=2, **FIT)


def test_fit_n_models_is_the_members_fitted_one_by_one_with_consecutive_seeds(ensemble, members):
    assert isinstance(ensemble, bt.tl.BiTroEnsemble) and len(ensemble) == 2 and ensemble.seeds == [0, 1]
    # the same fits as bt.tl.fit(seed=0) and bt.tl.fit(seed=1): same weights, same prediction
    assert ensemble.weights_hash() == [m.weights_hash() for m in members]
    test = make_toy_slide(2)
    np.testing.assert_array_equal(_arrays(ensemble, test)["units"], _arrays(members, test)["units"])
    assert ensemble.genes == members[0].genes and ensemble.level == "spot"
    assert "BiTroEnsemble(n_models=2, seeds=[0, 1]" in repr(ensemble)
    assert [m.seed for m in ensemble] == [0, 1] and ensemble[1] is ensemble.members[1]


def test_an_ensemble_saves_and_loads_to_the_same_predictions(ensemble, tmp_path):
    path = ensemble.save(tmp_path / "ens")
    assert sorted(p.name for p in path.iterdir()) == ["ensemble.json", "model_0", "model_1"]
    again = bt.tl.BiTroEnsemble.load(path)
    test = make_toy_slide(3)
    np.testing.assert_array_equal(_arrays(again, test)["units"], _arrays(ensemble, test)["units"])
    from bitro.tl._ensemble_model import load_model

    assert isinstance(load_model(path), bt.tl.BiTroEnsemble)
    assert isinstance(load_model(path / "model_0"), bt.tl.BiTroModel)
    # an existing ensemble is replaced only when asked; a foreign folder never
    with pytest.raises(FileExistsError, match="already exists"):
        ensemble.save(path)
    ensemble.save(path, overwrite=True)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a model ensemble folder written by bitro.*notes\.txt"):
        ensemble.save(path, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"


def test_a_swapped_member_or_the_wrong_loader_is_named(ensemble, members, tmp_path):
    import shutil

    path = ensemble.save(tmp_path / "ens")
    with pytest.raises(
        FileNotFoundError, match=r"an ensemble of models: load it with bt\.tl\.BiTroEnsemble\.load"
    ):
        bt.tl.BiTroModel.load(path)
    with pytest.raises(ValueError, match=r"it is a single model: load it with bt\.tl\.BiTroModel\.load"):
        bt.tl.BiTroEnsemble.load(path / "model_0")
    shutil.rmtree(path / "model_1")
    shutil.copytree(path / "model_0", path / "model_1")  # each folder is valid, but not the recorded member
    with pytest.raises(ValueError, match=r"model_1 holds other weights than .*ensemble\.json records"):
        bt.tl.BiTroEnsemble.load(path)
    (path / "ensemble.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a bitro-ensemble/1 manifest"):
        bt.tl.BiTroEnsemble.load(path)


def test_bad_n_models_requests_are_refused(members, tmp_path):
    train = [make_toy_slide(s) for s in range(2)]
    with pytest.raises(ValueError, match="n_models must be an integer ≥ 1, got 0"):
        bt.tl.fit(train, n_models=0, **FIT)
    with pytest.raises(ValueError, match="model='ridge' fits one model, so drop n_models"):
        bt.tl.fit(train, model="ridge", n_models=2, genes=GENES)
    with pytest.raises(ValueError, match="the members would share one checkpoint folder"):
        bt.tl.fit(train, n_models=2, checkpoint_dir=tmp_path / "ckpt", **FIT)
    with pytest.raises(TypeError, match="Only BiTro models"):
        bt.tl.BiTroEnsemble([members[0], "model"])


def test_an_ensemble_transfers_member_by_member(ensemble):
    bulk = [make_toy_slide(s, with_bulk=True) for s in range(4, 7)]
    new = bt.tl.transfer(ensemble, bulk, level="bulk", max_epochs=1)
    assert isinstance(new, bt.tl.BiTroEnsemble) and new.level == "bulk" and new.seeds == ensemble.seeds
    assert all(m.state.transferred_from for m in new)
