"""Procedural H&E rendering for :func:`bitro.datasets.synthetic_tissue`.

Everything here is vectorised numpy / scipy: smooth random fields are drawn on a coarse
grid and interpolated separably (two small matrix products), nuclei are placed with a
hard-core (minimum spacing) process and drawn as batches of small stamps, and the image
is composed in optical density (Beer–Lambert) from hematoxylin and eosin stain vectors.

Pixel convention: pixel ``(row, col)`` has its centre at ``(x=col, y=row)``, as in
:func:`skimage.measure.regionprops`; centroids, polygons and spot centres use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse

# Stain optical-density vectors (unit length), order R, G, B.
HEMATOXYLIN = np.array([0.650, 0.704, 0.286])
EOSIN = np.array([0.12, 0.88, 0.46])
GRID_UM = 10.0
"""Spacing of the coarse grid on which the smooth random fields are drawn (µm)."""
FINE_GRID_UM = 2.0
"""Spacing of the finer grid used for fibre breaks and cell bodies (µm)."""
GAP_UM = 1.5
"""Minimum distance between the outlines of two neighbouring nuclei (µm, conservative)."""
N_VERTICES = 32
"""Vertices of each nucleus polygon."""
OVERSAMPLE = 2.5
"""Candidate nuclei drawn per target nucleus before the minimum-spacing thinning."""
DOMAIN_SIZE_UM = 110.0
"""Default correlation length of the cell-type domain fields (µm)."""
DOMAIN_SHARPNESS = 3.0
"""Gain of the softmax that turns the domain fields into type probabilities at the default mixing."""
MIXING = 0.06
"""Default share of cells whose type ignores the domains (drawn uniformly over the types)."""


@dataclass(frozen=True)
class CellTypeStyle:
    """Appearance and abundance of one synthetic cell type (sizes in µm)."""

    name: str
    diameter_um: float  # mean long-axis diameter of the nucleus
    elongation: float  # long / short axis
    size_cv: float  # coefficient of variation of the diameter
    irregularity: float  # amplitude of the outline's 2nd/3rd harmonics
    darkness: float  # hematoxylin optical density of the nucleus
    hue: tuple[float, float, float]  # hematoxylin OD direction of this type (R, G, B)
    vesicular: float  # 0 = solid, 1 = pale centre with a dark rim
    nucleolus: float  # probability of a visible nucleolus
    granularity: float  # chromatin texture amplitude
    density_per_mm2: float  # nuclei per mm² of tissue in this type's domain
    cytoplasm: float  # eosin/amphophilic optical density of the cell body around the nucleus
    stroma: float  # weight of fibrous stroma in this type's domain
    align: float  # 0 = random orientation, 1 = aligned with the stroma fibres


ARCHETYPES: tuple[CellTypeStyle, ...] = (
    CellTypeStyle(
        "tumour", 11.0, 1.3, 0.15, 0.08, 0.55, (0.58, 0.76, 0.30), 0.75, 0.85, 0.25, 7500, 0.30, 0.1, 0.0
    ),
    CellTypeStyle(
        "lymphocyte", 6.5, 1.08, 0.08, 0.03, 1.30, (0.70, 0.68, 0.22), 0.0, 0.0, 0.08, 9000, 0.03, 0.3, 0.0
    ),
    CellTypeStyle(
        "fibroblast", 13.0, 3.4, 0.15, 0.04, 0.85, (0.65, 0.70, 0.29), 0.1, 0.0, 0.12, 1500, 0.0, 1.0, 1.0
    ),
    CellTypeStyle(
        "macrophage", 10.0, 1.5, 0.12, 0.16, 0.62, (0.62, 0.72, 0.31), 0.3, 0.2, 0.40, 3000, 0.45, 0.4, 0.0
    ),
    CellTypeStyle(
        "plasma", 7.5, 1.25, 0.10, 0.05, 0.95, (0.66, 0.71, 0.24), 0.45, 0.1, 0.55, 5500, 0.40, 0.3, 0.0
    ),
    CellTypeStyle(
        "endothelial", 11.0, 2.6, 0.12, 0.05, 1.05, (0.67, 0.69, 0.27), 0.05, 0.0, 0.10, 1400, 0.05, 0.6, 0.6
    ),
)


def cell_type_styles(n_types: int, rng: np.random.Generator) -> list[CellTypeStyle]:
    """The first ``n_types`` archetypes, completed by random styles drawn from ``rng``."""
    styles = list(ARCHETYPES[:n_types])
    for k in range(len(styles), n_types):
        hue = HEMATOXYLIN + rng.normal(0, 0.05, 3)
        styles.append(
            CellTypeStyle(
                name=f"type{k}",
                diameter_um=float(rng.uniform(6.0, 12.0)),
                elongation=float(rng.uniform(1.0, 2.5)),
                size_cv=0.12,
                irregularity=float(rng.uniform(0.02, 0.15)),
                darkness=float(rng.uniform(0.5, 1.3)),
                hue=tuple(float(v) for v in hue / np.linalg.norm(hue)),
                vesicular=float(rng.uniform(0, 0.7)),
                nucleolus=float(rng.uniform(0, 0.6)),
                granularity=float(rng.uniform(0.05, 0.5)),
                density_per_mm2=float(rng.uniform(1500, 5000)),
                cytoplasm=float(rng.uniform(0, 0.4)),
                stroma=float(rng.uniform(0, 1)),
                align=float(rng.uniform(0, 1) > 0.5),
            )
        )
    return styles


# --------------------------------------------------------------------------- smooth fields


class Grid:
    """Grid of smooth random fields (node spacing ``step_um``) covering an ``height × width`` px image.

    Node ``(i, j)`` sits at pixel ``(x, y) = (j, i) * step_px - 0.5``.
    """

    def __init__(self, height: int, width: int, mpp: float, step_um: float = GRID_UM) -> None:
        self.shape_px = (height, width)
        self.step_um = step_um
        self.step_px = step_um / mpp
        self.shape = (int(np.ceil(height / self.step_px)) + 2, int(np.ceil(width / self.step_px)) + 2)
        self.mpp = mpp
        self._iy = self._interp(height, self.shape[0])
        self._ix = self._interp(width, self.shape[1])

    def field(self, rng: np.random.Generator, scale_um: float) -> np.ndarray:
        """Gaussian random field (mean 0, sd 1) with correlation length ``scale_um``."""
        sigma = scale_um / self.step_um
        pad = int(np.ceil(3 * sigma))
        noise = rng.standard_normal((self.shape[0] + 2 * pad, self.shape[1] + 2 * pad), dtype=np.float32)
        smooth = ndimage.gaussian_filter(noise, sigma, mode="wrap")[
            pad : pad + self.shape[0], pad : pad + self.shape[1]
        ]
        return (smooth - smooth.mean()) / max(float(smooth.std()), 1e-12)

    def _interp(self, n_px: int, n_grid: int) -> tuple[np.ndarray, np.ndarray]:
        pos = (np.arange(n_px) + 0.5) / self.step_px
        lo = np.clip(np.floor(pos).astype(np.int64), 0, n_grid - 2)
        return lo, (pos - lo).astype(np.float32)

    def upsample(self, field: np.ndarray) -> np.ndarray:
        """Bilinear interpolation of a grid field to full resolution (float32 ``height × width``)."""
        field = np.asarray(field, dtype=np.float32)
        (ly, fy), (lx, fx) = self._iy, self._ix
        rows = field[ly] * (1 - fy)[:, None] + field[ly + 1] * fy[:, None]  # (H, gw)
        out = rows[:, lx]
        out *= 1 - fx
        out += rows[:, lx + 1] * fx
        return out

    def splat(self, xy: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Sum of ``weights`` per grid cell nearest to each position ``xy`` (density on the grid)."""
        i = np.clip(np.round((xy[:, 1] + 0.5) / self.step_px).astype(np.int64), 0, self.shape[0] - 1)
        j = np.clip(np.round((xy[:, 0] + 0.5) / self.step_px).astype(np.int64), 0, self.shape[1] - 1)
        flat = np.bincount(i * self.shape[1] + j, weights=weights, minlength=self.shape[0] * self.shape[1])
        return flat.reshape(self.shape)

    def sample(self, field: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Bilinear value of a coarse field at pixel positions ``xy`` (n × 2, x then y)."""
        coords = [(xy[:, 1] + 0.5) / self.step_px, (xy[:, 0] + 0.5) / self.step_px]
        return ndimage.map_coordinates(field, coords, order=1, mode="nearest")

    def gradient(self, field: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Gradient (d/dx, d/dy per pixel) of a coarse field at ``xy``."""
        gy, gx = np.gradient(field)
        return np.column_stack([self.sample(gx, xy), self.sample(gy, xy)]) / self.step_px


# --------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Smooth fields of one slide (coarse grid) and the derived per-pixel maps."""

    grid: Grid
    type_prob: np.ndarray  # (n_types, gh, gw) probability of each type
    tissue: np.ndarray  # (H, W) float32 in [0, 1], 0 = glass
    fibre_warp: np.ndarray  # (gh, gw) phase warp of the stroma fibres (radians)
    fibre_angle: float  # mean fibre direction (radians)
    fibre_period_px: float
    programs: np.ndarray  # (n_programs, gh, gw) spatial expression programs (sd 1)
    glass_fraction: float
    type_weights: np.ndarray  # (n_types,) the slide's composition weights (all 1 without composition_sd)


def make_layout(
    rng: np.random.Generator,
    height: int,
    width: int,
    mpp: float,
    styles: list[CellTypeStyle],
    n_programs: int,
    *,
    domain_size_um: float = DOMAIN_SIZE_UM,
    mixing: float = MIXING,
    composition_sd: float = 0.0,
) -> Layout:
    """Draw the domain, tissue, fibre and expression-program fields of one slide.

    Each type has a smooth random score field of correlation length ``domain_size_um``; the type
    probability at a point is ``(1 - mixing) * softmax(gain * scores) + mixing / T`` with
    ``gain = DOMAIN_SHARPNESS * sqrt(MIXING / mixing)``: ``mixing`` is the share of cells whose type is
    drawn regardless of the domain, and less mixing also makes the domains purer (at ``mixing = 0``
    the type with the highest score takes the whole domain). With ``composition_sd > 0`` the slide
    draws one log weight per type, normal with that standard deviation, after all other fields, and
    the type probabilities everywhere are multiplied by the weights and renormalised: slides then
    differ in their cell-type composition (at 0 nothing is drawn and the slide is unchanged).
    """
    grid = Grid(height, width, mpp)
    scores = np.stack([grid.field(rng, domain_size_um) for _ in styles])
    if mixing > 0:
        logits = DOMAIN_SHARPNESS * float(np.sqrt(MIXING / mixing)) * scores
        logits -= logits.max(axis=0, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=0, keepdims=True)
    else:
        prob = (scores == scores.max(axis=0, keepdims=True)).astype(scores.dtype)
    prob = (1.0 - mixing) * prob + mixing / len(styles)

    glass_fraction = float(rng.uniform(0.05, 0.2))
    tissue_field = grid.field(rng, 120.0) + 0.25 * grid.field(rng, 25.0)
    cut = float(np.quantile(tissue_field, glass_fraction))
    tissue_coarse = np.clip((tissue_field - cut) / 0.15 + 0.5, 0.0, 1.0)
    tissue = np.clip(grid.upsample(tissue_coarse), 0.0, 1.0)

    period_px = 7.0 / mpp
    warp = grid.field(rng, 70.0) * float(rng.uniform(6.0, 12.0))
    programs = np.stack([grid.field(rng, 160.0) for _ in range(n_programs)]) if n_programs else np.zeros((0,))
    type_weights = np.ones(len(styles))
    # drawn last, so composition_sd = 0 leaves every other field of the slide as it was
    if composition_sd > 0:
        type_weights = np.exp(rng.normal(0.0, composition_sd, len(styles)))
        prob = prob * type_weights[:, None, None]
        prob /= prob.sum(axis=0, keepdims=True)
    return Layout(
        grid=grid,
        type_prob=prob,
        tissue=tissue.astype(np.float32),
        fibre_warp=warp,
        fibre_angle=float(rng.uniform(0, np.pi)),
        fibre_period_px=period_px,
        programs=programs,
        glass_fraction=glass_fraction,
        type_weights=type_weights,
    )


@dataclass
class Nuclei:
    """Placed nuclei: centres (x, y px), type codes and shape parameters (px, radians)."""

    xy: np.ndarray
    cell_type: np.ndarray
    semi_major: np.ndarray
    semi_minor: np.ndarray
    angle: np.ndarray
    harmonics: np.ndarray  # (n, 2) amplitudes of the 2nd and 3rd harmonics of the outline
    phases: np.ndarray  # (n, 2)
    darkness: np.ndarray
    nucleolus: np.ndarray  # (n, 3): offset x, y in units of the semi-axes, and strength (0 = none)

    def take(self, keep: np.ndarray) -> Nuclei:
        """Subset of the nuclei (boolean mask or index array)."""
        return Nuclei(**{k: v[keep] for k, v in self.__dict__.items()})

    @property
    def max_radius(self) -> np.ndarray:
        """Radius (px) of the disc that surely contains each nucleus."""
        return self.semi_major * (1.0 + np.abs(self.harmonics).sum(axis=1))


def _fibre_direction(layout: Layout, xy: np.ndarray) -> np.ndarray:
    """Local direction (radians) of the stroma fibres at ``xy``: perpendicular to the phase gradient."""
    k = 2 * np.pi / layout.fibre_period_px
    grad = layout.grid.gradient(layout.fibre_warp, xy)
    grad[:, 0] += k * np.cos(layout.fibre_angle)
    grad[:, 1] += k * np.sin(layout.fibre_angle)
    return np.arctan2(grad[:, 1], grad[:, 0]) + np.pi / 2


def _independent_set(pairs: np.ndarray, n: int, priority: np.ndarray) -> np.ndarray:
    """Greedy maximal independent set of a conflict graph in ``priority`` order (high first).

    Luby-style rounds, each vectorised: a node whose live neighbours all have lower priority
    is kept and its neighbours are removed. The result equals sequential greedy acceptance.
    """
    alive = np.ones(n, dtype=bool)
    keep = np.zeros(n, dtype=bool)
    i, j = pairs[:, 0], pairs[:, 1]
    while alive.any():
        live = alive[i] & alive[j]
        li, lj = i[live], j[live]
        loser = np.where(priority[li] < priority[lj], li, lj)
        beaten = np.zeros(n, dtype=bool)
        beaten[loser] = True
        winners = alive & ~beaten
        keep |= winners
        alive &= ~winners
        alive[lj[winners[li]]] = False
        alive[li[winners[lj]]] = False
        i, j = li, lj
    return keep


def place_nuclei(rng: np.random.Generator, layout: Layout, styles: list[CellTypeStyle]) -> Nuclei:
    """Place nuclei with type-dependent density and a minimum spacing between outlines."""
    from scipy.spatial import cKDTree

    height, width = layout.tissue.shape
    mpp = layout.grid.mpp
    density = np.array([s.density_per_mm2 for s in styles]) * (mpp * 1e-3) ** 2  # per px²
    lam = OVERSAMPLE * float(density.max())
    max_r = max(s.diameter_um / 2 * (1 + 2 * s.irregularity) * (1 + 2 * s.size_cv) for s in styles) / mpp
    margin = float(np.ceil(max_r)) + 2.0
    span_x, span_y = width - 1 - 2 * margin, height - 1 - 2 * margin
    span_x, span_y = max(span_x, 0.0), max(span_y, 0.0)
    n_cand = int(rng.poisson(lam * span_x * span_y))
    xy = np.column_stack(
        [rng.uniform(margin, margin + span_x, n_cand), rng.uniform(margin, margin + span_y, n_cand)]
    )
    prob = np.stack([layout.grid.sample(p, xy) for p in layout.type_prob], axis=1)
    cum = np.cumsum(prob / prob.sum(axis=1, keepdims=True), axis=1)
    ctype = np.minimum((cum < rng.uniform(size=(n_cand, 1))).sum(axis=1), len(styles) - 1)
    tissue = layout.tissue[np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)]
    accept = rng.uniform(size=n_cand) < OVERSAMPLE * density[ctype] / lam * (tissue > 0.5)
    xy, ctype = xy[accept], ctype[accept]
    if not len(xy):  # tiny image: keep one nucleus at the centre so that every table has a row
        xy = np.array([[(width - 1) / 2, (height - 1) / 2]])
        ctype = np.array([int(np.argmax([layout.grid.sample(p, xy)[0] for p in layout.type_prob]))])
    nuclei = _shapes(rng, xy, ctype, styles, layout)

    # hard core: drop nuclei whose outline would come closer than GAP_UM to a neighbour's
    radius = nuclei.max_radius
    gap = GAP_UM / mpp
    tree = cKDTree(nuclei.xy)
    pairs = tree.query_pairs(2 * float(radius.max(initial=0)) + gap, output_type="ndarray")
    if len(pairs):
        dist = np.hypot(*(nuclei.xy[pairs[:, 0]] - nuclei.xy[pairs[:, 1]]).T)
        pairs = pairs[dist < radius[pairs[:, 0]] + radius[pairs[:, 1]] + gap]
    keep = _independent_set(pairs.reshape(-1, 2), len(radius), rng.permutation(len(radius)))
    return nuclei.take(keep)


