"""What OpenAI's API asks and answers, decided in small pure functions: request shapes (pydantic),
their values checked against the model (400 with a message naming the field), error bodies,
and the text a client sees (cut before a stop string). composer.serve does the serving."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from composer.config import ConfigError, GenerationConfig

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any conversation that fits these models' contexts
ANCHOR_SUFFIX = ":anchor"  # NAME:anchor is the anchor alone (bridge off)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ROLES_OF_PAIR = ("anchor", "specialist")


# ---------------------------------------------------------------------------------------------
# Errors: OpenAI's body, {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI-style fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(exc: ValidationError) -> APIError:
    """422 for a body of the wrong shape (a missing field, a wrong type), naming the first."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return APIError(
        422,
        f"{param or 'body'}: {first['msg']}; see the OpenAI API reference for this endpoint",
        param=param,
        code="invalid_type" if first["type"] != "missing" else "missing_field",
    )


# ---------------------------------------------------------------------------------------------
# Requests: pydantic checks the shape (422); the checks below check the values (400)


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # None: the recipe's; 0: greedy; > 0: sampling
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but vLLM and llama.cpp accept it too
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int]


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """[{"role", "content": str}] with OpenAI's roles mapped to the template's; 400 otherwise."""
    if not messages:
        raise APIError(400, "messages is empty; send at least one user message", param="messages")
    out = []
    for k, message in enumerate(messages):
        if message.role not in ROLES:
            raise APIError(
                400,
                f"messages[{k}].role is {message.role!r}; expected one of "
                f"{', '.join(ROLES)} (this server has no tools)",
                param=f"messages[{k}].role",
                code="invalid_role",
            )
        content = message.content
        if isinstance(content, list):
            kinds = {part.type for part in content} - {"text"}
            if kinds:
                raise APIError(
                    400,
                    f"messages[{k}].content has a {sorted(kinds)[0]!r} part; this model reads "
                    "text parts only",
                    param=f"messages[{k}].content",
                )
            content = "".join(part.text or "" for part in content)
        out.append({"role": ROLES[message.role], "content": content or ""})
    return out


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
    return tuple(stops)


@dataclass(frozen=True)
class Decoding:
    """One request's decoding, decided before it is queued."""

    input_ids: torch.Tensor  # (1, T)
    bridge: bool  # False: the anchor alone
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stop: tuple[str, ...]
    seed: int | None

    def kwargs(self) -> dict[str, Any]:
        """Arguments for ``Composition.generate`` (without streamer and generator; stop strings
        are this module's to apply to the text, see :func:`cut_at_stop`)."""
        settings = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )
        return settings.generate_kwargs()


def plan_decoding(
    request: GenerationRequest,
    input_ids: torch.Tensor,  # (1, T)
    *,
    bridge: bool,
    defaults: GenerationConfig,
    context: int | None,
    max_tokens: int | None = None,
) -> Decoding:
    """The request's settings over the recipe's defaults, checked against the context (400)."""
    if request.n != 1:
        raise APIError(400, f"n is {request.n}; this server returns one choice (n=1)", param="n")
    prompt = int(input_ids.shape[1])
    if prompt == 0:
        raise APIError(400, "the prompt is empty; send some text", param=_prompt_field(request))
    room = None if context is None else context - prompt
    if room is not None and room <= 0:
        raise APIError(
            400,
            f"the prompt is {prompt} tokens; this model's context is {context} tokens, which "
            "leaves no room for a reply. Send a shorter prompt",
            param=_prompt_field(request),
            code="context_length_exceeded",
        )
    if max_tokens is not None:
        if max_tokens <= 0:
            raise APIError(
                400, f"max_tokens is {max_tokens}; expected at least 1", param="max_tokens"
            )
        if room is not None and max_tokens > room:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}, but the prompt ({prompt} tokens) leaves "
                f"{room} of this model's {context}-token context; ask for at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        new = max_tokens
    else:
        new = defaults.max_new_tokens if room is None else min(defaults.max_new_tokens, room)
    if request.temperature is not None and not 0 <= request.temperature <= 2:
        raise APIError(
            400,
            f"temperature is {request.temperature}; expected 0 (greedy) to 2",
            param="temperature",
        )
    temperature = defaults.temperature if request.temperature is None else request.temperature
    do_sample = defaults.do_sample if request.temperature is None else request.temperature > 0
    decoding = Decoding(
        input_ids=input_ids,
        bridge=bridge,
        max_new_tokens=new,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        top_k=defaults.top_k if request.top_k is None else request.top_k,
        repetition_penalty=(
            defaults.repetition_penalty
            if request.repetition_penalty is None
            else request.repetition_penalty
        ),
        stop=stop_strings(request.stop) if request.stop is not None else tuple(defaults.stop),
        seed=request.seed,
    )
    try:  # the library's own checks (GenerationConfig), with its messages
        decoding.kwargs()
    except ConfigError as exc:
        raise APIError(400, str(exc)) from None
    return decoding


def _prompt_field(request: GenerationRequest) -> str:
    return "prompt" if isinstance(request, CompletionRequest) else "messages"


def context_length(composition: Any) -> int | None:
    """The shorter context of the two models (positions either may be asked to read), if known."""
    from composer.architectures import positions_of

    configs = [getattr(getattr(composition, role, None), "config", None) for role in ROLES_OF_PAIR]
    lengths = [n for n in (positions_of(c) for c in configs if c is not None) if n is not None]
    return min(lengths) if lengths else None


# ---------------------------------------------------------------------------------------------
# Text: what a client sees of the tokens, cut before the first stop string


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether there was one."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might begin a stop string (not safe to send yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def bridge_for_model(name: str, model_name: str) -> bool:
    """True for the composition, False for ``NAME:anchor``; 404 for any other model."""
    if name == model_name:
        return True
    if name == model_name + ANCHOR_SUFFIX:
        return False
    raise APIError(
        404,
        f"model {name!r} does not exist here; this server has {model_name!r} (the composition) "
        f"and {model_name + ANCHOR_SUFFIX!r} (the anchor alone)",
        param="model",
        code="model_not_found",
    )


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def default_model_name(recipe_name: str | None, fallback: str) -> str:
    """A model id from a recipe's name: "Key-value (CPU)" -> "key-value-cpu"."""
    text = (recipe_name or fallback).lower()
    words = "".join(c if c.isalnum() or c in "._" else " " for c in text).split()
    return "-".join(words) or "calm-composer"
