"""Masked graph contrastive learning for :class:`~bitro.models.SpaHGCNet` (BGRL-style, two views).

Two views of a heterogeneous graph are made by hiding feature columns and dropping edges:

- :func:`complementary_masks`: per node type, two column masks that hide *disjoint* sets of
  ``round(ratio · F)`` columns (a column hidden in one view is visible in the other); the ratio is
  low on target nodes and high on reference nodes (``SpaHGCConfig.target_mask_ratio`` /
  ``reference_mask_ratio``).
- :func:`drop_edges`: each view keeps every edge with probability ``1 − edge_drop``, independently.

:class:`MaskedGraphContrast` holds the *target* encoder (a frozen copy of the online encoder, updated
as an exponential moving average) and one predictor MLP per node type. Its :meth:`~MaskedGraphContrast.loss`
encodes view A with the online encoder and predictor and view B with the target encoder (no gradient),
and the other way round, and returns ``2 − 2 cos`` averaged over nodes, per node type.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bitro.models._spahgc import EXEMPLAR_EDGE, REFERENCE, TARGET
from bitro.models._spahgc_config import SpaHGCConfig


def complementary_masks(
    n_features: int, ratio: float, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two boolean ``(F,)`` *keep* masks hiding disjoint sets of ``round(ratio · F)`` columns each.

    ``ratio`` must be in ``[0, 0.5]`` (at 0.5 the masks are exact complements). Uses torch's global
    random generator.
    """
    if not 0 <= ratio <= 0.5:
        msg = f"ratio must be in [0, 0.5] for two disjoint masks, got {ratio!r}."
        raise ValueError(msg)
    n_hide = round(ratio * n_features)
    perm = torch.randperm(n_features, device=device)
    keep_a = torch.ones(n_features, dtype=torch.bool, device=device)
    keep_b = keep_a.clone()
    keep_a[perm[:n_hide]] = False
    keep_b[perm[n_hide : 2 * n_hide]] = False
    return keep_a, keep_b


def drop_edges(edge_index: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each of the ``(2, E)`` edges with probability ``1 − p``; returns ``(kept edges, kept mask)``."""
    if not 0 <= p < 1:
        msg = f"edge drop probability must be in [0, 1), got {p!r}."
        raise ValueError(msg)
    keep = torch.rand(edge_index.size(1), device=edge_index.device) >= p
    return edge_index[:, keep], keep


def _predictor(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.PReLU(), nn.Linear(d, d))


def _cosine_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    if p.size(0) == 0:
        return p.new_zeros(())
    cos = nn.functional.cosine_similarity(p, z.detach(), dim=-1)
    return (2 - 2 * cos).mean()


class MaskedGraphContrast(nn.Module):
    """Online/target encoders and the two-view BGRL loss on target and reference nodes.

    Parameters
    ----------
    encoder
        The online encoder (e.g. ``SpaHGCNet.encoder``); a frozen copy becomes the target encoder.
    config
        :class:`~bitro.models.SpaHGCConfig` (mask ratios, edge drop, EMA decay, loss weights).

    Notes
    -----
    Only the predictors are parameters of this module that the optimiser should see (the target
    encoder's weights have ``requires_grad=False``); call :meth:`update` after every optimiser step.
    """

    def __init__(self, encoder: nn.Module, config: SpaHGCConfig) -> None:
        super().__init__()
        self.config = config
        self.target_encoder = copy.deepcopy(encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        types = (TARGET, REFERENCE) if config.use_exemplars else (TARGET,)
        self.predictors = nn.ModuleDict({t: _predictor(config.hidden_dim) for t in types})

    @torch.no_grad()
    def update(self, encoder: nn.Module) -> None:
        """Move the target encoder towards ``encoder``: ``ξ ← τ ξ + (1 − τ) θ``."""
        tau = self.config.ema_decay
        for xi, theta in zip(self.target_encoder.parameters(), encoder.parameters(), strict=True):
            xi.mul_(tau).add_(theta.detach(), alpha=1 - tau)

    def views(
        self,
        x_dict: dict[str, torch.Tensor],
        edge_index_dict: dict[tuple[str, str, str], torch.Tensor],
        similarity: torch.Tensor | None = None,
    ) -> list[tuple[dict, dict, torch.Tensor | None]]:
        """Two ``(x_dict, edge_index_dict, similarity)`` views with complementary masks and dropped edges."""
        ratios = {TARGET: self.config.target_mask_ratio, REFERENCE: self.config.reference_mask_ratio}
        masks = {t: complementary_masks(x.size(1), ratios[t], device=x.device) for t, x in x_dict.items()}
        out = []
        for v in range(2):
            xs = {t: x * masks[t][v].to(x.dtype) for t, x in x_dict.items()}
            edges, sim = {}, similarity
            for e, ei in edge_index_dict.items():
                edges[e], keep = drop_edges(ei, self.config.edge_drop)
                if e == EXEMPLAR_EDGE and similarity is not None:
                    sim = similarity[keep]
            out.append((xs, edges, sim))
        return out

    def loss(
        self,
        encoder: nn.Module,
        x_dict: dict[str, torch.Tensor],
        edge_index_dict: dict[tuple[str, str, str], torch.Tensor],
        similarity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted symmetric BGRL loss of two views; returns ``(loss, {node type: its loss})``."""
        (xa, ea, sa), (xb, eb, sb) = self.views(x_dict, edge_index_dict, similarity)
        online_a, online_b = encoder(xa, ea, sa), encoder(xb, eb, sb)
        self.target_encoder.train(encoder.training)
        with torch.no_grad():
            target_a, target_b = self.target_encoder(xa, ea, sa), self.target_encoder(xb, eb, sb)
        weights = {
            TARGET: self.config.target_contrast_weight,
            REFERENCE: self.config.reference_contrast_weight,
        }
        total = x_dict[TARGET].new_zeros(())
        parts: dict[str, float] = {}
        for t, pred in self.predictors.items():
            if weights[t] == 0 or t not in online_a:
                continue
            term = _cosine_loss(pred(online_a[t]), target_b[t]) + _cosine_loss(pred(online_b[t]), target_a[t])
            parts[t] = float(term.detach())
            total = total + weights[t] * term
        return total, parts
