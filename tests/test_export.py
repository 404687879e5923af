"""Saving and loading a bridge: identical logits, atomic writes, refusal of the wrong pair."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from composer import ConfigError, compose, load_bridge
from composer.config import BridgeConfig
from composer.export import WEIGHTS
from tests.conftest import pico_gpt2, pico_llama, pico_qwen2, randomize_bridge


def _composed(seed: int = 0):
    anchor, specialist = pico_llama(), pico_qwen2()
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    randomize_bridge(composition, seed=seed)
    return composition


def test_save_load_gives_identical_logits(tmp_path):
    composition = _composed()
    composition.save_bridge(tmp_path / "bridge")
    files = sorted(p.name for p in (tmp_path / "bridge").iterdir())
    assert files == ["README.md", "bridge.safetensors", "bridge_config.json", "composition.yaml"]
    loaded = load_bridge(tmp_path / "bridge", pico_llama(), pico_qwen2())
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(composition(ids).logits, loaded(ids).logits)


def test_saved_files_hold_only_the_bridge_and_the_identity(tmp_path):
    composition = _composed()
    composition.save_bridge(tmp_path / "b")
    tensors = load_file(str(tmp_path / "b" / WEIGHTS))
    assert set(tensors) == set(composition.bridge.state_dict())
    assert all(k.startswith("blocks.") for k in tensors)
    config = json.loads((tmp_path / "b" / "bridge_config.json").read_text())
    assert config["format_version"] == 1
    assert config["anchor"]["model_type"] == "llama" and config["anchor"]["width"] == 64
    assert config["specialist"]["model_type"] == "qwen2" and config["specialist"]["num_layers"] == 8
    assert config["bridge"]["pairs"] == [list(p) for p in composition.pairs]
    assert config["num_parameters"] == composition.bridge.num_parameters()
    recipe = yaml.safe_load((tmp_path / "b" / "composition.yaml").read_text())
    assert "anchor" in recipe and "specialist" in recipe
    card = (tmp_path / "b" / "README.md").read_text()
    assert "h_i <- h_i + W_o Attn(" in card


def test_wrong_pair_is_refused_with_what_differs(tmp_path):
    _composed().save_bridge(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"anchor model_type is 'gpt2'.*'llama'"):
        load_bridge(tmp_path / "b", pico_gpt2(), pico_qwen2())
    with pytest.raises(ConfigError, match=r"specialist num_layers is 4, the bridge was made for 8"):
        load_bridge(tmp_path / "b", pico_llama(), pico_qwen2(layers=4))


def test_a_different_tokenizer_or_file_hash_is_refused(tmp_path):
    composition = _composed()
    composition.sources = {"anchor": {"name": "a.gguf", "sha256": "aa" * 32}}
    composition.save_bridge(tmp_path / "b")
    with pytest.raises(ConfigError, match="anchor sha256 differs"):
        load_bridge(
            tmp_path / "b",
            pico_llama(),
            pico_qwen2(),
            sources={"anchor": {"name": "a.gguf", "sha256": "bb" * 32}},
        )
    # Unknown on one side is not a mismatch (a model passed in memory has no file hash).
    load_bridge(tmp_path / "b", pico_llama(), pico_qwen2())


def test_overwrite_is_atomic_and_never_half_written(tmp_path, monkeypatch):
    first = _composed(seed=1)
    first.save_bridge(tmp_path / "b")
    before = (tmp_path / "b" / WEIGHTS).read_bytes()

    import composer.export as export

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "model_card", crash)  # fails after the tensors were written
    with pytest.raises(OSError, match="disk full"):
        _composed(seed=2).save_bridge(tmp_path / "b")
    assert (tmp_path / "b" / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary left behind
    monkeypatch.undo()
    _composed(seed=2).save_bridge(tmp_path / "b")
    assert (tmp_path / "b" / WEIGHTS).read_bytes() != before


def test_refuses_to_overwrite_a_folder_that_is_not_a_bridge(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not a bridge folder"):
        _composed().save_bridge(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_loading_a_folder_that_is_not_a_bridge_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a bridge folder: expected bridge.safetensors"):
        load_bridge(tmp_path, pico_llama(), pico_qwen2())


def test_no_pickle_in_the_bridge_folder(tmp_path):
    _composed().save_bridge(tmp_path / "b")
    for path in (tmp_path / "b").iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # pickle protocol marker
