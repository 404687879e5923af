"""Frozen, validated configuration objects for a composition.

Every user-facing setting lives here. Each dataclass validates itself in ``__post_init__`` and
raises :class:`ConfigError` with a message that names the field, the value, what was expected
and what to do. Layer indices are 0-based everywhere.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

QUANTIZATIONS = ("none", "nf4", "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A user-facing error: bad settings, files, models or bridges.

    The message is meant to be shown as-is (one line in the CLI, a message in the UI).
    """


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelSpec:
    """Where a frozen model comes from and how it is loaded."""

    model: str  # a Hugging Face hub id, a local folder, or a local .gguf file
    quantization: str = "none"  # "nf4" (bitsandbytes 4-bit) is what we use for the anchor on a GPU
    dtype: str = (
        "auto"  # auto: bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs)
    )
    revision: str | None = None  # hub revision (branch, tag or commit); ignored for local files
    tokenizer: str | None = None  # tokenizer source when it is not beside the weights
    trust_remote_code: bool = False  # off: never run code from a model repository unless asked

    def __post_init__(self) -> None:
        _require(
            isinstance(self.model, str) and self.model.strip() != "",
            f"model is {self.model!r}; expected a Hugging Face hub id (e.g. 'Qwen/Qwen2.5-0.5B'), "
            "a local folder or a .gguf file path",
        )
        _require(
            self.quantization in QUANTIZATIONS,
            f"quantization is {self.quantization!r} for model {self.model!r}; expected one of "
            f"{', '.join(QUANTIZATIONS)}",
        )
        _require(
            self.dtype in DTYPES,
            f"dtype is {self.dtype!r} for model {self.model!r}; "
            f"expected one of {', '.join(DTYPES)}",
        )

    @property
    def is_gguf(self) -> bool:
        return self.model.lower().endswith(".gguf")


@dataclass(frozen=True)
class BridgeConfig:
    """Shape of the bridge: which layers are connected and how wide each block is.

    Default pairing (the paper): one block per ``every`` specialist layers, reading the output
    of the last layer of each group of ``every`` (layers every-1, 2*every-1, ...), paired in order
    with as many evenly spaced anchor layers (see :func:`composer.pairing.default_pairs`).
    """

    every: int = 4  # paper: every 4th specialist layer
    pairs: tuple[tuple[int, int], ...] | None = None  # explicit (anchor layer, specialist layer)
    num_heads: int | None = None  # None: as many heads as the anchor (paper)
    head_dim: int | None = None  # None: d_anchor // num_heads (paper)
    project_specialist: bool = True  # paper: Linear(d_specialist -> d_anchor) before K/V
    norm: bool = True  # RMSNorm on the query and key/value inputs: anchor states can be huge
    causal: bool = True  # anchor t reads specialist positions <= t; False only to show the leak
    # RoPE on queries and keys at their token positions: reading "this token" needs position, and
    # plain cross-attention only sees content (see composer/bridge.py).
    rotary: bool = True
    # The paper's "specialist as encoder" ablation: the bridge reads the specialist's states of
    # the prompt only (in training: positions before the first labelled token), never of tokens
    # the anchor has written.
    prompt_only: bool = False
    dtype: str = "float32"  # bridge weights; float32 keeps the small trainable part exact

    def __post_init__(self) -> None:
        _require(
            isinstance(self.every, int) and self.every >= 1,
            f"bridge.every is {self.every!r}; expected a whole number >= 1 (paper: 4)",
        )
        if self.pairs is not None:
            try:
                pairs = tuple((int(a), int(s)) for a, s in self.pairs)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"bridge.pairs is {self.pairs!r}; expected a list of [anchor_layer, "
                    "specialist_layer] pairs of 0-based layer indices, e.g. [[3, 1], [7, 3]]"
                ) from None
            _require(
                len(pairs) > 0, "bridge.pairs is empty; give at least one pair or leave it out"
            )
            for a, s in pairs:
                _require(
                    a >= 0 and s >= 0,
                    f"bridge.pairs has ({a}, {s}); layer indices are 0-based and must be >= 0",
                )
            _require(
                len(set(pairs)) == len(pairs),
                f"bridge.pairs {list(pairs)} has a repeated pair; list each pair once",
            )
            object.__setattr__(self, "pairs", pairs)
        for name in ("num_heads", "head_dim"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, int) and value >= 1),
                f"bridge.{name} is {value!r}; expected a whole number >= 1, or leave it out to use "
                "the anchor's own",
            )
        _require(
            not self.rotary or self.head_dim is None or self.head_dim % 2 == 0,
            f"bridge.head_dim is {self.head_dim}; rotary positions need an even head_dim",
        )
        _require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"bridge.dtype is {self.dtype!r}; expected float32, bfloat16 or float16",
        )


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; sampling is done by transformers' logits processors."""

    max_new_tokens: int = 256
    do_sample: bool = False  # greedy by default: reproducible
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off
    stop: tuple[str, ...] = ()  # stop strings, in addition to the tokenizer's EOS

    def __post_init__(self) -> None:
        _require(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            f"max_new_tokens is {self.max_new_tokens!r}; expected a whole number >= 1",
        )
        _require(
            self.temperature > 0,
            f"temperature is {self.temperature!r}; expected > 0 (use do_sample=False for greedy)",
        )
        _require(0 < self.top_p <= 1, f"top_p is {self.top_p!r}; expected a number in (0, 1]")
        _require(self.top_k >= 0, f"top_k is {self.top_k!r}; expected >= 0 (0 turns it off)")
        _require(
            self.repetition_penalty > 0,
            f"repetition_penalty is {self.repetition_penalty!r}; expected > 0 (1.0 turns it off)",
        )
        object.__setattr__(self, "stop", tuple(self.stop))


