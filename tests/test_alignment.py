"""Two tokenizers: the anchor and the specialist read the same text aligned by characters.

Pico models with the character tokenizer on one side and a byte-level BPE trained on the fly on
the other, in both orders. The invariants are the shared-vocabulary ones (tests/test_composition)
restated for text: equal to the anchor at init, no character beyond an anchor token's text is
ever read at or before it, cached decoding equals recomputing, teacher forcing equals decoding.
"""

from __future__ import annotations

import pytest
import torch

import composer.alignment as alignment_module
from composer.aligned_reading import read_aligned
from composer.alignment import (
    AlignedTokens,
    TextAlignment,
    aligned_tokens,
    backend_of,
    committed_cut,
    needs_alignment,
    start_ids,
    tail_sources,
    twin_visibility,
)
from composer.chartok import build_bpe_tokenizer, build_char_tokenizer
from composer.composition import compose
from composer.config import BridgeConfig, ConfigError
from tests.conftest import pico_llama, pico_qwen2, randomize_bridge

CORPUS = [
    "The river wound through the valley, past the mills and the old stone bridge.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))\n",
    "Key k17 maps to 42; key k3 maps to 7. What is k17 + k3? 49.",
] * 30
TEXT = "The river wound past 12,345 mills: def add(a, b): return a+b  # done"


@pytest.fixture(scope="module")
def tokenizers():
    return build_char_tokenizer(), build_bpe_tokenizer(CORPUS, vocab_size=320)


def _pair(tokenizers, order: str, *, seed: int = 0):
    char, bpe = tokenizers
    a_tok, s_tok = (char, bpe) if order == "char+bpe" else (bpe, char)
    anchor = pico_llama(vocab_size=len(a_tok), seed=seed)
    specialist = pico_qwen2(vocab_size=len(s_tok), seed=seed + 1)
    composition = compose(
        anchor,
        specialist,
        bridge_config=BridgeConfig(every=2),
        tokenizer=a_tok,
        specialist_tokenizer=s_tok,
        seed=seed,
    )
    return composition, a_tok, s_tok


ORDERS = ["char+bpe", "bpe+char"]


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


# --- the rule, as pure functions ---------------------------------------------------------------


def test_the_cut_holds_back_the_tail_and_never_splits_a_character():
    spans = [(0, 3), (3, 5), (5, 9)]
    assert committed_cut(spans, limit=5) == 2
    assert committed_cut(spans, limit=9) == 2  # the last token is always held back
    assert committed_cut(spans, limit=4) == 1
    # "a" then the two byte tokens of one character (both spanning it): never split them
    assert committed_cut([(0, 1), (1, 3), (1, 3)], limit=3) == 1
    assert committed_cut([(0, 0), (0, 2)], limit=2) == 0  # a token with no text is not a cut


def test_start_tokens_are_the_tokenizers_own(tokenizers):
    char, bpe = tokenizers
    assert start_ids(char) == ()
    assert start_ids(bpe) == (bpe.bos_token_id,)


@pytest.mark.parametrize("order", ORDERS)
def test_committed_tokens_spell_the_text_and_never_pass_the_anchors(tokenizers, order):
    _, a_tok, s_tok = _pair(tokenizers, order)
    alignment = TextAlignment(a_tok, s_tok)
    row = alignment.row()
    for token in _ids(a_tok, TEXT)[0].tolist():
        row.push(token)
        spelled = s_tok.decode(row.committed, skip_special_tokens=True)
        assert spelled == row.text[: row.committed_chars]  # what was read is the text so far
        assert row.committed_chars <= len(row.text)  # never a character past the anchor's
        # with the tentative tail, the specialist reads the whole text so far, and no more
        assert s_tok.decode(row.committed + row.tail, skip_special_tokens=True) == row.text
    assert row.text == a_tok.decode(_ids(a_tok, TEXT)[0], skip_special_tokens=True)
    assert row.committed_chars > len(TEXT) - 12  # only the last word is still held back


def test_a_byte_token_inside_a_character_adds_no_text_until_the_character_is_whole(tokenizers):
    char, bpe = tokenizers
    row = TextAlignment(bpe, char).row()
    ids = bpe("é", add_special_tokens=False).input_ids
    assert len(ids) == 2  # é is two bytes, unseen in the corpus: two byte tokens
    row.push(ids[0])
    assert row.text == ""
    row.push(ids[1])
    assert row.text == "é"


