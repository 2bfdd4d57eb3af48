from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd

import bitro as bt

HIGH = [f"HIGH{i}" for i in range(5)]  # bimodal (×8 between two spot states): high dispersion, high std
RARE = [f"RARE{i}" for i in range(5)]  # expressed in ~5% of spots: high dispersion, very low mean
EXCLUDED = ["MT-CO1", "RPL3", "RPS6"]  # as variable as HIGH but mitochondrial / ribosomal
LEVELS = (20.0, 50.0, 120.0, 300.0, 700.0)  # HIGH genes sit at different expression levels (bins)


def _sample(rng, n_spots=200, extra=None) -> ad.AnnData:
    n_bg = 600
    bg_lam = np.geomspace(0.3, 12000, n_bg)  # Poisson genes at every expression level (low dispersion)
    cols, names = [rng.poisson(bg_lam, size=(n_spots, n_bg))], [f"BG{i}" for i in range(n_bg)]
    half = rng.random(n_spots) < 0.5
    for i, name in enumerate(HIGH + EXCLUDED):
        low = LEVELS[i % 5]
        cols.append(rng.poisson(np.where(half, low, 8.0 * low))[:, None])
        names.append(name)
    for name in RARE:
        cols.append(rng.poisson(np.where(rng.random(n_spots) < 0.05, 8.0, 0.0))[:, None])
        names.append(name)
    if extra:
        cols.append(rng.poisson(np.where(half, 1.0, 200.0))[:, None])
        names.append(extra)
    x = np.concatenate(cols, axis=1).astype(np.float32)
    a = ad.AnnData(X=np.zeros_like(x), obs=pd.DataFrame(index=[f"s{i}" for i in range(n_spots)]))
    a.var_names = names
    a.layers["counts"] = x
    return a


def test_select_genes_known_answer(rng):
    samples = [_sample(rng), _sample(rng), _sample(rng, extra="ONLYHERE")]
    # pool = top-10 HVGs per sample (HIGH and RARE); K = 5 keeps high-mean ∩ high-std
    genes = bt.pp.select_genes(samples, n_top=5, n_hvg_per_sample=10)
    assert genes == sorted(HIGH)
    # with K = pool size nothing is filtered: RARE genes were candidates, removed above by the mean/std filter
    pool = bt.pp.select_genes(samples, n_top=1000, n_hvg_per_sample=10)
    assert set(HIGH + RARE) <= set(pool)
    assert not set(pool) & set(EXCLUDED)
    assert "ONLYHERE" not in pool  # not measured in every sample
    # without exclusion patterns the mitochondrial/ribosomal genes come back
    loose = bt.pp.select_genes(samples, n_top=1000, n_hvg_per_sample=14, exclude_patterns=())
    assert set(EXCLUDED) <= set(loose)
    # stable order: sample order does not matter
    assert bt.pp.select_genes(samples[::-1], n_top=5, n_hvg_per_sample=10) == genes


def test_select_genes_from_spatialdata_and_layer(rng):
    a = _sample(rng)
    sdata = sd.SpatialData(tables={"spots": a})
    from_sdata = bt.pp.select_genes(sdata, n_top=1000, n_hvg_per_sample=10)
    assert from_sdata == bt.pp.select_genes(a, n_top=1000, n_hvg_per_sample=10)
    assert set(HIGH) <= set(from_sdata) and len(from_sdata) == 10
    with pytest.raises(KeyError, match="layer=None"):
        bt.pp.select_genes(sdata, layer="raw")
    with pytest.raises(KeyError, match="table 'bulk' not found"):
        bt.pp.select_genes(sdata, table_key="bulk")


def test_select_genes_user_list_wins(rng, caplog):
    samples = [_sample(rng), _sample(rng, extra="ONLYHERE")]
    user = ["RARE1", "MT-CO1", "BG3", "BG3"]
    assert bt.pp.select_genes(samples, genes=user) == ["RARE1", "MT-CO1", "BG3"]
    with pytest.raises(ValueError, match=r"2 of 3 requested genes.*NOTAGENE"):
        bt.pp.select_genes(samples, genes=["BG1", "ONLYHERE", "NOTAGENE"])
    with caplog.at_level("WARNING", logger="bitro"):
        assert bt.pp.select_genes(samples, genes=["BG1", "ONLYHERE"], missing="drop") == ["BG1"]
    assert "dropped" in caplog.text
    with pytest.raises(ValueError, match="None of the requested"):
        bt.pp.select_genes(samples, genes=["NOTAGENE"], missing="drop")
    with pytest.raises(TypeError, match="list"):
        bt.pp.select_genes(samples, genes="BG1")


@pytest.mark.realdata
def test_select_genes_her2st(data_dir):
    counts = data_dir / "her2st" / "counts"
    samples = []
    for section in ("C1", "D1"):
        df = pd.read_csv(counts / f"{section}.tsv.gz", sep="\t", index_col=0)
        a = ad.AnnData(X=np.zeros(df.shape, np.float32), obs=pd.DataFrame(index=df.index.astype(str)))
        a.var_names = df.columns.astype(str)
        a.layers["counts"] = df.to_numpy(np.float32)
        samples.append(a)
    genes = bt.pp.select_genes(samples, n_top=300, n_hvg_per_sample=1000)
    assert 50 < len(genes) <= 300
    assert not [g for g in genes if g.upper().startswith(("MT-", "RPS", "RPL"))]
    common = set(samples[0].var_names) & set(samples[1].var_names)
    assert set(genes) <= common
    # the 785-gene HER2ST list is (almost) fully measured in the kit
    ref = np.load(data_dir / "her2st" / "genes" / "her_hvg_cut_1000.npy", allow_pickle=True).astype(str)
    kept = bt.pp.select_genes(samples, genes=list(ref), missing="drop")
    assert len(ref) == 785 and len(kept) >= 0.95 * 785
