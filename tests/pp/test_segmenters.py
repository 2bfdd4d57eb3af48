"""Segmentation backends: bt.pp.register_segmenter / list_segmenters, method_kwargs, importers, hooks."""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest

import bitro as bt

PINK = np.array([236, 186, 206], dtype=float)
PURPLE = np.array([92, 52, 138], dtype=float)
CENTRES = [(40.0, 40.0), (120.0, 50.0), (60.0, 130.0), (150.0, 140.0)]  # (x, y), radius 7 px


def _scene(rng, shape=(180, 200), centres=CENTRES, radius=7):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.zeros(shape, dtype=bool)
    for x, y in centres:
        inside |= (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
    img = np.where(inside[..., None], PURPLE, PINK) + rng.normal(0, 4.0, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _sdata(rgb, mpp=0.5):
    import spatialdata as sd

    from bitro.io._build import image_element, set_scale

    sdata = sd.SpatialData(images={"he": image_element(rgb, dims=("y", "x", "c"), chunks=128)})
    set_scale(sdata, mpp=mpp)
    return sdata


def _dark(rgb):
    """Connected components of the purple discs (green channel below 120)."""
    from scipy import ndimage as ndi

    return ndi.label(rgb[..., 1] < 120)[0]


def _found(sdata, centres=CENTRES):
    xy = sdata.tables["cells"].obsm["spatial"]
    d = np.linalg.norm(np.asarray(centres)[:, None] - xy[None], axis=-1)
    return len(xy), float(d.min(axis=1).max())


# ------------------------------------------------------------------------------------------ registry
def test_builtins_are_registered():
    names = bt.pp.list_segmenters()
    assert {"watershed", "cellvit", "hovernet", "hest", "import", "stardist", "cellpose"} <= set(names)
    assert names == sorted(names)


def test_register_and_use_by_name_with_kwargs(rng):
    made = []

    def factory(level=120):
        made.append(level)
        return lambda rgb, mpp: _dark(rgb) * (rgb[..., 1] < level)

    bt.pp.register_segmenter("test_dark", factory)
    try:
        assert "test_dark" in bt.pp.list_segmenters()
        sdata = _sdata(_scene(rng))
        bt.pp.segment_cells(sdata, method="test_dark", method_kwargs={"level": 110}, tissue_key=None)
        assert made == [110]
        n, worst = _found(sdata)
        assert n == len(CENTRES) and worst < 1.0
        assert sdata.tables["cells"].uns["cells"]["method"] == "test_dark"
        with pytest.raises(ValueError, match="already registered"):
            bt.pp.register_segmenter("test_dark", factory)
        bt.pp.register_segmenter("test_dark", lambda: lambda rgb, mpp: _dark(rgb), overwrite=True)
        bt.pp.segment_cells(sdata, method="test_dark", tissue_key=None, overwrite=True)
        assert _found(sdata)[0] == len(CENTRES)
    finally:
        from bitro.pp import _segmenters

        _segmenters._REGISTRY.pop("test_dark", None)


def test_registry_errors(rng):
    with pytest.raises(ValueError, match="without ':'"):
        bt.pp.register_segmenter("a:b", lambda: _dark)
    with pytest.raises(TypeError, match="must be callable"):
        bt.pp.register_segmenter("thing", 3)
    sdata = _sdata(_scene(rng))
    with pytest.raises(
        ValueError, match=r"Unknown segmentation method 'magic'.*'watershed'.*register_segmenter"
    ):
        bt.pp.segment_cells(sdata, method="magic")
    with pytest.raises(ValueError, match="configure the function"):
        bt.pp.segment_cells(sdata, method=lambda rgb, mpp: _dark(rgb), method_kwargs={"level": 1})
    assert "cells" not in sdata.tables


# ------------------------------------------------------------------------------------------ watershed options
def test_watershed_options_are_method_kwargs(rng):
    sdata = _sdata(_scene(rng))
    bt.pp.segment_cells(sdata, tissue_key=None, method_kwargs={"threshold": 0.05, "h_um": 0.6})
    params = sdata.tables["cells"].uns["cells"]["params"]
    assert params["threshold"] == 0.05 and params["h_um"] == 0.6
    assert (params["min_area_um2"], params["max_area_um2"]) == (8.0, 400.0)
    assert _found(sdata)[0] == len(CENTRES)
    with pytest.raises(TypeError, match=r"Unknown watershed option\(s\) \['radius'\].*'sigma_um'"):
        bt.pp.segment_cells(sdata, method_kwargs={"radius": 3}, overwrite=True)
    with pytest.raises(TypeError, match=r"options of bt\.pp\.segment_cells itself"):
        bt.pp.segment_cells(sdata, method_kwargs={"max_area_um2": 50}, overwrite=True)


def test_segmenter_subclass_prepare_gets_the_slide(rng):
    from bitro.pp._segmenters import Segmenter

    class Counting(Segmenter):
        name = "counting"

        def __init__(self):
            self.prepared = []

        def prepare(self, image, *, mpp, tissue, seed, area_um2):
            self.prepared.append((tuple(image.shape), mpp, tissue, seed, area_um2))

        def segment_tile(self, rgb, mpp):
            return _dark(rgb)

        def params(self):
            return {"version": 1}

    seg = Counting()
    sdata = _sdata(_scene(rng))
    bt.pp.segment_cells(sdata, method=seg, tissue_key=None, seed=4, tile_size=64, max_area_um2=100.0)
    assert seg.prepared == [((3, 180, 200), 0.5, None, 4, (8.0, 100.0))]
    uns = sdata.tables["cells"].uns["cells"]
    assert uns["method"] == "counting" and uns["params"]["version"] == 1 and uns["n_tiles"] > 1
    assert _found(sdata)[0] == len(CENTRES)


# ------------------------------------------------------------------------------------------ importers
def _cellvit_file(path):
    """A CellViT-style GeoJSON: one MultiPolygon feature per class, level-0 pixel coordinates."""
    squares = [
        [[x - 5, y - 5], [x + 5, y - 5], [x + 5, y + 5], [x - 5, y + 5], [x - 5, y - 5]] for x, y in CENTRES
    ]
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": [[s] for s in squares[:3]]},
            "properties": {"classification": {"name": "Neoplastic"}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [squares[3]]},
            "properties": {"classification": {"name": "Inflammatory"}},
        },
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_cellvit_import_by_name(rng, tmp_path):
    path = _cellvit_file(tmp_path / "cells.geojson")
    sdata = _sdata(_scene(rng))
    bt.pp.segment_cells(sdata, method=f"cellvit:{path}")
    cells = sdata.tables["cells"]
    assert _found(sdata) == (4, 0.0)
    assert list(cells.obs["classification"]) == ["Neoplastic"] * 3 + ["Inflammatory"]
    np.testing.assert_allclose(cells.obs["area_um2"], 100 * 0.25)  # 10 x 10 px at 0.5 µm/px
    uns = cells.uns["cells"]
    assert uns["method"] == "cellvit" and uns["params"] == {"source": str(path), "format": "geojson"}
    assert "tissue" not in sdata.labels  # an import reads no tiles, so no mask is built
    again = _sdata(_scene(rng))
    table, shapes = bt.pp.segment_cells(again, method="import", method_kwargs={"path": path}, inplace=False)
    assert table.n_obs == 4 and len(shapes) == 4 and "cells" not in again.tables


def test_importer_errors(rng, tmp_path):
    sdata = _sdata(_scene(rng))
    with pytest.raises(
        ValueError, match=r"method='hovernet' imports a HoVer-Net JSON.*method='hovernet:/path"
    ):
        bt.pp.segment_cells(sdata, method="hovernet")
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet.*method='hest'.*does not exist"):
        bt.pp.segment_cells(sdata, method=f"hest:{tmp_path / 'nope.parquet'}")
    assert "cells" not in sdata.tables


# ------------------------------------------------------------------------------------------ StarDist / Cellpose
class _ThresholdStarDist:
    """A model with StarDist's predict_instances interface (percentile-normalised float input)."""

    def __init__(self):
        self.inputs = []

    def predict_instances(self, image, **kwargs):
        self.inputs.append((image.dtype, float(image.min()), float(image.max()), kwargs))
        return _dark(np.clip(image * 255, 0, 255).astype(np.uint8)), {"points": None}


class _ThresholdCellpose:
    """A model with Cellpose's eval interface."""

    def __init__(self):
        self.diameters = []

    def eval(self, image, diameter=None, **kwargs):
        self.diameters.append(diameter)
        return _dark(image), None, None


def test_stardist_and_cellpose_hooks_with_a_loaded_model(rng):
    sdata = _sdata(_scene(rng))
    star = _ThresholdStarDist()
    kwargs = {"model": star, "predict_kwargs": {"prob_thresh": 0.5}}
    bt.pp.segment_cells(sdata, method="stardist", method_kwargs=kwargs, tissue_key=None)
    assert _found(sdata)[0] == len(CENTRES)
    dtype, lo, hi, passed = star.inputs[0]
    assert dtype == np.float32 and lo < 0.05 and 0.95 < hi < 1.2 and passed == {"prob_thresh": 0.5}
    assert sdata.tables["cells"].uns["cells"]["params"]["model"] == "_ThresholdStarDist"

    pose = _ThresholdCellpose()
    kwargs = {"model": pose, "diameter_um": 7.0}
    bt.pp.segment_cells(sdata, method="cellpose", method_kwargs=kwargs, tissue_key=None, overwrite=True)
    assert _found(sdata)[0] == len(CENTRES)
    assert pose.diameters == [14.0]  # 7 µm at 0.5 µm/px
    with pytest.raises(TypeError, match="predict_instances"):
        bt.pp.segment_cells(sdata, method="stardist", method_kwargs={"model": object()}, overwrite=True)


@pytest.mark.parametrize("name", ["stardist", "cellpose"])
def test_missing_package_names_the_install_command(rng, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    with pytest.raises(ImportError, match=f"pip install {name}.*never downloads weights"):
        bt.pp.segment_cells(_sdata(_scene(rng)), method=name)


# ------------------------------------------------------------------------------------------ logging of the default
def test_tissue_key_none_warns_that_everything_is_segmented(rng, caplog):
    sdata = _sdata(_scene(rng))
    with caplog.at_level(logging.WARNING, logger="bitro"):
        bt.pp.segment_cells(sdata, tissue_key=None)
    assert "every tile of 'he' is segmented" in caplog.text
