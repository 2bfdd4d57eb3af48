"""The whole preprocessing chain and a spot-level fit on real HER2ST sections (cropped for CI).

Each of the five patient-C sections is cropped to a window of spots around its centre,
stain-normalised, segmented, embedded (morphology in the quick test; the ImageNet CNN on one
section) and assigned to spots. A model fitted on four sections predicts the fifth.

Marked ``chain``: the default ``pytest`` run skips it; ``scripts/test.sh`` (CI) runs it in its
second pytest call.
"""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd

import bitro as bt

pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.chain]
SECTIONS = ("C2", "C3", "C4", "C5", "C6")
HALF_WINDOW_PX = 600


def crop_section(section: str, data_dir, half: int = HALF_WINDOW_PX) -> sd.SpatialData:
    """A window of ``2 * half`` px around the section's central spot, in its own pixel frame."""
    full = bt.datasets.her2st(section, data_dir=data_dir)
    return bt.datasets.crop(full, size_um=2 * half * bt.io.get_mpp(full))


def preprocess(sdata, *, encoder="morphology"):
    bt.pp.normalize_stains(sdata, method="macenko")
    bt.pp.segment_cells(sdata, image_key="he_normalized", tissue_key=None)
    bt.pp.embed_cells(sdata, image_key="he_normalized", encoder=encoder, mode="tile")
    bt.pp.assign_cells(sdata)
    return sdata


@pytest.fixture(scope="module")
def sections(data_dir):
    return {s: preprocess(crop_section(s, data_dir)) for s in SECTIONS}


def test_chain_produces_plausible_cells(sections):
    slides = list(sections.values())
    projection = bt.pp.reduce_features(slides, n_components=16, seed=0, overwrite=True)
    bt.pp.cluster_phenotypes(slides, n_clusters=8, seed=0, overwrite=True)
    assert projection.n_components == 16
    for name, sdata in sections.items():
        bt.pp.cell_graph(sdata, overwrite=True)
        cells = sdata["cells"]
        assert cells.obsm["X_bitro_pca"].shape[1] == 16
        assert cells.obs["phenotype"].nunique() >= 2, name
        conn = cells.obsp["spatial_connectivities"]
        assert conn.nnz > 0 and (conn != conn.T).nnz == 0, name
    for name, sdata in sections.items():
        cells, spots = sdata["cells"], sdata["spots"]
        assert cells.n_obs > 500, name
        assert np.isfinite(cells.obsm["X_bitro"]).all()
        n = spots.obs["n_cells"].to_numpy()
        # a 100 µm legacy-ST spot holds tens of nuclei
        assert 10 <= np.median(n) <= 150, (name, np.median(n))
        assert (n > 0).mean() > 0.9, name
        area = cells.obs["area_um2"].to_numpy()
        assert 10 < np.median(area) < 120, (name, np.median(area))


def test_fit_four_predict_fifth(sections):
    genes = bt.datasets.her2st_genes()[:100]
    train = [sections[s] for s in SECTIONS[:4]]
    test = sections[SECTIONS[4]]
    model = bt.tl.fit(
        train,
        genes=genes,
        max_epochs=4,
        lr=1e-3,
        n_components=16,
        config={"hidden_dim": 32, "ffn_dim": 64, "readout_hidden": 32},
        seed=0,
    )
    bt.tl.predict(model, test)
    layer = test["spots"].layers["bitro"]
    cols = test["spots"].var_names.get_indexer(genes)
    assert np.isfinite(layer[:, cols]).all()
    res = bt.tl.evaluate(test, layer="bitro", inplace=True)
    assert set(res["scale"]) == {"raw", "library_size"}
    assert {"pcc_gene", "pcc_overall"} <= set(res["metric"])
    assert "bitro_pcc_raw" in test["spots"].var
    # pseudo-cells sum back to their spot (Eq. 10)
    cells = test["cells"]
    sid = test["spots"].obs_names[0]
    members = (cells.obs["spot_id"] == sid).to_numpy()
    np.testing.assert_allclose(
        np.expm1(cells.layers["bitro"][members]).sum(axis=0)[: len(genes)],
        np.expm1(layer[0, cols]),
        rtol=1e-3,
        atol=1e-3,
    )


def test_efficientnet_tile_embedding_on_real_section(data_dir):
    sdata = crop_section("C3", data_dir, half=300)
    bt.pp.segment_cells(sdata, tissue_key=None)
    bt.pp.embed_cells(sdata, encoder="efficientnet_lite0", mode="tile")
    x = sdata["cells"].obsm["X_bitro"]
    assert x.shape[1] == 1280 * 2 and np.isfinite(x).all()  # nucleus window + 200 µm neighbourhood
    assert x.std(axis=0).mean() > 0.01  # not constant: real image content reached the encoder


def _with_pseudo_bulk(sdata):
    """Add the section's pseudo-bulk (sum of its spots) as table "bulk" and spot-sized patches."""
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    counts = np.asarray(sdata["spots"].layers["counts"].sum(axis=0)).reshape(1, -1)
    bulk = ad.AnnData(
        X=(counts / counts.sum() * 1e6).astype(np.float32),
        obs=pd.DataFrame(index=[sdata.attrs["bitro_scale"]["sample_id"]]),
        var=pd.DataFrame(index=sdata["spots"].var_names),
    )
    bulk.layers["counts"] = counts.astype(np.float32)
    sdata.tables["bulk"] = TableModel.parse(bulk)
    if "patches" not in sdata.tables:
        bt.pp.make_patches(sdata, tissue_key=None)
    return sdata


def test_pseudo_bulk_fit_and_lora_transfer_both_ways(sections):
    genes = bt.datasets.her2st_genes()[:50]
    small = {"hidden_dim": 32, "ffn_dim": 64, "readout_hidden": 32}
    slides = [_with_pseudo_bulk(sections[s]) for s in SECTIONS]
    train, test = slides[:4], slides[4]
    bulk = bt.tl.fit(
        train, level="bulk", genes=genes, max_epochs=2, lr=1e-3, n_components=16, config=small, seed=0
    )
    from bitro.tl._cv import light_copy

    out = light_copy(test, tables=("spots", "cells", "patches", "bulk"))
    bulk.predict(out, overwrite=True)  # the cells may hold the spot model's prediction already
    pred = out["bulk"].layers["bitro"]
    cols = out["bulk"].var_names.get_indexer(genes)
    assert np.isfinite(pred[:, cols]).all()
    res = bt.tl.evaluate(
        out, table_key="bulk", layer="bitro", truth_layer=None, normalize="raw", inplace=False
    )
    assert np.isfinite(res.loc[res.metric == "pcc_overall", "value"]).all()
    # bulk -> spot and spot -> bulk with LoRA (base frozen)
    from bitro.models import lora_trainable_summary

    to_spot = bt.tl.transfer(bulk, train, level="spot", method="lora", max_epochs=1)
    s = lora_trainable_summary(to_spot.net)
    assert s["lora"] > 0 and s["frozen"] > 0
    assert all(
        "lora_" in n or n.startswith("head.") for n, p in to_spot.net.named_parameters() if p.requires_grad
    )
    spot = bt.tl.fit(train, genes=genes, max_epochs=1, lr=1e-3, n_components=16, config=small, seed=0)
    to_bulk = bt.tl.transfer(spot, train, level="bulk", method="lora", max_epochs=1)
    out2 = light_copy(test, tables=("spots", "cells", "patches", "bulk"))
    to_bulk.predict(out2, overwrite=True)
    assert np.isfinite(out2["bulk"].layers["bitro"][:, cols]).all()
