"""Model sources -> frozen transformers models and their tokenizer.

A model is named by a Hugging Face hub id (resolved through huggingface_hub's cache), a local
Hugging Face folder, or a local ``.gguf`` file (transformers' GGUF loader, dequantised to the
requested dtype). ``nf4``/``int8`` quantise with bitsandbytes, on CUDA or on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from composer.alignment import needs_alignment
from composer.architectures import model_shape
from composer.cache import cache_root, file_sha256
from composer.composition import Composition, check_vocabularies, compose, freeze
from composer.config import CompositionConfig, ConfigError, ModelSpec, first_line, read_recipe
from composer.export import read_bridge
from composer.hardware import configure_cuda_allocator, default_device, resolve_dtype
from composer.identity import model_identity
from composer.quantize import (
    disable_cpu_bf16_repack,
    quantization_config,
    quantize_nf4_in_memory,
)

if TYPE_CHECKING:
    from composer.llamacpp import LlamaCppComposition

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class Location:
    """Where a model's files are on disk once resolved."""

    kind: str  # "gguf", "folder" or "hub"
    folder: Path
    gguf_file: str | None = None
    revision: str | None = None  # hub commit hash


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: dict[str, Any] = field(default_factory=dict)  # name, kind, revision, sha256


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or os.sep in name.strip("/").split("/", 1)[-1]
        or (name.count("/") != 1)
    )


def locate(spec: ModelSpec) -> Location:
    """Find the model's files; raises ConfigError saying what to download or fix."""
    path = Path(os.path.expanduser(spec.model))
    if spec.is_gguf:
        if not path.is_file():
            from composer.model_files import fetch_hint

            raise ConfigError(
                f"GGUF file {spec.model!r} does not exist; "
                + (fetch_hint(path) or "check the path (e.g. models/my-model-q4_k_m.gguf)")
            )
        return Location(kind="gguf", folder=path.parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"folder {spec.model!r} has no config.json; expected a Hugging Face model folder "
                "(save_pretrained output) or give a .gguf file"
            )
        return Location(kind="folder", folder=path)
    if _looks_like_path(spec.model):
        raise ConfigError(
            f"model {spec.model!r} is neither an existing folder nor a hub id of the form "
            "'owner/name'; check the path"
        )
    return _from_hub(spec)


def _from_hub(spec: ModelSpec) -> Location:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # the cache first: works offline and costs no request
        folder = snapshot_download(
            spec.model, revision=spec.revision, allow_patterns=_HUB_PATTERNS, local_files_only=True
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        try:
            folder = snapshot_download(
                spec.model, revision=spec.revision, allow_patterns=_HUB_PATTERNS
            )
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
            cache = os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"
            raise ConfigError(
                f"model {spec.model!r} is not in the Hugging Face cache ({cache}) and could not be "
                f"downloaded ({type(exc).__name__}). On a connected machine run "
                f"`hf download {spec.model}` (and copy the cache here), or give a local folder or "
                ".gguf file instead"
            ) from None
    folder_path = Path(folder)
    return Location(kind="hub", folder=folder_path, revision=folder_path.name)


# What a malformed or truncated model file raises inside transformers, gguf, numpy or safetensors
# (struct.error from a cut GGUF header, a reshape ValueError from cut tensor data, ...).
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, struct.error)


def _unreadable(spec: ModelSpec, what: str, exc: BaseException) -> ConfigError:
    """One message for a model file that cannot be read, naming it as malformed."""
    kind = "GGUF file" if spec.is_gguf else "model folder"
    return ConfigError(
        f"could not read the {what} of {spec.model!r}: the {kind} is malformed or truncated "
        f"({type(exc).__name__}: {first_line(exc)}); download or convert it again"
    )


