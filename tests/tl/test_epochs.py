"""The shared epoch loop: patience, min_delta, best-weight restore, history, resume, no-validation modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitro.tl._epochs import EarlyStopping, run_epochs


def _scripted(train_losses, val_losses=None):
    """A one-weight net whose weight becomes the epoch number (1-based); losses come from the scripts."""
    net = torch.nn.Linear(1, 1, bias=False)
    calls = {"train": 0, "modes": []}

    def train_epoch():
        calls["modes"].append(net.training)
        calls["train"] += 1
        with torch.no_grad():
            net.weight.fill_(float(calls["train"]))
        return {"train_loss": train_losses[calls["train"] - 1], "extra": -float(calls["train"])}

    validate = None
    if val_losses is not None:

        def validate():
            return val_losses[calls["train"] - 1]

    return net, train_epoch, validate, calls


def _history():
    return {"epoch": [], "train_loss": [], "val_loss": [], "extra": []}


def test_patience_stops_at_the_right_epoch_and_restores_the_best_weights(caplog):
    val = [3.0, 2.0, 2.5, 1.0, 1.5, 1.2, 1.1, 0.5, 0.4, 0.3]
    net, train_epoch, validate, calls = _scripted([9.0] * 10, val)
    stopper, history = EarlyStopping(3), _history()
    with caplog.at_level("INFO", logger="bitro"):
        run_epochs(
            net, train_epoch, validate=validate, stopper=stopper, history=history, max_epochs=10, desc="t"
        )
    # best at epoch 4 (1.0); epochs 5, 6, 7 do not improve -> stop after 7, never seeing 0.5
    assert calls["train"] == 7
    assert history["epoch"] == [1, 2, 3, 4, 5, 6, 7]
    assert history["val_loss"] == val[:7]
    assert history["extra"] == [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]
    assert (stopper.best, stopper.best_epoch, stopper.bad_epochs) == (1.0, 4, 3)
    assert net.weight.item() == 4.0  # the weights of epoch 4, not of the last epoch
    assert net.weight.device.type == "cpu"
    assert all(calls["modes"])  # every epoch trains in training mode
    assert "Early stopping after epoch 7" in caplog.text


def test_an_improvement_smaller_than_min_delta_does_not_count():
    net, train_epoch, validate, calls = _scripted([1.0] * 6, [1.0, 0.95, 0.92, 0.5, 0.4, 0.3])
    stopper = EarlyStopping(2, min_delta=0.1)
    run_epochs(
        net, train_epoch, validate=validate, stopper=stopper, history=_history(), max_epochs=6, desc="t"
    )
    # 0.95 and 0.92 are within 0.1 of 1.0: two bad epochs -> stop after epoch 3 with epoch 1 kept
    assert calls["train"] == 3
    assert net.weight.item() == 1.0


@pytest.mark.parametrize(("mode", "kept"), [("best_train_loss", 2.0), ("last_epoch", 5.0)])
def test_without_validation_all_epochs_run_and_the_mode_picks_the_kept_epoch(mode, kept):
    net, train_epoch, _, calls = _scripted([3.0, 1.0, 2.0, 2.0, 2.0])
    history = _history()
    stopper = EarlyStopping(1)
    run_epochs(
        net,
        train_epoch,
        validate=None,
        stopper=stopper,
        history=history,
        max_epochs=5,
        desc="t",
        without_validation=mode,
    )
    assert calls["train"] == 5  # patience 1 would have stopped at epoch 3 with validation
    assert np.isnan(history["val_loss"]).all()
    assert net.weight.item() == kept


def test_a_resumed_run_continues_numbering_and_an_exhausted_one_runs_nothing():
    net, train_epoch, validate, calls = _scripted([1.0] * 6, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    history = {"epoch": [1, 2], "train_loss": [1.0, 1.0], "val_loss": [7.0, 6.0], "extra": [0.0, 0.0]}
    after = []
    stopper = EarlyStopping(2, best=6.0, bad_epochs=0, best_epoch=2)
    run_epochs(
        net,
        train_epoch,
        validate=validate,
        stopper=stopper,
        history=history,
        max_epochs=5,
        desc="t",
        first_epoch=2,
        after_epoch=after.append,
    )
    assert history["epoch"] == [1, 2, 3, 4, 5]
    assert after == [3, 4, 5]
    assert calls["train"] == 3
    assert stopper.best_epoch == 5

    exhausted = EarlyStopping(2, best=1.0, bad_epochs=2)
    net2, train_epoch2, validate2, calls2 = _scripted([1.0], [0.1])
    run_epochs(
        net2,
        train_epoch2,
        validate=validate2,
        stopper=exhausted,
        history=_history(),
        max_epochs=5,
        desc="t",
        first_epoch=3,
    )
    assert calls2["train"] == 0
