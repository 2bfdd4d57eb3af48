bt.pl.history(model)
