"""The composition in memory (loaded once, used under the session's lock) and streamed replies
from it, from the anchor alone or from the specialist alone."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.handlers.recipe import current_recipe
from app.session import Loaded, Session
from composer.config import CompositionConfig, ConfigError, GenerationConfig

logger = logging.getLogger(__name__)

NEW_BRIDGE = ""  # the bridge choice meaning "a new, untrained bridge"


ENGINES = ("auto", "torch", "llama.cpp")  # auto: llama.cpp for two GGUF files when installed


def _models_key(config: CompositionConfig, engine: str = "auto") -> str:
    data = config.to_dict()
    key = {k: data[k] for k in ("anchor", "specialist", "bridge")}
    return json.dumps({**key, "engine": engine}, sort_keys=True)


def load_models(session: Session, *, bridge: str | None = NEW_BRIDGE, engine: str = "auto") -> str:
    """Load the recipe's two models and a bridge (new, or a saved folder); returns a summary.

    ``engine``: auto (llama.cpp for two GGUF files when llama-cpp-python is installed, else
    torch), torch or llama.cpp. Reuses what is loaded when models, bridge and engine are the same.
    """
    if bridge is not None and not isinstance(bridge, str):
        raise ConfigError(
            f"the bridge is {bridge!r}; expected a bridge folder (text), or nothing for a new one"
        )
    config = current_recipe(session)
    key, bridge = _models_key(config, engine or "auto"), (bridge or NEW_BRIDGE)
    with session.model_lock:
        loaded = session.loaded
        if loaded is not None and loaded.key == key and loaded.bridge == bridge:
            return describe_loaded(session)
        from composer.loading import load_composition

        session.loaded = None  # free the old models before loading new ones
        composition = load_composition(
            config, bridge=bridge or None, seed=0, engine=engine or "auto"
        )
        session.loaded = Loaded(
            composition=composition,
            key=key,
            bridge=bridge,
            engine=getattr(composition, "engine", "torch"),
        )
    return describe_loaded(session)


def needs_loading(
    session: Session, *, bridge: str | None = NEW_BRIDGE, engine: str = "auto"
) -> bool:
    """Whether :func:`load_models` would load anything (other models, bridge or engine)."""
    loaded = session.loaded
    if loaded is None or loaded.bridge != (bridge or NEW_BRIDGE):
        return True
    try:
        return loaded.key != _models_key(current_recipe(session), engine or "auto")
    except ConfigError:
        return True


def describe_loaded(session: Session) -> str:
    if session.loaded is None:
        return "no models loaded"
    composition = session.loaded.composition
    bridge = session.loaded.bridge or "a new (untrained) bridge: the composition is the anchor"
    recipe = composition.recipe
    names = f"{recipe.anchor.model} + {recipe.specialist.model}" if recipe is not None else "models"
    return (
        f"loaded {names} on the **{session.loaded.engine}** engine; "
        f"{len(composition.pairs)} block(s), "
        f"{composition.bridge.num_parameters():,} bridge parameters; bridge: {bridge}"
    )


def reply_stats(session: Session) -> str:
    """The engine and measured speed of the last reply (or of each side-by-side reply)."""
    return session.loaded.last_reply if session.loaded is not None else ""


def require_loaded(session: Session) -> Any:
    if session.loaded is None:
        raise ConfigError("no models are loaded; press Load in the Chat tab first")
    return session.loaded.composition


# ---------------------------------------------------------------------------------------------
# Chat


def decoding_defaults(session: Session) -> GenerationConfig:
    """What the Chat tab's controls start at: the recipe's ``generation`` section (a preset's
    own settings), else the library's defaults."""
    try:
        return GenerationConfig(**dict(session.recipe.get("generation") or {}))
    except (ConfigError, TypeError):
        return GenerationConfig()


