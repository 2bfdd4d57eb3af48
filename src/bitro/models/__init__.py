"""The BiTro network (pure torch / PyG modules) and the user-facing model class.

The ``nn.Module`` classes here know nothing about AnnData. ``BiTroModel`` — the
scvi-tools-style wrapper that trains on SpatialData — lives in :mod:`bitro.tl`
and is re-exported here lazily.
"""

from bitro._lazy import lazy_exports

_EXPORTS = {
    "BiTroConfig": "._config",
    "BiTroNet": "._bitro",
    "GATBlock": "._gat",
    "BagTransformer": "._transformer",
    "GeneQueryHead": "._mil",
    "PositionEncoding": "._position",
    "apply_lora": "._lora",
    "lora_trainable_summary": "._lora",
    "cluster_loss": "._losses",
    "pseudo_cell_expression": "._losses",
    "aggregate_bulk": "._losses",
    "BiTroModel": "bitro.tl._model",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
