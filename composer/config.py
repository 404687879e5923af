"""The recipe's schema: frozen, validated settings for a composition.

Every user-facing setting lives here or in :mod:`composer.training_config`, as a field of a
frozen pydantic dataclass (``@section("bridge")``): its type says what it accepts (``Positive``,
``Number``, a ``Literal`` of choices, ...) and pydantic checks it; its ``setting(help=...)`` is
data that ``calm-composer fields`` and the app's labels show. A bad value is a
:class:`ConfigError` whose message names the field, the value, what was expected (said from the
field's type) and what to do (the field's ``fix``); checks across fields stay in
``__post_init__``. Layer indices are 0-based everywhere.

Why ~470 lines: the schema's helpers, each section of a composition recipe and the one reader
that builds them from YAML are one home for every setting (the training sections are
:mod:`composer.training_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

Quantization = Literal["none", "nf4", "int8"]
QUANTIZATIONS: tuple[str, ...] = typing.get_args(Quantization)
_A_MAPPING = "a mapping of settings (YAML 'key: value' lines)"

# Field types: strict, so 2.0 is not a whole number, "5" not a number and 1 not true.
Whole = Annotated[int, Strict()]
Positive = Annotated[int, Strict(), Ge(1)]
NonNegative = Annotated[int, Strict(), Ge(0)]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # an int or a finite float
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
NonBlank = Annotated[str, Strict(), Field(pattern=r"\S")]  # some character other than space
Layer = Annotated[int, Ge(0)]  # a layer index, counted from 0


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


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    fix: str = "",
    expect: str = "",
    **kwargs: Any,
) -> Any:
    """A config field whose help text is data (as PEFT's ``metadata={"help": ...}``): the CLI's
    ``calm-composer fields`` (:func:`reference`) and the app's form labels read it. ``fix`` is
    said after a bad value (what to do); ``expect`` replaces what the type says is expected."""
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(metadata={"help": help, "fix": fix, "expect": expect}, **kwargs)


class SettingsError(ConfigError):
    """A section's settings that pydantic refused; :meth:`said_for` names them in a section."""

    def __init__(self, cls: type, where: str, errors: list[dict[str, Any]], given: dict) -> None:
        self.cls, self.errors, self.given = cls, errors, given
        super().__init__(self.said_for(where))

    def said_for(self, where: str) -> str:
        """The message for the first problem, with ``where`` as the section's name (pure)."""
        fields = self.cls.__dataclass_fields__
        unknown = sorted(
            str(e["loc"][0])
            for e in self.errors
            if e["type"] in ("unexpected_keyword_argument", "extra_forbidden")
        )
        if unknown:
            return (
                f"unknown setting(s) {unknown} in '{where}'; expected some of {sorted(fields)}; "
                "fix the spelling or remove them"
            )
        error = self.errors[0]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # a check across fields, in __post_init__
            return str(cause)
        if not error["loc"] or str(error["loc"][0]) not in fields:  # not one field's value
            return f"bad settings in '{where}': {error['msg']}"
        name = str(error["loc"][0])
        meta = fields[name].metadata
        if error["type"] in ("missing", "missing_argument") and len(error["loc"]) == 1:
            return f"'{where}' has no '{name}'; add '{name}: ...': {meta.get('help', '')}"
        value = self.given.get(name, error.get("input"))
        pydantic_field = self.cls.__pydantic_fields__[name]
        expected = meta.get("expect") or expectation(
            pydantic_field.annotation, pydantic_field.metadata
        )
        fix = f" ({meta['fix']})" if meta.get("fix") else ""
        return f"{where}.{name} is {value!r}; expected {expected}{fix}"


def expectation(annotation: Any, metadata: Any = ()) -> str:
    """What a field's type accepts, in words: 'a whole number >= 1', 'one of a, b' (pure)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return expectation(args[0], [*metadata, *annotation.__metadata__])
    if origin in (typing.Union, types.UnionType):
        said = [expectation(a, metadata) for a in args if a is not type(None)]
        return " or ".join(said)  # None: the field's fix says "or leave it out"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    kind = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    said = kind.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bound = {
        kind: getattr(m, kind.__name__.lower())
        for m in metadata
        for kind in (Ge, Gt, Le, Lt)
        if isinstance(m, kind)
    }
    low = (f"[{bound[Ge]}", f">= {bound[Ge]}") if Ge in bound else None
    low = (f"({bound[Gt]}", f"> {bound[Gt]}") if Gt in bound else low
    high = (f"{bound[Le]}]", f"<= {bound[Le]}") if Le in bound else None
    high = (f"{bound[Lt]})", f"< {bound[Lt]}") if Lt in bound else high
    if low and high:
        return f"{said} in {low[0]}, {high[0]}"
    return " ".join([said, *(b[1] for b in (low, high) if b)])


def section(where: str) -> Callable[[type], type]:
    """Make ``cls`` a frozen pydantic dataclass of the recipe section ``where``: unknown keys
    and bad values raise :class:`SettingsError` (a ConfigError) naming ``where.field``."""

    def make(cls: type) -> type:
        cls = pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
        validated_init = cls.__init__

        def __init__(self: Any, **given: Any) -> None:
            try:
                validated_init(self, **given)
            except ValidationError as exc:
                raise SettingsError(cls, where, exc.errors(), given) from None

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return make


def build(cls: type, values: Any, where: str) -> Any:
    """``cls`` from a recipe's section ``values`` (a mapping), its messages naming ``where``."""
    require(isinstance(values, Mapping), f"'{where}' is {values!r}; expected {_A_MAPPING}")
    try:
        return cls(**{str(k): v for k, v in values.items()})
    except SettingsError as exc:
        raise ConfigError(exc.said_for(where)) from None


def field_type(cls: type, name: str) -> Any:
    """The Python type a setting holds (int, float, bool, str, ...), without its constraints."""
    annotation = cls.__pydantic_fields__[name].annotation
    while typing.get_origin(annotation) in (Annotated, typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def reference(sections: Mapping[str, type]) -> list[str]:
    """Lines documenting every setting of each recipe section: name, default and help (pure)."""
    lines = []
    for name, cls in sections.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f" (default: {json.dumps(_plain(f.default))})"
            else:
                default = " (required)"
            lines.append(f"  {f.name}{default}: {f.metadata.get('help', '')}")
    return lines


@section("model")
class ModelSpec:
    """Where a frozen model comes from and how it is loaded."""

    model: NonBlank = setting(
        help="A Hugging Face hub id, a local folder, or a local .gguf file",
        expect="a Hugging Face hub id (e.g. 'Qwen/Qwen2.5-0.5B'), a local folder or a .gguf file "
        "path",
    )
    quantization: Quantization = setting(
        "none", help="none, nf4 (bitsandbytes 4-bit: what we use for the anchor on a GPU) or int8"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", help="auto (chosen for the device the model runs on), float32, bfloat16, float16"
    )
    revision: Text | None = setting(
        None, help="Hub revision (branch, tag or commit); ignored for local files"
    )
    tokenizer: Text | None = setting(
        None, help="Tokenizer source when it is not beside the weights"
    )
    trust_remote_code: Flag = setting(
        False, help="Run code from the model's repository (off unless you trust it)"
    )

    @property
    def is_gguf(self) -> bool:
        return self.model.lower().endswith(".gguf")


@section("bridge")
class BridgeConfig:
    """Shape of the bridge: which layers are connected and how wide each block is.

    Default pairing (the paper): one block per ``every`` specialist layers, reading the output
    of the last layer of each group of ``every`` (layers every-1, 2*every-1, ...), paired in order
    with as many evenly spaced anchor layers (see :func:`composer.pairing.default_pairs`).
    """

    every: Positive = setting(
        4, help="One block per this many specialist layers (paper: 4)", fix="paper: 4"
    )
    pairs: tuple[tuple[Layer, Layer], ...] | None = setting(
        None,
        help="Explicit [[anchor_layer, specialist_layer], ...], 0-based; overrides every",
        expect="a list of [anchor_layer, specialist_layer] pairs of 0-based layer indices "
        "(>= 0), e.g. [[3, 1], [7, 3]]",
    )
    num_heads: Positive | None = setting(
        None,
        help="Cross-attention heads; unset: as many as the anchor (paper)",
        fix="or leave it out to use the anchor's own",
    )
    head_dim: Positive | None = setting(
        None,
        help="Width of a head; unset: d_anchor // num_heads",
        fix="or leave it out to use the anchor's own",
    )
    project_specialist: Flag = setting(
        True, help="Linear(d_specialist -> d_anchor) before keys/values (paper)"
    )
    norm: Flag = setting(
        True, help="RMSNorm on the query and key/value inputs: anchor states can be huge"
    )
    causal: Flag = setting(
        True, help="Anchor position t reads specialist positions <= t; false only shows the leak"
    )
    # Reading "this token" needs its position, and plain cross-attention only sees content (see
    # composer/bridge.py).
    rotary: Flag = setting(True, help="RoPE on queries and keys at their token positions")
    # In training the prompt is the positions before the first labelled token.
    prompt_only: Flag = setting(
        False, help="The paper's specialist-as-encoder ablation: read the prompt's states only"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "float32", help="Bridge weights; float32 keeps the small trainable part exact"
    )

    def __post_init__(self) -> None:
        if self.pairs is not None:
            require(self.pairs, "bridge.pairs is empty; give at least one pair or leave it out")
            require(
                len(set(self.pairs)) == len(self.pairs),
                f"bridge.pairs {list(self.pairs)} has a repeated pair; list each pair once",
            )
        require(
            not self.rotary or self.head_dim is None or self.head_dim % 2 == 0,
            f"bridge.head_dim is {self.head_dim}; rotary positions need an even head_dim",
        )


@section("generation")
class GenerationConfig:
    """Decoding settings; sampling is done by transformers' logits processors."""

    max_new_tokens: Positive = setting(256, help="Most tokens a reply may have")
    do_sample: Flag = setting(False, help="Sample; off: greedy, reproducible")
    temperature: Annotated[Number, Gt(0)] = setting(
        1.0, help="Sampling temperature (> 0)", fix="use do_sample=False for greedy"
    )
    top_p: Annotated[Number, Gt(0), Le(1)] = setting(
        1.0, help="Nucleus sampling: keep the smallest set with this mass"
    )
    top_k: NonNegative = setting(
        0, help="Keep the k most likely tokens; 0: off", fix="0 turns it off"
    )
    repetition_penalty: Annotated[Number, Gt(0)] = setting(
        1.0, help="Penalty on repeated tokens; 1.0: off", fix="1.0 turns it off"
    )
    stop: tuple[Text, ...] = setting((), help="Stop strings, besides the tokenizer's EOS")

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


@section("recipe")
class CompositionConfig:
    """The whole recipe: two models, the bridge, decoding, and sections later stages read."""

    anchor: ModelSpec
    specialist: ModelSpec
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    name: Text = ""
    description: Text = ""
    # Sections owned by training, data and presets; kept as read-only mappings here.
    training: Mapping[str, Any] = setting(default_factory=dict, help="", expect=_A_MAPPING)
    data: Mapping[str, Any] = setting(default_factory=dict, help="", expect=_A_MAPPING)
    hardware: Mapping[str, Any] = setting(default_factory=dict, help="", expect=_A_MAPPING)
    expect: Text = ""

    def __post_init__(self) -> None:
        for name in ("training", "data", "hardware"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

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
        models = {
            role: {"model": recipe[role]} if isinstance(recipe[role], str) else recipe[role]
            for role in ("anchor", "specialist")  # shorthand: `anchor: path/or/id`
        }
        return cls(
            anchor=build(ModelSpec, models["anchor"], "anchor"),
            specialist=build(ModelSpec, models["specialist"], "specialist"),
            bridge=build(BridgeConfig, recipe.get("bridge") or {}, "bridge"),
            generation=build(GenerationConfig, recipe.get("generation") or {}, "generation"),
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
