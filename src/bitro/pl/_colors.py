"""Colours of bitro's plots: colour maps with the NaN colour, limits, categorical palettes, the missing-value legend.

Cluster-like keys get saturated palettes, cell types and other labels pastel/dark ones, CellViT
classes their own colours, so two categorical panels side by side never share a palette by accident.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro.pl._scalebar import SCALE_BAR_HEIGHT_PT

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.axes import Axes

NAN_COLOR = "lightgrey"
"""Colour of spots/cells without a value (no prediction, or not measured)."""


def colormap(cmap: Any):
    """A copy of ``cmap`` whose NaN colour is :data:`NAN_COLOR`."""
    import matplotlib as mpl

    cm = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    return cm.with_extremes(bad=NAN_COLOR)


def resolve_limit(value: float | str | None, values: np.ndarray, default_pct: float) -> float:
    """A colour limit: a number, ``"pN"`` (the N-th percentile) or ``None`` (``default_pct``)."""
    if value is not None and not isinstance(value, str):
        return float(value)
    pct = default_pct if value is None else _parse_percentile(value)
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, pct)) if finite.size else 0.0


def _parse_percentile(value: str) -> float:
    try:
        pct = float(value[1:]) if value.startswith("p") else float("nan")
    except ValueError:
        pct = float("nan")
    if not 0 <= pct <= 100:
        msg = f"Colour limits are numbers or percentiles written 'p0'…'p100'; got {value!r}."
        raise ValueError(msg)
    return pct


CLUSTER_PALETTES = ("tab10", "tab20")
"""Default palettes of clusterings (keys such as ``leiden``, ``cluster``, ``phenotype``), by size."""
LABEL_PALETTES = ("Set2", "Dark2", "Set1", "Accent", "Paired", "Set3")
"""Default palettes of other categorical keys (annotations, true types); the key picks one that fits."""
MANY_LABELS_PALETTE = "tab20b"
"""Default palette of a non-clustering key with 13–20 categories (its hues interleaved)."""
_INTERLEAVED = ("tab20b", "tab20c")
"""Palettes of 5 hues × 4 shades: colours are taken hue by hue, so neighbouring categories differ in hue."""
CLUSTER_WORDS = ("leiden", "louvain", "cluster", "kmeans", "phenotype")
"""A key containing one of these words is a clustering."""
CELLVIT_COLORS = {
    "neoplastic": "#ff0000",
    "inflammatory": "#22dd4d",
    "connective": "#235cec",
    "dead": "#feff00",
    "epithelial": "#ff9f44",
}
"""CellViT's class colours (PanNuke classes), used when the categories are CellViT class names."""
UNKNOWN_COLOR = "#9e9e9e"
"""Colour of an ``"unknown"`` category next to CellViT classes."""


def _palette_size(name: str) -> int:
    import matplotlib as mpl

    return int(getattr(mpl.colormaps[name], "N", 256))


def default_palette(key: str | None, n_categories: int, avoid: Sequence[str] = ()) -> str:
    """The default palette name of the categorical ``key``.

    Clusterings (a key containing one of :data:`CLUSTER_WORDS`) get tab10 (tab20 above 10
    categories), as in scanpy; any other key gets one of :data:`LABEL_PALETTES`, chosen by a
    checksum of the key, so clusters and true types shown side by side get different palettes.
    Palettes in ``avoid`` (already used in the same figure) are skipped while another fits.
    A non-clustering key with 13–20 categories gets :data:`MANY_LABELS_PALETTE`; above 20
    categories: ``"gist_ncar"``.
    """
    name = "" if key is None else str(key).lower()
    if any(word in name for word in CLUSTER_WORDS):
        candidates = [p for p in CLUSTER_PALETTES if _palette_size(p) >= n_categories]
    else:
        fitting = [p for p in LABEL_PALETTES if _palette_size(p) >= n_categories]
        start = zlib.crc32(name.encode()) % max(len(fitting), 1)
        candidates = fitting[start:] + fitting[:start]
        if not candidates and n_categories <= _palette_size(MANY_LABELS_PALETTE):
            candidates = [MANY_LABELS_PALETTE]
    fresh = [p for p in candidates if p not in avoid]
    if fresh or candidates:
        return (fresh or candidates)[0]
    return "gist_ncar"


