"""The epoch loop every bitro training shares: progress bar, history, early stopping, best weights.

:class:`EarlyStopping` watches one loss per epoch, keeps a CPU copy of the weights of the best epoch
and says when ``patience`` epochs in a row brought no improvement larger than ``min_delta``.
:func:`run_epochs` drives it around a training-epoch callable and a validation callable; the BiTro
:class:`~bitro.tl._trainer.Trainer`, the SpaHGC loop and the contrastive alignment loop all run
through it, so they stop, keep weights and record history by the same rule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bitro._logging import logger
from bitro._settings import progress


@dataclass
class EarlyStopping:
    """Best-epoch tracking and the early-stopping counter.

    Attributes
    ----------
    patience
        Epochs in a row without improvement after which training stops.
    min_delta
        An epoch improves on the best only when its loss is lower by more than this.
    best
        The best monitored loss so far (``inf`` before the first epoch).
    best_state
        CPU copy of the network's ``state_dict`` at the best epoch (``None`` before the first epoch).
    bad_epochs
        Epochs since the last improvement.
    best_epoch
        Number (as recorded in the history) of the best epoch; 0 before the first epoch.
    """

    patience: int
    min_delta: float = 1e-6
    best: float = np.inf
    best_state: dict[str, Any] | None = None
    bad_epochs: int = 0
    best_epoch: int = 0

    @property
    def exhausted(self) -> bool:
        """Whether ``patience`` epochs in a row brought no improvement."""
        return self.bad_epochs >= self.patience

    def update(self, loss: float, net: Any, epoch: int) -> bool:
        """Record epoch ``epoch``'s ``loss``; keep ``net``'s weights if it is the best so far. Return whether it was."""
        if loss < self.best - self.min_delta:
            self.keep(loss, net, epoch)
            return True
        self.bad_epochs += 1
        return False

    def keep(self, loss: float, net: Any, epoch: int) -> None:
        """Take epoch ``epoch`` as the best one, whatever its ``loss``."""
        self.best, self.best_epoch, self.bad_epochs = loss, epoch, 0
        self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})

    def restore(self, net: Any) -> None:
        """Load the best epoch's weights into ``net`` (nothing when no epoch was recorded)."""
        if self.best_state is not None:
            net.load_state_dict(self.best_state)


def run_epochs(
    net: Any,
    train_epoch: Callable[[], dict[str, float]],
    *,
    validate: Callable[[], float] | None,
    stopper: EarlyStopping,
    history: dict[str, list[float]],
    max_epochs: int,
    desc: str,
    first_epoch: int = 0,
    without_validation: Literal["best_train_loss", "last_epoch"] = "best_train_loss",
    after_epoch: Callable[[int], None] | None = None,
) -> None:
    """Run epochs ``first_epoch … max_epochs − 1``; leave ``net`` on the CPU with the best epoch's weights.

    Each epoch puts ``net`` in training mode and calls ``train_epoch``, which returns ``train_loss``
    and any further per-epoch values (one history column each), then ``validate`` for the
    validation loss. The validation loss picks the best epoch and stops training after
    ``stopper.patience`` epochs without improvement. Without validation (``validate=None``) training
    never stops early and the kept epoch is the one with the lowest training loss
    (``without_validation='best_train_loss'``) or the last one (``'last_epoch'``).

    Parameters
    ----------
    net
        The network (a ``torch.nn.Module``), trained in place by ``train_epoch``.
    train_epoch
        One pass over the training data; returns ``{"train_loss": ..., <other column>: ...}``.
    validate
        The validation loss of ``net`` as it is now, or ``None`` when there is no validation data.
    stopper
        The early-stopping state, fresh or resumed from a checkpoint (then an exhausted one runs no epoch).
    history
        Appended to in place: ``epoch`` (numbered after the epochs already in it), the columns
        ``train_epoch`` returns and ``val_loss`` (NaN without validation).
    max_epochs
        The epoch to stop before.
    desc
        Label of the progress bar.
    first_epoch
        The first epoch to run (a resumed run starts after the epochs its checkpoint holds).
    without_validation
        Which epoch to keep when ``validate`` is ``None``.
    after_epoch
        Called with the number of epochs done (in this run's count) after each epoch's bookkeeping,
        before the stopping test (for checkpoints).
    """
    offset = len(history["epoch"]) - first_epoch
    stopped = validate is not None and stopper.exhausted
    bar = progress(range(first_epoch, first_epoch if stopped else max_epochs), desc=desc, unit="epoch")
    for epoch in bar:
        net.train()
        values = train_epoch()
        train_loss = values["train_loss"]
        val_loss = validate() if validate is not None else np.nan
        number = offset + epoch + 1
        history["epoch"].append(number)
        for key, value in values.items():
            history[key].append(value)
        history["val_loss"].append(val_loss)
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if validate is not None:
            stopper.update(val_loss, net, number)
        elif without_validation == "best_train_loss":
            stopper.update(train_loss, net, number)
        else:
            stopper.keep(train_loss, net, number)
        if after_epoch is not None:
            after_epoch(epoch + 1)
        if validate is not None and stopper.exhausted:
            logger.info(
                "Early stopping after epoch %d (best validation loss %.4f at epoch %d).",
                epoch + 1,
                stopper.best,
                stopper.best_epoch,
            )
            break
    stopper.restore(net)
    net.cpu()