def _shapes(
    rng: np.random.Generator, xy: np.ndarray, ctype: np.ndarray, styles: list[CellTypeStyle], layout: Layout
) -> Nuclei:
    """Draw size, elongation, orientation, outline and chromatin of each nucleus from its type."""
    n = len(xy)
    mpp = layout.grid.mpp

    def col(attr: str) -> np.ndarray:
        return np.array([getattr(s, attr) for s in styles], dtype=float)[ctype]

    diameter = col("diameter_um") * np.clip(1 + col("size_cv") * rng.standard_normal(n), 0.6, 1.5)
    elong = np.maximum(col("elongation") * np.exp(0.1 * rng.standard_normal(n)), 1.0)
    semi_major = diameter / 2 / mpp
    semi_minor = semi_major / elong
    align = col("align")
    angle = np.where(rng.uniform(size=n) < align, _fibre_direction(layout, xy), rng.uniform(0, np.pi, n))
    angle = angle + 0.15 * rng.standard_normal(n)
    harmonics = col("irregularity")[:, None] * rng.uniform(0.3, 1.0, (n, 2))
    phases = rng.uniform(0, 2 * np.pi, (n, 2))
    darkness = col("darkness") * np.exp(0.08 * rng.standard_normal(n))
    has_nucleolus = rng.uniform(size=n) < col("nucleolus")
    nucleolus = np.column_stack(
        [rng.uniform(-0.35, 0.35, n), rng.uniform(-0.35, 0.35, n), has_nucleolus * rng.uniform(0.8, 1.3, n)]
    )
    return Nuclei(xy, ctype, semi_major, semi_minor, angle, harmonics, phases, darkness, nucleolus)


