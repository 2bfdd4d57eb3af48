"""Pure-numpy stain estimation and re-painting (no SpatialData here).

Conventions used everywhere in bitro:

- images are ``(h, w, 3)`` uint8 RGB arrays; pixel lists are ``(n, 3)`` uint8;
- optical density (Beer–Lambert) is ``OD = -ln(max(I, 1) / 255)`` per channel, so white (255) has
  OD 0 and the inverse is ``I = 255 · exp(-OD)`` clipped to ``[0, 255]``;
- a stain matrix is ``(2, 3)``: row 0 hematoxylin, row 1 eosin, each row the unit-length OD vector of
  one stain. Hematoxylin is the stain with the larger *red-channel* OD (it absorbs red/orange light
  and looks blue-purple); eosin absorbs mostly green and looks pink;
- concentrations are ``(n, 2)``, non-negative, solved by exact two-variable non-negative least squares,
  so that ``OD ≈ C @ M`` (paper Eq. 17); re-painting scales each source concentration by the ratio of
  the reference and source 99th-percentile concentrations and multiplies by the reference matrix
  (paper Eq. 18).
"""

from __future__ import annotations

import numpy as np

#: Luminosity (CIELAB L / 100) above which a pixel is treated as background/glass when fitting.
LUMINOSITY_THRESHOLD = 0.8
#: Pixels with a summed OD below this carry no stain information and are ignored when fitting.
MIN_OD = 0.15
#: Percentile of the stain concentrations used as the "maximum" concentration.
MAX_CONCENTRATION_PERCENTILE = 99.0


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln(max(I, 1) / 255)`` of uint8 RGB values (float32, same shape)."""
    intensity = np.clip(np.asarray(rgb, dtype=np.float32), 1.0, 255.0)
    return -np.log(intensity / 255.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`: ``255 · exp(-OD)`` rounded and clipped to uint8."""
    rgb = 255.0 * np.exp(-np.asarray(od, dtype=np.float32))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def luminosity(rgb: np.ndarray) -> np.ndarray:
    """CIELAB lightness of uint8 RGB values, scaled to ``[0, 1]``."""
    from skimage.color import rgb2lab

    rgb = np.asarray(rgb)
    flat = rgb.reshape(-1, 1, 3)
    return (rgb2lab(flat)[..., 0] / 100.0).reshape(rgb.shape[:-1])


def stain_pixel_mask(rgb: np.ndarray, *, threshold: float = LUMINOSITY_THRESHOLD) -> np.ndarray:
    """Boolean mask of pixels usable for fitting: darker than ``threshold`` and with some stain."""
    od_sum = rgb_to_od(rgb).sum(axis=-1)
    return (luminosity(rgb) < threshold) & (od_sum > MIN_OD)


def _order_and_normalise(matrix: np.ndarray) -> np.ndarray:
    """Make rows unit-length and put hematoxylin (larger red-channel OD) first."""
    matrix = np.abs(np.asarray(matrix, dtype=np.float64))
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if np.any(norms <= 0):
        msg = "A fitted stain vector is zero; the sample has too little stain. Pass more tissue pixels."
        raise ValueError(msg)
    matrix = matrix / norms
    if matrix[0, 0] < matrix[1, 0]:
        matrix = matrix[::-1]
    return np.ascontiguousarray(matrix)


def fit_macenko(od: np.ndarray, *, percentile: float = 99.0) -> np.ndarray:
    """Macenko et al. (2009) stain matrix of OD pixels ``(n, 3)``.

    The OD cloud is projected on the plane of its two leading principal directions; the stain
    vectors are the directions at the ``100 - percentile`` and ``percentile`` angle percentiles.
    """
    od = np.asarray(od, dtype=np.float64)
    _, eigvecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = eigvecs[:, [2, 1]]  # two largest eigenvalues
    plane *= np.where(plane[0] < 0, -1.0, 1.0)  # orient towards positive red OD
    proj = od @ plane
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [100.0 - percentile, percentile])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    return _order_and_normalise(np.stack([v1, v2]))


