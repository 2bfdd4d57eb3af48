"""Preprocessing: stain normalisation, tissue, segmentation, embedding, bags (``bt.pp``)."""

from bitro._lazy import lazy_exports

_EXPORTS = {
    "fit_stain_reference": "._stain",
    "normalize_stains": "._stain",
    "StainReference": "._stain",
    "detect_tissue": "._tissue",
    "segment_cells": "._segment",
    "embed_cells": "._embed",
    "register_encoder": "._encoders",
    "list_encoders": "._encoders",
    "register_segmenter": "._segmenters",
    "list_segmenters": "._segmenters",
    "reduce_features": "._reduce",
    "cluster_phenotypes": "._reduce",
    "assign_cells": "._bags",
    "make_patches": "._bags",
    "cell_graph": "._graph",
    "run_pipeline": "._pipeline",
    "select_genes": "._genes",
    "FeatureProjection": "._projection",
    "PhenotypeModel": "._phenotypes",
    "tissue_mask": "._tissue",
    "tile_has_tissue": "._tissue",
    "standardize_features": "._standardize",
    "augment_slide": "._augment",
    "augment_slides": "._augment",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