_SECTIONS_KEPT_RAW = ("training", "data", "hardware")


@dataclass(frozen=True)
class CompositionConfig:
    """The whole recipe: two models, the bridge, decoding, and sections later stages read."""

    anchor: ModelSpec
    specialist: ModelSpec
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    name: str = ""
    description: str = ""
    # Sections owned by training, data and presets; kept as read-only mappings here.
    training: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    hardware: Mapping[str, Any] = field(default_factory=dict)
    expect: str = ""

    def __post_init__(self) -> None:
        for name in _SECTIONS_KEPT_RAW:
            value = getattr(self, name)
            _require(
                isinstance(value, Mapping),
                f"{name} is {value!r}; expected a mapping of settings (YAML 'key: value' lines)",
            )
            object.__setattr__(self, name, MappingProxyType(dict(value)))

    @classmethod
    def from_dict(cls, recipe: Mapping[str, Any]) -> CompositionConfig:
        """Build from a plain mapping (a parsed YAML recipe), rejecting unknown keys."""
        _require(
            isinstance(recipe, Mapping),
            f"the recipe is {type(recipe).__name__}; expected a mapping with 'anchor' and "
            "'specialist' sections",
        )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(recipe) - known)
        _require(
            not unknown,
            f"unknown recipe section(s) {unknown}; expected only {sorted(known)}",
        )
        for role in ("anchor", "specialist"):
            _require(
                role in recipe,
                f"the recipe has no '{role}' section; add '{role}: {{model: <hub id, folder or "
                ".gguf>}}'",
            )
        return cls(
            anchor=_build(ModelSpec, recipe["anchor"], "anchor"),
            specialist=_build(ModelSpec, recipe["specialist"], "specialist"),
            bridge=_build(BridgeConfig, recipe.get("bridge") or {}, "bridge"),
            generation=_build(GenerationConfig, recipe.get("generation") or {}, "generation"),
            name=str(recipe.get("name", "")),
            description=str(recipe.get("description", "")),
            training=recipe.get("training") or {},
            data=recipe.get("data") or {},
            hardware=recipe.get("hardware") or {},
            expect=str(recipe.get("expect", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-safe mapping that :meth:`from_dict` reads back to an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
            else:
                value = _plain(value)
            out[f.name] = value
        return out


def read_recipe(recipe: str | os.PathLike | Mapping[str, Any]) -> CompositionConfig:
    """A recipe from a YAML file path or a mapping, validated."""
    if isinstance(recipe, Mapping):
        return CompositionConfig.from_dict(recipe)
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(
            f"recipe file {str(path)!r} does not exist; give the path of a .yaml recipe"
        )
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML{line}; fix the file") from None
    if data is None:
        raise ConfigError(f"recipe {str(path)!r} is empty; it needs 'anchor' and 'specialist'")
    if isinstance(data, Mapping):
        data = resolve_model_paths(data, base=path.parent)
        if isinstance(data.get("default"), bool):
            del data["default"]  # a preset's "open this one first" flag (composer.presets)
    return CompositionConfig.from_dict(data)


def resolve_model_paths(recipe: Mapping[str, Any], *, base: Path) -> dict[str, Any]:
    """A copy of ``recipe`` whose relative model/tokenizer paths are absolute against ``base``.

    A recipe file names its models relative to its own folder (as a preset does). Names that
    exist there, and .gguf file names, are resolved; other names that are not files or folders
    there (hub ids such as ``Qwen/Qwen2.5-0.5B``) are left as they are.
    """
    out = dict(recipe)
    for role in ("anchor", "specialist"):
        section = out.get(role)
        if isinstance(section, str):
            section = {"model": section}
        if not isinstance(section, Mapping):
            continue
        section = dict(section)
        for key in ("model", "tokenizer"):
            value = section.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                candidate = base / value
                # A .gguf name is a file even before it exists (hub ids never end so): resolve
                # it, so "missing" names the place the recipe expects it (composer.model_files).
                if candidate.exists() or value.lower().endswith(".gguf"):
                    section[key] = str(candidate.resolve())
        out[role] = section
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, section: Any, where: str) -> Any:
    if isinstance(section, str) and cls is ModelSpec:
        section = {"model": section}  # shorthand: `anchor: path/or/id`
    _require(
        isinstance(section, Mapping),
        f"'{where}' is {section!r}; expected a mapping of settings",
    )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    _require(
        not unknown, f"unknown setting(s) {unknown} in '{where}'; expected some of {sorted(known)}"
    )
    if cls is ModelSpec:
        _require(
            "model" in section, f"'{where}' has no 'model'; add 'model: <hub id, folder or .gguf>'"
        )
    try:
        return cls(**section)
    except TypeError as exc:  # a wrongly typed value that __post_init__ could not compare
        raise ConfigError(f"bad settings in '{where}': {exc}") from None
