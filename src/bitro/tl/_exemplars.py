"""The exemplar index: cross-slide nearest neighbours of spot embeddings, by cosine similarity.

:class:`ExemplarIndex` holds the reference spots (their embedding, slide, spot id and optionally a
payload such as their expression) and answers "the ``k`` most similar reference spots of *other*
slides" for any query. Any retrieval method can use it (``bt.tl.fit(model="retrieval")`` and
``model="spahgc"`` do).

Leakage rules it enforces: a query names the slide it comes from (``query_slides``) and never gets a
reference spot of that slide back; references can be masked out (``exclude``, e.g. validation spots
during training). It is built from training slides only by its callers.

Two search paths give the same neighbours (up to ties):

- ``"exact"``: ``queries × references`` cosine similarities in chunks of queries, so memory is
  ``chunk × n_references`` floats, whatever the number of queries;
- ``"ball_tree"``: one scikit-learn ``BallTree`` per reference slide on the unit vectors (Euclidean
  distance ``d`` gives ``cos = 1 − d² / 2``), queried per allowed slide and merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bitro.tl._cross_slice_config import INDEX_METHODS

#: Similarities held at once by the exact search (queries per chunk × references).
CHUNK_ELEMENTS = 4_000_000


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32; all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


@dataclass(frozen=True)
class Exemplars:
    """The answer of :meth:`ExemplarIndex.query`: ``k`` reference spots per query, most similar first.

    Attributes
    ----------
    index
        ``(m, k)`` rows of the reference spots in the index.
    similarity
        ``(m, k)`` cosine similarities (float32), descending along each row.
    slide
        ``(m, k)`` slide names of the reference spots.
    spot
        ``(m, k)`` spot ids of the reference spots.
    """

    index: np.ndarray
    similarity: np.ndarray
    slide: np.ndarray
    spot: np.ndarray

    @property
    def k(self) -> int:
        """Exemplars per query."""
        return int(self.index.shape[1])

    def to_frame(self, query_ids: Any = None) -> pd.DataFrame:
        """One row per (query, exemplar): ``query, rank, slide, spot, similarity`` (rank 0 = most similar)."""
        m, k = self.index.shape
        queries = np.arange(m) if query_ids is None else np.asarray(query_ids)
        return pd.DataFrame(
            {
                "query": np.repeat(queries, k),
                "rank": np.tile(np.arange(k), m),
                "slide": self.slide.ravel(),
                "spot": self.spot.ravel(),
                "similarity": self.similarity.ravel(),
            }
        )


@dataclass
class ExemplarIndex:
    """Reference spot embeddings with their slide and spot id; cross-slide cosine kNN queries.

    Build with :meth:`build`. Attributes are the stored state (:meth:`arrays` / :meth:`meta`).

    Attributes
    ----------
    vectors
        ``(n, d)`` float32 reference embeddings as given (cosine similarity normalises them).
    slide_codes
        ``(n,)`` int32 position of each reference's slide in ``slide_names``.
    slide_names
        Names of the reference slides.
    spot_ids
        ``(n,)`` spot ids (strings).
    values
        Optional ``(n, p)`` float32 payload per reference (e.g. its normalised expression).
    method
        ``"exact"`` or ``"ball_tree"``.
    """

    vectors: np.ndarray
    slide_codes: np.ndarray
    slide_names: list[str]
    spot_ids: np.ndarray
    values: np.ndarray | None = None
    method: str = "exact"
    _unit: np.ndarray | None = field(default=None, repr=False, compare=False)
    _trees: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        slides: Any,
        spot_ids: Any,
        *,
        values: np.ndarray | None = None,
        method: str = "exact",
    ) -> ExemplarIndex:
        """Index ``vectors`` ``(n, d)`` of reference spots from ``slides`` ``(n,)`` with ``spot_ids`` ``(n,)``.

        Parameters
        ----------
        vectors
            Reference embeddings (finite).
        slides
            Slide name of each reference.
        spot_ids
            Spot id of each reference (unique within a slide).
        values
            Optional payload ``(n, p)`` returned by :meth:`values_of` (e.g. normalised expression).
        method
            ``"exact"`` or ``"ball_tree"``.
        """
        if method not in INDEX_METHODS:
            msg = f"Unknown exemplar search method {method!r}; choose one of {INDEX_METHODS}."
            raise ValueError(msg)
        vectors = np.asarray(vectors, dtype=np.float32)
        slides = np.asarray(slides, dtype=str)
        spot_ids = np.asarray(spot_ids, dtype=str)
        n = vectors.shape[0] if vectors.ndim == 2 else -1
        if n < 1 or slides.shape != (n,) or spot_ids.shape != (n,):
            msg = (
                f"build needs (n, d) vectors with n ≥ 1 and one slide and spot id per row; got vectors "
                f"{vectors.shape}, slides {slides.shape}, spot_ids {spot_ids.shape}."
            )
            raise ValueError(msg)
        if not np.isfinite(vectors).all():
            msg = "The reference embeddings contain NaN or infinite values; drop those spots first."
            raise ValueError(msg)
        if values is not None:
            values = np.asarray(values, dtype=np.float32)
            if values.ndim != 2 or values.shape[0] != n:
                msg = f"values must be (n, p) with n = {n} rows, got {values.shape}."
                raise ValueError(msg)
        names, codes = np.unique(slides, return_inverse=True)
        dup = pd.Index(pd.Series(slides).str.cat(spot_ids, sep="\x00")).duplicated()
        if dup.any():
            msg = f"Spot ids repeat within a slide (e.g. {spot_ids[dup][:3].tolist()}); each reference needs one id."
            raise ValueError(msg)
        return cls(vectors, codes.astype(np.int32), [str(s) for s in names], spot_ids, values, method)

    @property
    def n_references(self) -> int:
        """Number of reference spots."""
        return int(self.vectors.shape[0])

    @property
    def unit(self) -> np.ndarray:
        """The reference vectors scaled to unit length (computed once)."""
        if self._unit is None:
            self._unit = unit_rows(self.vectors)
        return self._unit

    def values_of(self, rows: np.ndarray) -> np.ndarray:
        """The payload of reference ``rows`` (any shape of row indices)."""
        if self.values is None:
            msg = "This index holds no values; build it with values=... ."
            raise ValueError(msg)
        return self.values[rows]

    # ------------------------------------------------------------------ queries
    def query(
        self,
        x: np.ndarray,
        k: int,
        *,
        query_slides: Any = None,
        exclude: np.ndarray | None = None,
    ) -> Exemplars:
        """The ``k`` most similar references of each query row, never from the query's own slide.

        Parameters
        ----------
        x
            ``(m, d)`` query embeddings (same space as the references).
        k
            Exemplars per query.
        query_slides
            Slide name of each query (one name for all, or ``(m,)``): references of that slide are
            never returned. ``None``: every reference may be returned.
        exclude
            ``(n,)`` boolean mask of references never to return (e.g. validation spots).

        Raises
        ------
        ValueError
            Fewer than ``k`` references are allowed for some query (one slide only, say).
        """
        x = unit_rows(x)
        if x.ndim != 2 or x.shape[1] != self.vectors.shape[1]:
            msg = f"Queries must be (m, {self.vectors.shape[1]}) like the references, got {x.shape}."
            raise ValueError(msg)
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            msg = f"k must be an integer ≥ 1, got {k!r}."
            raise ValueError(msg)
        m = x.shape[0]
        own = self._own_codes(query_slides, m)
        allowed = np.ones(self.n_references, dtype=bool) if exclude is None else ~np.asarray(exclude, bool)
        if allowed.shape != (self.n_references,):
            msg = f"exclude must be a boolean mask of the {self.n_references} references, got shape {allowed.shape}."
            raise ValueError(msg)
        index = np.empty((m, k), dtype=np.int64)
        sim = np.empty((m, k), dtype=np.float32)
        for code in np.unique(own):
            rows = np.flatnonzero(own == code)
            ok = allowed & (self.slide_codes != code)
            if ok.sum() < k:
                where = f"outside slide {self.slide_names[code]!r}" if code >= 0 else "in the index"
                msg = (
                    f"Only {int(ok.sum())} reference spots are available {where} but k={k} exemplars were "
                    f"requested; exemplars come from other slides only: add training slides or lower "
                    "n_exemplars."
                )
                raise ValueError(msg)
            search = self._exact if self.method == "exact" else self._ball_tree
            index[rows], sim[rows] = search(x[rows], k, ok)
        return Exemplars(
            index=index,
            similarity=sim,
            slide=np.asarray(self.slide_names, dtype=object)[self.slide_codes[index]],
            spot=self.spot_ids[index],
        )

    def _own_codes(self, query_slides: Any, m: int) -> np.ndarray:
        """Code of each query's slide in this index (−1: a slide the index does not hold)."""
        if query_slides is None:
            return np.full(m, -1)
        names = np.broadcast_to(np.asarray(query_slides, dtype=str), (m,))
        lookup = {n: i for i, n in enumerate(self.slide_names)}
        return np.array([lookup.get(n, -1) for n in names], dtype=np.int64)

    def _exact(self, q: np.ndarray, k: int, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols = np.flatnonzero(ok)
        ref = self.unit[cols]
        chunk = max(1, CHUNK_ELEMENTS // max(len(cols), 1))
        index = np.empty((len(q), k), dtype=np.int64)
        sim = np.empty((len(q), k), dtype=np.float32)
        for start in range(0, len(q), chunk):
            s = q[start : start + chunk] @ ref.T
            top = (
                np.argpartition(-s, k - 1, axis=1)[:, :k]
                if k < s.shape[1]
                else np.tile(np.arange(s.shape[1]), (len(s), 1))
            )
            top_sim = np.take_along_axis(s, top, axis=1)
            # most similar first; equal similarities in reference order
            order = np.lexsort((top, -top_sim), axis=1)
            top = np.take_along_axis(top, order, axis=1)
            index[start : start + chunk] = cols[top]
            sim[start : start + chunk] = np.take_along_axis(top_sim, order, axis=1)
        return index, sim

    def _tree(self, code: int) -> tuple[Any, np.ndarray]:
        from sklearn.neighbors import BallTree

        if code not in self._trees:
            rows = np.flatnonzero(self.slide_codes == code)
            self._trees[code] = (BallTree(self.unit[rows]), rows)
        return self._trees[code]

    def _ball_tree(self, q: np.ndarray, k: int, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found_idx, found_sim = [], []
        for code in np.unique(self.slide_codes[ok]):
            tree, rows = self._tree(int(code))
            n_out = int((~ok[rows]).sum())
            kk = min(k + n_out, len(rows))
            dist, pos = tree.query(q, k=kk)
            idx = rows[pos]
            s = 1.0 - dist**2 / 2.0
            s = np.where(ok[idx], s, -np.inf)
            found_idx.append(idx)
            found_sim.append(s)
        idx, s = np.concatenate(found_idx, axis=1), np.concatenate(found_sim, axis=1)
        order = np.lexsort((idx, -s), axis=1)[:, :k]
        return np.take_along_axis(idx, order, axis=1), np.take_along_axis(s, order, axis=1).astype(np.float32)

    # ------------------------------------------------------------------ storage
    def arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store in safetensors."""
        out = {"vectors": self.vectors, "slide_codes": self.slide_codes}
        if self.values is not None:
            out["values"] = self.values
        return out

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable metadata (slide names, spot ids, method)."""
        return {
            "slide_names": list(self.slide_names),
            "spot_ids": self.spot_ids.tolist(),
            "method": self.method,
            "n_references": self.n_references,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> ExemplarIndex:
        """Rebuild from :meth:`arrays` and :meth:`meta`."""
        vectors = np.asarray(arrays["vectors"], dtype=np.float32)
        codes = np.asarray(arrays["slide_codes"], dtype=np.int32)
        spot_ids = np.asarray(meta["spot_ids"], dtype=str)
        if not (len(vectors) == len(codes) == len(spot_ids) == meta["n_references"]):
            msg = "The stored exemplar index is inconsistent (vectors, slides and spot ids differ in length)."
            raise ValueError(msg)
        values = arrays.get("values")
        return cls(vectors, codes, list(meta["slide_names"]), spot_ids, values, meta["method"])

    def __repr__(self) -> str:
        return (
            f"ExemplarIndex({self.n_references} spots × {self.vectors.shape[1]} from {len(self.slide_names)} "
            f"slides, method={self.method!r})"
        )
