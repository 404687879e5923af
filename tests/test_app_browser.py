"""The app in a real browser (headless Chromium driven by Playwright): open the page on the
default preset, train briefly and watch the progress and the loss plot move, stop, chat with a
streamed reply, export the bridge. Screenshots of every tab go to $CALM_SCREENSHOTS when set
(docs/screenshots/ holds the committed ones), else to the test's temporary folder.

Needs Debian's `chromium` (scripts/setup.sh --test installs it when it can). Without it the
test is skipped, except in CI (CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.test_app_support import BAD_ROW, served_pico_app

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must run the browser test")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_pico_app(tmp_path_factory.mktemp("browser")) as demo:
        yield demo


@pytest.fixture(scope="module")
def browser():
    """One Playwright and one Chromium for the module: the sync API allows one running at once."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    with playwright_api.sync_playwright() as playwright:
        playwright.selectors.set_test_id_attribute("id")  # get_by_test_id finds elem_id
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(served, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(served.local_url)
    yield page
    page.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("CALM_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_until(condition, *, timeout: float = 90, every: float = 0.25, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what or condition}")


def field(page, elem_id: str):
    """The input of a gradio Textbox/Number by elem_id."""
    return page.get_by_test_id(elem_id).locator("textarea, input").first


def progress_step(page) -> int:
    text = page.get_by_test_id("train-progress-label").inner_text()
    match = re.search(r"step (\d+) /", text)
    return int(match.group(1)) if match else 0


@pytest.mark.slow
def test_the_whole_app_in_a_browser(served, page, shots):
    expect = pytest.importorskip("playwright.sync_api").expect
    session = served.calm_session
    # Compose: the default preset is open, checked, and its layer pairing is drawn.
    expect(page.get_by_test_id("pair-report")).to_contain_text("Compatible", timeout=60_000)
    expect(page.get_by_test_id("preset-info")).to_contain_text("Pico sums")
    assert field(page, "anchor-model").input_value().endswith("models/anchor")
    expect(page.locator("#pairing-svg line")).to_have_count(4)
    page.screenshot(path=str(shots / "compose.png"), full_page=True)

    # Data: the detected format, the rows as trained on, the bad row by number.
    page.get_by_role("tab", name="Data").click()
    expect(page.get_by_test_id("data-format")).to_contain_text("prompt_completion")
    problems = page.get_by_test_id("data-problems")
    expect(problems).to_contain_text("missing 'completion'")
    expect(problems.locator("[data-testid='cell-0-0']").first).to_have_text(str(BAD_ROW))
    expect(page.get_by_test_id("data-preview")).to_contain_text("<bos>")
    page.screenshot(path=str(shots / "data.png"), full_page=True)

    # Train: start, see the progress bar and the loss plot move, stop.
    page.get_by_role("tab", name="Train").click()
    assert field(page, "hp-max-steps").input_value() == "400"  # the preset's default
    field(page, "run-name").fill("browser-run")
    page.get_by_test_id("start-training").click()
    wait_until(lambda: progress_step(page) > 0, timeout=120, what="the first logged step")
    plot = page.get_by_test_id("loss-plot")
    first_step, first_plot = progress_step(page), plot.screenshot()
    wait_until(
        lambda: progress_step(page) >= first_step + 4, timeout=120, what="more training steps"
    )
    time.sleep(1.0)  # let the plot redraw
    assert plot.screenshot() != first_plot, "the loss plot did not change"
    expect(page.get_by_test_id("train-stats")).to_contain_text("tokens/s")
    assert "composer.train: step" in field(page, "train-log").input_value()
    page.screenshot(path=str(shots / "train.png"), full_page=True)
    page.get_by_test_id("stop-training").click()
    status = field(page, "train-status")
    wait_until(lambda: "browser-run: stopped" in status.input_value(), what="the run to stop")
    assert "stopped at step" in status.input_value()
    session.processes["browser-run"].wait(timeout=30)  # the process ends after its checkpoint

    # Chat: load the models, send a message, receive a streamed reply.
    page.get_by_role("tab", name="Chat").click()
    page.get_by_test_id("load-models").click()
    # "no models loaded" holds the word too: wait for the engine the models were loaded on.
    expect(page.get_by_test_id("models-status")).to_contain_text(
        re.compile(r"loaded .+ engine"), timeout=90_000
    )
    tokens = page.get_by_test_id("max-new-tokens").locator("input[type=number]")
    tokens.fill("300")  # long enough to watch it stream
    tokens.press("Enter")
    field(page, "chat-input").fill("12+3=")
    page.get_by_test_id("send").click()
    bot = page.get_by_test_id("chatbot").locator("[data-testid='bot']").last
    expect(bot).not_to_be_empty(timeout=60_000)
    lengths = set()
    while session.model_lock.locked() or not lengths:
        lengths.add(len(bot.inner_text().strip()))
        time.sleep(0.05)
    lengths.add(len(bot.inner_text().strip()))
    assert len(lengths - {0}) >= 2, f"the reply did not stream: lengths seen {sorted(lengths)}"
    expect(page.get_by_test_id("chatbot")).to_contain_text("12+3=")
    page.screenshot(path=str(shots / "chat.png"), full_page=True)

    # Export: save the bridge folder and download it as one archive.
    page.get_by_role("tab", name="Export").click()
    page.get_by_test_id("save-bridge").click()
    result = field(page, "export-status")
    wait_until(lambda: "saved the bridge" in result.input_value(), what="the bridge to be saved")
    saved = Path(field(page, "export-folder").input_value())
    assert (saved / "bridge_config.json").is_file()
    page.get_by_test_id("download-bridge").click()
    expect(page.get_by_test_id("bridge-archive")).to_contain_text(".zip")
    page.screenshot(path=str(shots / "export.png"), full_page=True)


# --- first open on the real default preset: the shipped bridge composes without training ----

HELD_OUT = {"oy+lne=": "892+320=1230"}  # keys no bridge training row contains (heldout.jsonl)


@pytest.fixture(scope="module")
def fresh_default_app(tmp_path_factory):
    """The app as `make run` opens it: the repository's presets, no runs, nothing trained."""
    from app.main import build_app
    from tests.test_app_support import free_port

    root = tmp_path_factory.mktemp("fresh")
    demo = build_app(runs_dir=root / "runs", models_dir=root / "models", poll_seconds=0.5)
    demo.queue().launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        yield demo
    finally:
        demo.calm_session.close()
        demo.close()


@pytest.mark.slow
def test_a_fresh_app_composes_held_out_keys_with_the_shipped_bridge(
    fresh_default_app, browser, shots
):
    playwright_api = pytest.importorskip("playwright.sync_api")
    expect = playwright_api.expect
    prompt, answer = next(iter(HELD_OUT.items()))
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(fresh_default_app.local_url)
    page.get_by_role("tab", name="Chat").click()
    # The shipped bridge is already chosen; no run exists.
    expect(field(page, "chat-bridge")).to_have_value("shipped kv-arithmetic (trained)")
    assert not fresh_default_app.calm_session.runs_dir.exists() or not any(
        fresh_default_app.calm_session.runs_dir.iterdir()
    )
    # One click puts a held-out example in the message box.
    examples = page.get_by_test_id("chat-examples")
    first = examples.locator("button").first
    clicked = first.inner_text().strip()
    first.click()
    wait_until(lambda: field(page, "chat-input").input_value() == clicked, what="example")
    # The three-way compare on a held-out ab+cde= expression.
    field(page, "chat-input").fill(prompt)
    page.get_by_text("Compare: the same prompt, three ways").click()
    page.get_by_test_id("compare").click()
    composed = field(page, "compare-composition")
    wait_until(lambda: answer in composed.input_value(), timeout=180, what="the composition")
    anchor = field(page, "compare-anchor").input_value()
    specialist = field(page, "compare-specialist").input_value()
    assert answer not in anchor and answer not in specialist, (anchor, specialist)
    assert composed.input_value().strip().startswith(answer)
    page.screenshot(path=str(shots / "chat-shipped-bridge.png"), full_page=True)
    page.close()