def cellvit_colors(categories: Sequence[str]) -> dict[str, str] | None:
    """CellViT's colours when every category is a CellViT class (or ``"unknown"``), else ``None``."""
    cats = [str(c) for c in categories]
    known = [c for c in cats if c.lower() in CELLVIT_COLORS]
    if not known or any(c.lower() not in CELLVIT_COLORS and c.lower() != "unknown" for c in cats):
        return None
    return {c: CELLVIT_COLORS.get(c.lower(), UNKNOWN_COLOR) for c in cats}


def category_colors(
    categories: Sequence[str],
    palette: Any = None,
    stored: Sequence[str] | None = None,
    *,
    key: str | None = None,
    avoid: Sequence[str] = (),
) -> dict:
    """Colour per category.

    In order of precedence: ``palette`` (a colour-map name, a list or a dict category → colour);
    scanpy's ``uns[f"{key}_colors"]`` (``stored``); CellViT's class colours when the categories
    are CellViT classes; the default palette of ``key`` (:func:`default_palette`, skipping the
    palettes in ``avoid``).
    """
    import matplotlib as mpl
    from matplotlib.colors import to_hex

    cats = [str(c) for c in categories]
    if isinstance(palette, dict):
        missing = [c for c in cats if c not in palette]
        if missing:
            msg = f"palette has no colour for categories {missing}; add them to the dict."
            raise ValueError(msg)
        return {c: to_hex(palette[c]) for c in cats}
    if palette is None and stored is not None and len(stored) >= len(cats):
        return {c: to_hex(col) for c, col in zip(cats, stored)}
    if palette is None:
        cellvit = cellvit_colors(cats)
        if cellvit is not None:
            return cellvit
        palette = default_palette(key, len(cats), avoid)
    if isinstance(palette, str):
        if palette not in mpl.colormaps:
            from bitro.pl._utils import close_matches_error

            raise close_matches_error(
                palette, list(mpl.colormaps), what="palette", hint="Pass a colour-map name, a list or a dict."
            )
        cm = mpl.colormaps[palette]
        n = getattr(cm, "N", 256)
        if n < 256 and len(cats) <= n:  # listed colormap: take its colours in order
            order = range(n)
            if palette in _INTERLEAVED:
                order = np.arange(n).reshape(-1, 4).T.ravel().tolist()
            colors = [cm(i) for i in list(order)[: len(cats)]]
        else:
            colors = [cm(x) for x in np.linspace(0.05, 0.95, len(cats))]
    else:
        colors = list(palette)
        if len(colors) < len(cats):
            msg = f"palette has {len(colors)} colours but there are {len(cats)} categories."
            raise ValueError(msg)
    return {c: to_hex(col) for c, col in zip(cats, colors)}


def missing_label(adata: ad.AnnData, layer: str | None, values: np.ndarray, *, unit: str) -> str:
    """Legend text of the grey shapes without a value: why a prediction or a value is missing."""
    from bitro.pl._utils import is_prediction_layer

    if not is_prediction_layer(adata, layer):
        return "no value (NaN)"
    if not np.isfinite(values).any():
        return "no prediction (gene not predicted)"
    return f"no prediction ({unit})"


def add_missing_legend(ax: Axes, label: str, alpha: float = 1.0) -> None:
    """A legend entry for the grey (NaN) shapes, under the lower-left corner of the panel (outside the data).

    When the panel has a scale bar (:func:`add_scale_bar`, called first), the entry goes one row
    lower, under the bar, so the two never collide however wide the label is.
    """
    from matplotlib.legend import Legend
    from matplotlib.lines import Line2D
    from matplotlib.transforms import ScaledTranslation

    below = SCALE_BAR_HEIGHT_PT if any(a.get_gid() == "scale_bar" for a in ax.artists) else 0.0
    anchor = ax.transAxes + ScaledTranslation(0.0, -below / 72.0, ax.figure.dpi_scale_trans)

    handle = Line2D(
        [],
        [],
        marker="o",
        linestyle="",
        markersize=7,
        markerfacecolor=NAN_COLOR,
        markeredgecolor="none",
        alpha=alpha,
    )
    legend = Legend(
        ax,
        [handle],
        [label],
        loc="upper left",
        bbox_to_anchor=(0.0, 0.0),
        bbox_transform=anchor,
        frameon=False,
        fontsize="small",
        borderaxespad=0.2,
        handletextpad=0.2,
        borderpad=0.1,
    )
    legend.set_gid("missing_legend")
    ax.add_artist(legend)
    legend.set_clip_on(False)  # add_artist clips to the axes, which would also drop it from the layout
