bt.pl.segmentation(sdata, image_key="he_normalized", crop=window)
