"""The µm scale bar under spatial panels (:func:`add_scale_bar`) and its nice lengths."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bitro._logging import logger

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SCALE_BAR_HEIGHT_PT = 22.0
"""Room (points) the scale bar takes under a panel: its label, gap, bar and padding, with a margin."""


def nice_length(span_um: float) -> float:
    """A round length (1, 2 or 5 × 10^k µm) of about a fifth of ``span_um``."""
    target = max(span_um / 5.0, 1e-9)
    exponent = np.floor(np.log10(target))
    for step in (5.0, 2.0, 1.0):
        if step * 10**exponent <= target:
            return float(step * 10**exponent)
    return float(10**exponent)


def add_scale_bar(ax: Axes, mpp: float | None, length_um: float | str | None) -> None:
    """Draw a µm scale bar under the lower-right corner of the panel, outside the data.

    ``length_um``: a length in µm, ``"auto"`` (a round fifth of the view) or ``None`` (no bar).
    The bar hangs below the axes, so it never covers a spot or a cell; constrained layout
    (the default of new bt.pl figures) and ``bbox_inches="tight"`` make room for it.
    """
    if mpp is None or length_um is None:
        return
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    x0, x1 = ax.get_xlim()
    span_um = abs(x1 - x0) * mpp
    if length_um == "auto":
        length_um = nice_length(span_um)
    elif isinstance(length_um, str):
        msg = f"scale_bar_um must be a length in µm, 'auto' or None; got {length_um!r}."
        raise ValueError(msg)
    length_um = float(length_um)
    if length_um > span_um:
        logger.info(
            "scale bar of %g µm is wider than the view (%g µm); using a shorter one.", length_um, span_um
        )
        length_um = nice_length(span_um)
    label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"
    bar = AnchoredSizeBar(
        ax.transData,
        length_um / mpp,
        label,
        loc="upper right",
        bbox_to_anchor=(1.0, 0.0),
        bbox_transform=ax.transAxes,
        pad=0.1,
        borderpad=0.2,
        sep=2,
        frameon=False,
        size_vertical=abs(x1 - x0) / 150,
        color="black",
        fontproperties=FontProperties(size="small"),
    )
    bar.set_gid("scale_bar")
    ax.add_artist(bar)
