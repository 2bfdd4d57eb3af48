"""HEST layout, Visium, Xenium conversion, squidpy fixture and the zarr round trip."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
import tifffile
from scipy import sparse

import bitro as bt


def _hest_folder(root, rng, sample="SPA999", mpp=0.5):
    (root / "st").mkdir(parents=True)
    (root / "wsis").mkdir()
    (root / "metadata").mkdir()
    img = rng.integers(0, 255, size=(800, 600, 3), dtype=np.uint8)
    tifffile.imwrite(root / "wsis" / f"{sample}.tif", img, tile=(256, 256))
    centres = np.array([[100.0, 100.0], [300.0, 200.0], [500.0, 700.0]])
    x = sparse.csr_matrix(rng.poisson(2, size=(3, 4)).astype(np.float32))
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=["s0", "s1", "s2"]), var=pd.DataFrame(index=list("ABCD")))
    adata.obsm["spatial"] = centres
    adata.write_h5ad(root / "st" / f"{sample}.h5ad")
    meta = {
        "pixel_size_um_estimated": mpp,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "st_technology": "Visium",
    }
    (root / "metadata" / f"{sample}.json").write_text(json.dumps(meta))
    return adata, img


def test_read_hest(tmp_path, rng):
    adata, _img = _hest_folder(tmp_path, rng)
    sdata = bt.io.read_hest(tmp_path, "SPA999")
    t = sdata["spots"]
    np.testing.assert_array_equal(t.layers["counts"].toarray(), adata.X.toarray())
    np.testing.assert_allclose(t.obsm["spatial"], adata.obsm["spatial"])
    scale = sdata.attrs["bitro_scale"]
    assert scale["mpp"] == 0.5 and scale["spot_diameter_um"] == 55.0 and scale["technology"] == "Visium"
    np.testing.assert_allclose(sdata.shapes["spots_shapes"]["radius"], 55.0)
    with pytest.raises(FileNotFoundError, match="SPA000"):
        bt.io.read_hest(tmp_path, "SPA000")


def test_read_hest_coordinates_outside(tmp_path, rng):
    adata, _ = _hest_folder(tmp_path, rng)
    adata.obsm["spatial"] = adata.obsm["spatial"] * 10
    adata.write_h5ad(tmp_path / "st" / "SPA999.h5ad")
    with pytest.raises(ValueError, match="outside the image"):
        bt.io.read_hest(tmp_path, "SPA999")


@pytest.mark.realdata
def test_read_visium_fixture(data_dir):
    sdata = bt.io.read_visium(data_dir / "fixtures" / "visium_v1")
    t = sdata["spots"]
    assert t.shape == (100, 100)
    scalef = json.loads((data_dir / "fixtures/visium_v1/spatial/scalefactors_json.json").read_text())
    assert sdata.attrs["bitro_scale"]["mpp"] == pytest.approx(
        55.0 / scalef["spot_diameter_fullres"] / scalef["tissue_lowres_scalef"]
    )
    _, h, w = sdata.images["he"].shape
    xy = t.obsm["spatial"]
    assert (xy[:, 0] < w).all() and (xy[:, 1] < h).all() and (xy >= 0).all()
    assert t.layers["counts"].sum() > 0


@pytest.mark.realdata
def test_squidpy_fixture_loads(data_dir):
    adata = ad.read_h5ad(data_dir / "fixtures" / "squidpy" / "test_data.h5ad")
    from bitro.io._image import read_image_file

    img = read_image_file(data_dir / "fixtures" / "squidpy" / "test_img.jpg")
    assert img.ndim == 3 and img.shape[2] == 3
    xy = adata.obsm["spatial"]
    assert adata.n_obs == 49
    assert (xy[:, 0] < img.shape[1]).all() and (xy[:, 1] < img.shape[0]).all()


def test_xenium_conversion(rng):
    from shapely.geometry import Polygon
    from spatialdata.models import ShapesModel, TableModel

    from bitro.io._xenium import xenium_to_bitro

    n = 5
    cent_um = rng.uniform(10, 100, size=(n, 2))
    ids = [f"c{i}" for i in range(n)]
    polys = [Polygon([(x - 2, y - 2), (x + 2, y - 2), (x + 2, y + 2), (x - 2, y + 2)]) for x, y in cent_um]
    import geopandas as gpd

    bounds = ShapesModel.parse(gpd.GeoDataFrame(geometry=polys, index=pd.Index(ids)))
    table = ad.AnnData(
        X=sparse.csr_matrix(rng.poisson(1, size=(n, 3)).astype(np.float32)),
        obs=pd.DataFrame({"cell_id": ids, "region": pd.Categorical(["cell_boundaries"] * n)}),
        var=pd.DataFrame(index=["G1", "G2", "G3"]),
    )
    table.obsm["spatial"] = cent_um
    table = TableModel.parse(table, region="cell_boundaries", region_key="region", instance_key="cell_id")
    raw = sd.SpatialData(shapes={"cell_boundaries": bounds}, tables={"table": table})
    out = xenium_to_bitro(raw, mpp=0.5)
    t = out["cells_truth"]
    np.testing.assert_allclose(t.obsm["spatial"], cent_um / 0.5)
    np.testing.assert_array_equal(t.layers["counts"].toarray(), table.X.toarray())
    c = out.shapes["cells_truth_shapes"].geometry.iloc[0].centroid
    assert (c.x, c.y) == pytest.approx(tuple(cent_um[0] / 0.5))
    assert out.attrs["bitro_scale"]["mpp"] == 0.5


def test_zarr_round_trip(tmp_path, rng):
    from bitro.io._build import circles_element, image_element, set_scale
    from bitro.io._st import spots_table

    img = rng.integers(0, 255, size=(3, 200, 300), dtype=np.uint8)
    centres = np.array([[50.0, 60.0], [150.0, 100.0]])
    counts = pd.DataFrame(rng.poisson(3, size=(2, 4)), index=["a", "b"], columns=list("WXYZ"))
    sdata = sd.SpatialData(
        images={"he": image_element(img, scale_factors=[2])},
        shapes={"spots_shapes": circles_element(centres, 20.0, ["a", "b"])},
        tables={"spots": spots_table(counts, centres)},
    )
    set_scale(sdata, mpp=0.7, spot_diameter_um=28.0)
    sdata.write(tmp_path / "x.zarr")
    back = sd.read_zarr(tmp_path / "x.zarr")
    assert back.attrs["bitro_scale"] == sdata.attrs["bitro_scale"]
    from bitro.io._build import get_image

    for level in (0, 1):
        np.testing.assert_array_equal(
            get_image(back, "he", level=level).values, get_image(sdata, "he", level=level).values
        )
    np.testing.assert_array_equal(back["spots"].layers["counts"].toarray(), counts.to_numpy())
    np.testing.assert_allclose(back["spots"].obsm["spatial"], centres)
    assert back["spots"].uns["spatialdata_attrs"] == sdata["spots"].uns["spatialdata_attrs"]
    assert back.shapes["spots_shapes"].equals(sdata.shapes["spots_shapes"])
