bt.pl.cells(sdata, color=[gene, "phenotype"], crop=window)
