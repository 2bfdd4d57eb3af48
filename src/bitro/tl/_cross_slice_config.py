"""Options of the cross-slice models (``model="spahgc"`` and ``model="retrieval"``), declared once.

:class:`CrossSliceConfig` holds what only the exemplar models need: how many exemplars, the graph
around each spot and the search method. The rest comes from the shared option sets —
:class:`~bitro.tl.SetupConfig` (target scale, ``zscore``, ``use_rep``, ``n_components``, seed,
table keys) and :class:`~bitro.tl.TrainConfig` (the loop) — so ``bt.tl.fit`` splits flat options by
these three dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitro.tl._configs import _check_float, _check_int, _opt, _Options

INDEX_METHODS = ("exact", "ball_tree")


@dataclass(frozen=True)
class CrossSliceConfig(_Options):
    """How spots of other slides are retrieved and linked (SpaHGC and the retrieval baseline).

    Parameters
    ----------
    n_exemplars
        ``k``: training spots retrieved per spot by cosine similarity of the spot features (SpaHGC:
        the reference nodes of each target; retrieval: the spots averaged). Leave one HER2ST section
        out (whole sections, 3 seeds), 32 against 8 raised normalised PCC_gene from 0.157 to 0.164 for
        SpaHGC and from 0.098 to 0.124 for retrieval (higher on 5 of 5 sections each); SpaHGC's fit
        takes about twice as long.
    reference_k
        SpaHGC: each exemplar is linked to this many of the most similar other exemplars of the
        same target (the reference–reference edges).
    neighbour_radius
        SpaHGC: target spots closer than this many spot spacings (centre to centre) are spatial
        neighbours (1.5: the 8-neighbourhood of a square grid, the 6 of a hexagonal one).
    max_neighbours
        SpaHGC: at most this many spatial neighbours per spot (the nearest).
    spot_rep
        A spot-patch embedding in ``spots.obsm`` (e.g. a pathology encoder run on each spot's image
        patch) to use beside the pooled cell features; it is projected by a PCA fitted on the
        training spots. ``None``: pooled cell features and the cell count only.
    index
        ``"exact"``: cosine similarity against every training spot, in chunks of queries (bounded
        memory); ``"ball_tree"``: scikit-learn's ball tree per training slide on the normalised
        vectors (same neighbours; see the benchmark for when it is faster).
    """

    n_exemplars: int = _opt(32, "training spots retrieved per spot (k)")
    reference_k: int = _opt(3, "links of each exemplar to the other exemplars of its spot")
    neighbour_radius: float = _opt(1.5, "spatial neighbours within this many spot spacings")
    max_neighbours: int = _opt(8, "at most this many spatial neighbours per spot")
    spot_rep: str | None = _opt(None, "spot-patch embedding in spots.obsm", shown="none")
    index: str = _opt("exact", "exemplar search: exact or ball_tree", choices=INDEX_METHODS)

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_int(name, "n_exemplars", self.n_exemplars, low=1)
        _check_int(name, "reference_k", self.reference_k, low=1)
        _check_int(name, "max_neighbours", self.max_neighbours, low=1)
        _check_float(name, "neighbour_radius", self.neighbour_radius, low=0.0, low_open=True)
        if self.index not in INDEX_METHODS:
            msg = f"{name}.index must be one of {INDEX_METHODS}, got {self.index!r}."
            raise ValueError(msg)
        if self.spot_rep is not None and (not isinstance(self.spot_rep, str) or not self.spot_rep):
            msg = f"{name}.spot_rep must be a non-empty string (a key of spots.obsm) or None, got {self.spot_rep!r}."
            raise ValueError(msg)
