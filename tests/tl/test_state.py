"""Model files: declared state, content hashes verified at load, clear errors for broken files, old format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _toy import GENES, SMALL
from safetensors.numpy import load_file, save_file

import bitro as bt
from bitro.tl import BiTroModel
from bitro.tl._cv import light_copy


@pytest.fixture
def saved(tmp_path, toy_slides):
    model = bt.tl.fit(
        toy_slides[:2],
        genes=GENES,
        config=SMALL,
        n_components=8,
        n_phenotypes=3,
        seed=0,
        max_epochs=2,
        lr=3e-3,
    )
    return model, model.save(tmp_path / "m")


def test_load_detects_edited_weights_and_state(saved):
    _, path = saved
    weights = load_file(str(path / "model.safetensors"))
    # other tensors of the same shapes (a weight and a target statistic) load, but are refused
    swapped = {
        k: (v[::-1].copy() if k.startswith("net.head") or k == "transform.target_mean" else v)
        for k, v in weights.items()
    }
    save_file(swapped, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors does not hold the arrays"):
        BiTroModel.load(path)
    save_file(weights, str(path / "model.safetensors"))
    BiTroModel.load(path)  # restored: loads again
    config = json.loads((path / "config.json").read_text())
    config["state"]["setup"]["k"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json was changed after the model was saved"):
        BiTroModel.load(path)


def test_broken_files_give_one_clear_error(saved):
    _, path = saved
    good_cfg, good_w = (path / "config.json").read_bytes(), (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(good_w[: len(good_w) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        BiTroModel.load(path)
    (path / "model.safetensors").write_bytes(good_w)
    (path / "config.json").write_bytes(good_cfg[: len(good_cfg) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        BiTroModel.load(path)
    (path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="not a bitro model config"):
        BiTroModel.load(path)
    config = json.loads(good_cfg)
    config["state"]["net_config"]["hidden_dim"] = 32  # edited architecture: the hash catches it first
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="changed after the model was saved"):
        BiTroModel.load(path)
    config["format"] = "bitro-model/99"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bitro-model/99"):
        BiTroModel.load(path)


def test_state_round_trips_every_declared_part(saved):
    model, path = saved
    loaded = BiTroModel.load(path)
    a_arrays, a_meta = model.state.encode()
    b_arrays, b_meta = loaded.state.encode()
    assert a_meta == b_meta and a_arrays.keys() == b_arrays.keys()
    for k in a_arrays:
        np.testing.assert_array_equal(a_arrays[k], b_arrays[k])
    assert loaded.weights_hash() == model.weights_hash()


def _as_legacy(path):
    """Rewrite a saved model folder in the layout bitro wrote before the declared state (bitro-model/1)."""
    config = json.loads((path / "config.json").read_text())
    s = config["state"]
    legacy = {
        "format": "bitro-model/1",
        "bitro_version": "0.4.0",
        "level": s["level"],
        "genes": s["genes"],
        "net_config": s["net_config"],
        "use_rep": s["setup"]["use_rep"],
        "k": s["setup"]["k"],
        "context_um": s["setup"]["context_um"],
        "keys": {r: s["setup"][f"{r}_key"] for r in ("spots", "cells", "patches", "bulk")},
        "seed": s["setup"]["seed"],
        "cluster_weight": s["setup"]["cluster_weight"],
        "projection": s["projection"],
        "phenotypes": s["phenotypes"],
        "target": s["transform"],
        "encoder": s["encoder"],
        "history": s["history"],
        "train_params": s["train"],
        "train_slides": s["train_slides"],
        "is_trained": True,
        "lora": None,
        "transferred_from": None,
    }
    arrays = load_file(str(path / "model.safetensors"))
    arrays = {(f"target.{k[10:]}" if k.startswith("transform.") else k): v for k, v in arrays.items()}
    save_file(arrays, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(legacy))


def test_models_saved_by_the_previous_format_still_load(saved, toy_slides, caplog):
    model, path = saved
    _as_legacy(path)
    with caplog.at_level("WARNING", logger="bitro"):
        old = BiTroModel.load(path)
    assert "records no content hash" in caplog.text
    a, b = light_copy(toy_slides[2]), light_copy(toy_slides[2])
    model.predict(a)
    old.predict(b)
    np.testing.assert_array_equal(a["spots"].layers["bitro"], b["spots"].layers["bitro"])
    assert old.setup == model.setup and old.genes == model.genes
