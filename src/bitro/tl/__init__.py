"""Tools: fit, predict, transfer and evaluate the BiTro model and the cross-slice models (``bt.tl``)."""

from bitro._lazy import lazy_exports

_EXPORTS = {
    "fit": "._api",
    "predict": "._api",
    "transfer": "._api",
    "evaluate": "._metrics",
    "cross_validate": "._cv",
    "pseudo_spots": "._pseudo",
    "cell_type_markers": "._composition",
    "type_cells": "._composition",
    "spot_composition": "._composition",
    "compare_composition": "._composition",
    "pcc_gene": "._metrics",
    "pcc_overall": "._metrics",
    "js_divergence": "._metrics",
    "score_cells": "._metrics",
    "original_reference": "._metrics",
    "summarize_cv": "._cv",
    "BaselineModel": "._baselines",
    "BiTroModel": "._model",
    "SpaHGCModel": "._spahgc",
    "RetrievalModel": "._retrieval",
    "ExemplarIndex": "._exemplars",
    "CrossSliceConfig": "._cross_slice_config",
    "build_hetero_graph": "._hetero",
    "TrainConfig": "._configs",
    "SetupConfig": "._configs",
    "TargetTransform": "._targets",
    "register_level": "._levels",
    "Level": "._levels",
    "domain_stats": "._domain",
    "domain_report": "._domain",
    "format_domain_report": "._domain",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