# --------------------------------------------------------------------------- drawing


def outline_polygons(nuclei: Nuclei) -> np.ndarray:
    """Vertices (n × N_VERTICES × 2, x then y) of each nucleus outline."""
    phi = np.linspace(0, 2 * np.pi, N_VERTICES, endpoint=False)
    s = 1 + (
        nuclei.harmonics[:, :1] * np.cos(2 * phi + nuclei.phases[:, :1])
        + nuclei.harmonics[:, 1:] * np.cos(3 * phi + nuclei.phases[:, 1:])
    )
    u = nuclei.semi_major[:, None] * s * np.cos(phi)
    v = nuclei.semi_minor[:, None] * s * np.sin(phi)
    c, sn = np.cos(nuclei.angle)[:, None], np.sin(nuclei.angle)[:, None]
    x = nuclei.xy[:, :1] + u * c - v * sn
    y = nuclei.xy[:, 1:] + u * sn + v * c
    return np.stack([x, y], axis=2)


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0, 1)
    return t * t * (3 - 2 * t)


def draw_nuclei(
    nuclei: Nuclei, styles: list[CellTypeStyle], shape: tuple[int, int], chromatin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin optical density (3, H, W) and instance labels (H, W, uint32, value = index + 1).

    Nuclei are drawn in batches of equal-sized stamps; the soft (anti-aliased) edge goes
    to the image, the hard outline (normalised radius ≤ 1 at the pixel centre) to the labels.
    """
    height, width = shape
    n_px = height * width
    labels = np.zeros(n_px, dtype=np.uint32)
    hues = np.array([np.asarray(st.hue) / np.linalg.norm(st.hue) for st in styles], dtype=np.float64)
    parts_flat, parts_weight, parts_type = [], [], []
    for t, style in enumerate(styles):
        idx_t = np.flatnonzero(nuclei.cell_type == t)
        if not len(idx_t):
            continue
        half = int(np.ceil(nuclei.max_radius[idx_t].max())) + 2
        oy, ox = np.mgrid[-half : half + 1, -half : half + 1]
        oy, ox = oy.ravel().astype(np.float32), ox.ravel().astype(np.float32)
        batch = max(1, 1_000_000 // len(oy))
        for start in range(0, len(idx_t), batch):
            sel = idx_t[start : start + batch]
            centre = np.round(nuclei.xy[sel]).astype(np.int64)
            off = (nuclei.xy[sel] - centre).astype(np.float32)
            dx, dy = ox[None] - off[:, :1], oy[None] - off[:, 1:]
            c = np.cos(nuclei.angle[sel]).astype(np.float32)[:, None]
            sn = np.sin(nuclei.angle[sel]).astype(np.float32)[:, None]
            a = nuclei.semi_major[sel].astype(np.float32)[:, None]
            b = nuclei.semi_minor[sel].astype(np.float32)[:, None]
            u = (dx * c + dy * sn) / a
            v = (dy * c - dx * sn) / b
            ell = np.hypot(u, v)
            # cheap prefilter: only pixels that can lie inside the (perturbed) outline plus half a pixel
            bound = (1 + nuclei.harmonics[sel].sum(axis=1)[:, None]) * (1 + 0.6 / b)
            cell_i, pix = np.nonzero(ell < bound)
            u, v, ell = u[cell_i, pix], v[cell_i, pix], ell[cell_i, pix]
            glob = sel[cell_i]
            rows = centre[cell_i, 1] + oy[pix].astype(np.int64)
            cols = centre[cell_i, 0] + ox[pix].astype(np.int64)
            phi = np.arctan2(v, u)
            harm, ph = nuclei.harmonics[glob], nuclei.phases[glob]
            scale = 1 + harm[:, 0] * np.cos(2 * phi + ph[:, 0]) + harm[:, 1] * np.cos(3 * phi + ph[:, 1])
            rho = ell / scale
            alpha = np.clip((1 - rho) * b[cell_i, 0] * scale + 0.5, 0, 1)  # ≈ distance to the outline in px
            ok = (alpha > 0) & (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
            rho, alpha, u, v, glob = rho[ok], alpha[ok], u[ok], v[ok], glob[ok]
            flat = rows[ok] * width + cols[ok]
            value = nuclei.darkness[glob] * (1 - style.vesicular * (1 - _smoothstep(0.5, 0.95, rho)))
            value *= np.clip(1 + style.granularity * chromatin[flat], 0.2, 2.5)
            nuc = nuclei.nucleolus[glob]
            d2 = (u - nuc[:, 0]) ** 2 + (v - nuc[:, 1]) ** 2
            value += nuc[:, 2] * nuclei.darkness[glob] * np.exp(-d2 / (2 * 0.12**2))
            parts_flat.append(flat)
            parts_weight.append(alpha * value)
            parts_type.append(np.full(len(flat), t, dtype=np.int64))
            inside = rho <= 1
            labels[flat[inside]] = (glob[inside] + 1).astype(np.uint32)
    od = np.zeros((3, height, width), dtype=np.float32)
    if parts_flat:
        flat, weight, types = (np.concatenate(p) for p in (parts_flat, parts_weight, parts_type))
        for ch in range(3):
            od[ch] = np.bincount(flat, weights=weight * hues[types, ch], minlength=n_px).reshape(
                height, width
            )
    return od, labels.reshape(height, width)


def compose_image(
    rng: np.random.Generator,
    layout: Layout,
    nuclei: Nuclei,
    styles: list[CellTypeStyle],
    nuclei_od: np.ndarray,
    *,
    stain_jitter: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Compose the RGB uint8 ``(3, H, W)`` image from stroma, cytoplasm and nuclei optical density."""
    height, width = layout.tissue.shape
    grid = layout.grid
    mpp = grid.mpp
    fine = Grid(height, width, mpp, step_um=FINE_GRID_UM)
    stroma_w = grid.upsample(np.tensordot(np.array([s.stroma for s in styles]), layout.type_prob, axes=1))

    # wavy collagen fibres: a warped sinusoid, sharpened and broken up by noise
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    k = 2 * np.pi / layout.fibre_period_px
    phase = xx * np.float32(k * np.cos(layout.fibre_angle)) + yy * np.float32(k * np.sin(layout.fibre_angle))
    phase += grid.upsample(layout.fibre_warp)
    fibre = np.sin(phase)
    fibre += 1
    fibre *= 0.5
    fibre *= fibre * fibre  # sharpen: thin bright-pink fibres
    breaks = np.clip(0.5 + 0.35 * fine.upsample(fine.field(rng, 2.5)), 0, 1)
    mottle = ndimage.gaussian_filter(rng.standard_normal((height, width), dtype=np.float32), 0.8 / mpp)
    mottle /= mottle.std() + 1e-6
    eosin = 0.34 - 0.12 * stroma_w + 0.45 * stroma_w * fibre * breaks + 0.04 * mottle

    # cell bodies: blurred nuclei positions, weighted by the type's cytoplasm density
    sigma_um = 4.0
    cyto_w = np.array([s.cytoplasm for s in styles])[nuclei.cell_type] * 2 * np.pi * (sigma_um / mpp) ** 2
    impulses = fine.splat(nuclei.xy, cyto_w) / fine.step_px**2
    cytoplasm = np.minimum(fine.upsample(ndimage.gaussian_filter(impulses, sigma_um / fine.step_um)), 0.8)

    tissue = layout.tissue
    e_scale, h_scale = stain_jitter
    eosin *= tissue * np.float32(e_scale)
    cytoplasm *= tissue * np.float32(e_scale)
    cyto_vec = (0.8 * EOSIN + 0.3 * HEMATOXYLIN).astype(np.float32)
    rgb = np.empty((3, height, width), dtype=np.float32)
    blur = 0.25 / mpp
    for ch in range(3):
        od = eosin * np.float32(EOSIN[ch]) + cytoplasm * cyto_vec[ch] + nuclei_od[ch] * np.float32(h_scale)
        od += np.float32(0.03)
        np.exp(-od, out=od)
        od *= 255.0
        rgb[ch] = ndimage.gaussian_filter(od, blur)
    noise = rng.standard_normal(rgb.shape, dtype=np.float32)
    noise *= 2.5
    rgb += noise
    rgb += 0.5  # round to nearest on the cast below
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8)


