"""The training loop, in one place: Adam, gradient clipping, early stopping, checkpoints and resume.

:class:`Trainer` runs any :class:`~bitro.tl._levels.Level` on its :class:`~bitro.tl._levels.TrainingSet`;
``fit`` and ``transfer`` (and :meth:`bitro.tl.BiTroModel.train`) all go through it. The weights of the
best validation epoch are kept. With ``checkpoint_dir`` the whole training state (network, best
weights, optimiser, both random generators, history) is written after every epoch as safetensors +
JSON, and a rerun of the same training resumes from it; on the CPU the result equals an
uninterrupted run with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitro._hashing import arrays_sha256, state_sha256
from bitro._logging import logger
from bitro._settings import resolve_device
from bitro.tl._configs import TrainConfig
from bitro.tl._epochs import EarlyStopping, run_epochs
from bitro.tl._levels import Level, TrainingSet


@dataclass
class TrainResult:
    """Outcome of a training run.

    Attributes
    ----------
    history
        ``epoch``, ``train_loss``, ``val_loss`` per epoch (continuing the history passed in).
    summary
        The training options and ``best_loss``, ``epochs_run``, ``n_train_units``, ``n_val_units``.
    """

    history: dict[str, list[float]]
    summary: dict[str, Any] = field(default_factory=dict)


def _data_fingerprint(data: TrainingSet) -> str:
    bags = data.bags
    parts = [bags.features, bags.bag_ptr, bags.edges]
    for extra in (bags.targets, data.slide_targets):
        if extra is not None:
            parts.append(extra)
    return arrays_sha256(parts)


class Trainer:
    """Train a network on a level's data.

    Parameters
    ----------
    level
        The level strategy (loss, split, steps).
    data
        Its training set.
    config
        :class:`~bitro.tl.TrainConfig`.
    seed
        Seed of the split, the batch order and torch.
    """

    def __init__(self, level: Level, data: TrainingSet, config: TrainConfig, *, seed: int) -> None:
        self.level, self.data, self.config, self.seed = level, data, config, int(seed)

    def run(
        self, net: Any, *, parameters: Any = None, history: dict[str, list[float]] | None = None
    ) -> TrainResult:
        """Train ``net`` in place (left on the CPU with the best weights); return history and summary."""
        import torch

        cfg, level, data = self.config, self.level, self.data
        dev = resolve_device(cfg.device)
        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        history = {
            k: list(v) for k, v in (history or {"epoch": [], "train_loss": [], "val_loss": []}).items()
        }
        run_id = f"{state_sha256(net.state_dict())[:16]}-{_data_fingerprint(data)[:16]}"
        train_idx, val_idx = level.split(data, cfg.validation_fraction, rng)
        level.warn_data(data, len(train_idx), len(val_idx))
        net = net.to(dev)
        params = [p for p in (parameters if parameters is not None else net.parameters()) if p.requires_grad]
        if not params:
            msg = "The network has no trainable parameters (all frozen)."
            raise RuntimeError(msg)
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        stopper, first = EarlyStopping(cfg.patience), 0
        if cfg.checkpoint_dir is not None:
            resumed = self._resume(net, opt, rng, run_id)
            if resumed is not None:
                stopper, first, history = resumed

        def train_epoch() -> dict[str, float]:
            losses = []
            for step in level.steps(data, train_idx, cfg.batch_size, rng):
                opt.zero_grad(set_to_none=True)
                loss = level.loss(net, data, step, device=dev, max_cells=cfg.max_cells_per_step)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
            return {"train_loss": float(np.mean(losses))}

        def checkpoint(epochs_done: int) -> None:
            self._checkpoint(net, stopper, opt, rng, run_id, epochs_done, history)

        run_epochs(
            net,
            train_epoch,
            validate=(lambda: self._validation_loss(net, val_idx, dev)) if len(val_idx) else None,
            stopper=stopper,
            history=history,
            max_epochs=cfg.max_epochs,
            desc=f"training ({level.name})",
            first_epoch=first,
            after_epoch=checkpoint if cfg.checkpoint_dir is not None else None,
        )
        summary = {
            **cfg.to_dict(),
            "best_loss": float(stopper.best),
            "epochs_run": len(history["epoch"]),
            "n_train_units": len(train_idx),
            "n_val_units": len(val_idx),
        }
        return TrainResult(history=history, summary=summary)

    def _validation_loss(self, net: Any, idx: np.ndarray, dev: Any) -> float:
        import torch

        net.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for step, weight in self.level.eval_steps(self.data, idx, self.config.batch_size):
                loss = self.level.loss(
                    net, self.data, step, device=dev, max_cells=self.config.max_cells_per_step
                )
                total += float(loss) * weight
                n += weight
        return total / max(n, 1)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, net, stopper, opt, rng, run_id, epochs_done, history) -> None:
        from bitro.tl._checkpoint import save_training_state

        save_training_state(
            self.config.checkpoint_dir,
            net_state=net.state_dict(),
            best_state=stopper.best_state,
            optimizer=opt,
            rng=rng,
            meta={
                "run_id": run_id,
                "epochs_done": epochs_done,
                "best": float(stopper.best),
                "bad_epochs": stopper.bad_epochs,
                "best_epoch": stopper.best_epoch,
                "history": history,
            },
        )

    def _resume(self, net, opt, rng, run_id):
        import torch

        from bitro.tl._checkpoint import load_training_state, restore_optimizer

        saved = load_training_state(self.config.checkpoint_dir)
        if saved is None:
            return None
        tensors, meta = saved
        if meta.get("run_id") != run_id:
            msg = (
                f"The checkpoint in {self.config.checkpoint_dir!r} belongs to another training run (different "
                "model, data or seed); use an empty checkpoint_dir or delete it."
            )
            raise ValueError(msg)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        best_state = None
        if meta["has_best"]:
            best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        restore_optimizer(opt, tensors, meta)
        rng.bit_generator.state = meta["numpy_rng"]
        torch.set_rng_state(tensors["rng.torch"])
        history = {k: list(v) for k, v in meta["history"].items()}
        logger.info("Resuming training from epoch %d (%s).", meta["epochs_done"], self.config.checkpoint_dir)
        stopper = EarlyStopping(
            self.config.patience,
            best=meta["best"],
            best_state=best_state,
            bad_epochs=meta["bad_epochs"],
            best_epoch=meta.get("best_epoch", 0),
        )
        return stopper, meta["epochs_done"], history
