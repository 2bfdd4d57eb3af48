"""bt.io.read_cell_segmentation: GeoJSON (CellViT/QuPath), HoVer-Net JSON and GeoParquet (HEST)."""

from __future__ import annotations

import json

import numpy as np
import pytest


def make_sdata(mpp=0.5):
    import spatialdata as sd

    from bitro.io._build import image_element, set_scale

    sdata = sd.SpatialData(images={"he": image_element(np.zeros((3, 100, 200), dtype=np.uint8))})
    set_scale(sdata, mpp=mpp)
    return sdata


@pytest.fixture
def polygons(rng):
    """Six squares of side 4–8 px (x, y level-0 px) with classes; a 6 px square is 9 µm² at 0.5 µm/px."""
    from shapely.geometry import box

    sides = np.array([4, 6, 8, 4, 6, 8], dtype=float)
    corners = rng.uniform(10, 80, size=(6, 2)) * [2, 1]
    polys = [box(x, y, x + s, y + s) for (x, y), s in zip(corners, sides, strict=True)]
    classes = ["Neoplastic", "Inflammatory", "Neoplastic", "Connective", "Inflammatory", "Neoplastic"]
    return polys, classes


def _centroids(polys):
    return np.array([[p.centroid.x, p.centroid.y] for p in polys])


def _check(sdata, polys, classes):
    cells = sdata.tables["cells"]
    assert cells.n_obs == len(polys)
    np.testing.assert_allclose(cells.obsm["spatial"], _centroids(polys), atol=1e-3)
    np.testing.assert_allclose(cells.obs["area_um2"], [p.area * 0.25 for p in polys], rtol=1e-5)
    np.testing.assert_allclose(cells.obs["solidity"], 1.0, atol=1e-6)
    np.testing.assert_allclose(cells.obs["eccentricity"], 0.0, atol=1e-6)  # squares: isotropic moments
    if classes is not None:
        assert list(cells.obs["classification"].astype(str)) == [str(c) for c in classes]
    shapes = sdata.shapes["cells_shapes"]
    assert list(shapes.index) == list(cells.obs["instance_id"])
    assert shapes.geometry.iloc[2].equals(polys[2])


def test_geojson_feature_collection(tmp_path, polygons):
    from shapely.geometry import mapping

    import bitro as bt

    polys, classes = polygons
    feats = [
        {
            "type": "Feature",
            "geometry": mapping(p),
            "properties": {"classification": {"name": c, "color": [1, 2, 3]}},
        }
        for p, c in zip(polys, classes, strict=True)
    ]
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    sdata = make_sdata()
    bt.io.read_cell_segmentation(sdata, path)
    _check(sdata, polys, classes)
    assert sdata.tables["cells"].uns["cells"]["format"] == "geojson"


def test_cellvit_multipolygon_per_class(tmp_path, polygons):
    """CellViT groups all cells of a class in one MultiPolygon feature: one cell per part."""
    from shapely.geometry import MultiPolygon, mapping

    import bitro as bt

    polys, classes = polygons
    order, feats = [], []
    for name in dict.fromkeys(classes):
        idx = [i for i, c in enumerate(classes) if c == name]
        order += idx
        geom = mapping(MultiPolygon([polys[i] for i in idx]))
        feats.append({"type": "Feature", "geometry": geom, "properties": {"classification": {"name": name}}})
    path = tmp_path / "cells.json"
    path.write_text(json.dumps(feats))  # a bare list of features
    sdata = make_sdata()
    bt.io.read_cell_segmentation(sdata, path)
    _check(sdata, [polys[i] for i in order], [classes[i] for i in order])


