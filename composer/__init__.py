"""calm-composer: compose a frozen anchor LLM with a frozen specialist through a trainable bridge.

The public API is imported lazily so ``import composer`` stays cheap (no torch until needed)
and never imports the UI.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BridgeConfig",
    "Composition",
    "CompositionConfig",
    "ConfigError",
    "GenerationConfig",
    "LlamaCppComposition",
    "ModelSpec",
    "compose",
    "load_bridge",
    "load_composition",
    "read_recipe",
]

_WHERE = {
    "BridgeConfig": "composer.config",
    "CompositionConfig": "composer.config",
    "ConfigError": "composer.config",
    "GenerationConfig": "composer.config",
    "ModelSpec": "composer.config",
    "read_recipe": "composer.config",
    "Composition": "composer.composition",
    "compose": "composer.composition",
    "load_bridge": "composer.loading",
    "load_composition": "composer.loading",
    "LlamaCppComposition": "composer.llamacpp",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'composer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
