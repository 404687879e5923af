"""CUDA: the 4-bit anchor through the real loading path, its gradients, cached decoding, training.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``pytest -m gpu tests/test_gpu.py``. On CUDA, bitsandbytes nf4 computes in bfloat16 and the
specialist loads in bfloat16, so comparisons allow bf16 rounding where the CPU tests are exact.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from composer import compose, progress
from composer.config import BridgeConfig, ModelSpec
from composer.generate import generate
from composer.loading import load_composition, load_model
from composer.train import train
from tests.conftest import pico_llama, randomize_bridge

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


def _recipe(root, **sections):
    return {
        "anchor": {"model": str(root / "anchor"), "quantization": "nf4"},
        "specialist": {"model": str(root / "specialist")},
        "bridge": {"every": 4},
        **sections,
    }


def _linear4bit(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_nf4_anchor_loads_on_cuda_and_step_zero_is_the_anchor(saved_pair):
    composition = load_composition(_recipe(saved_pair), device=CUDA)
    layers = _linear4bit(composition.anchor)
    assert layers, "the anchor was not quantised"
    assert all(m.weight.device.type == CUDA.type and m.weight.dtype == torch.uint8 for m in layers)
    assert all(p.device.type == CUDA.type for p in composition.bridge.parameters())
    ids = composition.tokenizer(["key abc=12", "x+y-z=3 ab"], return_tensors="pt").input_ids
    with torch.no_grad():
        composed = composition(ids.to(CUDA)).logits
        alone = composition.anchor(ids.to(CUDA)).logits
    assert torch.equal(composed, alone)  # zero-initialised bridge: exactly the anchor


def test_cached_decoding_follows_the_full_recompute(saved_pair):
    """Every greedily decoded token (with caches) is the argmax of a full recompute, up to bf16."""
    composition = load_composition(_recipe(saved_pair), device=CUDA)
    randomize_bridge(composition, scale=0.5)
    prompt = composition.tokenizer("key abc=", return_tensors="pt").input_ids.to(CUDA)
    new = generate(composition, prompt, max_new_tokens=16, eos_token_id=[], use_cache=True)
    assert new.shape == (1, 16)
    sequence = torch.cat([prompt, new], dim=1)
    with torch.no_grad():
        logits = composition(sequence).logits[0, prompt.shape[1] - 1 : -1].float()  # (16, V)
        anchor = composition.anchor(sequence).logits[0, prompt.shape[1] - 1 : -1].float()
    assert (logits - anchor).abs().max() > 0.1 * anchor.abs().max(), "the bridge changes nothing"
    chosen = logits.gather(1, new[0].unsqueeze(1)).squeeze(1)
    shortfall = logits.max(dim=1).values - chosen  # 0 where the cached choice is the argmax
    scale = logits.abs().max()
    assert shortfall.max() <= 0.02 * scale, (shortfall.tolist(), float(scale))


def test_bridge_gradients_with_the_4bit_anchor_on_cuda(saved_pair):
    """A no-grad forward first changes nothing; the gradients match a dequantised float32 anchor."""
    import bitsandbytes as bnb

    loaded = load_model(
        ModelSpec(model=str(saved_pair / "anchor"), quantization="nf4"), device=CUDA
    )
    specialist = load_model(ModelSpec(model=str(saved_pair / "specialist")), device=CUDA).model
    quantized = compose(loaded.model, specialist, bridge_config=BridgeConfig(every=4))
    randomize_bridge(quantized, scale=0.2)

    state = pico_llama(width=128, vocab_size=loaded.model.config.vocab_size).state_dict()
    for name, module in loaded.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            state[f"{name}.weight"] = weight.float().cpu()
    reference_anchor = pico_llama(width=128, vocab_size=loaded.model.config.vocab_size)
    reference_anchor.load_state_dict(state)
    reference = compose(
        reference_anchor.to(CUDA), specialist.float(), bridge_config=BridgeConfig(every=4)
    )
    reference.bridge.load_state_dict(quantized.bridge.state_dict())

    ids = loaded.tokenizer(["key abc=12", "x+y-z=3 ab"], return_tensors="pt").input_ids.to(CUDA)

    def bridge_grads(composition, *, no_grad_first: bool) -> dict[str, torch.Tensor]:
        if no_grad_first:
            with torch.no_grad():
                composition(ids)
        composition.bridge.zero_grad()
        composition(ids, labels=ids).loss.backward()
        return {k: p.grad.float().clone() for k, p in composition.bridge.named_parameters()}

    specialist.to(torch.bfloat16)
    plain = bridge_grads(quantized, no_grad_first=False)
    after_no_grad = bridge_grads(quantized, no_grad_first=True)
    specialist.float()
    exact = bridge_grads(reference, no_grad_first=False)
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, f"no gradient reached {name}"
        assert torch.allclose(grad, after_no_grad[name], rtol=1e-3, atol=1e-6), name
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), exact[name].flatten(), 0)
        assert cosine > 0.98, f"{name}: cosine {float(cosine):.4f} to the float32 reference"
        ratio = grad.norm() / exact[name].norm()
        assert 0.9 < ratio < 1.1, f"{name}: norm ratio {float(ratio):.3f}"


def test_training_on_cuda_bf16_paged_8bit_learns_and_round_trips(saved_pair, tmp_path):
    """train() with the GPU presets' settings: nf4 anchor, bf16 autocast, checkpointing, 8-bit."""
    rows = [
        {"prompt": f"{w}=", "completion": w[::-1]} for w in ("abc", "hello", "key", "xyz", "gpu")
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    recipe = _recipe(
        saved_pair,
        training={
            "max_steps": 40,
            "batch_size": 8,
            "lr": 3e-3,
            "max_length": 32,
            "logging_every": 5,
            "save_every": 20,
            "gradient_checkpointing": True,
            "optimizer": "paged_adamw_8bit",
        },
        data={"train": str(tmp_path / "train.jsonl")},
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    composition = load_composition(recipe, device=CUDA, seed=0)
    bridge_dir = train(
        tmp_path / "recipe.yaml", output_dir=tmp_path / "out", composition=composition
    )

    status = progress.read_status(tmp_path / "out")
    assert status["state"] == "finished", status
    records = progress.read_progress(tmp_path / "out")
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], [r["loss"] for r in records]
    assert records[-1]["peak_memory_bytes"] > 0
    assert "PagedAdamW8bit" in (tmp_path / "out" / progress.LOG).read_text()

    reloaded = load_composition(recipe, bridge=bridge_dir, device=CUDA)
    ids = composition.tokenizer(["hello="], return_tensors="pt").input_ids.to(CUDA)
    with torch.no_grad():
        assert torch.allclose(
            reloaded(ids).logits.float(), composition(ids).logits.float(), atol=1e-3
        )
        assert not torch.equal(reloaded(ids).logits, reloaded.anchor(ids).logits)
