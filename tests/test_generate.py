"""Decoding features: sampling through logits processors, EOS, stop strings, streaming, chat."""

from __future__ import annotations

import pytest
import torch
from transformers import TextIteratorStreamer

from composer import compose
from composer.chartok import build_char_tokenizer
from composer.config import BridgeConfig, ConfigError
from composer.generate import chat_input_ids, logits_processors
from tests.conftest import pico_llama, pico_qwen2, randomize_bridge


@pytest.fixture(scope="module")
def composition():
    tokenizer = build_char_tokenizer()
    anchor = pico_llama(vocab_size=len(tokenizer))
    specialist = pico_qwen2(vocab_size=len(tokenizer))
    composed = compose(anchor, specialist, bridge_config=BridgeConfig(every=2), tokenizer=tokenizer)
    randomize_bridge(composed, scale=0.3)
    return composed


def _prompt(composition, text="abc+de="):
    return composition.tokenizer(text, return_tensors="pt").input_ids


def test_top_k_1_sampling_is_greedy(composition):
    ids = _prompt(composition)
    greedy = composition.generate(ids, max_new_tokens=12, eos_token_id=[])
    sampled = composition.generate(
        ids, max_new_tokens=12, eos_token_id=[], do_sample=True, top_k=1, temperature=0.7
    )
    assert torch.equal(greedy, sampled)


def test_sampling_is_reproducible_with_a_generator_and_varies_without(composition):
    ids = _prompt(composition)

    def run(seed):
        return composition.generate(
            ids,
            max_new_tokens=16,
            eos_token_id=[],
            do_sample=True,
            temperature=1.5,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(run(1), run(1))
    assert not all(torch.equal(run(1), run(s)) for s in range(2, 6))


def test_processors_are_transformers_own():
    processors = logits_processors(
        do_sample=True, temperature=0.5, top_p=0.9, top_k=5, repetition_penalty=1.2
    )
    names = [type(p).__name__ for p in processors]
    assert names == [
        "RepetitionPenaltyLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]
    assert (
        len(
            logits_processors(
                do_sample=False, temperature=0.5, top_p=0.9, top_k=5, repetition_penalty=1.0
            )
        )
        == 0
    )


def test_eos_ends_a_row_and_pads_the_rest(composition):
    ids = _prompt(composition)
    free = composition.generate(ids, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, 3])  # pretend the 4th generated token is the end of sequence
    stopped = composition.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    first = int((free[0] == eos).nonzero()[0])
    assert stopped.shape[1] == first + 1  # every row done: decoding stops early
    assert torch.equal(stopped[0], free[0, : first + 1])


def test_stop_strings_end_decoding(composition):
    ids = _prompt(composition)
    free = composition.generate(ids, max_new_tokens=12, eos_token_id=[])
    text = composition.tokenizer.decode(free[0])
    stop = text[4:6]
    stopped = composition.generate(ids, max_new_tokens=12, eos_token_id=[], stop_strings=[stop])
    decoded = composition.tokenizer.decode(stopped[0])
    assert decoded.endswith(stop) and len(decoded) <= text.index(stop) + len(stop)


def test_streaming_yields_the_same_text(composition):
    ids = _prompt(composition)
    streamer = TextIteratorStreamer(composition.tokenizer, skip_prompt=True)
    out = composition.generate(ids, max_new_tokens=10, eos_token_id=[], streamer=streamer)
    assert "".join(streamer) == composition.tokenizer.decode(out[0])


def test_chat_prompt_uses_the_anchor_template(composition):
    ids = chat_input_ids(
        composition.tokenizer, [{"role": "user", "content": "hi"}], system_prompt="be brief"
    )
    text = composition.tokenizer.decode(ids[0])
    assert "be brief" in text and "hi" in text and text.endswith("<|assistant|>\n")


def test_bad_settings_are_refused_with_the_field_named(composition):
    with pytest.raises(ConfigError, match="top_p is 1.5"):
        composition.generate(_prompt(composition), max_new_tokens=3, top_p=1.5)
    with pytest.raises(ConfigError, match="max_new_tokens is 0"):
        composition.generate(_prompt(composition), max_new_tokens=0)
