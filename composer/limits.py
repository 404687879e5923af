"""Bounds that keep memory independent of what a user types or uploads: prompts against the
anchor's context, in characters before tokenizing and in tokens before decoding (pure)."""

from __future__ import annotations

import logging
from typing import Any

from composer.architectures import positions_of
from composer.config import ConfigError

logger = logging.getLogger(__name__)

# A prompt of more characters than this many per position cannot fit any context we know (even
# long tokens average under 32 characters), so it is refused before it is tokenized.
CHARS_PER_POSITION = 32


def context_of(model: Any) -> int | None:
    """The anchor's positions (its context), from its config; None when the config does not say."""
    return positions_of(model.config)


def check_prompt_chars(text: str, *, positions: int | None) -> None:
    """Refuse a prompt far longer than any context before spending time tokenizing it."""
    if positions is None:
        return
    limit = CHARS_PER_POSITION * positions
    if len(text) > limit:
        raise ConfigError(
            f"the prompt is {len(text):,} characters; the anchor reads at most {positions:,} "
            f"tokens, so at most ~{limit:,} characters fit. Shorten the prompt (or the "
            "conversation: start a new chat)"
        )


def fit_new_tokens(prompt_tokens: int, max_new_tokens: int, *, positions: int | None) -> int:
    """How many new tokens to decode: ``max_new_tokens``, lowered (with a warning) so that
    prompt + reply fit the context; ConfigError when the prompt alone fills it."""
    if positions is None:
        return max_new_tokens
    if prompt_tokens >= positions:
        raise ConfigError(
            f"the prompt is {prompt_tokens:,} tokens; the anchor's context is {positions:,} "
            "positions and the reply needs at least one. Shorten the prompt (or start a new "
            "chat)"
        )
    room = positions - prompt_tokens
    if max_new_tokens > room:
        logger.warning(
            "prompt of %d tokens: the reply is limited to %d new tokens (context %d)",
            prompt_tokens,
            room,
            positions,
        )
        return room
    return max_new_tokens
