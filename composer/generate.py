"""Co-decoding: every new token goes through both models, each with its own KV cache.

One decode step costs one anchor step, one specialist step and one cross-attention read per
block: the specialist's keys/values for earlier tokens stay in per-block caches (trap 3: the
anchor's cache is never handed to the specialist). Sampling uses transformers' logits
processors; streaming follows transformers' streamer protocol (``put`` then ``end``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from composer.config import ConfigError, GenerationConfig
from composer.limits import context_of, fit_new_tokens

if TYPE_CHECKING:
    from composer.composition import Composition


def logits_processors(
    *, do_sample: bool, temperature: float, top_p: float, top_k: int, repetition_penalty: float
) -> LogitsProcessorList:
    """The processors transformers' ``generate`` would build for the same settings."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


@dataclass(frozen=True)
class Decoding:
    """What both engines decode with, decided once from the settings (see :func:`decoding`)."""

    processors: LogitsProcessorList
    stopping: StoppingCriteriaList
    eos: list[int]
    pad_token_id: int


def decoding(
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    stop_strings: Sequence[str],
    tokenizer: Any,
    eos_token_id: int | Sequence[int] | None,  # None: ``model_eos``, else the tokenizer's
    model_eos: int | Sequence[int] | None,
    pad_token_id: int | None,  # None: the tokenizer's pad, else the first EOS, else 0
) -> Decoding:
    """Validate the settings (user-facing messages, as GenerationConfig gives them) and build
    the logits processors, stop criteria, EOS ids and pad id of one ``generate`` call."""
    GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=tuple(stop_strings),
    )
    if eos_token_id is None:
        eos_token_id = (
            model_eos if model_eos is not None else getattr(tokenizer, "eos_token_id", None)
        )
    eos = (
        []
        if eos_token_id is None
        else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    )
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    stopping = StoppingCriteriaList()
    if stop_strings:
        if tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; pass tokenizer= or compose with one")
        stopping.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop_strings)))
    processors = logits_processors(
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
    )
    return Decoding(processors, stopping, eos, pad_token_id)


@torch.no_grad()
def generate(
    composition: Composition,
    input_ids: torch.Tensor,  # (B, T) prompt; pad on the left for a batch of different lengths
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,  # None: the anchor's; [] never stops early
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,  # needed for stop strings; defaults to the composition's
    streamer: Any = None,  # a transformers streamer (TextStreamer, TextIteratorStreamer, ...)
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    # The paper's "specialist as encoder" ablation; None: as the bridge was trained (prompt_only)
    specialist_reads_prompt_only: bool | None = None,
) -> torch.Tensor:
    """Decode up to ``max_new_tokens``; returns only the new tokens, (B, new).

    Greedy decoding with ``use_cache=True`` gives the same tokens as recomputing both models over
    the whole sequence at every step (``use_cache=False``). A row that hit EOS or a stop string
    is filled with ``pad_token_id`` until every row is done.
    """
    tokenizer = tokenizer or composition.tokenizer
    settings = decoding(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        eos_token_id=eos_token_id,
        model_eos=getattr(
            getattr(composition.anchor, "generation_config", None), "eos_token_id", None
        ),
        pad_token_id=pad_token_id,
    )
    processors, stopping, eos = settings.processors, settings.stopping, settings.eos

    # Before any forward: a prompt over the anchor's context is refused, a reply is shortened.
    max_new_tokens = fit_new_tokens(
        input_ids.shape[-1], max_new_tokens, positions=context_of(composition.anchor)
    )
    device = composition.anchor.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    pad_token_id = settings.pad_token_id
    eos_tensor = torch.tensor(eos, device=device, dtype=torch.long)

    sequence = input_ids  # (B, T + generated)
    prompt_length = input_ids.shape[1]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    state = composition.new_decode_state() if use_cache else None
    # The bridge may read every token, or (ablation) only the prompt's.
    if specialist_reads_prompt_only is None:
        specialist_reads_prompt_only = composition.bridge.shape.prompt_only
    readable = attention_mask.clone() if specialist_reads_prompt_only else None
    logits = composition.step(
        input_ids, attention_mask, state=state, logits_to_keep=1, specialist_mask=readable
    )[:, -1]
    try:
        for step in range(max_new_tokens):
            scores = processors(sequence, logits.float())  # (B, V)
            if do_sample:
                probs = torch.softmax(scores, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
            else:
                next_token = scores.argmax(dim=-1)  # (B,)
            next_token = torch.where(done, torch.full_like(next_token, pad_token_id), next_token)
            sequence = torch.cat([sequence, next_token[:, None]], dim=1)
            if streamer is not None:
                streamer.put(next_token.cpu())
            if eos:
                done = done | torch.isin(next_token, eos_tensor)
            if len(stopping):
                done = done | stopping(sequence, scores).to(device)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(done), 1))], dim=1
            )
            if readable is not None:
                readable = torch.cat([readable, readable.new_zeros((len(done), 1))], dim=1)
            if state is not None:
                new = next_token[:, None]
                logits = composition.step(
                    new, attention_mask, state=state, specialist_mask=readable
                )
            else:
                logits = composition.step(
                    sequence, attention_mask, logits_to_keep=1, specialist_mask=readable
                )
            logits = logits[:, -1]
    finally:
        if streamer is not None:
            streamer.end()
    return sequence[:, prompt_length:]


def chat_input_ids(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, system_prompt: str | None = None
) -> torch.Tensor:
    """(1, T) prompt ids for a conversation, through the anchor tokenizer's chat template."""
    conversation = list(messages)
    if system_prompt:
        conversation = [{"role": "system", "content": system_prompt}, *conversation]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            "the anchor tokenizer has no chat template; use plain-text prompts or a chat model"
        )
    ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    return ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])


def conversation_input_ids(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, system_prompt: str | None = None
) -> torch.Tensor:
    """(1, T) prompt ids for a conversation: the chat template when the tokenizer has one, else
    the messages' texts one per line after BOS (models without a template, e.g. the default
    preset's, read plain text)."""
    if getattr(tokenizer, "chat_template", None):
        return chat_input_ids(tokenizer, messages, system_prompt=system_prompt)
    text = "\n".join(
        [*([system_prompt] if system_prompt else []), *(m["content"] for m in messages)]
    )
    return text_input_ids(tokenizer, text)


def text_input_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """(1, T) ids of a plain-text prompt as training reads one (composer.data): BOS first when
    the tokenizer has one, never twice, and no other special token."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return torch.tensor([ids])
