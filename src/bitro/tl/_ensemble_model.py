"""``BiTroEnsemble``: BiTro models of one training set fitted with consecutive seeds, used as one model.

``bt.tl.fit(..., n_models=3)`` returns one. It predicts like a :class:`~bitro.tl.BiTroModel` (the members'
spot predictions and cell shares averaged, :mod:`bitro.tl._ensemble`), transfers member by member, and
saves to one folder: ``ensemble.json`` (the members, their seeds and weight hashes) beside one model
folder per member (``model_0``, ``model_1``, ...; each :meth:`BiTroModel.save`'s format, safetensors +
JSON, no pickle). Leave one HER2ST section out, three members raised normalised PCC_gene from 0.169 to
0.183 (higher on 5 of 5 sections) for three times the training (benchmarks page, "Seed ensembles").
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitro._files import ENSEMBLE_FILE

if TYPE_CHECKING:
    import spatialdata as sd

    from bitro.tl._model import BiTroModel

ENSEMBLE_FORMAT = "bitro-ensemble/1"


def member_folder(i: int) -> str:
    """Name of member ``i``'s model folder inside an ensemble folder."""
    return f"model_{i}"


class BiTroEnsemble:
    """Several BiTro models of the same slides, genes and options (different seeds), used as one model.

    Parameters
    ----------
    members
        Trained :class:`~bitro.tl.BiTroModel` objects that can be averaged (same genes, level, table
        keys, target statistics and cell embedding; checked).

    Notes
    -----
    The members are in :attr:`members` (and ``ensemble[i]``, ``len(ensemble)``, ``for m in ensemble``),
    each with its own network, history and attention. Build one with ``bt.tl.fit(..., n_models=k)``.
    """

    def __init__(self, members: Sequence[BiTroModel]) -> None:
        from bitro.tl._ensemble import check_members

        members = check_members(members)
        untrained = [i for i, m in enumerate(members) if not m.is_trained]
        if untrained:
            msg = f"Ensemble members {untrained} are not trained; train them (or use bt.tl.fit(..., n_models=k))."
            raise ValueError(msg)
        self.members: list[BiTroModel] = members

    # ------------------------------------------------------------------ views shared by the members
    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[BiTroModel]:
        return iter(self.members)

    def __getitem__(self, i: int) -> BiTroModel:
        return self.members[i]

    genes = property(lambda self: self.members[0].genes, doc="Predicted genes, in output order.")
    level = property(lambda self: self.members[0].level, doc="``'spot'`` or ``'bulk'``.")
    use_rep = property(lambda self: self.members[0].use_rep, doc="Cell embedding in ``cells.obsm``.")
    transform = property(lambda self: self.members[0].transform, doc="Target statistics (shared).")
    train_slides = property(lambda self: self.members[0].train_slides, doc="Names of the training slides.")
    seeds = property(lambda self: [int(m.seed) for m in self.members], doc="Each member's seed.")
    is_trained = property(lambda self: all(m.is_trained for m in self.members), doc="Always true.")

    # ------------------------------------------------------------------ prediction and transfer
    def predict(
        self,
        sdata: sd.SpatialData,
        *,
        key_added: str | None = None,
        batch_size: int = 64,
        device: str | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Average the members' predictions and write them once (see :meth:`bitro.tl.BiTroModel.predict`).

        Each spot's log1p prediction on the target scale and each cell's share of its spot are averaged,
        so the cells still sum to the spot; ``uns[key_added]["ensemble"]`` lists the members.
        """
        from bitro import _keys as K
        from bitro.tl._ensemble import predict_ensemble

        return predict_ensemble(
            self.members,
            sdata,
            key_added=K.PRED if key_added is None else key_added,
            batch_size=batch_size,
            device=device,
            overwrite=overwrite,
        )

    def transfer(self, sdatas: Any, **kwargs: Any) -> BiTroEnsemble:
        """Transfer every member (:meth:`bitro.tl.BiTroModel.transfer`, same arguments); each keeps its seed."""
        from bitro._settings import progress

        return BiTroEnsemble(
            [m.transfer(sdatas, **kwargs) for m in progress(self.members, desc="transfer (ensemble)")]
        )

    def weights_hash(self) -> list[str]:
        """Each member's weight hash (:meth:`bitro.tl.BiTroModel.weights_hash`)."""
        return [m.weights_hash() for m in self.members]

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Save to the folder ``path``: ``ensemble.json`` and one model folder per member.

        Written beside ``path`` and moved into place, so an interrupted save leaves no half-written
        ensemble; ``overwrite=True`` replaces only an ensemble folder bitro wrote.
        """
        from bitro import __version__
        from bitro._files import write_replacing

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            for i, m in enumerate(self.members):
                m.save(tmp / member_folder(i))
            manifest = {
                "format": ENSEMBLE_FORMAT,
                "bitro_version": __version__,
                "n_models": len(self.members),
                "members": [
                    {"folder": member_folder(i), "seed": int(m.seed), "weights_sha256": m.weights_hash()}
                    for i, m in enumerate(self.members)
                ],
            }
            (tmp / ENSEMBLE_FILE).write_text(json.dumps(manifest, indent=1) + "\n")

        return write_replacing(write, path, kind="ensemble", overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> BiTroEnsemble:
        """Load an ensemble saved with :meth:`save`; each member is verified like :meth:`BiTroModel.load`.

        Raises
        ------
        ValueError
            ``path`` is not an ensemble folder, a member folder is missing, or a member's weights are not
            the ones the manifest recorded (a member folder was replaced).
        """
        from bitro.tl._model import BiTroModel

        path = Path(path)
        manifest = read_manifest(path)
        members = []
        for entry in manifest["members"]:
            m = BiTroModel.load(path / entry["folder"])
            if m.weights_hash() != entry["weights_sha256"]:
                msg = (
                    f"{path / entry['folder']} holds other weights than {path / ENSEMBLE_FILE} records; the "
                    "folders do not belong together. Save the ensemble again."
                )
                raise ValueError(msg)
            members.append(m)
        return cls(members)

    def __repr__(self) -> str:
        return (
            f"BiTroEnsemble(n_models={len(self.members)}, seeds={self.seeds}, level={self.level!r}, "
            f"genes={len(self.genes)})"
        )


def read_manifest(path: Path) -> dict[str, Any]:
    """``ensemble.json`` of the folder ``path``, checked (format, members named ``model_0 ..``)."""
    from bitro.tl._state import CONFIG_FILE

    file = path / ENSEMBLE_FILE
    if not file.is_file():
        hint = (
            " (it is a single model: load it with bt.tl.BiTroModel.load)"
            if (path / CONFIG_FILE).is_file()
            else ""
        )
        msg = f"{str(path)!r} is not a bitro ensemble folder: it has no {ENSEMBLE_FILE}{hint}."
        raise ValueError(msg)
    try:
        manifest = json.loads(file.read_text())
    except ValueError as err:
        msg = f"{file} is not valid JSON ({err}); save the ensemble again."
        raise ValueError(msg) from err
    members = manifest.get("members") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != ENSEMBLE_FORMAT
        or not isinstance(members, list)
        or not members
        or [m.get("folder") if isinstance(m, dict) else None for m in members]
        != [member_folder(i) for i in range(len(members))]
    ):
        msg = f"{file} is not a {ENSEMBLE_FORMAT} manifest with its members model_0, model_1, ...; save the ensemble again."
        raise ValueError(msg)
    return manifest


def load_model(path: str | Path) -> BiTroModel | BiTroEnsemble:
    """A saved BiTro model or ensemble, whichever the folder ``path`` holds (``ensemble.json`` or not)."""
    from bitro.tl._model import BiTroModel

    return BiTroEnsemble.load(path) if (Path(path) / ENSEMBLE_FILE).is_file() else BiTroModel.load(path)


def fit_ensemble(n_models: int, seed: int | None, fit_one: Any) -> BiTroEnsemble:
    """``n_models`` members from ``fit_one(seed)`` with seeds ``seed, seed + 1, ...`` (``None``: a random start)."""
    from bitro._logging import logger
    from bitro._settings import resolve_seed

    start = resolve_seed(seed)
    members = []
    for i in range(n_models):
        logger.info("ensemble: fitting member %d of %d (seed %d)", i + 1, n_models, start + i)
        members.append(fit_one(start + i))
    return BiTroEnsemble(members)
