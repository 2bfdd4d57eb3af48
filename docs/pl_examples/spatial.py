bt.pl.spatial(sdata, genes=best, scale_bar_um="auto")
