"""The local data-kit loaders: real files read, crafted files refused."""

from __future__ import annotations

import numpy as np
import pytest

import bitro as bt


@pytest.mark.realdata
def test_her2st_genes_reads_the_785_gene_list(data_dir):
    genes = bt.datasets.her2st_genes(data_dir)
    assert len(genes) == 785 == len(set(genes)) and all(isinstance(g, str) and g for g in genes)


class _Boom:
    def __reduce__(self):
        return (RuntimeError, ("this pickle ran code",))


def test_her2st_genes_never_unpickles(tmp_path):
    folder = tmp_path / "her2st" / "genes"
    folder.mkdir(parents=True)
    crafted = folder / "her_hvg_cut_1000.npy"
    np.save(crafted, np.array([_Boom()], dtype=object), allow_pickle=True)
    assert b"this pickle ran code" in crafted.read_bytes()
    with pytest.raises(ValueError, match="object arrays are never read"):
        bt.datasets.her2st_genes(tmp_path)  # a RuntimeError here would mean the pickle was executed
    np.save(crafted, np.arange(3))
    with pytest.raises(ValueError, match="1-D array of gene names"):
        bt.datasets.her2st_genes(tmp_path)
