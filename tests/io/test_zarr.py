"""``bt.io.write_zarr`` / ``bt.io.read_zarr``: stored slides carry an integrity record that reading checks."""

from __future__ import annotations

import json
import logging
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import bitro as bt
from bitro.io._build import circles_element, image_element, set_scale, table_element


def _slide(rng) -> sd.SpatialData:
    """Image "he" (two chunks along x) and a cells table with an embedding, as preprocessing writes them."""
    image = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    cells = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(20)]))
    cells.obsm["X_bitro"] = rng.normal(size=(20, 8)).astype(np.float32) + 3.0  # no chunk is all zeros
    cells.obsm["spatial"] = rng.uniform(5, 60, size=(20, 2))
    sdata = sd.SpatialData(
        images={"he": image_element(image, dims=("y", "x", "c"), chunks=48)},
        shapes={"cells_shapes": circles_element(cells.obsm["spatial"], 3.0, cells.obs_names)},
        tables={"cells": table_element(cells, region="cells_shapes")},
    )
    set_scale(sdata, mpp=0.5)
    return sdata


@pytest.fixture
def store(tmp_path, rng):
    sdata = _slide(rng)
    path = bt.io.write_zarr(sdata, tmp_path / "slide.zarr")
    return path, sdata


@pytest.fixture
def bitro_log(caplog):
    logger = logging.getLogger("bitro")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="bitro")
    yield caplog
    logger.removeHandler(caplog.handler)


def _chunk(store, array: str) -> str:
    """Relative path (in the store) of the first chunk file of ``array``."""
    files = sorted(p for p in (store / array / "c").rglob("*") if p.is_file())
    return files[0].relative_to(store).as_posix()


def test_round_trip_records_every_element_file(store):
    path, sdata = store
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide.zarr"]  # no temporary left
    record = json.loads((path / "bitro_integrity.json").read_text())
    assert record["format"] == "bitro-integrity/1" and set(record["elements"]) == {
        "images/he",
        "shapes/cells_shapes",
        "tables/cells",
    }
    on_disk = {p.relative_to(path / "tables/cells").as_posix() for p in (path / "tables/cells").rglob("*")}
    assert set(record["elements"]["tables/cells"]) == {
        f for f in on_disk if (path / "tables/cells" / f).is_file()
    }
    back = bt.io.read_zarr(path)
    np.testing.assert_array_equal(back["cells"].obsm["X_bitro"], sdata["cells"].obsm["X_bitro"])
    np.testing.assert_array_equal(np.asarray(back.images["he"].data), np.asarray(sdata.images["he"].data))
    assert back.attrs["bitro_scale"]["mpp"] == 0.5


@pytest.mark.parametrize("array", ["tables/cells/obsm/X_bitro", "images/he/s0"])
def test_a_deleted_chunk_is_an_error_naming_the_array_and_chunk(store, array):
    path, _ = store
    chunk = _chunk(path, array)
    assert np.asarray(sd.read_zarr(path)["cells"].obsm["X_bitro"]).any()
    (path / chunk).unlink()
    with pytest.raises(ValueError, match=rf"chunk '{chunk[len(array) + 1 :]}' of array '{array}' is missing"):
        bt.io.read_zarr(path)
    assert bt.io.read_zarr(path, verify=False) is not None  # the check can be skipped on purpose


def test_a_flipped_byte_is_an_error_naming_the_file(store):
    path, _ = store
    chunk = path / _chunk(path, "tables/cells/obsm/X_bitro")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"file '{_chunk(path, 'tables/cells/obsm/X_bitro')}'.*has changed"):
        bt.io.read_zarr(path)


def test_a_missing_element_or_edited_attrs_are_errors(store, tmp_path):
    path, _ = store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    shutil.rmtree(copy / "tables" / "cells")
    with pytest.raises(ValueError, match="element 'tables/cells' is missing"):
        bt.io.read_zarr(copy)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["bitro_scale"]["mpp"] = 5.0
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"attributes \(sdata.attrs"):
        bt.io.read_zarr(path)
    (path / "bitro_integrity.json").write_text("[]")
    with pytest.raises(ValueError, match="not a readable bitro integrity record"):
        bt.io.read_zarr(path)


def test_a_store_without_record_is_read_with_a_note(tmp_path, rng, bitro_log):
    sdata = _slide(rng)
    sdata.write(tmp_path / "plain.zarr")
    back = bt.io.read_zarr(tmp_path / "plain.zarr")
    assert back["cells"].n_obs == 20
    assert "has no bitro_integrity.json" in bitro_log.text and "cannot be checked" in bitro_log.text
    with pytest.raises(FileNotFoundError, match="not found"):
        bt.io.read_zarr(tmp_path / "absent.zarr")


def test_overwrite_goes_through_the_replace_checks(store, rng, tmp_path):
    path, _ = store
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        bt.io.write_zarr(_slide(rng), path)
    other = _slide(np.random.default_rng(7))
    bt.io.write_zarr(other, path, overwrite=True)
    np.testing.assert_array_equal(
        bt.io.read_zarr(path)["cells"].obsm["X_bitro"], other["cells"].obsm["X_bitro"]
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="bitro replaces only its own outputs"):
        bt.io.write_zarr(other, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_rewriting_tables_in_place_updates_the_record(store):
    """What ``bitro predict --inplace`` does: rewrite tables of the store it read, record updated."""
    from bitro._cli_commands import rewrite_tables

    path, _ = store
    sdata = bt.io.read_zarr(path)
    sdata["cells"].obsm["X_pred"] = np.ones((20, 2), np.float32)
    rewrite_tables(sdata, ["cells"])
    back = bt.io.read_zarr(path)  # would fail if the record still described the old table
    np.testing.assert_array_equal(back["cells"].obsm["X_pred"], 1.0)
    (path / _chunk(path, "tables/cells/obsm/X_pred")).unlink()  # and the new files are covered
    with pytest.raises(ValueError, match="array 'tables/cells/obsm/X_pred' is missing"):
        bt.io.read_zarr(path)
