"""The default key-value preset's models written as GGUF (composer.gguf_write) and run by the
llama.cpp engine with the shipped bridge: the same held-out answers as the torch engine.

The writer is checked by a round trip (transformers' GGUF loader undoes its query/key reordering,
so the weights must come back bit for bit); the engine by the preset's own score on held-out keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from composer.config import ConfigError
from composer.gguf_write import halves_to_pairs, write_gguf
from composer.llamacpp import llama_cpp_missing
from composer.presets import read_preset

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "kv-arithmetic.yaml"
MODELS = ROOT / "presets" / "models"
FOLDERS = {"anchor": MODELS / "kv-anchor-context", "specialist": MODELS / "kv-specialist"}


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("kv-gguf")
    return {
        role: write_gguf(folder, out / f"{folder.name}.gguf") for role, folder in FOLDERS.items()
    }


def test_query_key_rows_move_from_halves_to_adjacent_pairs():
    # one head of 4 dimensions: transformers pairs (0, 2) and (1, 3); llama.cpp (0, 1) and (2, 3)
    rows = torch.arange(4.0)[:, None].numpy()
    assert halves_to_pairs(rows, heads=1)[:, 0].tolist() == [0.0, 2.0, 1.0, 3.0]
    # two heads are reordered each within itself
    rows = torch.arange(8.0)[:, None].numpy()
    assert halves_to_pairs(rows, heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("role", ["anchor", "specialist"])
def test_a_written_gguf_loads_back_with_the_same_weights(ggufs, role):
    from transformers import AutoModelForCausalLM

    path, folder = ggufs[role], FOLDERS[role]
    back = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(back.config, key) == getattr(original.config, key), key
    ours, theirs = back.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_other_architectures_are_refused_by_name(tmp_path):
    from transformers import LlamaConfig, Qwen2Config

    Qwen2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ConfigError, match="model_type is 'qwen2'.*convert_hf_to_gguf"):
        write_gguf(tmp_path, tmp_path / "out.gguf")
    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(llama)
    with pytest.raises(ConfigError, match="model.safetensors is missing"):
        write_gguf(llama, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))  # nothing half-written
    with pytest.raises(ConfigError, match="neither an existing folder"):
        write_gguf(tmp_path / "no-such-model", tmp_path / "out.gguf")


def _gguf_recipe(ggufs: dict[str, Path]) -> dict:
    """The preset's recipe with each model read from its GGUF and tokenized as before."""
    recipe = read_preset(PRESET).config.to_dict()
    for role, path in ggufs.items():
        folder = recipe[role]["model"]
        recipe[role] = {**recipe[role], "model": str(path), "tokenizer": folder}
    return recipe


@pytest.mark.slow
def test_the_llama_cpp_engine_answers_held_out_keys_as_the_torch_engine_does(ggufs):
    missing = llama_cpp_missing()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing}; CI must run the llama.cpp engine's tests")
        pytest.skip(missing)
    from composer.loading import load_composition
    from composer.repro.kv import score_worked

    torch.set_num_threads(2)
    preset = read_preset(PRESET)
    rows = [json.loads(line) for line in open(preset.config.data["eval"])]
    torch_engine = load_composition(PRESET, bridge=preset.shipped_bridge, device="cpu")
    llama = load_composition(_gguf_recipe(ggufs), bridge=preset.shipped_bridge, engine="llama.cpp")
    assert type(llama).__name__ == "LlamaCppComposition"

    expected = score_worked(torch_engine, rows)
    got = score_worked(llama, rows)
    print(f"held-out ({len(rows)} rows): torch {expected}, llama.cpp {got}")
    assert expected["KV-MATH"] >= 0.75  # the preset's promise, so the comparison means something
    for name in ("KV-MATH", "KV-SUBS"):
        assert abs(got[name] - expected[name]) <= 0.02, (name, got, expected)
    with llama.bridge_off():  # and the bridge is what answers: the anchor alone cannot
        assert score_worked(llama, rows[:50])["KV-MATH"] <= 0.05
