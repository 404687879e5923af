"""The four CALM traps and the composition's contract, on pico models of two architectures."""

from __future__ import annotations

import pytest
import torch

from composer.composition import compose
from composer.config import BridgeConfig
from tests.conftest import VOCAB, randomize_bridge


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def test_composed_equals_anchor_at_init(model_pair):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    ids = _ids()
    with torch.no_grad():
        composed = composition(ids).logits
        alone = anchor(ids).logits
    assert torch.equal(composed, alone)  # exactly, not approximately


def test_future_tokens_do_not_change_earlier_logits(model_pair):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    randomize_bridge(composition)
    ids = _ids()
    changed = ids.clone()
    t = 5
    changed[:, t + 1 :] = _ids(seed=1)[:, t + 1 :]
    with torch.no_grad():
        before = composition(ids).logits
        after = composition(changed).logits
        alone = anchor(ids).logits
    assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6)
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :], atol=1e-3)
    # The randomised bridge really acts: composed differs from the anchor.
    assert (before - alone).abs().max() > 1e-2


def test_without_causal_mask_the_label_leaks(model_pair):
    """The ablation shows the test above can fail: without the mask, later tokens leak back."""
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2, causal=False))
    randomize_bridge(composition)
    ids = _ids()
    changed = ids.clone()
    changed[:, 6:] = _ids(seed=1)[:, 6:]
    with torch.no_grad():
        before = composition(ids).logits
        after = composition(changed).logits
    assert (before[:, :6] - after[:, :6]).abs().max() > 1e-3


def test_left_padded_batch_matches_each_sequence_alone(model_pair):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    randomize_bridge(composition)
    long, short = _ids(1, 10, seed=2)[0], _ids(1, 6, seed=3)[0]
    pad = 4
    batch = torch.stack([long, torch.cat([torch.full((pad,), 0), short])])
    mask = torch.tensor([[1] * 10, [0] * pad + [1] * 6])
    with torch.no_grad():
        batched = composition(batch, attention_mask=mask).logits
        alone_long = composition(long[None]).logits
        alone_short = composition(short[None]).logits
    assert torch.allclose(batched[0], alone_long[0], atol=1e-4)
    assert torch.allclose(batched[1, pad:], alone_short[0], atol=1e-4)
    assert torch.isfinite(batched).all()  # padding queries read nothing, no NaN


def test_right_padding_is_respected(model_pair):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    randomize_bridge(composition)
    seq = _ids(1, 6, seed=4)
    batch = torch.cat([seq, torch.full((1, 3), 0)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        padded = composition(batch, attention_mask=mask).logits
        alone = composition(seq).logits
    assert torch.allclose(padded[0, :6], alone[0], atol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_cached_equals_uncached_greedy_decoding(model_pair, padded):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    randomize_bridge(composition, scale=0.3)
    ids = _ids(2, 7, seed=5)
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :3] = 0
        mask[1, :3] = 0
    cached = composition.generate(
        ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], use_cache=True
    )
    uncached = composition.generate(
        ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], use_cache=False
    )
    assert cached.shape == (2, 24)  # new tokens only
    assert torch.equal(cached, uncached)


def test_decode_state_grows_one_entry_per_token(model_pair):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    state = composition.new_decode_state()
    ids = _ids(1, 5)
    composition.step(ids, torch.ones_like(ids), state=state)
    composition.step(ids[:, :1], torch.ones(1, 6, dtype=torch.long), state=state)
    assert state.length == 6
    assert all(k.shape[2] == 6 for k in state.keys)
    assert state.anchor_cache is not state.specialist_cache
    assert state.anchor_cache.get_seq_length() == state.specialist_cache.get_seq_length() == 6


def test_only_bridge_tensors_change_in_training(model_pair):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    frozen_before = {
        f"{role}.{k}": v.clone()
        for role, model in (("anchor", anchor), ("specialist", specialist))
        for k, v in model.state_dict().items()
    }
    bridge_before = {k: v.clone() for k, v in composition.bridge.state_dict().items()}
    assert {id(p) for p in composition.parameters()} == {
        id(p) for p in composition.bridge.parameters()
    }
    assert all(p.requires_grad for p in composition.parameters())
    assert not any(p.requires_grad for p in anchor.parameters())
    assert not any(p.requires_grad for p in specialist.parameters())
    optimizer = torch.optim.AdamW(composition.parameters(), lr=1e-2)
    ids = _ids()
    for _ in range(3):
        loss = composition(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for role, model in (("anchor", anchor), ("specialist", specialist)):
        for k, v in model.state_dict().items():
            assert torch.equal(v, frozen_before[f"{role}.{k}"]), f"{role} {k} changed"
    changed = [
        k
        for k, v in composition.bridge.state_dict().items()
        if not torch.equal(v, bridge_before[k])
    ]
    assert any(k.endswith("o_proj.weight") for k in changed)
    assert len(changed) == len(bridge_before)


def test_no_autograd_below_lowest_connected_layer():
    from composer.architectures import decoder_layers
    from tests.conftest import pico_llama, pico_qwen2

    anchor, specialist = pico_llama(layers=6), pico_qwen2()
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(pairs=((3, 1), (5, 7))))
    seen: dict[str, bool] = {}
    handles = [
        layer.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(f"anchor{i}", out.requires_grad)
        )
        for i, layer in enumerate(decoder_layers(anchor))
    ]
    handles += [
        layer.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(f"specialist{i}", out.requires_grad)
        )
        for i, layer in enumerate(decoder_layers(specialist))
    ]
    try:
        ids = _ids()
        composition(ids, labels=ids).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    # Layer 3's own output (seen before the bridge adds to it) and everything below it is
    # computed before any bridge tensor enters: no graph there. Layers 4 and 5 carry grad.
    assert [seen[f"anchor{i}"] for i in range(6)] == [False, False, False, False, True, True]
    assert not any(seen[f"specialist{i}"] for i in range(8))