@dataclass(frozen=True)
class ChatSettings:
    """The Chat tab's values as they arrive (checked by :meth:`generation`); defaults are the
    library's (:class:`composer.config.GenerationConfig`)."""

    system_prompt: str = ""
    max_new_tokens: int = GenerationConfig.max_new_tokens
    do_sample: bool = GenerationConfig.do_sample
    temperature: float = GenerationConfig.temperature
    top_p: float = GenerationConfig.top_p
    top_k: int = GenerationConfig.top_k
    repetition_penalty: float = GenerationConfig.repetition_penalty
    bridge: bool = True  # False: the anchor alone

    def generation(self) -> GenerationConfig:
        """Validated decoding settings (ConfigError names a bad one)."""
        values = {}
        for name, kind in (
            ("max_new_tokens", int),
            ("temperature", float),
            ("top_p", float),
            ("top_k", int),
            ("repetition_penalty", float),
        ):
            value = getattr(self, name)
            try:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise TypeError
                number = float(value)
                if kind is int and not number.is_integer():
                    raise ValueError
                values[name] = kind(number)
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(
                    f"{name} is {value!r}; expected a {'whole ' if kind is int else ''}number"
                ) from None
        if not isinstance(self.system_prompt, str):
            raise ConfigError(f"the system prompt is {self.system_prompt!r}; expected text")
        return GenerationConfig(do_sample=bool(self.do_sample), **values)


def flatten_content(content: Any) -> str:
    """Gradio 6 message content (a string, or a list of parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, Sequence):
        return "".join(flatten_content(part) for part in content)
    return "" if content is None else str(content)


def flatten_history(history: Sequence[Mapping[str, Any]] | None) -> list[dict[str, str]]:
    """[{"role", "content": str}, ...] from a Chatbot value (other roles dropped)."""
    if history is not None and not isinstance(history, (list, tuple)):
        raise ConfigError(
            f"the conversation is {type(history).__name__}; expected a list of messages "
            '({"role": "user", "content": "..."})'
        )
    out = []
    for message in history or []:
        if not isinstance(message, Mapping):
            raise ConfigError(
                f"a message of the conversation is {message!r}; expected "
                '{"role": "user" or "assistant", "content": "..."}'
            )
        role = message.get("role")
        if role in ("user", "assistant", "system"):
            out.append({"role": role, "content": flatten_content(message.get("content"))})
    return out


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], system_prompt: str) -> Any:
    """(1, T) prompt ids: the chat template when the tokenizer has one, else plain text (the
    same rule as the OpenAI-compatible server's)."""
    from composer.generate import conversation_input_ids

    return conversation_input_ids(tokenizer, messages, system_prompt=system_prompt or None)


class GenerationCancelled(Exception):
    """Raised inside the decoding thread when Stop was pressed."""


def _streamer(tokenizer: Any, cancel: threading.Event) -> Any:
    from transformers import TextIteratorStreamer

    class CancellableStreamer(TextIteratorStreamer):
        new_tokens = 0  # counted for the reply's tokens/s (the first put is the prompt)
        prompt_seen = False

        def put(self, value: Any) -> None:
            if cancel.is_set():
                raise GenerationCancelled
            if self.prompt_seen:
                self.new_tokens += int(value.numel())
            self.prompt_seen = True
            super().put(value)

    return CancellableStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.2)


def _stream(
    decode: Callable[[Any], Any],
    tokenizer: Any,
    cancel: threading.Event,
    on_done: Callable[[int, float], None] | None = None,  # (new tokens, seconds decoding)
) -> Iterator[str]:
    """Run ``decode(streamer)`` in a thread; yield the growing text until it ends or Stop."""
    import time
    from queue import Empty

    streamer = _streamer(tokenizer, cancel)
    started = time.perf_counter()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            decode(streamer)
        except GenerationCancelled:
            streamer.end()
        except BaseException as exc:  # surfaced in the request thread below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, name="calm-generate", daemon=True)
    thread.start()
    text = ""
    try:
        while True:
            try:
                piece = next(streamer)
            except StopIteration:
                break
            except Empty:
                if not thread.is_alive() and streamer.text_queue.empty():
                    break
                continue
            text += piece
            yield text
    finally:
        if thread.is_alive():
            cancel.set()  # the caller stopped reading (Stop, closed page): end the decoding
        thread.join(timeout=30)
    if errors:
        raise errors[0]
    if on_done is not None:
        on_done(streamer.new_tokens, time.perf_counter() - started)


