"""The two towers of contrastive image ↔ expression alignment (HESCAPE-style) and their losses.

- :class:`ProjectionHead`: the MLP every tower ends with, ``Linear → GELU → Dropout → Linear``
  (its ``state_dict`` keys are ``net.0.*`` and ``net.3.*``).
- :class:`CellPoolTower`: the image side. Each cell's feature vector goes through the head; a spot's
  embedding is the **mean of its cells' head outputs**, so the same head applied to single cells
  gives cell embeddings whose spot means are exactly the spot embeddings.
- :class:`GeneTower`: the expression side, a head on a spot's normalised (log1p, z-scored) expression.
- :class:`ClipLoss`: symmetric InfoNCE over the batch (softmax in both directions) with a learnable
  temperature; :class:`SigLipLoss`: the pairwise sigmoid loss with a learnable temperature and bias.

Pure torch: nothing here knows about AnnData or SpatialData.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("clip", "siglip")


class ProjectionHead(nn.Module):
    """``Linear(in_dim, hidden_dim) → GELU → Dropout → Linear(hidden_dim, out_dim)``.

    Parameters
    ----------
    in_dim, hidden_dim, out_dim
        Widths of the input, the hidden layer and the output.
    dropout
        Dropout after the activation (training only).

    Notes
    -----
    Maps inputs of shape ``(*, in_dim)`` to ``(*, out_dim)``, not normalised (the losses normalise).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim, self.dropout = in_dim, hidden_dim, out_dim, dropout
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x``."""
        return self.net(x)

    def extra_repr(self) -> str:
        return f"{self.in_dim} → {self.hidden_dim} → {self.out_dim}, dropout={self.dropout}"


def segment_mean(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mean of the rows of ``values`` ``(n, d)`` per segment id ``segment`` ``(n,)`` → ``(n_segments, d)``.

    A segment without rows gives zeros.
    """
    sums = values.new_zeros((n_segments, values.shape[1])).index_add_(0, segment, values)
    counts = torch.bincount(segment, minlength=n_segments).clamp_min(1).to(values.dtype)
    return sums / counts[:, None]


class CellPoolTower(nn.Module):
    """Image tower on cell features: a head per cell, then the mean per spot.

    Parameters
    ----------
    in_dim
        Width of a cell's feature vector (e.g. its projected embedding).
    hidden_dim, out_dim, dropout
        Of the :class:`ProjectionHead`.

    Notes
    -----
    :meth:`forward` takes cells of shape ``(n_cells, in_dim)`` and ``segment`` of shape ``(n_cells,)``
    (each cell's spot, in ``[0, n_spots)``) and returns ``(n_spots, out_dim)``; :meth:`cells` maps
    ``(n_cells, in_dim)`` to ``(n_cells, out_dim)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.head = ProjectionHead(in_dim, hidden_dim, out_dim, dropout)

    def cells(self, x: torch.Tensor) -> torch.Tensor:
        """Aligned embedding of each cell (before pooling)."""
        return self.head(x)

    def forward(self, x: torch.Tensor, segment: torch.Tensor, n_spots: int) -> torch.Tensor:
        """Spot embeddings: the mean of the head outputs of each spot's cells."""
        return segment_mean(self.head(x), segment, n_spots)


class GeneTower(nn.Module):
    """Expression tower: a :class:`ProjectionHead` on normalised spot expression ``(n_spots, n_genes)``."""

    def __init__(self, n_genes: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.head = ProjectionHead(n_genes, hidden_dim, out_dim, dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(n_spots, n_genes) → (n_spots, out_dim)``."""
        return self.head(z)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP): cross-entropy of the matching pair, image→expression and back.

    Parameters
    ----------
    temperature
        Initial softmax temperature; learnt as ``log(1 / temperature)``, clamped to at most 100.

    Shapes
    ------
    ``a``, ``b``: ``(n, d)`` paired embeddings (row ``i`` of each is one spot) → scalar.
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(n, n)`` scaled cosine similarities."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean of the two cross-entropies."""
        logits = self.logits(a, b)
        target = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): every pair is a binary "same spot?" decision.

    Parameters
    ----------
    temperature
        Initial temperature (learnt as ``log(1 / temperature)``; SigLIP starts at 0.1).
    bias
        Initial logit bias (SigLIP: −10, so that the many negative pairs start near probability 0).

    Shapes
    ------
    ``a``, ``b``: ``(n, d)`` → scalar (the summed pair losses divided by ``n``).
    """

    def __init__(self, temperature: float = 0.1, bias: float = -10.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``−Σ log σ(label · (s · cos + bias)) / n`` with label +1 on the diagonal, −1 elsewhere."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T + self.bias
        labels = 2.0 * torch.eye(len(a), device=a.device, dtype=logits.dtype) - 1.0
        return -F.logsigmoid(labels * logits).sum() / len(a)


def contrastive_loss(kind: str, temperature: float) -> nn.Module:
    """The loss module named ``kind`` (``"clip"`` or ``"siglip"``) with initial ``temperature``."""
    if kind == "clip":
        return ClipLoss(temperature)
    if kind == "siglip":
        return SigLipLoss(temperature)
    msg = f"Unknown contrastive loss {kind!r}; choose one of {LOSSES}."
    raise ValueError(msg)


class AlignmentNet(nn.Module):
    """The image tower, the gene tower and the loss, trained together.

    Parameters
    ----------
    image
        A :class:`CellPoolTower` (or any module ``(cells, segment, n_spots) → (n_spots, d)``).
    gene
        A :class:`GeneTower`.
    loss
        :class:`ClipLoss` or :class:`SigLipLoss`.
    """

    def __init__(self, image: nn.Module, gene: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.image, self.gene, self.loss = image, gene, loss

    def forward(self, cells: torch.Tensor, segment: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of ``len(expression)`` paired spots."""
        return self.loss(self.image(cells, segment, len(expression)), self.gene(expression))