def load_config(spec: ModelSpec, location: Location | None = None) -> Any:
    """The model's transformers config, checked against the architecture table (no weights)."""
    from transformers import AutoConfig

    location = location or locate(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if location.gguf_file:
        kwargs["gguf_file"] = location.gguf_file
    try:
        config = AutoConfig.from_pretrained(str(location.folder), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if spec.is_gguf:  # the file exists (locate checked): it cannot be parsed
            raise _unreadable(spec, "config", exc) from None
        raise ConfigError(
            f"could not read the config of {spec.model!r}: {first_line(exc)}"
        ) from None
    except _UNREADABLE as exc:
        raise _unreadable(spec, "config", exc) from None
    model_shape(config)  # unknown architecture -> ConfigError naming it
    return config


def load_tokenizer(spec: ModelSpec, location: Location | None = None) -> Any:
    from transformers import AutoTokenizer

    location = location or locate(spec)
    source = spec.tokenizer or str(location.folder)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if location.gguf_file and spec.tokenizer is None:
        kwargs["gguf_file"] = location.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"could not load a tokenizer for {spec.model!r} from {source}: {first_line(exc)}; "
            "set 'tokenizer:' in the model's section to a folder or hub id that has one"
        ) from None
    except (*_UNREADABLE, Exception) as exc:  # the tokenizers library raises bare Exception
        raise _unreadable(spec, "tokenizer", exc) from None
    return tokenizer


def load_model(
    spec: ModelSpec, *, device: torch.device | str | None = None, with_tokenizer: bool = True
) -> LoadedModel:
    """Load a frozen causal LM (eval mode, no gradients) and, by default, its tokenizer."""
    from transformers import AutoModelForCausalLM

    configure_cuda_allocator()  # before the first CUDA allocation, or it has no effect
    device = torch.device(device) if device is not None else default_device()
    location = locate(spec)
    dtype = resolve_dtype(spec.dtype, device)
    sha256 = file_sha256(location.folder / location.gguf_file) if location.gguf_file else None
    converted = _converted(sha256, dtype)  # a GGUF converted by an earlier load, if any
    weights = Location(kind="folder", folder=converted) if converted else location
    load_config(spec, weights)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    if weights.gguf_file:
        kwargs["gguf_file"] = weights.gguf_file
    # transformers cannot quantise while loading a GGUF: dequantise, then quantise in memory.
    quantize_after = location.gguf_file is not None and spec.quantization != "none"
    if quantize_after and spec.quantization != "nf4":
        raise ConfigError(
            f"quantization {spec.quantization!r} is not available for GGUF file {spec.model!r}; "
            "use 'nf4' or 'none'"
        )
    quant = None if quantize_after else quantization_config(spec.quantization, device)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device) if device.type == "cpu" else device.index or 0}
    how = f"the converted copy in {converted}" if converted else location.kind
    logger.info("loading %s (%s, %s, %s)", spec.model, how, spec.quantization, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(weights.folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"could not load model {spec.model!r}: {first_line(exc)}") from None
    except (*_UNREADABLE, Exception) as exc:  # e.g. SafetensorError from a cut weights file
        raise _unreadable(spec, "weights", exc) from None
    tokenizer = None
    if location.gguf_file and converted is None and sha256 is not None and cache_root():
        # Converted once, mapped from now on; with the GGUF's own tokenizer (slow to build).
        from composer.cache import store_converted

        own = load_tokenizer(dataclasses.replace(spec, tokenizer=None), location)
        tokenizer = own if spec.tokenizer is None else None
        store_converted(model, own, sha256=sha256, dtype=_dtype_name(dtype), source=str(spec.model))
    if quant is None:
        model.to(device)
    if quantize_after:
        quantize_nf4_in_memory(
            model,
            device=device,
            compute_dtype=quantization_config("nf4", device).bnb_4bit_compute_dtype,
        )
    if spec.quantization == "nf4" and device.type == "cpu":
        disable_cpu_bf16_repack(model)
    model.requires_grad_(False)
    model.eval()
    if tokenizer is None and with_tokenizer:
        tokenizer = load_tokenizer(spec, weights)  # a converted copy holds the GGUF's tokenizer
    elif not with_tokenizer:
        tokenizer = None
    source = {
        "name": spec.model,
        "kind": location.kind,
        "revision": location.revision,
        "sha256": sha256,
    }
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _converted(sha256: str | None, dtype: torch.dtype) -> Path | None:
    """The cached safetensors copy of a GGUF file in ``dtype`` (composer.cache), or None."""
    if sha256 is None:
        return None
    from composer.cache import converted_folder

    return converted_folder(sha256, _dtype_name(dtype))


def load_composition(
    recipe: str | os.PathLike | Mapping[str, Any] | CompositionConfig,
    *,
    bridge: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    seed: int | None = None,
    engine: str = "torch",
) -> Composition | LlamaCppComposition:
    """Load both models of a recipe and compose them (a new bridge, or the saved ``bridge``).

    ``engine``: "torch" (trains and decodes), "llama.cpp" (decodes GGUF models on llama.cpp's
    quantised kernels; see composer.llamacpp) or "auto" (llama.cpp when it can run the recipe).
    """
    config = recipe if isinstance(recipe, CompositionConfig) else read_recipe(recipe)
    if resolve_engine(config, engine) == "llama.cpp":
        from composer.llamacpp import load_llamacpp_composition

        return load_llamacpp_composition(config, bridge=bridge, seed=seed)
    anchor = load_model(config.anchor, device=device)
    specialist = load_model(config.specialist, device=device)
    sources = {"anchor": anchor.source, "specialist": specialist.source}
    if bridge is not None:
        return load_bridge(
            bridge,
            anchor.model,
            specialist.model,
            tokenizer=anchor.tokenizer,
            specialist_tokenizer=specialist.tokenizer,
            recipe=config,
            sources=sources,
        )
    return compose(
        anchor.model,
        specialist.model,
        bridge_config=config.bridge,
        tokenizer=anchor.tokenizer,
        specialist_tokenizer=specialist.tokenizer,
        recipe=config,
        sources=sources,
        seed=seed,
    )


def resolve_engine(config: CompositionConfig, engine: str) -> str:
    """ "torch" or "llama.cpp" for ``engine``; logs one line when ``auto`` falls back to torch."""
    from composer.llamacpp import choose_engine, llama_cpp_missing

    missing = llama_cpp_missing() if engine != "torch" else None
    chosen, why = choose_engine(config, engine, missing=missing)
    if why:  # a warning only when llama.cpp was the choice but cannot run here
        gguf = config.anchor.is_gguf and config.specialist.is_gguf
        logger.log(logging.WARNING if gguf else logging.INFO, "%s", why)
    return chosen


def load_bridge(
    path: str | os.PathLike,
    anchor_model: torch.nn.Module,
    specialist_model: torch.nn.Module,
    *,
    tokenizer: Any = None,
    specialist_tokenizer: Any = None,  # None: the anchor's (one shared vocabulary)
    recipe: Any = None,
    sources: dict[str, dict[str, Any]] | None = None,
) -> Composition:
    """Compose two loaded models with a saved bridge; refuses a bridge made for another pair."""
    sources = sources or {}
    tokenizers = {"anchor": tokenizer, "specialist": specialist_tokenizer or tokenizer}
    models = {"anchor": anchor_model, "specialist": specialist_model}
    bridge = read_bridge(
        path,
        {
            role: model_identity(model, source=sources.get(role), tokenizer=tokenizers[role])
            for role, model in models.items()
        },
        anchor_layers=model_shape(anchor_model.config).num_layers,
        specialist_layers=model_shape(specialist_model.config).num_layers,
        aligned=needs_alignment(tokenizer, tokenizers["specialist"]),
    )
    check_vocabularies(anchor_model, specialist_model, tokenizer, tokenizers["specialist"])
    bridge.to(anchor_model.get_input_embeddings().weight.device)
    freeze(anchor_model)
    freeze(specialist_model)
    return Composition(
        anchor_model,
        specialist_model,
        bridge,
        tokenizer=tokenizer,
        specialist_tokenizer=tokenizers["specialist"],
        recipe=recipe,
        sources=sources,
    )
