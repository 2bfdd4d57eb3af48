"""The alignment loop: contrastive batches of training spots, early stopping on held-back training spots.

Every step takes ``batch_size`` training spots (shuffled with the seed), runs their cells through the
image tower and their expression through the gene tower, and minimises the contrastive loss of the
batch (the other spots of the batch are the negatives). The validation spots are a random share of
the *training* slides' spots (never a held-out slide); their loss, in fixed chunks of ``batch_size``
spots with dropout off, picks the epoch whose weights are kept and stops training after ``patience``
epochs without improvement.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from bitro._settings import resolve_device
from bitro.tl._epochs import EarlyStopping, run_epochs

if TYPE_CHECKING:
    from bitro.tl._align_data import SpotPairs
    from bitro.tl._configs import TrainConfig


def _loss(net: Any, pairs: SpotPairs, rows: np.ndarray, device: Any) -> Any:
    import torch

    cells, segment = pairs.batch(rows)
    return net(
        torch.from_numpy(cells).to(device),
        torch.from_numpy(segment).to(device),
        torch.from_numpy(pairs.z[rows]).to(device),
    )


def validation_loss(net: Any, pairs: SpotPairs, batch_size: int, device: Any) -> float:
    """Mean contrastive loss over fixed chunks of ``batch_size`` spots (chunks of one spot skipped)."""
    import torch

    net.eval()
    total, weight = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            rows = np.arange(start, min(start + batch_size, len(pairs)))
            if len(rows) < 2:
                continue
            total += float(_loss(net, pairs, rows, device)) * len(rows)
            weight += len(rows)
    return total / weight if weight else float("nan")


def train_alignment(
    net: Any, train: SpotPairs, val: SpotPairs | None, config: TrainConfig, *, seed: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Train ``net`` (an :class:`~bitro.models.AlignmentNet`) in place; return ``(history, summary)``.

    The net is left on the CPU with the weights of the best validation epoch (the last epoch
    without validation spots).
    """
    import torch

    if len(train) < 2:
        msg = (
            f"Contrastive alignment needs at least 2 training spots with cells and counts, got {len(train)}."
        )
        raise ValueError(msg)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = resolve_device(config.device)
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "val_loss": [], "temperature": []}
    batch = min(config.batch_size, len(train))
    has_val = val is not None and len(val) >= 2
    t0 = time.perf_counter()

    def train_epoch() -> dict[str, float]:
        order = rng.permutation(len(train))
        losses = []
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            if len(rows) < 2:
                continue
            loss = _loss(net, train, rows, device)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
        return {
            "train_loss": float(np.mean(losses)),
            "temperature": float(1.0 / net.loss.logit_scale.detach().exp()),
        }

    stopper = EarlyStopping(config.patience, min_delta=0.0)
    run_epochs(
        net,
        train_epoch,
        validate=(lambda: validation_loss(net, val, batch, device)) if has_val else None,
        stopper=stopper,
        history=history,
        max_epochs=config.max_epochs,
        desc="aligning",
        without_validation="last_epoch",
    )
    net.eval()
    summary = {
        **config.to_dict(),
        "best_epoch": stopper.best_epoch,
        "best_val_loss": float(stopper.best) if has_val else None,
        "epochs_run": len(history["epoch"]),
        "n_train_spots": len(train),
        "n_val_spots": 0 if val is None else len(val),
        "seconds": round(time.perf_counter() - t0, 2),
        "seed": seed,
        "device": str(device),
    }
    return history, summary
