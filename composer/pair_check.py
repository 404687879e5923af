"""Is a pair of models composable, decided from their configs before any weights are loaded:
a shared vocabulary, a bridge shape the widths and heads allow, and enough positions for the
training length. ``calm-composer info`` and ``train`` ask here first, so an impossible pair is
refused in seconds, not after minutes of loading."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from composer.architectures import model_shape, positions_of
from composer.bridge import bridge_shape_for
from composer.config import CompositionConfig, ConfigError, ModelSpec

logger = logging.getLogger(__name__)

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
    tokenizers_match: Callable[[bool], bool | None] | None = None,
) -> list[str]:
    """Everything that makes the pair unusable, one sentence each (empty: compatible).

    ``tokenizers_match(required)`` compares the two tokenizers (True: the same ids; None: not
    compared). It is called with ``required=True`` when the vocabulary sizes differ: then only
    the same tokenizer with padded embeddings is allowed (as ``compose`` allows it); with
    ``required=False`` when the sizes agree, where it may skip a slow comparison.
    """
    problems = []
    anchor, specialist = model_shape(configs["anchor"]), model_shape(configs["specialist"])
    differ = anchor.vocab_size != specialist.vocab_size
    match = tokenizers_match(differ) if tokenizers_match is not None else None
    if differ and match is not True:
        problems.append(
            f"vocabulary: the anchor has {anchor.vocab_size:,} tokens and the specialist "
            f"{specialist.vocab_size:,}, and their tokenizers differ; both models must read the "
            "same token ids (choose two models of the same family)"
        )
    elif match is False:
        problems.append(
            "vocabulary: same size, but the tokenizers map tokens to different ids; choose two "
            "models of the same family"
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


def tokenizer_check(
    recipe: CompositionConfig, *, load: Callable[[ModelSpec], Any] | None = None
) -> Callable[[bool], bool | None]:
    """``tokenizers_match`` for :func:`pair_problems`: loads both tokenizers (``load``, default
    composer.loading.load_tokenizer) and compares their fingerprints. When not required it skips
    GGUF files (building a tokenizer from one takes seconds to tens of seconds) and tokenizers
    that cannot be read (None: not compared)."""

    def check(required: bool) -> bool | None:
        from composer.identity import tokenizer_fingerprint
        from composer.loading import load_tokenizer

        if not required and (recipe.anchor.is_gguf or recipe.specialist.is_gguf):
            return None
        try:
            a, s = ((load or load_tokenizer)(getattr(recipe, r)) for r in ("anchor", "specialist"))
        except ConfigError:
            if required:
                raise
            return None
        return tokenizer_fingerprint(a) == tokenizer_fingerprint(s)

    return check


def check_pair_configs(
    recipe: CompositionConfig,
    *,
    max_length: int | None = None,
    configs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Raise ConfigError listing every problem of the pair; returns the configs read."""
    configs = configs or read_configs(recipe)
    problems = pair_problems(
        recipe, configs, max_length=max_length, tokenizers_match=tokenizer_check(recipe)
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
