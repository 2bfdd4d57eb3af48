"""BiTroConfig: defaults, validation and JSON round-trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bitro.models import BiTroConfig


def test_defaults_and_json_round_trip():
    cfg = BiTroConfig(n_genes=10)
    assert (cfg.in_dim, cfg.hidden_dim, cfg.gat_layers, cfg.gat_heads, cfg.pos_bins) == (128, 128, 2, 4, 64)
    assert (cfg.output, cfg.pooling, cfg.dropout) == ("linear", "gene_query", 0.1)
    back = BiTroConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert cfg.replace(hidden_dim=16).hidden_dim == 16 and cfg.hidden_dim == 128


def test_frozen():
    cfg = BiTroConfig(n_genes=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_genes = 4


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_genes": 0}, "n_genes"),
        ({"hidden_dim": 2.5}, "hidden_dim"),
        ({"gat_heads": True}, "gat_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"output": "relu"}, "output"),
        ({"pooling": "max"}, "pooling"),
        ({"use_gat": "yes"}, "use_gat"),
        ({"hidden_dim": 10, "transformer_heads": 4}, "hidden_dim"),
    ],
)
def test_invalid_fields_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        BiTroConfig(**{"n_genes": 3, **changes})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="hiden_dim"):
        BiTroConfig.from_dict({"n_genes": 3, "hiden_dim": 8})


def test_cell_count_extension_is_off_by_default_and_validated():
    assert BiTroConfig(n_genes=2).use_cell_count is False
    with pytest.raises(ValueError, match="use_cell_count"):
        BiTroConfig(n_genes=2, use_cell_count=1)