def fit_vahadane(
    od: np.ndarray,
    *,
    alpha: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-6,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Vahadane et al. (2016) stain matrix by sparse non-negative dictionary learning.

    Minimises ``½‖OD − C·M‖² + alpha·‖C‖₁`` over ``C ≥ 0`` and ``M ≥ 0`` with unit-norm rows of ``M``
    by alternating an exact sparse non-negative coding step (two unknowns per pixel, solved in
    closed form) with a block-coordinate update of each stain vector. The dictionary starts from
    the Macenko estimate (or ``init``), which makes the fit deterministic given the pixel sample.
    """
    od = np.asarray(od, dtype=np.float64).reshape(-1, 3)
    matrix = fit_macenko(od) if init is None else _order_and_normalise(init)
    previous = np.inf
    for _ in range(max_iter):
        conc = concentrations(od, matrix, alpha=alpha).astype(np.float64)
        residual = od - conc @ matrix
        for k in range(2):
            weight = conc[:, k] @ conc[:, k]
            if weight <= 0:
                continue
            residual += np.outer(conc[:, k], matrix[k])
            atom = np.maximum(residual.T @ conc[:, k] / weight, 0.0)
            atom /= max(np.linalg.norm(atom), 1e-12)
            matrix[k] = atom
            residual -= np.outer(conc[:, k], atom)
        loss = 0.5 * np.sum(residual**2) + alpha * conc.sum()
        if previous - loss <= tol * max(abs(previous), 1.0):
            break
        previous = loss
    return _order_and_normalise(matrix)


def concentrations(od: np.ndarray, stain_matrix: np.ndarray, *, alpha: float = 0.0) -> np.ndarray:
    """Non-negative concentrations ``C`` (``(n, 2)``, float32) minimising ``½‖OD − C·M‖² + alpha·ΣC``.

    Exact two-variable solution: the unconstrained optimum when both entries are non-negative,
    otherwise the best of the single-stain optima and zero. ``alpha=0`` is plain non-negative least
    squares; ``alpha > 0`` is the non-negative lasso used by Vahadane's sparse coding.
    """
    od = np.asarray(od, dtype=np.float32).reshape(-1, 3)
    m = np.asarray(stain_matrix, dtype=np.float32)
    gram = m @ m.T
    diag = np.diag(gram)
    proj = od @ m.T - np.float32(alpha)  # (n, 2) linear term of the objective
    c = proj @ np.linalg.inv(gram).T
    bad = np.any(c < 0, axis=1)
    if np.any(bad):
        p = proj[bad]
        single = np.maximum(p / diag, 0.0)  # optimum of c_k alone, the other stain 0
        # objective up to the common ‖od‖²/2: −c·p + ½c²g (zero when c = 0, the third candidate)
        cost = -single * p + 0.5 * single**2 * diag
        use0 = cost[:, 0] <= cost[:, 1]
        fixed = np.zeros_like(p)
        fixed[use0, 0] = single[use0, 0]
        fixed[~use0, 1] = single[~use0, 1]
        c[bad] = fixed
    return c


def max_concentrations(conc: np.ndarray) -> np.ndarray:
    """99th percentile of each stain's concentration (``(2,)``, float64)."""
    return np.percentile(conc, MAX_CONCENTRATION_PERCENTILE, axis=0).astype(np.float64)


def repaint(
    rgb: np.ndarray,
    source_matrix: np.ndarray,
    source_max: np.ndarray,
    target_matrix: np.ndarray,
    target_max: np.ndarray,
) -> np.ndarray:
    """Re-paint ``rgb`` (``(..., 3)`` uint8) with the target stains (paper Eqs. 17–18)."""
    shape = np.shape(rgb)
    conc = concentrations(rgb_to_od(rgb), source_matrix)
    scale = np.asarray(target_max, dtype=np.float32) / np.maximum(np.asarray(source_max, np.float32), 1e-6)
    od = (conc * scale) @ np.asarray(target_matrix, dtype=np.float32)
    return od_to_rgb(od).reshape(shape)


def lab_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel CIELAB mean and standard deviation of RGB pixels ``(n, 3)``."""
    from skimage.color import rgb2lab

    lab = rgb2lab(np.asarray(pixels).reshape(-1, 1, 3)).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def reinhard(
    rgb: np.ndarray,
    source_mean: np.ndarray,
    source_std: np.ndarray,
    target_mean: np.ndarray,
    target_std: np.ndarray,
) -> np.ndarray:
    """Reinhard et al. (2001) colour transfer: match CIELAB mean and std channel by channel."""
    from skimage.color import lab2rgb, rgb2lab

    shape = np.shape(rgb)
    lab = rgb2lab(np.asarray(rgb).reshape(-1, 1, 3))
    lab = (lab - source_mean) / np.maximum(source_std, 1e-6) * target_std + target_mean
    out = lab2rgb(lab) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(shape)