def stream_reply(
    session: Session,
    messages: Sequence[Mapping[str, str]],
    settings: ChatSettings,
    *,
    model: str = "composition",  # or "anchor" (bridge off) or "specialist"
    keep_previous: bool = False,  # add this reply's speed line to the last one's (compare)
) -> Iterator[str]:
    """Stream the reply to the conversation's last user message; yields the text so far.

    Holds the model lock while decoding. Stop (``stop_reply``) ends it within one token.
    """
    from composer.limits import check_prompt_chars, context_of, fit_new_tokens

    generation = settings.generation()
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ConfigError("type a message first")
    with session.model_lock:
        composition = require_loaded(session)
        tokenizer = composition.tokenizer
        # Refused before any work when it cannot fit the context (memory grows with it).
        positions = context_of(composition.anchor)
        text = settings.system_prompt + "".join(m["content"] for m in messages)
        check_prompt_chars(text, positions=positions)
        input_ids = prompt_ids(tokenizer, messages, settings.system_prompt)
        kwargs = generation.generate_kwargs()
        kwargs["max_new_tokens"] = fit_new_tokens(
            input_ids.shape[-1], kwargs["max_new_tokens"], positions=positions
        )
        session.cancel.clear()
        if model == "specialist":
            # Two tokenizers: the specialist alone reads and writes through its own.
            if getattr(composition, "alignment", None) is not None:
                tokenizer = composition.specialist_tokenizer
                input_ids = prompt_ids(tokenizer, messages, settings.system_prompt)
            decode = _specialist_decode(composition, input_ids, kwargs, tokenizer)
        elif model == "anchor" or not settings.bridge:

            def decode(streamer: Any) -> None:
                with composition.bridge_off():
                    composition.generate(input_ids, streamer=streamer, **kwargs)

        else:

            def decode(streamer: Any) -> None:
                composition.generate(input_ids, streamer=streamer, **kwargs)

        loaded = session.loaded

        def record(tokens: int, seconds: float) -> None:
            label = "anchor" if model == "composition" and not settings.bridge else model
            line = speed_line(label, loaded.engine, tokens, seconds)
            loaded.last_reply = f"{loaded.last_reply}  \n{line}" if keep_previous else line

        yield from _stream(decode, tokenizer, session.cancel, on_done=record)


def speed_line(model: str, engine: str, tokens: int, seconds: float) -> str:
    """One line under a reply: which model and engine wrote it, how fast (pure)."""
    speed = tokens / seconds if seconds > 0 else 0.0
    return f"{model}: {engine} engine, {tokens} tokens in {seconds:.1f} s ({speed:.1f} tokens/s)"


def _specialist_decode(composition: Any, input_ids: Any, kwargs: dict[str, Any], tokenizer: Any):  # noqa: ANN202
    import torch

    specialist = composition.specialist
    sample = kwargs["do_sample"]
    options: dict[str, Any] = {
        "max_new_tokens": kwargs["max_new_tokens"],
        "do_sample": sample,
        "repetition_penalty": kwargs["repetition_penalty"],
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    }
    if sample:
        options.update(
            temperature=kwargs["temperature"], top_p=kwargs["top_p"], top_k=kwargs["top_k"]
        )
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if hasattr(composition, "specialist_alone"):  # the llama.cpp engine decodes it itself

        def decode_alone(streamer: Any) -> None:
            with composition.specialist_alone():
                composition.generate(input_ids, streamer=streamer, **kwargs)

        return decode_alone
    device = specialist.get_input_embeddings().weight.device

    def decode(streamer: Any) -> None:
        ids = input_ids.to(device)
        with torch.no_grad():
            specialist.generate(
                ids, attention_mask=torch.ones_like(ids), streamer=streamer, **options
            )

    return decode


def stop_reply(session: Session) -> None:
    session.cancel.set()


def training_notice(session: Session) -> str | None:
    """Why a reply may be slow now (a training run shares the machine), or None."""
    busy = session.running_process()
    if busy is None:
        return None
    return (
        f"training run {busy[0]!r} is running on this machine; replies share the processor with "
        "it and will be slower until it ends"
    )


def example_prompts(session: Session, *, count: int = 4) -> list[str]:
    """The first ``count`` prompts of the current preset's eval file (for the default preset:
    expressions over held-out keys, which no bridge training example contains), or none."""
    preset = session.preset(session.preset_id) if session.preset_id else None
    path = (preset.config.data or {}).get("eval") if preset is not None else None
    if not path:
        return []
    prompts: list[str] = []
    try:
        with open(path, encoding="utf-8") as rows:
            for line in rows:
                prompt = json.loads(line).get("prompt") if line.strip() else None
                if isinstance(prompt, str) and prompt.strip():
                    prompts.append(prompt)
                if len(prompts) >= count:
                    break
    except (OSError, ValueError, AttributeError) as exc:  # examples are a convenience only
        logger.warning("no example prompts from %s: %s", path, exc)
        return []
    return prompts
