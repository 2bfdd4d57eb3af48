"""Every default element, column and key name in one place."""

from __future__ import annotations

# SpatialData element names
IMAGE = "he"
IMAGE_NORMALIZED = "he_normalized"
SPOTS = "spots"  # table name; its shapes element is shapes_key(SPOTS)
CELLS = "cells"
PATCHES = "patches"
BULK = "bulk"
TISSUE = "tissue"

# Coordinate system of level-0 pixels
CS = "global"

# Table linkage (spatialdata TableModel)
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"

# AnnData keys
COUNTS_LAYER = "counts"
SPATIAL = "spatial"  # obsm centre coordinates in level-0 pixels (x, y)
EMBEDDING = "X_bitro"
PRED = "bitro"
PRED_OBSM = "X_bitro_expr"
PHENOTYPE = "phenotype"
SPOT_ID = "spot_id"
PATCH_ID = "patch_id"
N_CELLS = "n_cells"
CONNECTIVITIES = "spatial_connectivities"
DISTANCES = "spatial_distances"

# Scale metadata: one dict in sdata.attrs[SCALE] (a table-only AnnData may carry it in .uns[SCALE])
SCALE = "bitro_scale"
MPP = "mpp"  # microns per level-0 pixel
SPOT_DIAMETER_UM = "spot_diameter_um"
SPOT_SPACING_UM = "spot_spacing_um"

# Provenance of an augmented copy (bt.pp.augment_slide): a list of records in sdata.attrs and tables' .uns
AUGMENT = "bitro_augment"

SHAPES_SUFFIX = "_shapes"

# Default methods chosen by the benchmarks (docs/benchmarks.md)
#: Stain normalisation of bt.pp.normalize_stains, run_pipeline and ``bitro preprocess --stain``: the
#: method every accuracy/pipeline benchmark preprocesses with (benchmarks/_common.py PREPROCESS), and the
#: closest to tiatoolbox and 16x faster than Vahadane in the stain benchmark.
STAIN_METHOD = "macenko"


def shapes_key(table_key: str) -> str:
    """Name of the shapes element linked to table ``table_key``.

    spatialdata requires element names to be unique across element types, so the
    table ``"spots"`` annotates the shapes ``"spots_shapes"`` (likewise ``"cells"``
    and ``"patches"``).
    """
    return f"{table_key}{SHAPES_SUFFIX}"
