"""The ``"morphology"`` encoder: hand-crafted nucleus features that need no weights.

Per nucleus (from its rasterised mask, all lengths in µm):

- shape: area, perimeter, eccentricity, solidity, major and minor axis length;
- stain: hematoxylin and eosin optical density (``skimage.color.rgb2hed``), mean and standard
  deviation inside the nucleus, mean in a ring of ``ring_um`` around it (other nuclei excluded);
- texture: grey-level co-occurrence (GLCM) contrast, homogeneity, energy and correlation of the
  hematoxylin channel over the nucleus' bounding box (16 grey levels spanning the box, distance 1 px,
  averaged over 4 directions); histogram of uniform local binary patterns (LBP, P=8, R=1) inside the
  nucleus;
- local density: number of other cell centroids within each of ``density_radii_um``.

Everything except GLCM (one small matrix per nucleus) is vectorised over the labels of a tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bitro.pp._encoders import Encoder

_SHAPE = ("area_um2", "perimeter_um", "eccentricity", "solidity", "major_axis_um", "minor_axis_um")
_STAIN = ("h_mean", "h_std", "e_mean", "e_std", "h_ring_mean", "e_ring_mean")
_GLCM = ("contrast", "homogeneity", "energy", "correlation")
_LBP_P = 8
_LBP_BINS = _LBP_P + 2  # "uniform" LBP codes 0..P+1
_GLCM_LEVELS = 16
_H_MAX = 0.25  # hematoxylin OD mapped to 255 for LBP (dark nuclei reach ~0.2)


class MorphologyEncoder(Encoder):
    """Hand-crafted nucleus features (shape, stain, texture, density); see the module docstring.

    Parameters
    ----------
    ring_um
        Width of the ring around each nucleus in which stain is measured.
    density_radii_um
        Radii of the local-density counts.
    """

    name = "morphology"
    kind = "mask"

    def __init__(self, *, ring_um: float = 4.0, density_radii_um: Sequence[float] = (25.0, 50.0)):
        if ring_um <= 0:
            msg = f"ring_um must be positive, got {ring_um}."
            raise ValueError(msg)
        self.ring_um = float(ring_um)
        self.density_radii_um = tuple(float(r) for r in density_radii_um)
        self.feature_names = [
            *_SHAPE,
            *_STAIN,
            *(f"glcm_{g}" for g in _GLCM),
            *(f"lbp_{i}" for i in range(_LBP_BINS)),
            *(f"density_{r:g}um" for r in self.density_radii_um),
        ]
        self.dim = len(self.feature_names)

    def provenance(self) -> dict:
        """Name, dimension, feature names and parameters."""
        out = super().provenance()
        out.update(
            feature_names=list(self.feature_names),
            ring_um=self.ring_um,
            density_radii_um=list(self.density_radii_um),
        )
        return out

    def embed_masks(
        self, tile: np.ndarray, labels: np.ndarray, ids: np.ndarray, *, um_per_px: float
    ) -> np.ndarray:
        """Shape, stain and texture features of the nuclei ``ids`` of a labelled tile.

        Parameters
        ----------
        tile
            RGB tile ``(h, w, 3) uint8``.
        labels
            ``(h, w)`` integer label image, 0 = background; other nuclei may be labelled too (they are
            excluded from the rings).
        ids
            Labels whose features are returned, in this order.
        um_per_px
            Pixel size of the tile in µm.

        Returns
        -------
        ``(len(ids), dim - len(density_radii_um))`` float32.
        """
        from skimage.color import rgb2hed
        from skimage.feature import local_binary_pattern
        from skimage.measure import regionprops_table
        from skimage.segmentation import expand_labels

        labels = labels.astype(np.int64, copy=False)
        ids = np.asarray(ids, dtype=np.int64)
        n_lab = int(labels.max()) + 1
        hed = rgb2hed(tile[..., :3])
        h, e = hed[..., 0], hed[..., 1]
        flat = labels.ravel()

        # stain inside the nucleus and in the ring
        h_mean, h_std, cnt = _label_stats(h, flat, n_lab)
        e_mean, e_std, _ = _label_stats(e, flat, n_lab)
        grown = expand_labels(labels, distance=max(1.0, self.ring_um / um_per_px))
        ring = np.where(labels == 0, grown, 0).ravel()
        h_ring, _, ring_cnt = _label_stats(h, ring, n_lab)
        e_ring, _, _ = _label_stats(e, ring, n_lab)
        background = (labels == 0) & (grown == 0)
        h_bg = float(h[background].mean()) if background.any() else 0.0
        e_bg = float(e[background].mean()) if background.any() else 0.0
        h_ring = np.where(ring_cnt > 0, h_ring, h_bg)
        e_ring = np.where(ring_cnt > 0, e_ring, e_bg)

        # shape
        props = regionprops_table(
            labels,
            properties=(
                "label",
                "area",
                "perimeter",
                "eccentricity",
                "solidity",
                "axis_major_length",
                "axis_minor_length",
                "bbox",
            ),
        )
        row = np.full(n_lab, -1, dtype=np.int64)
        row[props["label"]] = np.arange(len(props["label"]))
        r = row[ids]
        shape = np.stack(
            [
                props["area"][r] * um_per_px**2,
                props["perimeter"][r] * um_per_px,
                props["eccentricity"][r],
                props["solidity"][r],
                props["axis_major_length"][r] * um_per_px,
                props["axis_minor_length"][r] * um_per_px,
            ],
            axis=1,
        )
        stain = np.stack([h_mean, h_std, e_mean, e_std, h_ring, e_ring], axis=1)[ids]

        # texture: LBP histograms (vectorised) and GLCM per nucleus
        h8 = (np.clip(h / _H_MAX, 0.0, 1.0) * 255).astype(np.uint8)
        codes = local_binary_pattern(h8, _LBP_P, 1, method="uniform").astype(np.int64).ravel()
        lbp = np.bincount(flat * _LBP_BINS + codes, minlength=n_lab * _LBP_BINS).reshape(n_lab, _LBP_BINS)
        lbp = lbp[ids] / np.maximum(cnt[ids], 1)[:, None]
        boxes = np.stack([props[f"bbox-{i}"][r] for i in range(4)], axis=1)
        glcm = (
            np.stack([_glcm(h[b0:b2, b1:b3]) for b0, b1, b2, b3 in boxes]) if len(ids) else np.zeros((0, 4))
        )
        return np.concatenate([shape, stain, glcm, lbp], axis=1).astype(np.float32)

    def density_features(self, centroids_um: np.ndarray) -> np.ndarray:
        """Number of other centroids within each radius (``(n, len(density_radii_um))`` float32)."""
        from scipy.spatial import cKDTree

        tree = cKDTree(centroids_um)
        cols = [tree.query_ball_point(centroids_um, r, return_length=True) - 1 for r in self.density_radii_um]
        return (
            np.stack(cols, axis=1).astype(np.float32)
            if cols
            else np.zeros((len(centroids_um), 0), np.float32)
        )


def _label_stats(values: np.ndarray, flat_labels: np.ndarray, n_lab: int) -> tuple[np.ndarray, ...]:
    """Per-label mean, standard deviation and pixel count of ``values``."""
    v = values.ravel()
    cnt = np.bincount(flat_labels, minlength=n_lab).astype(np.float64)
    s1 = np.bincount(flat_labels, weights=v, minlength=n_lab)
    s2 = np.bincount(flat_labels, weights=v * v, minlength=n_lab)
    denom = np.maximum(cnt, 1)
    mean = s1 / denom
    std = np.sqrt(np.maximum(s2 / denom - mean**2, 0.0))
    return mean, std, cnt


def _glcm(patch: np.ndarray) -> np.ndarray:
    """GLCM contrast, homogeneity, energy, correlation of a hematoxylin patch (16 levels over its range)."""
    from skimage.feature import graycomatrix, graycoprops

    if patch.size == 0 or min(patch.shape) < 2:
        return np.array([0.0, 1.0, 1.0, 1.0])
    lo, hi = float(patch.min()), float(patch.max())
    if hi - lo < 1e-9:
        return np.array([0.0, 1.0, 1.0, 1.0])
    q = np.minimum(((patch - lo) / (hi - lo) * _GLCM_LEVELS).astype(np.uint8), _GLCM_LEVELS - 1)
    angles = [0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    mat = graycomatrix(q, distances=[1], angles=angles, levels=_GLCM_LEVELS, symmetric=True, normed=True)
    return np.array([float(np.nan_to_num(graycoprops(mat, p).mean(), nan=1.0)) for p in _GLCM])
