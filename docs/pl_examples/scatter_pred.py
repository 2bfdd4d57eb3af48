bt.pl.scatter_pred(sdata, gene=gene)
