"""Frozen, validated configuration objects for a composition.

Every user-facing setting lives here. Each dataclass validates itself in ``__post_init__`` and
raises :class:`ConfigError` with a message that names the field, the value, what was expected
and what to do. Layer indices are 0-based everywhere.

Why ~420 lines: each section of a composition recipe (models, bridge, generation, the whole) with
its help text and checks, and the one reader that builds them from YAML, are one home for every
setting; the training section is :mod:`composer.training_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: how a
    library's error is quoted inside one of ours."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``: the one check every config uses."""
    if not condition:
        raise ConfigError(message)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def setting(default: Any = dataclasses.MISSING, *, help: str, **kwargs: Any) -> Any:
    """A config field whose help text is data (as PEFT's ``metadata={"help": ...}``): the CLI's
    ``calm-composer fields`` (:func:`reference`) and the app's form labels read it."""
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(metadata={"help": help}, **kwargs)


def reference(sections: Mapping[str, type]) -> list[str]:
    """Lines documenting every setting of each recipe section: name, default and help (pure)."""
    lines = []
    for section, cls in sections.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f" (default: {json.dumps(_plain(f.default))})"
            else:
                default = " (required)"
            lines.append(f"  {f.name}{default}: {f.metadata.get('help', '')}")
    return lines


def check_keys(cls: type, section: Any, where: str) -> dict[str, Any]:
    """``section`` as a dict, or ConfigError when it is not a mapping or names unknown settings."""
    require(
        isinstance(section, Mapping),
        f"'{where}' is {section!r}; expected a mapping of settings (YAML 'key: value' lines)",
    )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    require(
        not unknown,
        f"unknown setting(s) {unknown} in '{where}'; expected some of {sorted(known)}; "
        "fix the spelling or remove them",
    )
    return dict(section)


