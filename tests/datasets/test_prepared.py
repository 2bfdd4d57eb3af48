"""Prepared HER2ST sections: built once, read from the cache, rebuilt when anything they depend on changes."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pytest

import bitro as bt
from bitro.datasets import _prepared
from bitro.pp._embed import DEFAULT_CONTEXT_UM

CROP_UM = 400.0  # a ~580 px window: a few hundred nuclei, seconds per build
FAST = _prepared.Preparation(encoders=("morphology",))  # the cache logic does not need the CNN


@pytest.fixture
def builds(monkeypatch):
    """Count (and keep) every preparation run: the objects ``prepare`` filled, in order."""
    done = []
    real = _prepared.prepare

    def counting(sdata, *args, **kwargs):
        out = real(sdata, *args, **kwargs)
        done.append(sdata)
        return out

    monkeypatch.setattr(_prepared, "prepare", counting)
    return done


@pytest.fixture(scope="module")
def built_store(tmp_path_factory, data_dir):
    """One prepared C3 window (FAST recipe) in a module cache folder; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("prepared")
    _prepared.load_prepared(
        "C3", crop_um=CROP_UM, preparation=FAST, image=False, data_dir=data_dir, cache_dir=root
    )
    return root


def _copy_of(built_store, tmp_path):
    shutil.copytree(built_store / "her2st", tmp_path / "her2st")
    return tmp_path


def _load(tmp_path, data_dir, **kwargs):
    kwargs = {"crop_um": CROP_UM, "preparation": FAST, "image": False} | kwargs
    return _prepared.load_prepared("C3", data_dir=data_dir, cache_dir=tmp_path, **kwargs)


def _stores(tmp_path):
    return sorted((tmp_path / "her2st").glob("*.zarr"))


@pytest.mark.realdata
def test_prepared_section_is_built_once_then_read(tmp_path, data_dir, builds):
    first = bt.datasets.her2st("C2", data_dir=data_dir, prepared=True, crop_um=CROP_UM, cache_dir=tmp_path)
    second = bt.datasets.her2st("C2", data_dir=data_dir, prepared=True, crop_um=CROP_UM, cache_dir=tmp_path)
    assert len(builds) == 1  # the second call read the store
    built = builds[0]
    [store] = _stores(tmp_path)
    assert store.name.startswith("C2_crop400um_")
    for sdata in (first, second):
        assert {"he", "he_normalized"} <= set(sdata.images)
        assert {"cells_shapes", "spots_shapes"} <= set(sdata.shapes) and "tissue" in sdata.labels
        cells, spots = sdata["cells"], sdata["spots"]
        # EfficientNet-Lite0 features of the nucleus window, then of the neighbourhood window
        assert cells.obsm["X_bitro"].shape == (built["cells"].n_obs, 1280 * (1 + len(DEFAULT_CONTEXT_UM)))
        assert cells.uns["X_bitro"]["context_um"] == list(DEFAULT_CONTEXT_UM)
        np.testing.assert_allclose(cells.obsm["X_bitro"], built["cells"].obsm["X_bitro"])
        assert cells.obs["spot_id"].astype(str).tolist() == built["cells"].obs["spot_id"].astype(str).tolist()
        assert spots.obs["n_cells"].tolist() == built["spots"].obs["n_cells"].tolist()
        assert (spots.obs["n_cells"] > 0).any()
        # the re-attached normalised image is the one the cells were segmented and embedded on
        np.testing.assert_array_equal(
            np.asarray(sdata["he_normalized"].data), np.asarray(built["he_normalized"].data)
        )
    record = second.attrs["bitro_prepared"]
    assert record["key"]["preparation"]["stain_method"] == "macenko"
    assert record["key"]["preparation_version"] == _prepared.PREPARATION_VERSION
    assert record["key"]["inputs"]["image"] and record["key"]["crop_um"] == CROP_UM
    assert set(record["steps"]) >= {"load", "stain_norm", "tissue", "segmentation", "assign_cells"}
    assert _prepared.read_record(store)["key"] == record["key"]


@pytest.mark.realdata
def test_changed_parameters_or_version_build_a_new_store(
    tmp_path, data_dir, built_store, builds, monkeypatch
):
    cache = _copy_of(built_store, tmp_path)
    base = _load(cache, data_dir)
    assert builds == []  # the copied store is read, not rebuilt
    assert "he" not in base.images  # image=False: tables, shapes and the tissue mask only
    key = base.attrs["bitro_prepared"]["key"]
    path = _prepared.store_path(key, cache)
    # every parameter is in the key, so any change names another store
    for changed in (
        {"preparation": _prepared.Preparation(encoders=("morphology",), tile_size=512)},
        {"preparation": _prepared.Preparation(encoders=("morphology",), seed=1)},
        {"crop_um": CROP_UM + 100},
    ):
        args = {"crop_um": CROP_UM, "preparation": FAST} | changed
        other = _prepared.store_key("C3", data_dir=data_dir, **args)
        assert other != key and _prepared.store_path(other, cache) != path
    # a new preparation version really rebuilds (next to the old store, which is left alone)
    monkeypatch.setattr(_prepared, "PREPARATION_VERSION", _prepared.PREPARATION_VERSION + 1)
    newer = _load(cache, data_dir)
    assert len(builds) == 1 and len(_stores(cache)) == 2
    assert newer.attrs["bitro_prepared"]["key"]["preparation_version"] == key["preparation_version"] + 1
    _load(cache, data_dir)
    assert len(builds) == 1


