"""The OpenAI-compatible server, through the real `openai` client, on 127.0.0.1: the default
preset with a bridge that changes its output (its trained bridge when shipped, else seeded
random weights saved and loaded back), the anchor alone by name, many clients at once, a client
killed mid-stream, every bad request, a failing generation, and the API key."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from composer.config import ConfigError  # noqa: E402
from composer.generate import conversation_input_ids, text_input_ids  # noqa: E402
from composer.loading import load_composition  # noqa: E402
from composer.openai_api import cut_at_stop, held_back  # noqa: E402
from composer.serve import BackgroundServer, create_app  # noqa: E402
from tests.conftest import randomize_bridge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "kv-arithmetic.yaml"
SHIPPED_BRIDGE = ROOT / "presets" / "bridges" / "kv-arithmetic"  # the preset's trained bridge
NAME = "kv"
KEY = "test-key-123"
NEW = 8  # tokens per reply: enough to tell the models apart, cheap on a shared CPU


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(composition, server, keyed server): the default preset with its trained bridge when it
    ships one, else a saved and reloaded bridge of seeded random weights; served twice over one
    model lock (without and with an API key)."""
    torch.set_num_threads(1)
    folder = SHIPPED_BRIDGE
    if not (folder / "bridge_config.json").is_file():  # not shipped (yet): a seeded random one
        made = load_composition(PRESET, device="cpu")
        randomize_bridge(made, seed=0, scale=0.5)  # non-zero: the composition is not the anchor
        folder = tmp_path_factory.mktemp("bridge") / "kv-bridge"
        made.save_bridge(str(folder))
    composition = load_composition(PRESET, bridge=folder, device="cpu")
    lock = threading.Lock()
    server = BackgroundServer(create_app(composition, model_name=NAME, lock=lock))
    keyed = BackgroundServer(create_app(composition, model_name=NAME, lock=lock, api_key=KEY))
    yield composition, server, keyed
    server.stop()
    keyed.stop()


def held_out_prompts(count: int) -> list[str]:
    rows = (ROOT / "presets" / "data" / "kv-arithmetic-heldout.jsonl").read_text().splitlines()
    return [json.loads(row)["prompt"] for row in rows[:count]]


def reference(composition, input_ids: torch.Tensor, *, bridge: bool = True, new: int = NEW):
    """(text, new token count) from Composition.generate, greedy, as the server decodes."""
    with torch.no_grad():
        if bridge:
            out = composition.generate(input_ids, max_new_tokens=new)
        else:
            with composition.bridge_off():
                out = composition.generate(input_ids, max_new_tokens=new)
    return composition.tokenizer.decode(out[0], skip_special_tokens=True), out.shape[1]


def chat_ids(composition, prompt: str) -> torch.Tensor:
    return conversation_input_ids(composition.tokenizer, [{"role": "user", "content": prompt}])


def streamed_chat(client, model: str, prompt: str, **kwargs) -> tuple[str, str | None]:
    text, reason = "", None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=NEW,
        temperature=0,
        stream=True,
        **kwargs,
    )
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    return text, reason


def client_for(server, **kwargs):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, **kwargs)


# ---------------------------------------------------------------------------------------------
# Text helpers (pure)


def test_stop_strings_cut_the_text_and_hold_back_a_possible_start():
    assert cut_at_stop("12+34=46\n", ["\n", "="]) == ("12+34", True)
    assert cut_at_stop("1234", ["x"]) == ("1234", False)
    assert held_back("12+3", ["+34"]) == 2  # "+3" may begin "+34"
    assert held_back("12+3", ["9"]) == 0


# ---------------------------------------------------------------------------------------------
# Equality: streamed == non-streamed == Composition.generate; NAME:anchor == the anchor alone


@pytest.mark.slow
def test_chat_and_completions_equal_composition_generate(served):
    composition, server, _ = served
    client = client_for(server)
    assert [m.id for m in client.models.list()] == [NAME, f"{NAME}:anchor"]
    for prompt in held_out_prompts(2):
        ids = chat_ids(composition, prompt)
        expected, count = reference(composition, ids)
        reply = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=NEW,
            temperature=0,
        )
        streamed, reason = streamed_chat(client, NAME, prompt)
        assert reply.choices[0].message.content == streamed == expected, prompt
        assert reply.usage.prompt_tokens == ids.shape[1]
        assert reply.usage.completion_tokens == count
        assert reply.choices[0].finish_reason == reason

        raw_ids = text_input_ids(composition.tokenizer, prompt)
        raw_expected, raw_count = reference(composition, raw_ids)
        text = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW, temperature=0)
        pieces = client.completions.create(
            model=NAME, prompt=prompt, max_tokens=NEW, temperature=0, stream=True
        )
        assert text.choices[0].text == "".join(c.choices[0].text for c in pieces) == raw_expected
        assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (
            raw_ids.shape[1],
            raw_count,
        )


