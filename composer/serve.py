"""An OpenAI-compatible HTTP server for one composition (``calm-composer serve RECIPE``).

``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed as
server-sent events in OpenAI's chunk format or answered whole, built on FastAPI and uvicorn.
The model name ``NAME`` is the composition and ``NAME:anchor`` the anchor alone (bridge off).

One model, many clients: every request becomes a job on one FIFO queue that a single worker
thread decodes, so the model never runs two generations at once. The job's streamer raises as
soon as its client has gone (a disconnect seen while sending, or while waiting), which ends the
decoding within one token and frees the worker for the next job.

Why one module of ~630 lines: the worker, the FastAPI routes and the runners of one server
change together; what the OpenAI API asks and answers (pure) is :mod:`composer.openai_api`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from composer.config import ConfigError, GenerationConfig
from composer.generate import conversation_input_ids, text_input_ids
from composer.openai_api import (
    ANCHOR_SUFFIX,
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Decoding,
    GenerationRequest,
    bridge_for_model,
    chat_messages,
    context_length,
    cut_at_stop,
    default_model_name,
    error_body,
    held_back,
    plan_decoding,
    usage_counts,
    validation_error,
)

if TYPE_CHECKING:
    from composer.composition import Composition

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


class _Finished(Exception):
    """Raised from the streamer to end a generation early (a stop string, or a client gone)."""


@dataclass
class Job:
    """One request's generation: queued, decoded by the worker, read by the request."""

    decoding: Decoding
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class JobStreamer:
    """transformers' streamer protocol (``put`` then ``end``) for one job: text deltas to the
    job's queue, cut at stop strings; raises inside decoding when the job was cancelled."""

    def __init__(self, job: Job, tokenizer: Any) -> None:
        self.job, self.tokenizer = job, tokenizer
        self.prompt_seen = False
        self.tokens: list[int] = []
        self.sent = ""  # text already emitted
        self.stopped = False  # a stop string ended the text

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def put(self, value: torch.Tensor) -> None:
        if self.job.cancel.is_set():
            raise _Finished
        if not self.prompt_seen:  # generate() puts the prompt first
            self.prompt_seen = True
            return
        self.tokens += value.reshape(-1).tolist()
        text = self._text()
        if text.endswith("\ufffd"):  # half a character: wait for the rest of its bytes
            return
        text, self.stopped = cut_at_stop(text, self.job.decoding.stop)
        safe = len(text) if self.stopped else len(text) - held_back(text, self.job.decoding.stop)
        self._send(text[:safe])
        if self.stopped:
            raise _Finished

    def end(self) -> None:
        if not self.stopped and not self.job.cancel.is_set():
            self._send(cut_at_stop(self._text(), self.job.decoding.stop)[0])

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.emit("text", text[len(self.sent) :])
            self.sent = text


class ModelWorker:
    """One thread that decodes queued jobs one at a time, in arrival order.

    ``get_composition`` returns the composition to use now (the app swaps models); ``lock`` is
    held around every generation (the app shares its model lock, so its own chat waits too).
    """

    def __init__(
        self, get_composition: Callable[[], Any], *, lock: threading.Lock | None = None
    ) -> None:
        self.get_composition = get_composition
        self.lock = lock or threading.Lock()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="calm-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancel.is_set():  # the client left while waiting
                continue
            try:
                with self.lock:
                    self._decode(job)
            except Exception as exc:  # the request answers it; the worker goes on
                logger.exception("generation failed")
                job.emit("error", exc)

    def _decode(self, job: Job) -> None:
        composition = self.get_composition()
        if composition is None:
            raise APIError(503, "no model is loaded", type="server_error")
        streamer = JobStreamer(job, composition.tokenizer)
        decoding = job.decoding
        generator = None
        if decoding.seed is not None:
            generator = torch.Generator(device=_sampling_device(composition))
            generator.manual_seed(decoding.seed)
        bridge_off = composition.bridge_off() if not decoding.bridge else contextlib.nullcontext()
        try:
            with bridge_off:
                composition.generate(
                    decoding.input_ids, **decoding.kwargs(), streamer=streamer, generator=generator
                )
        except _Finished:
            streamer.end()
        if job.cancel.is_set():
            return
        job.emit(
            "done",
            finish_reason(streamer, decoding, composition.tokenizer),
            int(decoding.input_ids.shape[1]),
            len(streamer.tokens),
        )


def _sampling_device(composition: Any) -> torch.device:
    """Where generate() samples: the torch anchor's device; the CPU for llama.cpp."""
    embeddings = getattr(composition.anchor, "get_input_embeddings", None)
    return embeddings().weight.device if embeddings is not None else torch.device("cpu")


