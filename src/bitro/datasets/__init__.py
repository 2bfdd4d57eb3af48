"""Built-in synthetic tissue and access to the local real-data kit (``bt.datasets``)."""

from bitro._lazy import lazy_exports

_EXPORTS = {
    "synthetic_tissue": "._synthetic",
    "crop": "._crop",
    "her2st": "._kit",
    "her2st_sections": "._kit",
    "her2st_genes": "._kit",
    "her2st_proportions": "._deconv",
    "data_dir": "._kit",
    "thin_counts": "._shift",
    "restain": "._shift",
    "rescale": "._rescale",
    "cache_dir": "._prepared",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
