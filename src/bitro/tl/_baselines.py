"""Baselines that share bitro's predict/evaluate path.

- ``"ridge"``: mean-pooled cell features per bag → standardise → PCA → ridge (the HEST-Benchmark probe).
- ``"mlp"``: the same pooled features → a small MLP (scikit-learn).
- ``"depth"``: predicts only each bag's log total count from its pooled features, then spreads it
  over genes by the training gene fractions — how far "more molecules everywhere" gets.
- ``"cell_count"``: a per-gene linear model on log(1 + cells in the bag) alone.
- ``"mean"``: the training mean of every gene.

How each baseline extrapolates to a slide unlike the training ones: ridge and depth are linear in the
pooled features (a spot with twice the feature shift gets twice the change, without bound); the MLP is
piecewise linear; cell_count is linear in log(1 + cells); mean is constant. Their predictions are not
clipped to the training range: a clip hid how they generalise (on a new patient most spots hit it and
the prediction became constant). Only the numeric overflow that motivated it is guarded, where log1p
values go back to counts (:data:`bitro.tl._targets.MAX_LOG1P`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bitro import _keys as K
from bitro._settings import resolve_seed
from bitro.io._build import get_table
from bitro.tl._data import cells_of
from bitro.tl._levels import unit_counts as _unit_counts
from bitro.tl._setup import as_slides as _as_list
from bitro.tl._setup import cell_features as _cell_features
from bitro.tl._targets import MAX_LOG1P, TargetTransform

if TYPE_CHECKING:
    import spatialdata as sd

BASELINES = ("ridge", "mlp", "depth", "cell_count", "mean")


def pooled_features(
    sdata: sd.SpatialData,
    *,
    use_rep: str,
    units_key: str = K.SPOTS,
    bag_key: str = K.SPOT_ID,
    cells_key: str = K.CELLS,
) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    """Mean cell feature and cell count of every unit (NaN features for units without cells)."""
    units = get_table(sdata, units_key)
    cells = cells_of(sdata, cells_key)
    if bag_key not in cells.obs:
        msg = f"cells.obs[{bag_key!r}] is missing: run bt.pp.assign_cells first."
        raise KeyError(msg)
    x = _cell_features(sdata, use_rep, cells_key)
    codes = pd.Categorical(cells.obs[bag_key].astype("object"), categories=units.obs_names).codes
    inside = codes >= 0
    n = np.bincount(codes[inside], minlength=units.n_obs)
    sums = np.zeros((units.n_obs, x.shape[1]))
    np.add.at(sums, codes[inside], x[inside])
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = sums / n[:, None]
    pooled[n == 0] = np.nan
    return units.obs_names, pooled, n


def _floored_scaler() -> Any:
    """A scikit-learn ``StandardScaler`` whose per-feature scales are floored like the projection's.

    See :func:`bitro.pp._projection.feature_scale`: without the floor, a pooled feature that is almost
    constant on the training spots turns one unusual held-out spot into an extreme prediction.
    """
    from sklearn.preprocessing import StandardScaler

    from bitro.pp._projection import feature_scale

    class FlooredScaler(StandardScaler):
        def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> FlooredScaler:
            super().fit(X, y, sample_weight)
            self.scale_ = feature_scale(np.asarray(X))
            return self

    return FlooredScaler()


class BaselineModel:
    """A spot-level baseline with the same ``predict`` interface as :class:`BiTroModel`.

    Parameters
    ----------
    sdatas
        Training slides (``spots`` with counts, ``cells`` with ``obsm[use_rep]`` and ``obs["spot_id"]``).
    kind
        One of ``"ridge"``, ``"mlp"``, ``"depth"``, ``"cell_count"``, ``"mean"``.
    genes
        Genes to predict (must be in every training slide).
    target
        ``"raw"`` or ``"library_size"`` log1p scale (as :class:`BiTroModel`).
    use_rep
        Cell features to pool.
    alpha
        Ridge penalty (``"ridge"`` and ``"depth"``).
    n_components
        PCA dimension of the pooled features (``"ridge"``, ``"mlp"``, ``"depth"``).
    seed
        Random seed.
    """

    def __init__(
        self,
        sdatas: Any,
        *,
        kind: str,
        genes: list[str],
        target: str = "raw",
        use_rep: str = K.EMBEDDING,
        alpha: float = 100.0,
        n_components: int = 256,
        seed: int | None = None,
    ) -> None:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.neural_network import MLPRegressor
        from sklearn.pipeline import make_pipeline

        if kind not in BASELINES:
            msg = f"Unknown baseline {kind!r}; choose one of {BASELINES} (or model='bitro')."
            raise ValueError(msg)
        sdatas = _as_list(sdatas)
        self.kind, self.genes, self.use_rep, self.level = kind, list(genes), use_rep, "spot"
        self.seed = resolve_seed(seed)
        feats, ncell, counts = [], [], []
        for sdata in sdatas:
            _names, pooled, n = pooled_features(sdata, use_rep=use_rep)
            keep = n > 0
            table = get_table(sdata, K.SPOTS)
            feats.append(pooled[keep])
            ncell.append(n[keep])
            counts.append(
                _unit_counts(table[np.flatnonzero(keep)], self.genes, layer=K.COUNTS_LAYER, what="spots")
            )
        x, n_cells, counts = np.concatenate(feats), np.concatenate(ncell), np.concatenate(counts)
        self.transform = TargetTransform.fit(counts, self.genes, scale=target)
        y = self.transform.encode(counts)
        n_comp = int(min(n_components, x.shape[0] - 1, x.shape[1]))
        if kind in ("ridge", "depth", "mlp"):
            head = (
                Ridge(alpha=alpha)
                if kind != "mlp"
                else MLPRegressor(
                    hidden_layer_sizes=(256,),
                    alpha=1e-2,
                    max_iter=300,
                    early_stopping=True,
                    random_state=self.seed,
                )
            )
            self.regressor = make_pipeline(
                _floored_scaler(), PCA(n_components=n_comp, random_state=self.seed), head
            )
        if kind in ("ridge", "mlp"):
            self.regressor.fit(x, y)
        elif kind == "depth":
            totals = counts.sum(axis=1)
            self.regressor.fit(x, np.log1p(totals))
            self.fractions = counts.sum(axis=0) / max(counts.sum(), 1e-12)
        elif kind == "cell_count":
            design = np.column_stack([np.log1p(n_cells), np.ones(len(n_cells))])
            self.coef = np.linalg.lstsq(design, y, rcond=None)[0]
        self.is_trained = True
        self.history = {}

    def predict_log1p(self, sdata: sd.SpatialData) -> tuple[pd.Index, np.ndarray, np.ndarray]:
        """``(unit names, log1p predictions (units × genes; NaN for units without cells), cells per unit)``."""
        names, pooled, n = pooled_features(sdata, use_rep=self.use_rep)
        keep = n > 0
        out = np.full((len(names), len(self.genes)), np.nan)
        x = pooled[keep]
        if self.kind in ("ridge", "mlp"):
            out[keep] = self.transform.to_log1p(self.regressor.predict(x))
        elif self.kind == "depth":
            total = np.expm1(np.clip(self.regressor.predict(x), 0.0, MAX_LOG1P))[:, None]
            counts = total * self.fractions[None, :]
            z = self.transform.encode(counts)
            out[keep] = self.transform.to_log1p(z)
        elif self.kind == "cell_count":
            design = np.column_stack([np.log1p(n[keep]), np.ones(keep.sum())])
            out[keep] = self.transform.to_log1p(design @ self.coef)
        else:
            out[keep] = self.transform.mean[None, :]
        return names, out, n

    def predict(
        self, sdata: sd.SpatialData, *, key_added: str = K.PRED, overwrite: bool = False, **_: Any
    ) -> dict:
        """Write ``spots.layers[key_added]`` (log1p, aligned to ``var``; NaN where not predicted)."""
        from bitro import __version__
        from bitro.tl._write import write_units_layer

        names, log1p, n = self.predict_log1p(sdata)
        units = get_table(sdata, K.SPOTS)
        prov = {
            "model": self.kind,
            "level": "spot",
            "target_scale": self.transform.scale,
            "use_rep": self.use_rep,
            "seed": self.seed,
            "bitro_version": __version__,
        }
        layer = write_units_layer(
            units,
            names.to_numpy(),
            self.genes,
            log1p,
            key_added=key_added,
            provenance=prov,
            n_cells=n,
            overwrite=overwrite,
        )
        return {"units": layer}

    def __repr__(self) -> str:
        return f"BaselineModel(kind={self.kind!r}, genes={len(self.genes)}, target={self.transform.scale!r})"
