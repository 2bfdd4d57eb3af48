"""Fitted k-means phenotypes of cells (:class:`PhenotypeModel`): nearest centroid labels any slide.

Fitted once on the projected features of all training cells (:meth:`PhenotypeModel.fit`, used by
:func:`bitro.pp.cluster_phenotypes` and by the model); new slides get labels from the stored centroids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bitro._settings import resolve_seed
from bitro._version import __version__

MINIBATCH_ABOVE = 100_000
"""Above this many training cells k-means uses :class:`~sklearn.cluster.MiniBatchKMeans`."""
CHUNK = 65_536
"""Rows labelled per chunk."""
PCA_KEY = "X_bitro_pca"


@dataclass(frozen=True)
class PhenotypeModel:
    """Fitted k-means phenotypes: each cell gets the label of its nearest centroid.

    Attributes
    ----------
    centroids
        ``(n_clusters, d)`` cluster centres in the ``use_rep`` space.
    use_rep
        ``obsm`` key the centroids live in.
    inertia
        Sum of squared distances of the training cells to their centroid.
    n_cells_fit
        Number of training cells.
    seed
        Seed of the k-means initialisation.
    """

    centroids: np.ndarray
    use_rep: str = PCA_KEY
    inertia: float = float("nan")
    n_cells_fit: int = 0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        """Number of phenotypes."""
        return int(self.centroids.shape[0])

    @property
    def categories(self) -> list[str]:
        """Label names ``"0"`` … ``"K-1"``."""
        return [str(i) for i in range(self.n_clusters)]

    def predict(self, x: np.ndarray, *, chunk_size: int = CHUNK) -> np.ndarray:
        """Index of the nearest centroid for each row of ``x`` (int64)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.centroids.shape[1]:
            msg = (
                f"The phenotype centroids are {self.centroids.shape[1]}-dimensional (obsm[{self.use_rep!r}]) "
                f"but got features of shape {x.shape}; project the slide with the same PCA first."
            )
            raise ValueError(msg)
        c = np.asarray(self.centroids, dtype=np.float64)
        c_sq = np.einsum("ij,ij->i", c, c)
        out = np.empty(x.shape[0], dtype=np.int64)
        for start in range(0, x.shape[0], chunk_size):
            block = np.asarray(x[start : start + chunk_size], dtype=np.float64)
            out[start : start + chunk_size] = np.argmin(c_sq[None, :] - 2.0 * block @ c.T, axis=1)
        return out

    def labels(self, x: np.ndarray) -> pd.Categorical:
        """Categorical labels ``"0"`` … ``"K-1"`` (all categories present)."""
        return pd.Categorical.from_codes(self.predict(x), categories=self.categories)

    def arrays(self) -> dict[str, np.ndarray]:
        """Numeric parts (for safetensors)."""
        return {"centroids": np.asarray(self.centroids, dtype=np.float32)}

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {
            "kind": "PhenotypeModel",
            "use_rep": self.use_rep,
            "n_clusters": self.n_clusters,
            "n_features": int(self.centroids.shape[1]),
            "inertia": float(self.inertia),
            "n_cells_fit": int(self.n_cells_fit),
            "seed": int(self.seed),
            "bitro_version": __version__,
            **self.extra,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> PhenotypeModel:
        """Rebuild from :meth:`arrays` and :meth:`meta`."""
        known = {
            "kind",
            "use_rep",
            "n_clusters",
            "n_features",
            "inertia",
            "n_cells_fit",
            "seed",
            "bitro_version",
        }
        centroids = np.asarray(arrays["centroids"], dtype=np.float64)
        if centroids.shape[0] != meta.get("n_clusters", centroids.shape[0]):
            msg = (
                f"Stored centroids have {centroids.shape[0]} rows but the metadata says {meta['n_clusters']}."
            )
            raise ValueError(msg)
        return cls(
            centroids=centroids,
            use_rep=meta.get("use_rep", PCA_KEY),
            inertia=float(meta.get("inertia", float("nan"))),
            n_cells_fit=int(meta.get("n_cells_fit", 0)),
            seed=int(meta.get("seed", 0)),
            extra={k: v for k, v in meta.items() if k not in known},
        )

    @classmethod
    def fit(
        cls, x: np.ndarray, *, n_clusters: int = 8, seed: int | None = None, use_rep: str = PCA_KEY
    ) -> PhenotypeModel:
        """Fit k-means phenotypes on ``x`` (``(n_cells, d)``, the training cells of all slides stacked).

        Used by :func:`bitro.pp.cluster_phenotypes` and by :class:`bitro.tl.BiTroModel`. The centroids are
        returned in their stored (float32) form. k-means uses :class:`~sklearn.cluster.KMeans`
        (10 initialisations), or :class:`~sklearn.cluster.MiniBatchKMeans` above 100,000 cells.
        """
        state = _fit_kmeans(np.asarray(x), n_clusters=n_clusters, seed=resolve_seed(seed), use_rep=use_rep)
        return cls.from_arrays(state.arrays(), state.meta())

    def to_dict(self) -> dict[str, Any]:
        """Everything as one JSON-serialisable dict."""
        return {"meta": self.meta(), "arrays": {k: v.tolist() for k, v in self.arrays().items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhenotypeModel:
        """Inverse of :meth:`to_dict`."""
        return cls.from_arrays({k: np.asarray(v) for k, v in d["arrays"].items()}, d["meta"])

    def __repr__(self) -> str:
        return (
            f"PhenotypeModel({self.n_clusters} phenotypes in obsm[{self.use_rep!r}] "
            f"({self.centroids.shape[1]} dims), fitted on {self.n_cells_fit} cells)"
        )


def _fit_kmeans(x: np.ndarray, *, n_clusters: int, seed: int, use_rep: str) -> PhenotypeModel:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n = x.shape[0]
    if n < n_clusters:
        msg = (
            f"k-means with n_clusters={n_clusters} needs at least that many cells; got {n}. Lower n_clusters."
        )
        raise ValueError(msg)
    if n > MINIBATCH_ABOVE:
        km = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=3, batch_size=4096)
        algo = "MiniBatchKMeans"
    else:
        km = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10)
        algo = "KMeans"
    km.fit(x)
    return PhenotypeModel(
        centroids=np.asarray(km.cluster_centers_, dtype=np.float64),
        use_rep=use_rep,
        inertia=float(km.inertia_),
        n_cells_fit=int(n),
        seed=seed,
        extra={"algorithm": algo},
    )