@pytest.mark.slow
def test_anchor_model_is_the_anchor_alone_and_differs_from_the_composition(served):
    composition, server, _ = served
    client = client_for(server)
    differs = False
    for prompt in held_out_prompts(3):
        ids = chat_ids(composition, prompt)
        anchor, _ = reference(composition, ids, bridge=False)
        composed, _ = reference(composition, ids)
        assert streamed_chat(client, f"{NAME}:anchor", prompt)[0] == anchor, prompt
        differs |= anchor != composed
    assert differs, "the bridge changes nothing: this test could not tell the models apart"


@pytest.mark.slow
def test_stop_string_ends_the_reply_before_it_in_both_modes(served):
    composition, server, _ = served
    client = client_for(server)
    prompt = held_out_prompts(1)[0]
    expected, _ = reference(composition, chat_ids(composition, prompt))
    stop = expected[2]  # a character the reply does write
    cut = expected[: expected.index(stop)]
    reply = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=NEW,
        temperature=0,
        stop=[stop],
    )
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    assert streamed_chat(client, NAME, prompt, stop=[stop]) == (cut, "stop")


def test_seeded_sampling_repeats_and_equals_composition_generate(served):
    composition, server, _ = served
    client = client_for(server)
    prompt = held_out_prompts(1)[0]
    ids = text_input_ids(composition.tokenizer, prompt)
    texts = [
        client.completions.create(
            model=NAME, prompt=prompt, max_tokens=NEW, temperature=1.5, seed=seed
        )
        .choices[0]
        .text
        for seed in (7, 7, 8)
    ]
    with torch.no_grad():
        out = composition.generate(
            ids,
            max_new_tokens=NEW,
            do_sample=True,
            temperature=1.5,
            generator=torch.Generator().manual_seed(7),
        )
    assert texts[0] == texts[1] == composition.tokenizer.decode(out[0], skip_special_tokens=True)
    assert texts[2] != texts[0]  # the seed matters (checked for these seeds and this prompt)


def test_serve_refuses_a_taken_port_before_loading_anything(capsys):
    from composer.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", str(PRESET), "--port", str(port)]) == 2
    assert time.monotonic() - started < 5  # no model was loaded
    assert f"port {port}" in capsys.readouterr().err


def test_another_host_gets_the_apps_warning_and_loopback_none(served, monkeypatch):
    import uvicorn

    import composer.serve as serve_module
    import launch

    ran = []
    monkeypatch.setattr(serve_module, "load_for_serving", lambda *a, **k: served[0])
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: ran.append(kwargs))
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        lines: list[str] = []
        serve_module.serve(PRESET, host=host, port=0, announce=lines.append)
        warnings = [line for line in lines if "WARNING" in line]
        assert bool(warnings) == warned, lines
    (app_warning,) = launch.exposure_warnings("0.0.0.0", share=False)
    shared = app_warning.split(" can ")[0]  # "binding 0.0.0.0: anyone who ... machine"
    assert shared in warnings[0] and "127.0.0.1 unless you mean it" in warnings[0]
    assert [kwargs["host"] for kwargs in ran] == ["127.0.0.1", "0.0.0.0"]


def test_stream_is_openai_server_sent_events_ending_with_done(served):
    _, server, _ = served
    body = {**GOOD, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------------------------------------
# One model, many clients


@pytest.mark.slow
def test_eight_concurrent_streaming_clients_get_their_own_replies(served):
    composition, server, _ = served
    prompts = held_out_prompts(8)
    expected = [reference(composition, chat_ids(composition, p))[0] for p in prompts]
    assert len(set(expected)) > 1  # else mixed-up replies could not be seen
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = streamed_chat(client_for(server), NAME, prompts[k])[0]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert [results.get(k) for k in range(8)] == expected


class SlowComposition:
    """The composition, decoding at most one token per 50 ms and never stopping at EOS, so an
    abandoned generation that went on would hold the model for seconds; it records when each
    generation starts and how many tokens each made."""

    def __init__(self, composition) -> None:
        self.inner = composition
        self.starts: list[float] = []
        self.tokens: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, input_ids, *, streamer, **kwargs):
        self.starts.append(time.monotonic())
        self.tokens.append(0)
        index = len(self.tokens) - 1
        outer = self

        class Slow:
            def put(self, value):
                outer.tokens[index] += 1
                time.sleep(0.05)
                streamer.put(value)

            def end(self):
                streamer.end()

        return self.inner.generate(input_ids, streamer=Slow(), eos_token_id=[], **kwargs)


def raw_stream_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return sock


@pytest.mark.slow
def test_a_client_killed_mid_stream_frees_the_model_at_once(served):
    composition = served[0]
    slow = SlowComposition(composition)
    server = BackgroundServer(create_app(get_composition=lambda: slow, model_name=NAME))
    try:
        prompt = held_out_prompts(1)[0]
        long = {
            "model": NAME,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 100,  # >= 5 s at 50 ms a token if nobody stopped it
            "temperature": 0,
            "stream": True,
        }
        sock = raw_stream_request(server.port, long)
        received = b""
        while received.count(b'"content"') < 3:  # the role chunk and two tokens
            received += sock.recv(4096)
        sock.close()  # the client is gone
        killed_at = time.monotonic()

        text, _ = streamed_chat(client_for(server), NAME, prompt)
        assert len(slow.starts) == 2
        assert slow.starts[1] - killed_at < 1.0, "the next request waited for the dead one"
        assert slow.tokens[0] < 30, f"the abandoned generation went on ({slow.tokens[0]} tokens)"
        assert text == reference(composition, chat_ids(composition, prompt))[0]
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Bad requests: OpenAI's error body and the fitting status, and the server goes on

