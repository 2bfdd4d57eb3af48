"""Target transforms: counts → log1p (raw or library-size normalised) → per-gene z-score, and back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Scale = Literal["raw", "library_size"]
SCALES = ("raw", "library_size")
MIN_STD = 1e-3
#: Largest log1p value turned back into counts (e^20 ≈ 5·10^8 molecules in one unit): a numeric guard
#: against overflow of ``expm1`` for wildly extrapolated predictions, far outside any real spot.
MAX_LOG1P = 20.0


def dense(x: Any) -> np.ndarray:
    """Dense float64 copy of a (possibly sparse) matrix."""
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def log1p_scale(counts: np.ndarray, scale: Scale, target_sum: float | None) -> np.ndarray:
    """``log1p`` of raw counts, or of counts rescaled so each row sums to ``target_sum``."""
    counts = np.asarray(counts, dtype=np.float64)
    if scale == "raw":
        return np.log1p(counts)
    if scale == "library_size":
        if target_sum is None:
            msg = "target_sum is required for the library_size scale."
            raise ValueError(msg)
        total = counts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            normed = np.where(total > 0, counts / total * target_sum, 0.0)
        return np.log1p(normed)
    msg = f"Unknown target scale {scale!r}; choose one of {SCALES}."
    raise ValueError(msg)


@dataclass(frozen=True)
class TargetTransform:
    """Per-gene z-scoring of log1p expression with training statistics (paper Eq. 21).

    Attributes
    ----------
    genes
        Gene names, in model order.
    scale
        ``"raw"`` (log1p of raw counts, the paper's convention) or ``"library_size"``.
    target_sum
        Library size that counts are rescaled to on the ``library_size`` scale.
    mean, std
        Per-gene mean and standard deviation of the log1p targets on the training units (0 and 1
        when ``zscore`` is off).
    zscore
        Whether targets are z-scored per gene (paper Eq. 21) or used as log1p values directly.
    """

    genes: tuple[str, ...]
    scale: str
    target_sum: float | None
    mean: np.ndarray
    std: np.ndarray
    zscore: bool = True

    @classmethod
    def fit(
        cls, counts: np.ndarray, genes: list[str], *, scale: Scale = "raw", zscore: bool = True
    ) -> TargetTransform:
        """Fit the statistics on training counts ``(units, genes)``.

        With ``zscore=False`` the network learns log1p values directly (mean 0, std 1): the ablation
        of the paper's per-gene standardisation.
        """
        if scale not in SCALES:
            msg = f"Unknown target scale {scale!r}; choose one of {SCALES}."
            raise ValueError(msg)
        if not isinstance(zscore, bool):
            msg = f"zscore must be True or False, got {zscore!r}."
            raise ValueError(msg)
        counts = np.asarray(counts, dtype=np.float64)
        target_sum = float(np.median(counts.sum(axis=1))) if scale == "library_size" else None
        if not zscore:
            ones = np.ones(counts.shape[1])
            return cls(tuple(genes), scale, target_sum, np.zeros_like(ones), ones, zscore=False)
        logx = log1p_scale(counts, scale, target_sum)
        std = np.maximum(logx.std(axis=0), MIN_STD)
        return cls(tuple(genes), scale, target_sum, logx.mean(axis=0), std)

    def encode(self, counts: np.ndarray) -> np.ndarray:
        """Counts → z-scores (float32)."""
        return ((log1p_scale(counts, self.scale, self.target_sum) - self.mean) / self.std).astype(np.float32)

    def to_log1p(self, z: np.ndarray) -> np.ndarray:
        """z-scores → log1p expression on this transform's scale (clipped at 0: counts are non-negative)."""
        return np.maximum(np.asarray(z, dtype=np.float64) * self.std + self.mean, 0.0)

    def to_counts(self, z: np.ndarray) -> np.ndarray:
        """z-scores → expression in count space (``expm1``; non-negative; log1p capped at :data:`MAX_LOG1P`)."""
        return np.clip(np.expm1(np.minimum(self.to_log1p(z), MAX_LOG1P)), 0.0, None)

    def to_counts_torch(self, z: Any) -> Any:
        """z-scores → count space on a torch tensor, differentiably (the values of :meth:`to_counts`)."""
        import torch

        mean = torch.as_tensor(self.mean, dtype=z.dtype, device=z.device)
        std = torch.as_tensor(self.std, dtype=z.dtype, device=z.device)
        return torch.clamp(torch.expm1(z * std + mean), min=0.0)

    def encode_torch(self, counts: Any) -> Any:
        """Counts → z-scores on a torch tensor, differentiably (the values of :meth:`encode`)."""
        import torch

        if self.scale == "library_size":
            total = counts.sum(dim=1, keepdim=True).clamp_min(1e-12)
            counts = counts / total * self.target_sum
        mean = torch.as_tensor(self.mean, dtype=counts.dtype, device=counts.device)
        std = torch.as_tensor(self.std, dtype=counts.dtype, device=counts.device)
        return (torch.log1p(counts) - mean) / std

    def arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store in safetensors."""
        return {"target_mean": self.mean.astype(np.float64), "target_std": self.std.astype(np.float64)}

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable metadata."""
        return {
            "genes": list(self.genes),
            "scale": self.scale,
            "target_sum": self.target_sum,
            "zscore": self.zscore,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> TargetTransform:
        """Rebuild from :meth:`arrays` and :meth:`meta`."""
        return cls(
            tuple(meta["genes"]),
            meta["scale"],
            meta["target_sum"],
            arrays["target_mean"],
            arrays["target_std"],
            zscore=bool(meta.get("zscore", True)),
        )
