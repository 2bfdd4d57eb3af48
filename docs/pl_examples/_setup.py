import bitro as bt

# three synthetic Visium-like slides: train on two, predict the third
slides = bt.datasets.synthetic_tissue(3, size=1200, technology="visium", seed=0)
for slide in slides:
    bt.pp.normalize_stains(slide, method="macenko")
    bt.pp.segment_cells(slide, image_key="he_normalized")
    bt.pp.embed_cells(slide, image_key="he_normalized", encoder="morphology", mode="tile")
    bt.pp.assign_cells(slide)
bt.pp.reduce_features(slides, n_components=16)
bt.pp.cluster_phenotypes(slides, n_clusters=6)  # obs["phenotype"]: morphology clusters
train, sdata = slides[:2], slides[2]

genes = bt.pp.select_genes(train, n_top=100)
model = bt.tl.fit(
    train, genes=genes, max_epochs=30, lr=1e-3, n_components=16, config={"hidden_dim": 64, "ffn_dim": 128}
)
bt.tl.predict(model, sdata)  # spots.layers["bitro"], cells.layers["bitro"]
bt.tl.evaluate(sdata)  # spots.var["bitro_pcc_raw"], ["bitro_pcc_library_size"]

# the two best-predicted genes and a 300 × 300 µm window in the middle of the slide (level-0 pixels)
best = sdata["spots"].var["bitro_pcc_library_size"].nlargest(2).index.tolist()
gene = best[0]
x, y = sdata["cells"].obsm["spatial"].mean(axis=0)
window = (x - 300, y - 300, x + 300, y + 300)
