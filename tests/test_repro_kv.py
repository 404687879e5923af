"""The key-value experiment: its data (pure) and the harness end to end at toy size."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from composer.repro import kv_data as kv
from composer.repro.kv import (
    PAPER_SCORING,
    KVSettings,
    ModelSize,
    bridge_rows,
    eval_sets,
    make_task,
    run,
    training_prompts,
)


def test_task_is_a_seeded_permutation_with_a_held_in_split():
    task = kv.make_task(seed=3, num_keys=100)
    assert task == kv.make_task(seed=3, num_keys=100)
    assert task != kv.make_task(seed=4, num_keys=100)
    assert sorted(task.values) == list(range(1, 101))
    assert len(set(task.keys)) == 100 and all(2 <= len(k) <= 6 for k in task.keys)
    assert len(task.held_in) == 20 and not set(task.held_out) & task.held_in


def test_rows_mean_what_they_say():
    task = kv.make_task(seed=0, num_keys=500)
    mapping, rng = task.mapping, random.Random(0)
    for row in kv.kv_math(rng, task, 50, list(task.keys)):
        a, b = row["prompt"].rstrip("=").split("+")
        assert kv.read_number(row["completion"]) == mapping[a] + mapping[b]
    for row in kv.num_math(rng, task, 50):
        a, b = row["prompt"].rstrip("=").split("+")
        assert kv.read_number(row["completion"]) == kv.read_number(a) + kv.read_number(b)
    for row in kv.num_math_in_context(rng, task, 50):  # "qz+fyk=210+543=" -> "7530"
        context, expression, rest = row["prompt"].split("=")
        assert rest == "" and context.replace("+", "").isalpha()
        a, b = expression.split("+")
        assert kv.read_number(row["completion"]) == kv.read_number(a) + kv.read_number(b)
    for row in kv.kv_subs(rng, task, 50, list(task.keys)):
        keys, values = row["prompt"].rstrip("=").split("+"), row["completion"].split("+")
        assert [kv.read_number(v) for v in values] == [mapping[k] for k in keys]
    assert task.answer(357) == "7530" and task.operand(12) == "210"
    for row in kv.kv_worked(rng, task, 20, list(task.keys)):  # "ab+cde=" -> "210+543=7530"
        substituted, answer = row["completion"].split("=")
        values = [kv.read_number(v) for v in substituted.split("+")]
        assert values == [mapping[k] for k in row["prompt"].rstrip("=").split("+")]
        assert kv.read_number(answer) == sum(values)
        for mode in ("subs", "math", "worked"):  # an existing prompt answered the same way
            assert kv.answer_prompt(task, row["prompt"], mode)["completion"] == kv.completion(
                task, row["prompt"].rstrip("=").split("+"), ["+"], mode
            )
        assert kv.answer_prompt(task, row["prompt"], "worked") == row
    minus = kv.make_task(seed=0, num_keys=50, operators="+-")
    a, b = minus.keys[:2]
    expected = minus.answer(minus.mapping[a] - minus.mapping[b])
    assert kv.answer_prompt(minus, f"{a}-{b}=", "math")["completion"] == expected


def test_bridge_data_uses_only_held_in_keys():
    task = kv.make_task(seed=0, num_keys=200)
    rows = bridge_rows(task, "subs", count=500, num_math_share=0.2, seed=0)
    keys = [k for r in rows if not r["prompt"][0].isdigit() for k in r["prompt"][:-1].split("+")]
    assert keys and set(keys) <= task.held_in
    assert sum(r["prompt"][0].isdigit() for r in rows) == 100  # the NUM-MATH share


def test_the_papers_scoring_is_unseen_expressions_over_any_keys_and_ours_held_out_keys():
    settings = replace(KVSettings(), num_keys=60, train_rows=400, eval_rows=80)
    task = make_task(settings)
    sets = eval_sets(task, settings)

    def keys(rows):  # noqa: ANN001, ANN202
        return {k for r in rows for k in r["prompt"].removesuffix("=").split("+")}

    paper = sets[PAPER_SCORING]
    assert len(paper) == 80
    assert not {r["prompt"] for r in paper} & training_prompts(task, settings)
    assert keys(paper) & task.held_in and keys(paper) - task.held_in  # both kinds of key
    assert not keys(sets["KV-MATH"]) & task.held_in  # ours: held-out keys only
    # Drawn last: the other sets are what they were before the paper's scoring was added.
    rng = random.Random(10_000 + settings.seed)
    held_out = list(task.held_out)
    assert sets["KV-SUBS"] == kv.kv_subs(rng, task, 80, held_out)
    assert sets["NUM-MATH"] == kv.num_math(rng, task, 80)
    assert sets["KV-MATH"] == kv.kv_math(rng, task, 80, held_out)


def toy_settings(*, model_steps: int, **changes) -> KVSettings:
    """The experiment at a size that runs in seconds (the numbers mean nothing)."""
    tiny = ModelSize(width=32, layers=2, heads=2, steps=model_steps, batch_size=8, lr=1e-3)
    return replace(
        KVSettings(),
        num_keys=30,
        anchor=tiny,
        specialist=tiny,
        bpe_specialist=tiny,
        bridge_pairs=((0, 1), (1, 1)),
        bridge_heads=2,
        bridge_head_dim=8,
        bridge_steps=2,
        bridge_batch_size=4,
        train_rows=40,
        eval_rows=4,
        **changes,
    )


def test_harness_runs_end_to_end_at_toy_size(tmp_path):
    settings = toy_settings(
        model_steps=5, context_steps=3, variants=("subs", "worked", "no_mask", "encoder", "lora")
    )
    results = run(settings, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["accuracy"]) == {
        "specialist",
        "anchor",
        "CALM (KV-SUBS data)",
        "CALM (worked KV-MATH data)",
        "anchor (context-trained)",
        "no causal mask",
        "specialist as encoder",
        "LoRA",
    }
    config = json.loads(
        (tmp_path / "runs" / "encoder" / "bridge" / "bridge_config.json").read_text()
    )
    assert config["bridge"]["prompt_only"] is True
    assert all(0.0 <= v <= 1.0 for col in saved["accuracy"].values() for v in col.values())
    assert "| KV-MATH |" in (tmp_path / "results.md").read_text()
    assert all(PAPER_SCORING in column for column in saved["accuracy"].values())
    assert (tmp_path / "models" / "anchor" / "kv_meta.json").is_file()
    continued = json.loads((tmp_path / "models" / "anchor-context" / "kv_meta.json").read_text())
    assert continued["continued"] == {"steps": 3, "lr": 1e-3, "context_share": 0.5}
    bridge_file = tmp_path / "runs" / "subs" / "bridge" / "bridge.safetensors"
    made = bridge_file.stat().st_mtime_ns
    again = run(settings, tmp_path)  # the trained models are reused, not retrained
    assert again.seconds["models"] < results.seconds["models"] or again.seconds["models"] < 2
    assert bridge_file.stat().st_mtime_ns == made  # same inputs: the finished bridge is reused
    assert again.accuracy == results.accuracy
    retrained = run(replace(settings, bridge_steps=3, variants=("subs",)), tmp_path)
    assert bridge_file.stat().st_mtime_ns != made  # other settings: trained again
    assert retrained.train_loss["CALM (KV-SUBS data)"] != results.train_loss["CALM (KV-SUBS data)"]


def test_a_run_that_fails_keeps_the_columns_it_measured(tmp_path, monkeypatch):
    import pytest

    from composer.repro import kv as harness

    settings = toy_settings(model_steps=3, variants=("subs", "lora"))

    def broken(*args, **kwargs):
        raise RuntimeError("stopped while training LoRA")

    monkeypatch.setattr(harness, "_train_lora", broken)
    with pytest.raises(RuntimeError, match="stopped while training LoRA"):
        run(settings, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["accuracy"]) == {"specialist", "anchor", "CALM (KV-SUBS data)"}
    assert "CALM (KV-SUBS data)" in (tmp_path / "results.md").read_text()


PROGRESS_RUN = """
import sys
import composer.repro.kv as kv
from tests.test_repro_kv import toy_settings
kv.settings_from = lambda **_: toy_settings(model_steps=200_000, variants=("subs",))
from composer.cli import main
sys.exit(main(["repro", "kv", "--output", sys.argv[1]]))
"""


@pytest.mark.slow
def test_repro_kv_prints_progress_at_once_and_then_at_least_every_ten_seconds(tmp_path):
    """The command (toy models, a long first training) speaks within 10 s of starting and then
    keeps saying how far it is: step, loss and ETA."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRESS_RUN, str(tmp_path / "out")],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[tuple[float, str]] = []
    try:
        for line in process.stdout:
            seen.append((time.monotonic() - start, line.strip()))
            if sum("ETA" in text for _, text in seen) >= 3 or seen[-1][0] > 120:
                break
    finally:
        process.kill()
        process.wait()
    assert seen and seen[0][0] <= 10, seen[:3]
    steps = [(t, text) for t, text in seen if "step" in text and "ETA" in text and "loss" in text]
    assert len(steps) >= 3, seen
    assert "training the anchor" in " ".join(text for _, text in seen)
    gaps = [b - a for (a, _), (b, _) in zip(steps, steps[1:], strict=False)]
    assert all(gap <= 15 for gap in gaps), gaps  # 10 s, with slack for a busy machine


