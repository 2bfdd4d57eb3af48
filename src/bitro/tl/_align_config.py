"""Options of contrastive image ↔ expression alignment (``bt.tl.align_encoder``), declared once.

:class:`AlignConfig` holds what only the alignment needs (which image tower, which loss, the tower
widths). The rest comes from the shared option sets: :class:`~bitro.tl.SetupConfig` (``use_rep``,
``n_components`` of the cell-feature PCA, ``seed``, table keys) and :class:`~bitro.tl.TrainConfig`
(the loop: epochs, learning rate, batch size = spots per step, patience, validation share, device),
with alignment defaults in :data:`TRAIN_DEFAULTS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitro.tl._configs import _check_float, _check_int, _opt, _Options

#: Image towers: ``"features"`` projects the cells' existing ``obsm`` embedding. (Fine-tuning a CNN on
#: cell crops, ``"efficientnet_lite0"``, is planned: issue 14.)
ENCODERS = ("features",)
LOSSES = ("clip", "siglip")
#: TrainConfig values of the alignment loop unless given (many small steps; contrastive batches want
#: many negatives, so more spots per step than BiTro's bags).
TRAIN_DEFAULTS = {"max_epochs": 100, "batch_size": 128, "patience": 10, "validation_fraction": 0.15}


@dataclass(frozen=True)
class AlignConfig(_Options):
    """Which towers and which loss align image and expression.

    Parameters
    ----------
    encoder
        ``"features"`` (the only tower so far): an MLP over the cells' existing embedding
        ``cells.obsm[use_rep]`` (PCA-projected), applied per cell and averaged per spot; saved folders
        are applied with :func:`bitro.tl.apply_alignment`.
    loss
        ``"clip"`` (symmetric InfoNCE, softmax over the batch) or ``"siglip"`` (pairwise sigmoid).
    embed_dim
        Width of the shared aligned space.
    hidden_dim
        Hidden width of both towers' MLPs.
    dropout
        Dropout inside both MLPs (training only).
    temperature
        Initial temperature of the loss (learnt).
    """

    encoder: str = _opt("features", "image tower: features", choices=ENCODERS)
    loss: str = _opt("clip", "contrastive loss: clip or siglip", choices=LOSSES)
    embed_dim: int = _opt(64, "width of the aligned space")
    hidden_dim: int = _opt(256, "hidden width of the tower MLPs")
    dropout: float = _opt(0.1, "dropout in the tower MLPs")
    temperature: float = _opt(0.07, "initial temperature of the loss (learnt)")

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.encoder not in ENCODERS:
            msg = (
                f"{name}.encoder must be one of {ENCODERS}, got {self.encoder!r}: fine-tuning an image encoder "
                "on crops is not available yet; embed the cells with it (bt.pp.embed_cells) and align its features."
            )
            raise ValueError(msg)
        if self.loss not in LOSSES:
            msg = f"{name}.loss must be one of {LOSSES}, got {self.loss!r}."
            raise ValueError(msg)
        _check_int(name, "embed_dim", self.embed_dim, low=2)
        _check_int(name, "hidden_dim", self.hidden_dim, low=1)
        _check_float(name, "dropout", self.dropout, low=0.0, high=1.0)
        _check_float(name, "temperature", self.temperature, low=0.0, low_open=True)