def test_hovernet_json(tmp_path, polygons):
    import bitro as bt

    polys, _ = polygons
    nuc = {
        str(i + 1): {
            "contour": np.asarray(p.exterior.coords)[:-1].tolist(),
            "centroid": [p.centroid.x, p.centroid.y],
            "type": i % 3,
        }
        for i, p in enumerate(polys)
    }
    path = tmp_path / "hovernet.json"
    path.write_text(json.dumps({"mag": 40, "nuc": nuc}))
    sdata = make_sdata()
    bt.io.read_cell_segmentation(sdata, path, format="auto")
    _check(sdata, polys, [i % 3 for i in range(len(polys))])


def test_geoparquet_and_mpp_override(tmp_path, polygons):
    import geopandas as gpd

    import bitro as bt

    polys, classes = polygons
    path = tmp_path / "cellvit_seg.parquet"
    gpd.GeoDataFrame({"class": classes}, geometry=polys).to_parquet(path)
    sdata = make_sdata()
    bt.io.read_cell_segmentation(sdata, path)
    _check(sdata, polys, classes)
    bt.io.read_cell_segmentation(sdata, path, mpp=1.0, key_added="cells_1um")
    np.testing.assert_allclose(sdata.tables["cells_1um"].obs["area_um2"], [p.area for p in polys], rtol=1e-5)
    assert "cells_1um_shapes" in sdata.shapes


def test_no_classes_and_overwrite(tmp_path, polygons):
    from shapely.geometry import mapping

    import bitro as bt

    polys, _ = polygons
    path = tmp_path / "plain.geojson"
    feats = [{"type": "Feature", "geometry": mapping(p), "properties": {}} for p in polys]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    sdata = make_sdata()
    bt.io.read_cell_segmentation(sdata, path)
    assert "classification" not in sdata.tables["cells"].obs
    with pytest.raises(ValueError, match="already exists"):
        bt.io.read_cell_segmentation(sdata, path)
    path2 = tmp_path / "two.geojson"
    path2.write_text(json.dumps({"type": "FeatureCollection", "features": feats[:2]}))
    bt.io.read_cell_segmentation(sdata, path2, overwrite=True)
    assert sdata.tables["cells"].n_obs == 2 and len(sdata.shapes["cells_shapes"]) == 2


def test_polygon_eccentricity_known_values():
    from shapely.geometry import Point, box

    from bitro.io._cells import polygon_eccentricity

    assert polygon_eccentricity(Point(0, 0).buffer(10, 64)) == pytest.approx(0.0, abs=1e-3)
    # rectangle a × b: variances a²/12, b²/12 → e = sqrt(1 - (b/a)²)
    assert polygon_eccentricity(box(0, 0, 10, 5)) == pytest.approx(np.sqrt(1 - 0.25), abs=1e-9)
    ring = box(0, 0, 10, 10).difference(box(4, 4, 6, 6))
    assert polygon_eccentricity(ring) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("broken.geojson", "{not json"),
        ("wrong.json", json.dumps({"hello": 1})),
        (
            "line.geojson",
            json.dumps(
                {
                    "type": "FeatureCollection",
                    "features": [
                        {
                            "type": "Feature",
                            "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
                        }
                    ],
                }
            ),
        ),
        ("hv.json", json.dumps({"nuc": {"1": {"contour": [[0, 0]]}}})),
        ("bad.parquet", "not a parquet file"),
    ],
)
def test_corrupt_files_name_the_file(tmp_path, name, content):
    import bitro as bt

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        bt.io.read_cell_segmentation(make_sdata(), path)


def test_bad_arguments(tmp_path):
    import spatialdata as sd

    import bitro as bt
    from bitro.io._build import image_element

    with pytest.raises(FileNotFoundError, match=r"missing\.geojson"):
        bt.io.read_cell_segmentation(make_sdata(), tmp_path / "missing.geojson")
    path = tmp_path / "x.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(ValueError, match="format"):
        bt.io.read_cell_segmentation(make_sdata(), path, format="csv")
    no_scale = sd.SpatialData(images={"he": image_element(np.zeros((3, 8, 8), dtype=np.uint8))})
    with pytest.raises(ValueError, match="set_scale"):
        bt.io.read_cell_segmentation(no_scale, path)