@pytest.mark.realdata
def test_stale_record_in_a_store_is_rebuilt(tmp_path, data_dir, built_store, builds, caplog):
    cache = _copy_of(built_store, tmp_path)
    [store] = _stores(cache)
    meta = store / "zarr.json"
    data = json.loads(meta.read_text())
    data["attributes"]["bitro_prepared"]["key"]["preparation"]["seed"] = 7  # as if built differently
    meta.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="bitro"):
        again = _load(cache, data_dir)
    assert len(builds) == 1
    assert "recorded key" in caplog.text and "rebuilding" in caplog.text
    assert again.attrs["bitro_prepared"]["key"]["preparation"]["seed"] == 0
    assert _prepared.read_record(store)["key"]["preparation"]["seed"] == 0  # the store itself was replaced


@pytest.mark.realdata
def test_corrupt_store_is_rebuilt(tmp_path, data_dir, built_store, builds, caplog):
    cache = _copy_of(built_store, tmp_path)
    first = _load(built_store, data_dir)
    [store] = _stores(cache)
    for part in (store / "tables" / "cells").rglob("*"):
        if part.is_file():
            part.write_bytes(b"not zarr")
    with caplog.at_level(logging.WARNING, logger="bitro"):
        again = _load(cache, data_dir)
    assert len(builds) == 1
    assert "unusable" in caplog.text
    np.testing.assert_allclose(again["cells"].obsm["X_bitro"], first["cells"].obsm["X_bitro"])


@pytest.mark.realdata
def test_foreign_folder_at_the_store_path_is_refused_and_kept(tmp_path, data_dir, builds):
    key = _prepared.store_key("C3", crop_um=CROP_UM, preparation=FAST, data_dir=data_dir)
    path = _prepared.store_path(key, tmp_path)
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a store bitro wrote"):
        _load(tmp_path, data_dir)
    assert (path / "notes.txt").read_text() == "mine" and builds == []


@pytest.mark.realdata
def test_prepared_argument_errors(tmp_path, data_dir):
    with pytest.raises(TypeError, match="drop"):
        bt.datasets.her2st("C2", data_dir=data_dir, prepared=True, cache_dir=tmp_path, sample_id="x")
    with pytest.raises(KeyError, match="cannot be prepared"):
        _prepared.load_prepared("A1", data_dir=data_dir, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="crop_um"):
        _prepared.load_prepared("C2", data_dir=data_dir, cache_dir=tmp_path, crop_um=-5)


def test_cache_dir_order_and_kit_refusal(tmp_path, monkeypatch):
    monkeypatch.setenv("BITRO_CACHE_DIR", str(tmp_path / "env"))
    assert bt.datasets.cache_dir() == (tmp_path / "env").resolve()
    assert bt.datasets.cache_dir(tmp_path / "given") == (tmp_path / "given").resolve()
    assert (tmp_path / "given").is_dir()
    monkeypatch.delenv("BITRO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the platform default, on Linux
    if sys.platform.startswith("linux"):
        assert bt.datasets.cache_dir() == (tmp_path / "xdg" / "bitro").resolve()
    kit = tmp_path / "kit"
    kit.mkdir()
    monkeypatch.setenv("BITRO_DATA_DIR", str(kit))
    with pytest.raises(ValueError, match="inside the data kit"):
        bt.datasets.cache_dir(kit / "cache")
    assert not (kit / "cache").exists()


def test_crop_environment_variable(monkeypatch, caplog):
    monkeypatch.delenv(_prepared.CROP_ENV_VAR, raising=False)
    assert _prepared.crop_from_env(None) is None
    monkeypatch.setenv(_prepared.CROP_ENV_VAR, "1500")
    with caplog.at_level(logging.WARNING, logger="bitro"):
        assert _prepared.crop_from_env(None) == 1500.0
    assert "not whole sections" in caplog.text
    assert _prepared.crop_from_env(800.0) == 800.0  # an explicit crop wins
    monkeypatch.setenv(_prepared.CROP_ENV_VAR, "wide")
    with pytest.raises(ValueError, match="BITRO_PREPARED_CROP_UM"):
        _prepared.crop_from_env(None)
