"""Readers that build SpatialData objects (``bt.io``)."""

from bitro._lazy import lazy_exports

_EXPORTS = {
    "read_st": "._st",
    "read_hest": "._hest",
    "read_visium": "._visium",
    "read_xenium": "._xenium",
    "read_wsi": "._wsi",
    "read_zarr": "._zarr",
    "write_zarr": "._zarr",
    "read_cell_segmentation": "._cells",
    "set_scale": "._build",
    "get_scale": "._build",
    "get_mpp": "._build",
    "register_reader": "._read",
    "list_readers": "._read",
    "read_path": "._read",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
