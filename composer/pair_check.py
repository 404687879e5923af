"""Is a pair of models composable, decided from their configs before any weights are loaded:
a bridge shape the widths and heads allow, and enough positions for the training length (and,
said rather than checked, whether the two read one vocabulary or text aligned by characters).
``calm-composer info`` and ``train`` ask here first, so an impossible pair is refused in
seconds, not after minutes of loading."""

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
) -> list[str]:
    """Everything that makes the pair unusable, one sentence each (empty: compatible).

    Vocabularies are never a problem: two tokenizers are aligned by characters
    (composer.alignment); :func:`vocabulary_note` says which way a pair reads its text.
    """
    problems = []
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
) -> Callable[[], bool | None]:
    """``tokenizers_match`` for :func:`vocabulary_note`: loads both tokenizers (``load``, default
    composer.loading.load_tokenizer) and compares their fingerprints. Skips GGUF files (building
    a tokenizer from one takes seconds to tens of seconds) and tokenizers that cannot be read
    (None: not compared)."""

    def check() -> bool | None:
        from composer.identity import tokenizer_fingerprint
        from composer.loading import load_tokenizer

        if recipe.anchor.is_gguf or recipe.specialist.is_gguf:
            return None
        try:
            a, s = ((load or load_tokenizer)(getattr(recipe, r)) for r in ("anchor", "specialist"))
        except ConfigError:
            return None
        return tokenizer_fingerprint(a) == tokenizer_fingerprint(s)

    return check


def vocabulary_note(configs: dict[str, Any], match: bool | None) -> str:
    """How the pair reads its text, one line for a report (pure). ``match``: whether the two
    tokenizers map text to the same ids (None: not compared)."""
    a, s = (model_shape(configs[r]).vocab_size for r in ("anchor", "specialist"))
    aligned = "the two models read the same text, aligned by characters (docs/ALIGNMENT.md)"
    if match is True:
        return f"vocabulary: shared, {a:,} tokens (identical tokenizers)"
    if match is False:
        return f"vocabulary: two tokenizers ({a:,} and {s:,} tokens); {aligned}"
    if a == s:
        return (
            f"vocabulary: {a:,} tokens each (tokenizers compared when loading: shared ids if "
            f"identical, else {aligned})"
        )
    return (
        f"vocabulary: {a:,} and {s:,} tokens (tokenizers compared when loading: shared ids if "
        f"one tokenizer with padded embeddings, else {aligned})"
    )


def check_pair_configs(
    recipe: CompositionConfig,
    *,
    max_length: int | None = None,
    configs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Raise ConfigError listing every problem of the pair; returns the configs read."""
    configs = configs or read_configs(recipe)
    problems = pair_problems(recipe, configs, max_length=max_length)
    if problems:
        raise ConfigError(
            f"the anchor {recipe.anchor.model!r} and the specialist {recipe.specialist.model!r} "
            "cannot be composed: " + "; ".join(problems)
        )
    return configs