def test_worked_bpe_column_composes_a_specialist_with_its_own_bpe_tokenizer(tmp_path):
    """The worked column with a specialist trained under a BPE of its own text: the recipe's
    specialist folder carries that tokenizer, so the composition aligns by characters."""
    from transformers import AutoTokenizer

    from composer.loading import load_composition
    from composer.repro.kv import BPE_COLUMN, make_bpe_tokenizer, make_task

    settings = toy_settings(model_steps=3, context_steps=2, variants=("worked_bpe",))
    settings = replace(settings, bpe_vocab_size=300)
    results = run(settings, tmp_path)
    assert {"specialist (BPE)", "anchor (context-trained)", BPE_COLUMN} <= set(results.accuracy)
    folder = tmp_path / "models" / "specialist-bpe"
    meta = json.loads((folder / "kv_meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "bpe", "vocab_size": 300, "split_digits": True}
    assert meta["seed"] == 0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = make_task(settings)
    assert tokenizer.get_vocab() == make_bpe_tokenizer(task, settings).get_vocab()  # seeded
    key = task.keys[0]
    assert len(tokenizer(key, add_special_tokens=False).input_ids) < len(key) + 1
    recipe = json.loads((tmp_path / "runs" / "worked_bpe" / "repro_inputs.json").read_text())
    composition = load_composition(recipe["recipe"], device="cpu")
    assert composition.alignment is not None
    # the character models are untouched: their meta carries no tokenizer entry
    assert "tokenizer" not in json.loads(
        (tmp_path / "models" / "specialist" / "kv_meta.json").read_text()
    )


def test_bpe_of_the_specialist_text_merges_keys_and_can_keep_digits_apart():
    """The specialist's BPE is learnt from its own rows (deterministic from the seed); with
    ``bpe_split_digits`` every digit is its own token, as the anchor writes them."""
    from composer.repro.kv import make_bpe_tokenizer, make_task

    settings = replace(KVSettings(), num_keys=100)
    task = make_task(settings)
    text = f"{task.keys[0]}+{task.keys[1]}=" + kv.completion(
        task, list(task.keys[:2]), ["+"], "worked"
    )
    for split in (False, True):
        tokenizer = make_bpe_tokenizer(task, replace(settings, bpe_split_digits=split))
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        pieces = tokenizer.convert_ids_to_tokens(ids[1:])
        assert len(pieces) < len(text)  # some characters are merged (the keys, at least)
        digits = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 for p in digits) == split


def test_the_context_anchor_trains_longer_for_more_keys():
    from composer.repro.kv import KVSettings, context_steps_for

    steps = [context_steps_for(k) for k in (300, 500, 750, 1000)]
    assert steps == [1000, 1000, 2000, 3000]  # 500 keys: the shipped context anchor's 1,000
    assert KVSettings().context_steps is None  # the default follows the key count


def test_the_bridge_trains_longer_for_more_keys_unless_told_how_long():
    from pathlib import Path

    from composer.repro.kv import _recipe, bridge_steps_for

    assert [bridge_steps_for(k) for k in (300, 500, 750, 1000)] == [2400, 2400, 3600, 4800]
    folder = Path("unused")

    def steps(**changes):  # noqa: ANN003, ANN202
        settings = replace(KVSettings(), **changes)
        return _recipe(settings, folder, folder, folder)["training"]["max_steps"]

    assert steps() == 2400 and steps(num_keys=750) == 3600
    assert steps(num_keys=750, bridge_steps=1200) == 1200  # --bridge-steps wins


def test_curriculum_column_starts_from_the_worked_bridge(tmp_path):
    """The "math_curriculum" column trains the direct form from the worked bridge's weights
    (reusing that bridge when the worked column made it), not from a fresh bridge."""
    from safetensors.torch import load_file

    from composer.repro import kv as harness

    settings = toy_settings(model_steps=3, context_steps=2, variants=("worked", "math_curriculum"))
    results = run(settings, tmp_path)
    assert harness.CURRICULUM_COLUMN in results.accuracy
    digits = results.answer_characters[harness.CURRICULUM_COLUMN]  # a direct-form column
    assert set(digits) == {"held-in", "held-out"} and "CALM (worked KV-MATH data)" not in (
        results.answer_characters
    )
    width = len(make_task(settings).answer(1))  # answers are written at a fixed width
    assert all(len(accs) == width and all(0 <= a <= 1 for a in accs) for accs in digits.values())
    assert "teacher-forced accuracy per answer character" in (tmp_path / "results.md").read_text()
    worked_file = tmp_path / "runs" / "worked" / "bridge" / "bridge.safetensors"
    made = worked_file.stat().st_mtime_ns
    run(replace(settings, variants=("math_curriculum",)), tmp_path)
    assert worked_file.stat().st_mtime_ns == made  # its start is reused, not trained again

    # Same recipe at a learning rate too small to move anything: from the worked bridge the
    # weights stay the worked bridge's; from scratch they are a fresh bridge's.
    recipe = harness._recipe(
        replace(settings, bridge_lr=1e-12),
        tmp_path / "models" / "anchor-context",
        tmp_path / "models" / "specialist",
        tmp_path / "data" / "bridge-math.jsonl",
    )
    start = load_file(worked_file)
    warm, _ = harness._train_calm(recipe, tmp_path / "warm", start=worked_file.parent)
    cold, _ = harness._train_calm(recipe, tmp_path / "cold")
    for name, weight in start.items():
        assert torch.allclose(warm.bridge.state_dict()[name], weight, atol=1e-6), name
    assert any(
        not torch.allclose(cold.bridge.state_dict()[name], weight, atol=1e-4)
        for name, weight in start.items()
    )


def test_an_unknown_variant_is_refused_before_anything_trains(tmp_path):
    from composer.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown variant\(s\) \['wroked'\].*worked"):
        run(toy_settings(model_steps=3, variants=("wroked",)), tmp_path)
    assert not (tmp_path / "models").exists()


def test_answer_characters_scores_each_completion_token_given_the_true_ones_before_it():
    from types import SimpleNamespace

    from composer.repro.kv import answer_characters, make_tokenizer

    tokenizer = make_tokenizer()
    rows = [{"prompt": "ab+c=", "completion": "7530"}, {"prompt": "xyz+q=", "completion": "1100"}]

    def model(shift):  # noqa: ANN001, ANN202
        def forward(input_ids, attention_mask):  # noqa: ANN001, ANN202
            target = torch.roll(input_ids, -shift, dims=1)  # the token `shift` ahead
            return SimpleNamespace(logits=torch.nn.functional.one_hot(target, len(tokenizer)))

        return forward

    assert answer_characters(model(1), tokenizer, rows) == [1.0, 1.0, 1.0, 1.0]  # the oracle
    # Predicting the current token again: right only where a character repeats ("11", "00").
    assert answer_characters(model(0), tokenizer, rows) == [0.0, 0.5, 0.0, 0.5]


def test_the_specialist_trains_longer_above_750_keys_and_matches_the_shipped_one_at_500():
    from composer.presets import default_folder
    from composer.repro.kv import _meta, specialist_steps_for

    assert [specialist_steps_for(k) for k in (300, 500, 750, 1000)] == [1500, 1500, 1500, 3000]
    settings = KVSettings()
    assert settings.specialist.steps is None  # the default follows the key count
    shipped = default_folder() / "models" / "kv-specialist" / "kv_meta.json"
    assert _meta(make_task(settings), settings, "specialist") == json.loads(shipped.read_text())
    more = replace(settings, num_keys=1000)
    assert _meta(make_task(more), more, "specialist")["steps"] == 3000
    fixed = replace(more, specialist=replace(settings.specialist, steps=700))
    assert _meta(make_task(fixed), fixed, "specialist")["steps"] == 700