def finish_reason(streamer: JobStreamer, decoding: Decoding, tokenizer: Any) -> str:
    """OpenAI's: "stop" for a stop string or an end-of-text token, "length" at max_tokens."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    if streamer.stopped or (streamer.tokens and streamer.tokens[-1] in special):
        return "stop"
    return "length" if len(streamer.tokens) >= decoding.max_new_tokens else "stop"


# ---------------------------------------------------------------------------------------------
# The app


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(
    composition: Composition | None = None,
    *,
    model_name: str,
    api_key: str | None = None,
    get_composition: Callable[[], Any] | None = None,
    lock: threading.Lock | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``composition`` (or whatever ``get_composition()`` returns).

    Closing it (the lifespan's end, e.g. uvicorn's shutdown) stops the worker thread.
    """
    if (composition is None) == (get_composition is None):
        raise ValueError("give exactly one of composition and get_composition")
    current = get_composition or (lambda: composition)
    settings = ServeSettings(model_name=model_name, api_key=api_key, max_body_bytes=max_body_bytes)
    worker = ModelWorker(current, lock=lock)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(
        title="calm-composer",
        lifespan=lifespan,
        dependencies=[Depends(_authorize(settings))],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.worker = worker
    app.state.settings = settings
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += "; the endpoints are /v1/models, /v1/chat/completions, /v1/completions"
        return JSONResponse(
            error_body(message, code=str(exc.status_code)), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return JSONResponse(
            error_body(f"{type(exc).__name__}: {exc}", type="server_error"), status_code=500
        )

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "calm-composer"}

    names = (model_name, model_name + ANCHOR_SUFFIX)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        bridge_for_model(name, model_name)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = _parse(ChatCompletionRequest, await _json_body(request, max_body_bytes))
        bridge = bridge_for_model(body.model, model_name)
        messages = chat_messages(body.messages)
        composition = _loaded(current)
        try:
            input_ids = conversation_input_ids(composition.tokenizer, messages)
        except Exception as exc:  # a template that refuses this conversation (jinja raises)
            raise APIError(400, f"the chat template refused the messages: {exc}") from None
        limit = (
            body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        )
        decoding = _plan(body, input_ids, bridge, composition, limit)
        return await _answer(request, worker, decoding, body, kind="chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = _parse(CompletionRequest, await _json_body(request, max_body_bytes))
        bridge = bridge_for_model(body.model, model_name)
        composition = _loaded(current)
        prompt = body.prompt
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt) and prompt:
            if len(prompt) != 1:
                raise APIError(400, "prompt: send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):  # as training reads text: BOS first when there is one
            ids = text_input_ids(composition.tokenizer, prompt)[0].tolist()
        else:
            vocab = len(composition.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        input_ids = torch.tensor([ids], dtype=torch.long)
        decoding = _plan(body, input_ids, bridge, composition, body.max_tokens)
        return await _answer(request, worker, decoding, body, kind="text")

    return app


def _plan(
    body: GenerationRequest,
    input_ids: torch.Tensor,
    bridge: bool,
    composition: Any,
    limit: int | None,
) -> Decoding:
    recipe = getattr(composition, "recipe", None)
    defaults = recipe.generation if recipe is not None else GenerationConfig()
    return plan_decoding(
        body,
        input_ids,
        bridge=bridge,
        defaults=defaults,
        context=context_length(composition),
        max_tokens=limit,
    )


def _authorize(settings: ServeSettings) -> Callable[[Request], None]:
    expected = None if settings.api_key is None else f"Bearer {settings.api_key}".encode()

    def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: no guessing by timing
            raise APIError(
                401,
                "missing or wrong API key; send the header 'Authorization: Bearer KEY' with "
                "the key the server was started with (--api-key)",
                type="authentication_error",
                code="invalid_api_key",
            )

    return authorize


def _loaded(current: Callable[[], Any]) -> Any:
    composition = current()
    if composition is None:
        raise APIError(
            503, "no model is loaded; load one in the app's Chat tab", type="server_error"
        )
    return composition


def _parse(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise APIError(
            422,
            f"the body is a JSON {type(data).__name__}; expected an object",
            code="invalid_type",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def _json_body(request: Request, limit: int) -> Any:
    """The request's JSON, refusing bodies over ``limit`` bytes (413) before reading them all."""
    declared = request.headers.get("content-length")
    too_big = APIError(
        413,
        f"the request body is over {limit:,} bytes; send a shorter conversation",
        code="request_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(
            400,
            f"the body is not valid JSON ({exc}); send a JSON object with "
            "'Content-Type: application/json'",
            code="invalid_json",
        ) from None


async def _events(request: Request, job: Job) -> AsyncIterator[tuple[Any, ...]]:
    """The job's events until "done"; cancels the job when the client goes away first."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    logger.info("client left; cancelling its generation")
                    return
                continue
            if event[0] == "error":
                error = event[1]
                if isinstance(error, APIError):
                    raise error
                if isinstance(error, ConfigError):
                    raise APIError(400, str(error)) from None
                raise APIError(
                    500, f"generation failed: {type(error).__name__}: {error}", type="server_error"
                )
            yield event
            if event[0] == "done":
                return
    finally:
        job.cancel.set()  # a no-op once done; else the decoding stops at its next token


async def _answer(
    request: Request, worker: ModelWorker, decoding: Decoding, body: GenerationRequest, *, kind: str
) -> Any:
    job = Job(decoding=decoding, loop=asyncio.get_running_loop())
    worker.submit(job)
    ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if not body.stream:
        text, reason, usage = "", "stop", None
        async for event in _events(request, job):
            if event[0] == "text":
                text += event[1]
            else:
                reason, usage = event[1], usage_counts(*event[2:])
        if usage is None:  # the client left; nobody reads this
            return JSONResponse(error_body("client disconnected"), status_code=499)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": ident,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created,
            "model": body.model,
            "choices": [choice],
            "usage": usage,
        }
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    # The first event is awaited here, so an error before any text is still a plain error reply.
    events = _events(request, job)
    first = await anext(events, None)

    def chunk(delta: str | None, reason: str | None, usage: dict | None = None) -> str:
        if kind == "chat":
            choices = [
                {
                    "index": 0,
                    "delta": {} if delta is None else {"content": delta},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ]
            data = {"object": "chat.completion.chunk", "choices": choices}
        else:
            choices = [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}]
            data = {"object": "text_completion", "choices": choices}
        data = {"id": ident, "created": created, "model": body.model, **data}
        if usage is not None:
            data = {**data, "choices": [], "usage": usage}
        return f"data: {json.dumps(data)}\n\n"

    async def stream() -> AsyncIterator[str]:
        try:
            if kind == "chat":
                head = json.loads(chunk("", None)[6:])
                head["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield f"data: {json.dumps(head)}\n\n"
            event: tuple[Any, ...] | None = first
            while event is not None:
                if event[0] == "text":
                    yield chunk(event[1], None)
                else:
                    yield chunk(None, event[1])
                    if include_usage:
                        yield chunk(None, None, usage=usage_counts(*event[2:]))
                    yield "data: [DONE]\n\n"
                event = await anext(events, None)
        except APIError as exc:  # after the first token: the error as a last event
            yield f"data: {json.dumps(exc.body())}\n\n"
        finally:
            job.cancel.set()
            await events.aclose()

    return _JobResponse(
        job, stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


class _JobResponse(StreamingResponse):
    """A stream whose job is cancelled however the response ends (done, error, or a client that
    left: Starlette cancels the stream, or a send fails)."""

    def __init__(self, job: Job, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()


# ---------------------------------------------------------------------------------------------
# Running it


class BackgroundServer:
    """uvicorn serving ``app`` in a thread (the app's Serve switch, tests); ``stop()`` ends it."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.app, self.server, self.host = app, uvicorn.Server(config), host
        self.thread = threading.Thread(target=self.server.run, name="calm-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(
                    f"the server could not start on {host}:{port} (is the port taken?); "
                    "choose another port"
                )
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def client_snippet(url: str, model_name: str, *, api_key: str | None = None) -> str:
    """A Python snippet that talks to the server with the ``openai`` client."""
    key = api_key and "..." or "unused"
    return (
        "from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{url}", api_key="{key}")\n'
        "reply = client.chat.completions.create(\n"
        f'    model="{model_name}",  # "{model_name}{ANCHOR_SUFFIX}": the anchor alone\n'
        '    messages=[{"role": "user", "content": "ab+cde="}],\n'
        "    max_tokens=16,\n"
        "    temperature=0,\n"
        ")\n"
        "print(reply.choices[0].message.content)\n"
    )


def serve(
    recipe: Any,
    *,
    bridge: str | None = None,
    engine: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    announce: Callable[[str], None] = logger.warning,
) -> None:
    """Load the composition once and serve it until interrupted (blocks)."""
    import uvicorn

    from composer.config import read_recipe
    from composer.network import exposure_warning, port_is_free

    config = read_recipe(recipe)
    if not port_is_free(host, port):  # before minutes of loading, not after
        raise ConfigError(f"port {port} on {host} is taken; pass another --port")
    composition = load_for_serving(config, bridge=bridge, engine=engine)
    name = model_name or default_model_name(config.name, "calm-composer")
    warning = exposure_warning(host, reach="use the served model (set --api-key)")
    if warning:
        announce(f"WARNING: {warning}")
    app = create_app(composition, model_name=name, api_key=api_key)
    shown = f"[{host}]" if ":" in host else host
    announce(
        f"serving {name!r} (and {name + ANCHOR_SUFFIX!r}: the anchor alone) at "
        f"http://{shown}:{port}/v1"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


def load_for_serving(config: Any, *, bridge: str | None, engine: str) -> Any:
    """``load_composition`` with ``engine`` passed through when the loader takes it."""
    import inspect

    from composer.loading import load_composition

    kwargs: dict[str, Any] = {"bridge": bridge}
    if "engine" in inspect.signature(load_composition).parameters:
        kwargs["engine"] = engine
    elif engine == "llama.cpp":
        raise ConfigError(
            "--engine llama.cpp: this version of composer.loading has no llama.cpp engine; "
            "use --engine torch"
        )
    if bridge is None:
        logger.warning("no --bridge given: the bridge is untrained, so this is the anchor alone")
    return load_composition(config, **kwargs)
