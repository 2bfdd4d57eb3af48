"""Global settings: verbosity, progress bars, device and seed."""

from __future__ import annotations

import logging
from typing import Any

from bitro._logging import logger

_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}
_DEVICES = ("auto", "cpu", "cuda", "mps")


class BitroSettings:
    """Package-wide settings, reachable as ``bt.settings``.

    Attributes
    ----------
    verbosity
        0 = errors, 1 = warnings (default), 2 = info, 3 = debug.
    progress
        Show tqdm progress bars on long work.
    device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"cuda:N"``.
    seed
        Default seed used where a function's ``seed=None``.
    savefig_dpi
        Resolution (dots per inch) of figures the ``bt.pl`` functions write with ``save=``
        (default 300, print quality).
    """

    def __init__(self) -> None:
        self._verbosity = 1
        self.progress: bool = True
        self._device = "auto"
        self._seed = 0
        self._savefig_dpi = 300
        self.verbosity = 1

    @property
    def verbosity(self) -> int:
        """Logging verbosity (0–3)."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        if value not in _LEVELS:
            msg = f"verbosity must be one of {sorted(_LEVELS)}, got {value!r}."
            raise ValueError(msg)
        self._verbosity = int(value)
        logger.setLevel(_LEVELS[self._verbosity])

    @property
    def device(self) -> str:
        """Default compute device."""
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        if not isinstance(value, str) or value.split(":")[0] not in _DEVICES:
            msg = f"device must be one of {_DEVICES} (optionally 'cuda:N'), got {value!r}."
            raise ValueError(msg)
        self._device = value

    @property
    def seed(self) -> int:
        """Default random seed."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        if not isinstance(value, int | None) or (value is not None and value < 0):
            msg = f"seed must be a non-negative int, got {value!r}."
            raise ValueError(msg)
        self._seed = 0 if value is None else int(value)

    @property
    def savefig_dpi(self) -> int:
        """Resolution of figures saved by ``bt.pl`` functions (``save=``)."""
        return self._savefig_dpi

    @savefig_dpi.setter
    def savefig_dpi(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 10 <= value <= 2400:
            msg = f"savefig_dpi must be a number of dots per inch between 10 and 2400, got {value!r}."
            raise ValueError(msg)
        self._savefig_dpi = int(value)

    def __repr__(self) -> str:
        return (
            f"BitroSettings(verbosity={self.verbosity}, progress={self.progress}, "
            f"device={self.device!r}, seed={self.seed}, savefig_dpi={self.savefig_dpi})"
        )

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as a plain dict (for provenance)."""
        return {
            "verbosity": self.verbosity,
            "progress": self.progress,
            "device": self.device,
            "seed": self.seed,
            "savefig_dpi": self.savefig_dpi,
        }


settings = BitroSettings()


def resolve_seed(seed: int | None) -> int:
    """Return ``seed`` or the global default seed."""
    return settings.seed if seed is None else int(seed)


def resolve_device(device: str | None = None):
    """Return a :class:`torch.device` for ``device`` (``"auto"`` picks CUDA, then MPS, then CPU)."""
    import torch

    device = settings.device if device is None else device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        msg = f"device={device!r} was requested but CUDA is not available; use device='auto' or 'cpu'."
        raise RuntimeError(msg)
    return torch.device(device)


def progress(iterable=None, **kwargs):
    """Wrap ``iterable`` in a tqdm bar, honouring ``bt.settings.progress``."""
    try:  # notebook bars need ipywidgets; without it tqdm.auto warns, so fall back to the text bar
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm.std import tqdm

    kwargs.setdefault("disable", not settings.progress)
    return tqdm(iterable, **kwargs)
