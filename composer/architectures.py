"""Where each model family keeps its decoder layers, width, depth and heads.

Facts are data, not branches: supporting a new family is one row in ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from composer.config import ConfigError


@dataclass(frozen=True)
class ArchitectureFacts:
    layers: tuple[
        str, ...
    ]  # dotted paths (from the CausalLM) to the decoder-layer ModuleList; first found wins
    hidden_size: str = "hidden_size"  # config attribute names (read from the text config)
    num_layers: str = "num_hidden_layers"
    num_heads: str = "num_attention_heads"


_DECODER = ArchitectureFacts(layers=("model.layers",))
# Multimodal wrappers (e.g. Gemma3ForConditionalGeneration) keep the text stack one level deeper.
_DECODER_OR_LANGUAGE_MODEL = ArchitectureFacts(
    layers=("model.layers", "model.language_model.layers", "language_model.model.layers")
)

ARCHITECTURES: dict[str, ArchitectureFacts] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "mixtral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "qwen3_moe": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3": _DECODER_OR_LANGUAGE_MODEL,
    "gemma3_text": _DECODER,
    "phi3": _DECODER,
    "olmo2": _DECODER,
    "granite": _DECODER,
    "smollm3": _DECODER,
    "gpt2": ArchitectureFacts(
        layers=("transformer.h",), hidden_size="n_embd", num_layers="n_layer", num_heads="n_head"
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """The numbers the bridge needs from a model."""

    model_type: str
    width: int  # hidden size of the residual stream
    num_layers: int
    num_heads: int
    vocab_size: int


def facts_for(model_type: str) -> ArchitectureFacts:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ConfigError(
            f"architecture {model_type!r} is not supported: calm-composer does not know where its "
            f"decoder layers, width and heads are. Supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Add a row to composer/architectures.py:ARCHITECTURES to support it."
        ) from None


def model_shape(config) -> ModelShape:  # noqa: ANN001 - any transformers PretrainedConfig
    """Read width, depth, heads and vocabulary size from a transformers config."""
    model_type = getattr(config, "model_type", None) or "unknown"
    facts = facts_for(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = {}
    for field in ("hidden_size", "num_layers", "num_heads"):
        attr = getattr(facts, field)
        value = getattr(text, attr, None)
        if not isinstance(value, int):
            raise ConfigError(
                f"the {model_type!r} config has no integer {attr!r} (needed as {field}); "
                "the model's config.json may be incomplete"
            )
        values[field] = value
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int):
        raise ConfigError(f"the {model_type!r} config has no integer 'vocab_size'")
    return ModelShape(
        model_type=model_type,
        width=values["hidden_size"],
        num_layers=values["num_layers"],
        num_heads=values["num_heads"],
        vocab_size=vocab,
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order (layer 0 first)."""
    model_type = getattr(model.config, "model_type", "unknown")
    for path in facts_for(model_type).layers:
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ConfigError(
        f"could not find the decoder layers of this {model_type!r} model at "
        f"{' or '.join(facts_for(model_type).layers)}; its class is {type(model).__name__}. "
        "Update the row for it in composer/architectures.py:ARCHITECTURES."
    )


_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def positions_of(config: Any) -> int | None:
    """How many positions a model was built for (its context), from its config; None if unsaid."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in _POSITION_ATTRS:
        value = getattr(text, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def sliding_window(config: Any) -> bool:
    """Whether any layer of the model attends over a sliding window (Gemma 3, Mistral), from
    its config: such a layer's cache forgets old tokens, so it cannot be rolled back exactly."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        return "sliding_attention" in layer_types
    return bool(getattr(text, "sliding_window", None)) and getattr(text, "use_sliding_window", True)
