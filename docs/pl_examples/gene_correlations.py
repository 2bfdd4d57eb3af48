bt.pl.gene_correlations(sdata, key="bitro_pcc_library_size", n_top=8)
