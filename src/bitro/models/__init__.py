"""The networks: pure torch / PyG modules that know nothing about AnnData (BiTro, SpaHGC, alignment towers).

The user-facing model class that trains on SpatialData is :class:`bitro.tl.BiTroModel`; this package
imports nothing from :mod:`bitro.tl`.
"""

from bitro._lazy import lazy_exports

_EXPORTS = {
    "BiTroConfig": "._config",
    "BiTroNet": "._bitro",
    "GATBlock": "._gat",
    "BagTransformer": "._transformer",
    "GeneQueryHead": "._mil",
    "CellCountHead": "._count_head",
    "PositionEncoding": "._position",
    "apply_lora": "._lora",
    "lora_trainable_summary": "._lora",
    "cluster_loss": "._losses",
    "pseudo_cell_expression": "._losses",
    "aggregate_bulk": "._losses",
    "SpaHGCConfig": "._spahgc_config",
    "SpaHGCNet": "._spahgc",
    "SpaHGCEncoder": "._spahgc",
    "CrossNodeAttention": "._spahgc",
    "ExemplarPooling": "._spahgc",
    "MaskedGraphContrast": "._contrastive",
    "complementary_masks": "._contrastive",
    "drop_edges": "._contrastive",
    "ProjectionHead": "._towers",
    "CellPoolTower": "._towers",
    "GeneTower": "._towers",
    "ClipLoss": "._towers",
    "SigLipLoss": "._towers",
    "AlignmentNet": "._towers",
    "contrastive_loss": "._towers",
    "segment_mean": "._towers",
}
__all__ = sorted(_EXPORTS)
_lazy_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> object:
    if name == "BiTroModel":
        msg = "BiTroModel is bt.tl.BiTroModel (bitro.models holds the pure torch network only)."
        raise AttributeError(msg)
    return _lazy_getattr(name)