def test_a_shared_tokenizer_needs_no_alignment(tokenizers):
    char, bpe = tokenizers
    assert not needs_alignment(char, char)
    assert not needs_alignment(char, build_char_tokenizer())  # another object, the same ids
    assert not needs_alignment(char, None)
    assert needs_alignment(char, bpe)


# --- the invariants on composed models ----------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_composed_equals_anchor_exactly_at_init(tokenizers, order):
    composition, a_tok, _ = _pair(tokenizers, order)
    assert composition.alignment is not None
    ids = _ids(a_tok, TEXT)
    with torch.no_grad():
        composed = composition(ids).logits
        alone = composition.anchor(input_ids=ids).logits
    assert torch.equal(composed, alone)


def _changed_after(ids: torch.Tensor, t: int, a_tok, seed: int) -> torch.Tensor:
    """The same first t+1 anchor tokens, then other text."""
    other = "Zebras quietly 987 xylophones!? jump over lazy dogs"
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(0, 20, (1,), generator=generator))
    tail = _ids(a_tok, other[start:])[0]
    n = ids.shape[1] - (t + 1)
    tail = tail.repeat(n // len(tail) + 1)[:n]
    return torch.cat([ids[0, : t + 1], tail])[None]


@pytest.mark.parametrize("order", ORDERS)
def test_text_after_an_anchor_token_changes_no_logit_at_or_before_it(tokenizers, order):
    composition, a_tok, _ = _pair(tokenizers, order)
    randomize_bridge(composition)
    ids = _ids(a_tok, TEXT)
    with torch.no_grad():
        base = composition(ids).logits
        assert not torch.allclose(base, composition.anchor(input_ids=ids).logits)  # it reads
        for t in range(2, ids.shape[1] - 1, 3):
            changed = composition(_changed_after(ids, t, a_tok, seed=t)).logits
            torch.testing.assert_close(changed[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)


def _leaky_tokens(a_tok, s_tok):
    """The rule's ablation: every specialist token of the whole text, readable from the anchor
    token in whose text it starts (a token straddling that token's end is read early)."""

    def aligned(rows, input_ids, attention_mask, *, column_offset, pad_id):
        ids = input_ids[0].tolist()
        ends = [len(a_tok.decode(ids[: t + 1], skip_special_tokens=True)) for t in range(len(ids))]
        encoded = s_tok(
            a_tok.decode(ids, skip_special_tokens=True),
            add_special_tokens=False,
            return_offsets_mapping=True,
        )
        columns = [
            next(t for t, end in enumerate(ends) if end > start)
            for start, _ in encoded["offset_mapping"]
        ]
        n = len(columns)
        none = torch.zeros(1, 0, dtype=torch.long)  # no tails: everything is read at once
        return AlignedTokens(
            ids=torch.tensor([encoded["input_ids"]]),
            mask=torch.ones(1, n, dtype=torch.long),
            columns=torch.tensor([columns]) + column_offset,
            ends=torch.tensor([columns]) + column_offset,
            tail_ids=none,
            tail_mask=none,
            tail_columns=none,
            tail_index=none,
            tail_ends=none,
            tail_source=none,
        )

    return aligned


def test_without_the_rule_the_next_characters_leak(tokenizers, monkeypatch):
    # A BPE specialist under a character anchor: its tokens straddle anchor tokens' ends (with a
    # character specialist nothing straddles, so this ablation cannot leak in the other order).
    import composer.aligned_reading as reading_module

    composition, a_tok, s_tok = _pair(tokenizers, "char+bpe")
    randomize_bridge(composition)
    monkeypatch.setattr(reading_module, "aligned_tokens", _leaky_tokens(a_tok, s_tok))
    ids = _ids(a_tok, TEXT)
    leaks = 0
    with torch.no_grad():
        base = composition(ids).logits
        for t in range(2, ids.shape[1] - 1, 3):
            changed = composition(_changed_after(ids, t, a_tok, seed=t)).logits
            leaks += not torch.allclose(changed[:, : t + 1], base[:, : t + 1], atol=1e-5)
    assert leaks > 0


@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
def test_cached_co_decoding_equals_recomputing_for_64_tokens(tokenizers, order):
    composition, a_tok, _ = _pair(tokenizers, order, seed=3)
    randomize_bridge(composition, scale=0.3)
    prompts = ["def add(a, b):", "The river wound past 12,3"]  # the second ends inside a number
    rows = [_ids(a_tok, p)[0] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):  # left padding
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    settings = {"max_new_tokens": 64, "eos_token_id": [], "attention_mask": mask}
    cached = composition.generate(ids, use_cache=True, **settings)
    recomputed = composition.generate(ids, use_cache=False, **settings)
    assert cached.shape == (2, 64)
    assert torch.equal(cached, recomputed)
    texts = [a_tok.decode(row, skip_special_tokens=True) for row in cached]
    assert all(texts), texts  # text was written, so the specialist read along


@pytest.mark.parametrize("order", ORDERS)
def test_teacher_forced_logits_equal_the_logits_seen_while_decoding(tokenizers, order):
    composition, a_tok, _ = _pair(tokenizers, order, seed=5)
    randomize_bridge(composition, scale=0.3)
    ids = _ids(a_tok, TEXT)
    with torch.no_grad():
        forced = composition(ids).logits  # (1, T, V)
        state = composition.new_decode_state()
        stepped = []
        for t in range(ids.shape[1]):
            mask = torch.ones(1, t + 1, dtype=torch.long)
            stepped.append(composition.step(ids[:, t : t + 1], mask, state=state)[:, -1])
    torch.testing.assert_close(torch.stack(stepped, dim=1), forced, rtol=1e-4, atol=1e-4)
    assert state.specialist_mask.sum() == len(state.rows[0].committed)


@pytest.mark.parametrize("order", ORDERS)
def test_each_position_reads_the_word_it_is_writing_as_the_specialist_would_alone(
    tokenizers, order
):
    # The tentative tail: the bridge's keys for anchor position t's tail equal those made from
    # the specialist run alone over exactly the tokens it has read by t (committed + tail).
    composition, a_tok, s_tok = _pair(tokenizers, order, seed=7)
    randomize_bridge(composition, scale=0.3)
    ids = _ids(a_tok, TEXT)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        keys, _, visible = read_aligned(composition, ids, mask, mask, None)
    k = 0  # the first block
    _, layer = composition.pairs[k]
    block = composition.bridge.blocks[k]
    row = composition.alignment.row()
    committed_so_far, checked = 0, 0
    for t, token in enumerate(ids[0].tolist()):
        committed_so_far += len(row.push(token))
        if not row.tail or t % 4:
            continue
        # the tail keys anchor position t reads: the last visible entries of its query row
        read = visible[0, t].nonzero().flatten()
        assert len(read) == committed_so_far + len(row.tail)
        tail_key = keys[k][0, :, read[-1]]  # (H, hd): the last token of t's tail
        alone = torch.tensor([row.committed + row.tail])
        with torch.no_grad():
            states = composition.specialist(alone, output_hidden_states=True).hidden_states
        position = torch.tensor([[t]])
        expected, _ = block.keys_values(states[layer + 1][:, -1:], position)
        torch.testing.assert_close(tail_key, expected[0, :, 0], rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked >= 5


def test_tail_sources_point_at_the_committed_tokens_a_tail_equals():
    committed = [5, 6, 7, 8]  # this call's committed tokens; the tail was read after the first
    assert tail_sources(committed, 1, [6, 7]) == [1, 2]
    assert tail_sources(committed, 1, [6, 9, 8]) == [1, -1, -1]  # the word was re-tokenized
    assert tail_sources(committed, 1, [9, 7]) == [-1, -1]  # a later token never matches alone
    assert tail_sources(committed, 3, [8, 9]) == [3, -1]  # its end is not committed (yet)
    assert tail_sources(committed, 4, []) == []


@pytest.mark.parametrize("order", ORDERS)
def test_a_tail_token_committed_unchanged_is_not_run_twice(tokenizers, order):
    # Training: the specialist runs over the committed tokens, then over only those tail tokens
    # that were never committed as they stand (the others take the committed token's states;
    # the test above and the teacher-forcing test check that the keys stay the same).
    composition, a_tok, _ = _pair(tokenizers, order)
    ids = _ids(a_tok, TEXT)
    alignment = composition.alignment
    new = aligned_tokens(
        [alignment.row()], ids, torch.ones_like(ids), column_offset=0, pad_id=alignment.pad_id
    )
    source = new.tail_source[0]
    reused = source >= 0
    assert 0 < int(reused.sum()) < new.tail_ids.shape[1]
    assert torch.equal(new.ids[0, source[reused]], new.tail_ids[0, reused])
    ran = []

    def count(module, args, kwargs):  # noqa: ANN001, ANN202
        ran.append(kwargs["input_ids"].shape[1])

    handle = composition.specialist.base_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with torch.no_grad():
            composition(ids)
    finally:
        handle.remove()
    assert sum(ran) == new.ids.shape[1] + new.tail_ids.shape[1] - int(reused.sum())


@pytest.mark.parametrize("order", ORDERS)
def test_the_aligner_reads_the_tokenizers_directly_with_the_same_result(
    tokenizers, order, monkeypatch
):
    # RowAligner calls the `tokenizers` library under transformers (backend_of) for speed; the
    # tokens, columns, ends and tails are those of the transformers calls it replaces.
    composition, a_tok, s_tok = _pair(tokenizers, order)
    assert backend_of(a_tok) is not None and backend_of(s_tok) is not None
    ids = _ids(a_tok, TEXT + " ünï 日本")
    alignment = composition.alignment

    def aligned():
        return aligned_tokens(
            [alignment.row()], ids, torch.ones_like(ids), column_offset=0, pad_id=alignment.pad_id
        )

    direct = aligned()
    monkeypatch.setattr(alignment_module, "backend_of", lambda tokenizer: None)
    through_transformers = aligned()
    for name, value in vars(direct).items():
        assert torch.equal(value, getattr(through_transformers, name)), name


def test_a_query_reads_the_twins_of_its_own_tail_only():
    twins = torch.tensor([[-1, 0, 2, 1]])  # the committed token each tail token equals, or -1
    tail_columns = torch.tensor([[1, 1, 3, 5]])  # column 5 is past the 4 queries: not read
    readable = torch.tensor([[1, 1, 1, 0, 1, 1]])  # column 3 is not readable (prompt-only rule)
    where = {"num_committed": 3, "num_queries": 4}
    out = twin_visibility(twins, tail_columns, readable, **where)
    assert out.nonzero().tolist() == [[0, 1, 0]]
    readable[0, 3] = 1
    assert twin_visibility(twins, tail_columns, readable, **where).nonzero().tolist() == [
        [0, 1, 0],
        [0, 3, 2],
    ]
    # queries 2.. of a call that began at column 2: column 3's tail is read by query 1
    shifted = twin_visibility(twins, tail_columns, readable, **where, query_offset=2)
    assert shifted.nonzero().tolist() == [[0, 1, 2], [0, 3, 1]]
    assert not twin_visibility(twins, tail_columns, readable, **where, causal=False).any()


@pytest.mark.parametrize("order", ORDERS)
def test_a_twin_ends_where_its_tail_token_ends_and_no_copy_of_it_is_read(tokenizers, order):
    # Keys are rotated by the anchor column where a token's text ends: a tail token and the
    # committed token it later becomes end at the same column, so they have the same key and
    # the bridge reads the committed one; only the other tail tokens get keys of their own.
    composition, a_tok, _ = _pair(tokenizers, order)
    ids = _ids(a_tok, TEXT)
    alignment = composition.alignment
    new = aligned_tokens(
        [alignment.row()], ids, torch.ones_like(ids), column_offset=0, pad_id=alignment.pad_id
    )
    assert bool((new.ends <= new.columns).all()) and bool((new.ends < new.columns).any())
    assert bool((new.tail_ends <= new.tail_columns).all())
    source = new.tail_source[0]
    reused = source >= 0
    assert torch.equal(new.ends[0, source[reused]], new.tail_ends[0, reused])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        keys, _, visible = read_aligned(composition, ids, mask, mask, None)
    assert keys[0].shape[2] == visible.shape[2] == new.ids.shape[1] + int((~reused).sum())


@pytest.mark.parametrize("order", ORDERS)
def test_a_padded_batch_reads_each_row_as_it_would_alone(tokenizers, order):
    # Rows commit and reuse different numbers of specialist tokens: the batch packs each row's
    # tail tokens to its front; every row's logits must be those of the row run alone.
    composition, a_tok, _ = _pair(tokenizers, order, seed=9)
    randomize_bridge(composition, scale=0.3)
    rows = [_ids(a_tok, text)[0] for text in (TEXT, "The old mills: 12+3", "def f(x): riverbank")]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):  # right padding, as in training
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    with torch.no_grad():
        batched = composition(ids, attention_mask=mask).logits
        for b, r in enumerate(rows):
            alone = composition(r[None]).logits[0]
            torch.testing.assert_close(batched[b, : len(r)], alone, rtol=1e-4, atol=1e-4)


def test_a_sliding_window_is_read_from_the_config():
    from transformers import Gemma3TextConfig, Qwen2Config

    from composer.architectures import sliding_window

    assert sliding_window(Gemma3TextConfig())
    assert not sliding_window(Qwen2Config())


@pytest.mark.parametrize("order", ORDERS)
def test_only_the_bridge_trains_and_the_loss_falls(tokenizers, order):
    composition, a_tok, _ = _pair(tokenizers, order)
    ids = _ids(a_tok, TEXT)
    optimizer = torch.optim.AdamW(composition.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = composition(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(not p.requires_grad for p in composition.anchor.parameters())


def test_a_bridge_records_both_tokenizers_and_is_refused_on_another_pair(tokenizers, tmp_path):
    from composer.loading import load_bridge

    composition, a_tok, s_tok = _pair(tokenizers, "char+bpe")
    randomize_bridge(composition)
    composition.save_bridge(str(tmp_path / "bridge"))
    ids = _ids(a_tok, TEXT)
    loaded = load_bridge(
        tmp_path / "bridge",
        composition.anchor,
        composition.specialist,
        tokenizer=a_tok,
        specialist_tokenizer=s_tok,
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, composition(ids).logits)
    other = build_bpe_tokenizer(CORPUS[1:2], vocab_size=320)  # trained on other text
    with pytest.raises(ConfigError, match="specialist tokenizer_fingerprint differs"):
        load_bridge(
            tmp_path / "bridge",
            composition.anchor,
            composition.specialist,
            tokenizer=a_tok,
            specialist_tokenizer=other,
        )


def test_different_vocabularies_without_both_tokenizers_are_refused_with_the_fix_named():
    anchor, specialist = pico_llama(vocab_size=97), pico_qwen2(vocab_size=120)
    with pytest.raises(ConfigError, match="pass both tokenizers"):
        compose(anchor, specialist)


@pytest.mark.slow
def test_a_recipe_of_two_tokenizers_trains_saves_and_loads_from_folders(tokenizers, tmp_path):
    """The whole path a user takes: folders with their own tokenizers, `train` (data tokenized by
    the anchor's tokenizer, the specialist's view derived in the composition), the bridge folder,
    then load_composition with that bridge and the same logits."""
    import json

    import yaml

    from composer.loading import load_composition
    from composer.train import train

    char, bpe = tokenizers
    for name, model, tok in (
        ("anchor", pico_llama(vocab_size=len(char)), char),
        ("specialist", pico_qwen2(vocab_size=len(bpe)), bpe),
    ):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = [{"text": line} for line in CORPUS[:3] * 4]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "anchor": {"model": str(tmp_path / "anchor")},
        "specialist": {"model": str(tmp_path / "specialist")},
        "bridge": {"every": 2, "num_heads": 2, "head_dim": 16},
        "training": {
            "max_steps": 4,
            "batch_size": 2,
            "lr": 1e-2,
            "warmup_steps": 1,
            "logging_every": 1,
            "save_every": 4,
            "max_length": 64,
        },
        "data": {"train": str(tmp_path / "train.jsonl")},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    bridge = train(tmp_path / "recipe.yaml", output_dir=tmp_path / "run")
    saved = json.loads((bridge / "bridge_config.json").read_text())
    assert saved["alignment"] == "characters, keys where their text ends"
    from composer.identity import tokenizer_fingerprint

    assert saved["specialist"]["tokenizer_fingerprint"] == tokenizer_fingerprint(bpe)
    assert saved["anchor"]["tokenizer_fingerprint"] == tokenizer_fingerprint(char)
    loaded = load_composition(tmp_path / "recipe.yaml", bridge=bridge)
    assert loaded.alignment is not None
    ids = _ids(char, TEXT)
    with torch.no_grad():
        assert not torch.equal(loaded(ids).logits, loaded.anchor(input_ids=ids).logits)
    # A bridge saved before keys were placed where their text ends is refused, with the fix.
    saved["alignment"] = "characters"
    (bridge / "bridge_config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="earlier calm-composer.*train it again"):
        load_composition(tmp_path / "recipe.yaml", bridge=bridge)
    saved["alignment"] = "shared ids"  # one trained for a shared tokenizer: said as such
    (bridge / "bridge_config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="share one tokenizer.*train it again"):
        load_composition(tmp_path / "recipe.yaml", bridge=bridge)
