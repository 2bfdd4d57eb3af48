"""The SpaHGC training loop: regression + masked graph contrastive loss, EMA target encoder, early stopping.

It honours the :class:`~bitro.tl.TrainConfig` fields as BiTro's trainer does: ``max_epochs``, ``lr``,
``weight_decay``, ``grad_clip``, ``patience``, ``validation_fraction`` (a random share of the
training spots drawn by source spot, never a held-out slide), ``batch_size`` (target spots per optimiser step) and
``device`` (``None``: ``bt.settings.device``). ``max_cells_per_step`` is a bulk-level option and does
not apply; ``checkpoint_dir`` is refused (not supported for this model).

A step takes ``batch_size`` training spots of one slide, cuts out the subgraph their predictions
depend on (:meth:`~bitro.tl._hetero.SlideGraph.batch`), and minimises
``MSE + pcc_weight · (1 − mean gene PCC)`` over those spots plus the weighted BGRL losses of two
masked views of the subgraph (:class:`~bitro.models.MaskedGraphContrast`); the target encoder then
moves towards the online one. The weights of the best validation epoch are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bitro._settings import resolve_device
from bitro.tl._configs import TrainConfig
from bitro.tl._epochs import EarlyStopping, run_epochs
from bitro.tl._hetero import SlideGraph


@dataclass
class SlideTrainingData:
    """One training slide: its graph (exemplars from the other slides), targets and split.

    Attributes
    ----------
    graph
        The slide's :class:`~bitro.tl._hetero.SlideGraph`.
    y
        ``(T, G)`` normalised targets of its spots.
    train, val
        Indices of the training and validation spots.
    """

    graph: SlideGraph
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray


def regression_loss(pred: Any, y: Any, pcc_weight: float) -> Any:
    """``MSE + pcc_weight · (1 − mean over genes of the PCC across spots)`` (PCC term needs ≥ 2 spots)."""
    import torch

    loss = torch.nn.functional.mse_loss(pred, y)
    if pcc_weight > 0 and pred.size(0) > 1:
        pc, yc = pred - pred.mean(0), y - y.mean(0)
        r = (pc * yc).sum(0) / (pc.norm(dim=0) * yc.norm(dim=0) + 1e-8)
        loss = loss + pcc_weight * (1 - r.mean())
    return loss


def run_graph(net: Any, graph: SlideGraph, seeds: np.ndarray, *, batch_size: int, device: Any) -> np.ndarray:
    """``(len(seeds), G)`` predictions of ``seeds`` in eval mode, ``batch_size`` seeds at a time (exact)."""
    import torch

    from bitro.models._spahgc import EXEMPLAR_EDGE

    hops = net.config.num_layers
    out = []
    net.eval()
    with torch.no_grad():
        for start in range(0, len(seeds), batch_size):
            sub, pos = graph.batch(seeds[start : start + batch_size], hops)
            sub = sub.to(device)
            sim = sub[EXEMPLAR_EDGE].similarity if graph.k else None
            out.append(
                net(sub.x_dict, sub.edge_index_dict, sim)["y"][torch.as_tensor(pos, device=device)]
                .cpu()
                .numpy()
            )
    return np.concatenate(out) if out else np.zeros((0, net.config.n_genes), dtype=np.float32)


def train_spahgc(
    net: Any, slides: list[SlideTrainingData], config: TrainConfig, *, seed: int
) -> tuple[dict, dict]:
    """Train ``net`` in place (left on the CPU with the best weights); return ``(history, summary)``."""
    import torch

    from bitro.models import MaskedGraphContrast
    from bitro.models._spahgc import EXEMPLAR_EDGE

    if config.checkpoint_dir is not None:
        msg = "checkpoint_dir is not supported for model='spahgc' (its training resumes only from scratch); drop it."
        raise ValueError(msg)
    dev = resolve_device(config.device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = net.to(dev)
    contrast = MaskedGraphContrast(net.encoder, net.config).to(dev) if net.config.contrastive else None
    params = [*net.parameters(), *(contrast.predictors.parameters() if contrast is not None else [])]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    hops, pcc_w = net.config.num_layers, net.config.pcc_weight
    ys = [torch.as_tensor(s.y) for s in slides]
    n_train = sum(len(s.train) for s in slides)
    n_val = sum(len(s.val) for s in slides)
    if n_train < 2:
        msg = f"Only {n_train} training spot(s) after the validation split; train on slides with more spots."
        raise ValueError(msg)
    history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "val_loss": [], "contrastive_loss": []}

    def train_epoch() -> dict[str, float]:
        steps = [
            (s, perm[i : i + config.batch_size])
            for s, slide in enumerate(slides)
            for perm in [rng.permutation(slide.train)]
            for i in range(0, len(perm), config.batch_size)
        ]
        losses, contrast_losses = [], []
        for j in rng.permutation(len(steps)):
            s, seeds = steps[j]
            sub, pos = slides[s].graph.batch(seeds, hops)
            sub = sub.to(dev)
            sim = sub[EXEMPLAR_EDGE].similarity if slides[s].graph.k else None
            opt.zero_grad(set_to_none=True)
            out = net(sub.x_dict, sub.edge_index_dict, sim)
            loss = regression_loss(out["y"][torch.as_tensor(pos, device=dev)], ys[s][seeds].to(dev), pcc_w)
            losses.append(float(loss.detach()))
            if contrast is not None:
                c_loss, _ = contrast.loss(net.encoder, sub.x_dict, sub.edge_index_dict, sim)
                contrast_losses.append(float(c_loss.detach()))
                loss = loss + c_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            if contrast is not None:
                contrast.update(net.encoder)
        return {
            "train_loss": float(np.mean(losses)),
            "contrastive_loss": float(np.mean(contrast_losses)) if contrast_losses else np.nan,
        }

    stopper = EarlyStopping(config.patience)
    run_epochs(
        net,
        train_epoch,
        validate=(lambda: _validation_loss(net, slides, ys, config.batch_size, dev, pcc_w))
        if n_val
        else None,
        stopper=stopper,
        history=history,
        max_epochs=config.max_epochs,
        desc="training (spahgc)",
    )
    summary = {
        **config.to_dict(),
        "best_loss": float(stopper.best),
        "epochs_run": len(history["epoch"]),
        "n_train_units": n_train,
        "n_val_units": n_val,
    }
    return history, summary


def _validation_loss(net, slides, ys, batch_size, dev, pcc_weight) -> float:
    import torch

    preds, targets = [], []
    for slide, y in zip(slides, ys, strict=True):
        if len(slide.val):
            preds.append(run_graph(net, slide.graph, slide.val, batch_size=batch_size, device=dev))
            targets.append(y[slide.val].numpy())
    pred, target = torch.as_tensor(np.concatenate(preds)), torch.as_tensor(np.concatenate(targets))
    return float(regression_loss(pred, target, pcc_weight))