def chromatin_noise(rng: np.random.Generator, shape: tuple[int, int], mpp: float) -> np.ndarray:
    """Fine noise (sd 1, correlation ≈ 0.4 µm) that textures the chromatin, flattened."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(0.4 / mpp, 0.5))
    return (noise / (noise.std() + 1e-6)).ravel()


def label_stats(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and centroid (x, y) of labels ``1..n`` of an instance mask."""
    flat = labels.ravel()
    width = labels.shape[1]
    counts = np.bincount(flat, minlength=n + 1)[1:]
    pos = np.flatnonzero(flat)
    lab = flat[pos]
    sx = np.bincount(lab, weights=pos % width, minlength=n + 1)[1:]
    sy = np.bincount(lab, weights=pos // width, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = np.column_stack([sx / counts, sy / counts])
    return counts, centroid


def membership_matrix(codes: np.ndarray, n_rows: int) -> sparse.csr_matrix:
    """Sparse ``n_rows × len(codes)`` 0/1 matrix with a 1 at ``(codes[i], i)`` for ``codes[i] >= 0``."""
    cols = np.flatnonzero(codes >= 0)
    return sparse.csr_matrix(
        (np.ones(len(cols), dtype=np.float32), (codes[cols], cols)), shape=(n_rows, len(codes))
    )