@dataclass(frozen=True)
class ModelSpec:
    """Where a frozen model comes from and how it is loaded."""

    model: str = setting(help="A Hugging Face hub id, a local folder, or a local .gguf file")
    quantization: str = setting(
        "none", help="none, nf4 (bitsandbytes 4-bit: what we use for the anchor on a GPU) or int8"
    )
    dtype: str = setting(
        "auto", help="auto (chosen for the device the model runs on), float32, bfloat16, float16"
    )
    revision: str | None = setting(
        None, help="Hub revision (branch, tag or commit); ignored for local files"
    )
    tokenizer: str | None = setting(None, help="Tokenizer source when it is not beside the weights")
    trust_remote_code: bool = setting(
        False, help="Run code from the model's repository (off unless you trust it)"
    )

    def __post_init__(self) -> None:
        require(
            isinstance(self.model, str) and self.model.strip() != "",
            f"model is {self.model!r}; expected a Hugging Face hub id (e.g. 'Qwen/Qwen2.5-0.5B'), "
            "a local folder or a .gguf file path",
        )
        require(
            self.quantization in QUANTIZATIONS,
            f"quantization is {self.quantization!r} for model {self.model!r}; expected one of "
            f"{', '.join(QUANTIZATIONS)}",
        )
        require(
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

    every: int = setting(4, help="One block per this many specialist layers (paper: 4)")
    pairs: tuple[tuple[int, int], ...] | None = setting(
        None, help="Explicit [[anchor_layer, specialist_layer], ...], 0-based; overrides every"
    )
    num_heads: int | None = setting(
        None, help="Cross-attention heads; unset: as many as the anchor (paper)"
    )
    head_dim: int | None = setting(None, help="Width of a head; unset: d_anchor // num_heads")
    project_specialist: bool = setting(
        True, help="Linear(d_specialist -> d_anchor) before keys/values (paper)"
    )
    norm: bool = setting(
        True, help="RMSNorm on the query and key/value inputs: anchor states can be huge"
    )
    causal: bool = setting(
        True, help="Anchor position t reads specialist positions <= t; false only shows the leak"
    )
    # Reading "this token" needs its position, and plain cross-attention only sees content (see
    # composer/bridge.py).
    rotary: bool = setting(True, help="RoPE on queries and keys at their token positions")
    # In training the prompt is the positions before the first labelled token.
    prompt_only: bool = setting(
        False, help="The paper's specialist-as-encoder ablation: read the prompt's states only"
    )
    dtype: str = setting(
        "float32", help="Bridge weights; float32 keeps the small trainable part exact"
    )

    def __post_init__(self) -> None:
        require(
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
            require(len(pairs) > 0, "bridge.pairs is empty; give at least one pair or leave it out")
            for a, s in pairs:
                require(
                    a >= 0 and s >= 0,
                    f"bridge.pairs has ({a}, {s}); layer indices are 0-based and must be >= 0",
                )
            require(
                len(set(pairs)) == len(pairs),
                f"bridge.pairs {list(pairs)} has a repeated pair; list each pair once",
            )
            object.__setattr__(self, "pairs", pairs)
        for name in ("num_heads", "head_dim"):
            value = getattr(self, name)
            require(
                value is None or (isinstance(value, int) and value >= 1),
                f"bridge.{name} is {value!r}; expected a whole number >= 1, or leave it out to use "
                "the anchor's own",
            )
        require(
            not self.rotary or self.head_dim is None or self.head_dim % 2 == 0,
            f"bridge.head_dim is {self.head_dim}; rotary positions need an even head_dim",
        )
        require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"bridge.dtype is {self.dtype!r}; expected float32, bfloat16 or float16",
        )


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; sampling is done by transformers' logits processors."""

    max_new_tokens: int = setting(256, help="Most tokens a reply may have")
    do_sample: bool = setting(False, help="Sample; off: greedy, reproducible")
    temperature: float = setting(1.0, help="Sampling temperature (> 0)")
    top_p: float = setting(1.0, help="Nucleus sampling: keep the smallest set with this mass")
    top_k: int = setting(0, help="Keep the k most likely tokens; 0: off")
    repetition_penalty: float = setting(1.0, help="Penalty on repeated tokens; 1.0: off")
    stop: tuple[str, ...] = setting((), help="Stop strings, besides the tokenizer's EOS")

    def __post_init__(self) -> None:
        require(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            f"max_new_tokens is {self.max_new_tokens!r}; expected a whole number >= 1",
        )
        require(
            self.temperature > 0,
            f"temperature is {self.temperature!r}; expected > 0 (use do_sample=False for greedy)",
        )
        require(0 < self.top_p <= 1, f"top_p is {self.top_p!r}; expected a number in (0, 1]")
        require(self.top_k >= 0, f"top_k is {self.top_k!r}; expected >= 0 (0 turns it off)")
        require(
            self.repetition_penalty > 0,
            f"repetition_penalty is {self.repetition_penalty!r}; expected > 0 (1.0 turns it off)",
        )
        object.__setattr__(self, "stop", tuple(self.stop))

    def generate_kwargs(self) -> dict[str, Any]:
        """These settings as ``Composition.generate``'s keyword arguments (the one place they
        are spelled out: the CLI, the app and the server all pass them this way)."""
        return dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop_strings=self.stop,
        )


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
            require(
                isinstance(value, Mapping),
                f"{name} is {value!r}; expected a mapping of settings (YAML 'key: value' lines)",
            )
            object.__setattr__(self, name, MappingProxyType(dict(value)))

    @classmethod
    def from_dict(cls, recipe: Mapping[str, Any]) -> CompositionConfig:
        """Build from a plain mapping (a parsed YAML recipe), rejecting unknown keys."""
        require(
            isinstance(recipe, Mapping),
            f"the recipe is {type(recipe).__name__}; expected a mapping with 'anchor' and "
            "'specialist' sections",
        )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(recipe) - known)
        require(
            not unknown,
            f"unknown recipe section(s) {unknown}; expected only {sorted(known)}",
        )
        for role in ("anchor", "specialist"):
            require(
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
    """A recipe from a YAML file path or a mapping, validated. A file's relative paths (models,
    tokenizers, data) are made absolute against its folder (:func:`resolve_paths`)."""
    if isinstance(recipe, Mapping):
        return CompositionConfig.from_dict(recipe)
    path = Path(recipe)
    data = read_yaml(path, what="recipe")
    if isinstance(data, Mapping):
        data = resolve_paths(data, base=path.resolve().parent)
        if isinstance(data.get("default"), bool):
            del data["default"]  # a preset's "open this one first" flag (composer.presets)
    return CompositionConfig.from_dict(data)


def read_yaml(path: str | os.PathLike, *, what: str) -> Any:
    """The parsed YAML file of a ``what`` (recipe, preset): ConfigError naming the file when it is
    missing, unreadable, not UTF-8, not YAML or empty. The one YAML reader of the package."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML{line}; fix the file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"could not read {what} {str(path)!r} ({exc}); expected UTF-8") from None
    if data is None:
        raise ConfigError(f"{what} {str(path)!r} is empty; it needs 'anchor' and 'specialist'")
    return data


def resolve_paths(recipe: Mapping[str, Any], *, base: Path) -> dict[str, Any]:
    """A copy of a parsed recipe whose relative paths are absolute against ``base`` (its folder):
    the one place a recipe's paths are resolved.

    Models and tokenizers: names that exist there, and .gguf file names, are resolved; other
    names (hub ids such as ``Qwen/Qwen2.5-0.5B``) stay as they are. Data files (``data.train``,
    ``data.eval``) are always paths, so they are always resolved (``~`` expanded).
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
    data = out.get("data")
    if isinstance(data, Mapping):
        data = dict(data)
        for key in ("train", "eval"):
            value = data.get(key)
            if isinstance(value, str) and value.strip():  # anything else is for validation
                path = Path(value).expanduser()
                data[key] = str(path if path.is_absolute() else (base / path).resolve())
        out["data"] = data
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
    section = check_keys(cls, section, where)
    if cls is ModelSpec:
        require(
            "model" in section, f"'{where}' has no 'model'; add 'model: <hub id, folder or .gguf>'"
        )
    try:
        return cls(**section)
    except TypeError as exc:  # a wrongly typed value that __post_init__ could not compare
        raise ConfigError(f"bad settings in '{where}': {exc}") from None
