spot = sdata["spots"].obs["n_cells"].idxmax()  # the spot with the most cells
bt.pl.attention(sdata, spot=spot, gene=gene)