def test_hooks_are_removed_after_an_exception(model_pair):
    from composer.architectures import decoder_layers

    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    last = decoder_layers(anchor)[-1]

    def boom(module, args, output):
        raise RuntimeError("failure inside the anchor's forward")

    handle = last.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="failure inside"):
            composition(_ids())
    finally:
        handle.remove()
    for model in (anchor, specialist):
        for layer in decoder_layers(model):
            assert len(layer._forward_hooks) == 0
    with torch.no_grad():  # and the anchor is itself again
        assert torch.equal(anchor(_ids()).logits, composition(_ids()).logits)


def test_bridge_off_is_the_anchor_alone(model_pair):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    randomize_bridge(composition)
    ids = _ids()
    with torch.no_grad(), composition.bridge_off():
        off = composition(ids).logits
    with torch.no_grad():
        on = composition(ids).logits
    assert torch.equal(off, anchor(ids).logits)
    assert not torch.allclose(on, off)


def test_loss_matches_transformers_shift(model_pair):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    ids = _ids()
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        ours = composition(ids, labels=labels).loss
        theirs = anchor(ids, labels=labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_narrow_bridge_parameter_count():
    from tests.conftest import pico_llama, pico_qwen2

    anchor, specialist = pico_llama(width=64), pico_qwen2(width=48)
    full = compose(anchor, specialist, bridge_config=BridgeConfig(every=4))
    narrow = compose(
        anchor,
        specialist,
        bridge_config=BridgeConfig(every=4, num_heads=2, head_dim=8, project_specialist=False),
    )
    n = len(full.pairs)
    d_a, d_s = 64, 48
    # Paper: D_s*D_a + 4*D_a^2 per block, plus our two RMSNorm weight vectors.
    assert full.bridge.num_parameters() == n * (d_s * d_a + 4 * d_a * d_a + d_a + d_s)
    assert narrow.bridge.num_parameters() == n * (d_a * 16 + 2 * d_s * 16 + 16 * d_a + d_a + d_s)
    assert full.bridge.shape.num_parameters() == full.bridge.num_parameters()
    assert narrow.bridge.shape.num_parameters() == narrow.bridge.num_parameters()


def test_specialist_as_encoder_reads_only_the_prompt(model_pair):
    """The paper's ablation: cached == uncached, and it differs from full co-decoding."""
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2))
    randomize_bridge(composition, scale=0.3)
    ids = _ids(2, 6, seed=6)
    kwargs = dict(max_new_tokens=16, eos_token_id=[], specialist_reads_prompt_only=True)
    cached = composition.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, composition.generate(ids, use_cache=False, **kwargs))
    full = composition.generate(ids, max_new_tokens=16, eos_token_id=[])
    assert not torch.equal(cached, full)


def test_prompt_only_bridge_trains_as_it_decodes(model_pair):
    """bridge.prompt_only: a teacher-forced pass with labels reads the same specialist states as
    greedy decoding does (the prompt's), so its argmax reproduces the decoded tokens."""
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2, prompt_only=True))
    randomize_bridge(composition, scale=0.3)
    prompt = _ids(2, 6, seed=7)
    new = composition.generate(prompt, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(
        new,
        composition.generate(
            prompt, max_new_tokens=10, eos_token_id=[], specialist_reads_prompt_only=True
        ),
    )
    full = torch.cat([prompt, new], dim=1)
    labels = full.clone()
    labels[:, : prompt.shape[1]] = -100
    with torch.no_grad():
        logits = composition(full, labels=labels).logits
    assert torch.equal(logits[:, prompt.shape[1] - 1 : -1].argmax(-1), new)
    with torch.no_grad():  # without labels nothing marks the prompt: every token is read
        unmasked = composition(full).logits
    assert not torch.allclose(unmasked[:, prompt.shape[1] :], logits[:, prompt.shape[1] :])


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    from composer.bridge import rotate

    generator = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, 2, 1, 8, generator=generator),
        torch.randn(1, 2, 1, 8, generator=generator),
    )

    def score(query_pos: int, key_pos: int) -> torch.Tensor:
        return (rotate(q, torch.tensor([[query_pos]])) * rotate(k, torch.tensor([[key_pos]]))).sum(
            -1
        )

    assert torch.equal(rotate(q, torch.tensor([[0]])), q)
    assert torch.allclose(score(7, 3), score(14, 10), atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 6), atol=1e-3)


def test_bridge_without_rotary_keeps_every_invariant(model_pair):
    anchor, specialist = model_pair
    composition = compose(anchor, specialist, bridge_config=BridgeConfig(every=2, rotary=False))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(composition(ids).logits, anchor(ids).logits)
    randomize_bridge(composition, scale=0.3)
    cached = composition.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(
        cached, composition.generate(ids, max_new_tokens=8, eos_token_id=[], use_cache=False)
    )


def test_a_seeded_bridge_is_repeatable_and_leaves_the_global_generator_alone():
    from tests.conftest import pico_llama, pico_qwen2

    pairs = [(pico_llama(), pico_qwen2()) for _ in range(3)]  # building them seeds torch

    def bridge(i: int, seed: int) -> dict[str, torch.Tensor]:
        anchor, specialist = pairs[i]
        composed = compose(anchor, specialist, bridge_config=BridgeConfig(every=2), seed=seed)
        return dict(composed.bridge.state_dict())

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = bridge(0, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream went on untouched
    second, other = bridge(1, seed=7), bridge(2, seed=8)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
