"""The app's main endpoints driven with gradio_client, against an in-process server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.handlers.chat import flatten_history
from composer.pairing import default_pairs
from tests.test_app_support import BAD_ROW, served_pico_app

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with served_pico_app(tmp_path_factory.mktemp("client")) as demo:
        yield demo, gradio_client.Client(demo.local_url, verbose=False)


def test_every_event_is_named(app):
    demo, client = app
    names = [d.api_name for d in demo.fns.values()]
    assert len(names) == len(set(names)) and not any("lambda" in n for n in names), names
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in (
        "apply_preset",
        "check_pair",
        "preview_data",
        "start_training",
        "poll_run",
        "stop_training",
        "load_models",
        "chat",
        "compare",
        "save_bridge",
        "archive_bridge",
        "load_bridge",
        "push_to_hub",
    ):
        assert f"/{name}" in endpoints


def test_preset_check_and_data(app):
    demo, client = app
    values = client.predict("pico", api_name="/apply_preset")
    info, anchor, specialist = values[0], values[1], values[2]
    assert "Pico sums" in info and anchor.endswith("models/anchor")
    assert specialist.endswith("models/specialist")
    report, pairs, picture = client.predict(
        anchor, specialist, "none", "none", 2, 2, 16, True, api_name="/check_pair"
    )
    assert report.startswith("**Compatible**") and "<svg" in picture
    expected = default_pairs(anchor_layers=6, specialist_layers=8, every=2)
    assert [tuple(row[1:]) for row in pairs["data"]] == list(expected)
    summary, preview, problems = client.predict(values[-1], api_name="/preview_data")
    assert "prompt_completion" in summary and "48 row(s)" in summary
    assert problems["data"][0][0] == BAD_ROW
    assert preview["data"][0][1].startswith("<bos>")


def test_a_user_error_is_a_message(app):
    _, client = app
    with pytest.raises(Exception, match="no anchor model chosen"):
        client.predict("", "b", "none", "none", 2, 0, 0, True, api_name="/check_pair")


@pytest.mark.slow
def test_start_poll_stop(app):
    demo, client = app
    client.predict("pico", api_name="/apply_preset")
    hyper = [400, 4, 1, 1e-3, 32, 0.1, 2, 0, 200, 0]
    update = client.predict("client-run", *hyper, api_name="/start_training")
    run = update["value"]
    assert run == "client-run" and ["client-run", "client-run"] in update["choices"]
    assert (demo.calm_session.runs_dir / run / "recipe.yaml").is_file()
    deadline, steps = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        bar, status, stats, plot, log = client.predict(run, api_name="/poll_run")
        step = int(bar.split('data-step="')[1].split('"')[0])
        if step and (not steps or step > steps[-1]):
            steps.append(step)
        if len(steps) >= 2:
            break
        time.sleep(0.5)
    assert len(steps) >= 2, status
    # A refreshed page (or a second tab) reconnects to the running job.
    page = client.predict(api_name="/load_page")
    assert any(isinstance(v, dict) and v.get("value") == run for v in page)
    assert "tokens/s" in stats and "loss" in stats
    assert {row[2] for row in plot["data"]} >= {"raw", "smoothed"}
    assert "step" in log
    client.predict(run, api_name="/stop_training")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.predict(run, api_name="/poll_run")[1]
        if "stopped" in status:
            break
        time.sleep(0.5)
    assert f"{run}: stopped" in status and "stopped at step" in status


def test_chat_streams_compare_and_export(app, tmp_path):
    demo, client = app
    client.predict("pico", api_name="/apply_preset")  # independent of the tests before it
    status = client.predict("", api_name="/load_models")
    assert "loaded" in status and "new (untrained) bridge" in status
    settings = ["", 12, False, 0.7, 1.0, 0, 1.0, True]
    job = client.submit([], "12+3=", "", *settings, api_name="/chat")
    outputs = [out for out in job]
    history, box = job.result()
    messages = flatten_history(history)
    assert box == "" and messages[0] == {"role": "user", "content": "12+3="}
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"]
    assert len(outputs) > 2  # streamed in pieces
    again = client.predict(history, "", *settings, api_name="/regenerate")
    assert flatten_history(again) == messages  # greedy: the same reply again
    anchor, specialist, composed = client.predict("12+3=", "", *settings, api_name="/compare")
    assert composed == anchor  # a new bridge: the composition is exactly the anchor
    assert specialist != anchor

    message, folder = client.predict(str(tmp_path / "saved"), api_name="/save_bridge")
    assert Path(folder, "bridge_config.json").is_file() and "saved the bridge" in message
    archive, note = client.predict(folder, api_name="/archive_bridge")
    assert Path(archive).suffix == ".zip" and "archive ready" in note
    loaded = client.predict(folder, None, api_name="/load_bridge")
    assert loaded.endswith(str(Path(folder).resolve()))
    with pytest.raises(Exception, match="no Hugging Face token|could not push"):
        client.predict(folder, "me/bridge", True, api_name="/push_to_hub")


def test_errors_become_page_messages(caplog):
    import gradio as gr

    from app.ui import guard
    from composer.config import ConfigError

    def user_mistake():
        raise ConfigError("bridge.every is 0; expected a whole number >= 1")

    def bug():
        raise ZeroDivisionError("division by zero\nsecond line")

    def streaming():
        yield "partial"
        raise ConfigError("stopped half way")

    with pytest.raises(gr.Error) as error:
        guard(user_mistake)()
    assert error.value.message == "bridge.every is 0; expected a whole number >= 1"
    with caplog.at_level("ERROR"), pytest.raises(gr.Error) as error:
        guard(bug)()
    assert error.value.message.startswith("ZeroDivisionError: division by zero (")
    assert "Traceback" in caplog.text and "second line" not in error.value.message
    with pytest.raises(gr.Error, match="stopped half way"):
        list(guard(streaming)())


def test_uploads(app, tmp_path):
    demo, client = app
    mine = tmp_path / "mine.csv"
    mine.write_text("prompt,completion\n1+1=,2\n2+2=,\n")
    kept = client.predict(gradio_client.handle_file(str(mine)), api_name="/upload_data")
    assert Path(kept).parent == demo.calm_session.uploads_dir and Path(kept).name == "mine.csv"
    summary, _, problems = client.predict(kept, api_name="/preview_data")
    assert "prompt_completion" in summary and problems["data"] == [[2, "'completion' is empty"]]


EVENTS = {"click", "change", "input", "submit", "upload", "select", "tick", "then", "load", "on"}


def test_every_event_in_the_source_names_its_api():
    """gradio would invent a name from the function; the app names each one (a static check)."""
    import ast

    unnamed = []
    for path in sorted(Path(__file__).resolve().parents[1].glob("app/**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            is_event = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in EVENTS
            )
            if is_event:
                if not any(k.arg == "api_name" for k in node.keywords):
                    unnamed.append(f"{path.name}:{node.lineno} .{node.func.attr}(")
    assert unnamed == []