GOOD = {"model": NAME, "messages": [{"role": "user", "content": "ab+c="}], "max_tokens": 2}


def _with(**changes):
    return json.dumps({**GOOD, **changes}).encode()


BAD_REQUESTS = {
    "not json": (b"{model: kv", 400, "invalid_json", None),
    "json list": (b"[1, 2]", 422, "invalid_type", None),
    "no messages": (json.dumps({"model": NAME}).encode(), 422, "missing_field", "messages"),
    "messages of the wrong type": (_with(messages="hi"), 422, "invalid_type", "messages"),
    "unknown model": (_with(model="gpt-4"), 404, "model_not_found", "model"),
    "empty messages": (_with(messages=[]), 400, None, "messages"),
    "unknown role": (
        _with(messages=[{"role": "wizard", "content": "hi"}]),
        400,
        "invalid_role",
        "messages[0].role",
    ),
    "max_tokens zero": (_with(max_tokens=0), 400, None, "max_tokens"),
    "max_tokens negative": (_with(max_tokens=-5), 400, None, "max_tokens"),
    "max_tokens beyond the context": (
        _with(max_tokens=10_000),
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    "prompt longer than the context": (
        _with(messages=[{"role": "user", "content": "a" * 500}]),
        400,
        "context_length_exceeded",
        "messages",
    ),
    "n above 1": (_with(n=2), 400, None, "n"),
    "negative temperature": (_with(temperature=-0.5), 400, None, "temperature"),
    "body over the limit": (
        b'{"model": "' + b"k" * (2 << 20) + b'"}',
        413,
        "request_too_large",
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_an_openai_error_body(served, case):
    _, server, _ = served
    body, status, code, param = BAD_REQUESTS[case]
    response = httpx.post(
        server.url + "/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)


def test_bad_requests_through_the_openai_client_and_the_server_goes_on(served):
    _, server, _ = served
    client = client_for(server)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="ab+c=", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt="1" * 300)
    assert httpx.get(server.url + "/nowhere").status_code == 404
    reply = client.completions.create(model=NAME, prompt="ab+c=", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1


class BrokenOnce:
    """The composition, whose first generation fails as a bug would."""

    def __init__(self, composition) -> None:
        self.inner, self.failed = composition, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("boom")
        return self.inner.generate(*args, **kwargs)


def test_a_failing_generation_is_a_500_body_and_the_server_goes_on(served):
    broken = BrokenOnce(served[0])
    server = BackgroundServer(create_app(get_composition=lambda: broken, model_name=NAME))
    try:
        response = httpx.post(server.url + "/chat/completions", json=GOOD, timeout=60)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "boom" in error["message"]
        reply = client_for(server).completions.create(
            model=NAME, prompt="ab+c=", max_tokens=2, temperature=0
        )
        assert reply.usage.completion_tokens >= 1
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# The API key


def test_api_key_is_required_and_accepted(served):
    _, _, keyed = served
    with pytest.raises(openai.AuthenticationError):
        client_for(keyed).models.list()
    wrong = openai.OpenAI(base_url=keyed.url, api_key=KEY + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=NAME, prompt="ab+c=", max_tokens=2)
    response = httpx.post(keyed.url + "/completions", json={"model": NAME, "prompt": "a"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"

    right = openai.OpenAI(base_url=keyed.url, api_key=KEY, max_retries=0)
    assert [m.id for m in right.models.list()] == [NAME, f"{NAME}:anchor"]
    reply = right.completions.create(model=NAME, prompt="ab+c=", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1


# ---------------------------------------------------------------------------------------------
# The app's Serve switch


def test_the_apps_serve_switch_serves_what_is_loaded_and_stops(served, tmp_path):
    from app.handlers import serve as serving
    from app.session import Loaded, Session

    composition = served[0]
    session = Session.create(runs_dir=tmp_path / "runs", models_dir=tmp_path / "models")
    with pytest.raises(ConfigError, match="Load models"):
        serving.toggle_serving(session, True)
    session.loaded = Loaded(composition=composition, key="", bridge="")
    status, snippet = serving.toggle_serving(session, True)
    url = session.server.url
    assert url in status and url in snippet and "127.0.0.1" in url
    name = session.server.app.state.settings.model_name
    scope = {"openai": openai}
    exec(snippet.replace('"ab+cde="', '"ab+c="').replace("print(", "answer = ("), scope)
    assert isinstance(scope["answer"], str)  # the copyable snippet runs as shown
    models = [m.id for m in client_for(session.server).models.list()]
    assert models == [name, f"{name}:anchor"]
    assert serving.toggle_serving(session, False) == ("", "")
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/models", timeout=5)
    session.close()
