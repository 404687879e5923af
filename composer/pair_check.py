"""Is a pair of models composable, decided from their configs before any weights are loaded:
a shared vocabulary, a bridge shape the widths and heads allow, and enough positions for the
training length. ``calm-composer info`` and ``train`` ask here first, so an impossible pair is
refused in seconds, not after minutes of loading."""

from __future__ import annotations

import logging
from typing import Any

from composer.architectures import model_shape
from composer.config import CompositionConfig, ConfigError

logger = logging.getLogger(__name__)

_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def positions_of(config: Any) -> int | None:
    """How many positions a model was built for (its context), from its config; None if unsaid."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in _POSITION_ATTRS:
        value = getattr(text, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def position_problems(configs: dict[str, Any], *, max_length: int | None) -> list[str]:
    """training.max_length against each model's positions (pure)."""
    if max_length is None:
        return []
    problems = []
    for role, config in configs.items():
        positions = positions_of(config)
        if positions is not None and max_length > positions:
            problems.append(
                f"training.max_length is {max_length} but the {role} has {positions} positions; "
                f"set training.max_length to at most {positions}"
            )
    return problems


def pair_problems(
    recipe: CompositionConfig,
    configs: dict[str, Any],
    *,
    max_length: int | None = None,
    tokenizers_match: Any = None,
) -> list[str]:
    """Everything that makes the pair unusable, one sentence each (empty: compatible).

    ``tokenizers_match`` is called (with no argument) only when the vocabulary sizes differ:
    the same tokenizer with padded embeddings is allowed (as ``compose`` allows it).
    """
    from composer.composition import bridge_shape_for

    problems = []
    anchor, specialist = model_shape(configs["anchor"]), model_shape(configs["specialist"])
    if anchor.vocab_size != specialist.vocab_size and not (
        tokenizers_match is not None and tokenizers_match()
    ):
        problems.append(
            f"vocabulary: the anchor has {anchor.vocab_size:,} tokens and the specialist "
            f"{specialist.vocab_size:,}, and their tokenizers differ; both models must read the "
            "same token ids (choose two models of the same family)"
        )
    try:
        bridge_shape_for(configs["anchor"], configs["specialist"], recipe.bridge)
    except ConfigError as exc:
        problems.append(f"bridge: {exc}")
    problems += position_problems(configs, max_length=max_length)
    return problems


def read_configs(recipe: CompositionConfig) -> dict[str, Any]:
    from composer.loading import load_config

    return {role: load_config(getattr(recipe, role)) for role in ("anchor", "specialist")}


def tokenizers_match(recipe: CompositionConfig) -> bool:
    """Whether both models' tokenizers map tokens to the same ids (loads tokenizers only)."""
    from composer.identity import tokenizer_fingerprint
    from composer.loading import load_tokenizer

    a, s = (load_tokenizer(getattr(recipe, role)) for role in ("anchor", "specialist"))
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(s)


def check_pair_configs(
    recipe: CompositionConfig,
    *,
    max_length: int | None = None,
    configs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Raise ConfigError listing every problem of the pair; returns the configs read."""
    configs = configs or read_configs(recipe)
    problems = pair_problems(
        recipe, configs, max_length=max_length, tokenizers_match=lambda: tokenizers_match(recipe)
    )
    if problems:
        raise ConfigError(
            f"the anchor {recipe.anchor.model!r} and the specialist {recipe.specialist.model!r} "
            "cannot be composed: " + "; ".join(problems)
        )
    return configs


def check_positions(composition: Any, *, max_length: int) -> None:
    """position_problems for models already loaded."""
    configs = {"anchor": composition.anchor.config, "specialist": composition.specialist.config}
    problems = position_problems(configs, max_length=max_length)
    if problems:
        raise ConfigError("; ".join(problems))
