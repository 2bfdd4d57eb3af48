"""SetupConfig / TrainConfig: one declaration of every option, validated, with the benchmark's defaults."""

from __future__ import annotations

import pytest
from _toy import GENES, SMALL

import bitro as bt
from bitro.tl import SetupConfig, TrainConfig


def test_defaults_are_the_benchmark_best():
    train, setup = TrainConfig(), SetupConfig()
    # benchmarks/accuracy.py BITRO_KW and the main table's best normalised row (library-size targets)
    assert (train.lr, train.max_epochs, train.patience, train.batch_size) == (1e-3, 30, 6, 32)
    assert train.validation_fraction == 0.1 and setup.target == "library_size" and setup.n_components == 128


def test_fit_with_defaults_trains_with_them(toy_slides):
    model = bt.tl.fit(
        toy_slides[:2], genes=GENES, config=SMALL, n_components=8, n_phenotypes=3, seed=0, max_epochs=2
    )
    assert model.train_params["lr"] == 1e-3 and model.train_params["batch_size"] == 32
    assert model.setup.target == "library_size" and model.transform.scale == "library_size"


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (TrainConfig, "validation_fraction", 1.0),
        (TrainConfig, "validation_fraction", -0.1),
        (TrainConfig, "batch_size", 0),
        (TrainConfig, "max_epochs", 0),
        (TrainConfig, "lr", 0.0),
        (TrainConfig, "lr", float("nan")),
        (TrainConfig, "max_cells_per_step", True),
        (SetupConfig, "target", "log"),
        (SetupConfig, "k", 0),
        (SetupConfig, "context_um", -5.0),
        (SetupConfig, "zscore", "yes"),
    ],
)
def test_bad_values_name_the_option(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: value})


def test_unknown_options_are_refused_with_the_valid_names(toy_slides):
    with pytest.raises(ValueError, match="Unknown TrainConfig option"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['epochs'\].*max_epochs"):
        bt.tl.fit(toy_slides[:1], genes=GENES, epochs=3)


def test_validation_fraction_outside_range_never_saves_an_untrained_model(toy_slides):
    with pytest.raises(ValueError, match="validation_fraction"):
        bt.tl.fit(toy_slides[:2], genes=GENES, config=SMALL, n_components=8, validation_fraction=1.5)


def test_round_trip_and_replace():
    cfg = TrainConfig(lr=3e-4, checkpoint_dir="ck")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(lr=1e-2).lr == 1e-2 and cfg.lr == 3e-4
    assert SetupConfig(cells_key="cells_truth").keys["cells"] == "cells_truth"
