"""What a bridge or a run folder was made from: a cheap fingerprint of a model's weights, and the
identity of a training run (its recipe, data files and models).

A weights fingerprint is a few values read at fixed places of the tensors that every load of a
model keeps in floating point (the input embeddings and the norms of the first and last decoder
layers; linear layers too where they are not quantised). Two models of the same shape but other
weights differ there; the same model loaded in another dtype (bf16 on a GPU, fp32 on a CPU) or
quantised agrees within a small tolerance. It costs a few microseconds, not a pass over the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer.architectures import decoder_layers, model_shape
from composer.config import ConfigError

logger = logging.getLogger(__name__)

SAMPLES_PER_TENSOR = 8
# bf16 keeps 8 bits of mantissa (relative error <= 2^-8); fp16 flushes tiny values to subnormals.
_RELATIVE_TOLERANCE = 2e-2
_ABSOLUTE_TOLERANCE = 1e-4
IDENTITY_FILE = "run_identity.json"


class RunFolderMismatch(ConfigError):
    """A run folder holds a run made from other models, bridge settings or data."""


def _tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield "embed", model.get_input_embeddings().weight
    layers = list(decoder_layers(model))
    for tag, layer in (("first", layers[0]), ("last", layers[-1])):
        for name, param in layer.named_parameters():
            yield f"{tag}.{name}", param


def weights_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """{tensor: values at evenly spaced places} for the floating-point tensors chosen above."""
    out: dict[str, list[float]] = {}
    for name, tensor in _tensors(model):
        if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
            continue  # quantised (packed integers): not comparable across loads
        flat = tensor.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, SAMPLES_PER_TENSOR).long()
        # float32 rounds a large last index past the end (28,311,551 -> 28,311,552): clamp it,
        # which keeps every place saved fingerprints already use.
        index = index.clamp(max=flat.numel() - 1).to(flat.device)
        out[name] = [float(f"{v:.6g}") for v in flat[index].float().cpu().tolist()]
    return out


def fingerprint_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """The first tensor whose sampled values differ beyond dtype rounding, or None (pure).

    Only tensors both fingerprints hold are compared (a quantised load holds fewer).
    """
    for name in sorted(set(saved) & set(current)):
        a, b = saved[name], current[name]
        if len(a) != len(b):
            return name
        for x, y in zip(a, b, strict=True):
            if not (math.isfinite(x) and math.isfinite(y)):
                if not (x == y or (math.isnan(x) and math.isnan(y))):
                    return name
                continue
            if abs(x - y) > _ABSOLUTE_TOLERANCE + _RELATIVE_TOLERANCE * max(abs(x), abs(y)):
                return name
    return None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the token -> id map and the special tokens: equal iff ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def config_identity(
    config: Any,
    *,
    source: dict[str, Any] | None = None,
    tokenizer: Any = None,
    weights: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """What identifies a frozen model: where it came from, the shape the bridge depends on, its
    tokenizer, and ``weights`` (its :func:`weights_fingerprint`, so another model of the same
    shape is told apart; None where the file's sha256 in ``source`` stands for them)."""
    shape = model_shape(config)
    source = source or {}
    return {
        "name": source.get("name") or getattr(config, "_name_or_path", "") or "",
        "revision": source.get("revision"),
        "sha256": source.get("sha256"),
        "model_type": shape.model_type,
        "width": shape.width,
        "num_layers": shape.num_layers,
        "vocab_size": shape.vocab_size,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)
        if tokenizer is not None
        else None,
        "weights_fingerprint": weights,
    }


def model_identity(
    model: torch.nn.Module, *, source: dict[str, Any] | None = None, tokenizer: Any = None
) -> dict[str, Any]:
    """:func:`config_identity` of a loaded model, with the fingerprint of its weights."""
    return config_identity(
        model.config, source=source, tokenizer=tokenizer, weights=weights_fingerprint(model)
    )


def identity_mismatches(role: str, saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Differences that make a saved bridge wrong for a model (pure).

    Shape facts and tokenizers must match; a file hash or hub revision must match when both
    sides know it. A different name alone is not a mismatch (folders move).
    """
    problems = []
    for key in ("model_type", "width", "num_layers", "vocab_size"):
        if saved.get(key) != current.get(key):
            problems.append(
                f"{role} {key} is {current.get(key)!r}, the bridge was made for {saved.get(key)!r}"
            )
    for key in ("tokenizer_fingerprint", "sha256", "revision"):
        if saved.get(key) and current.get(key) and saved[key] != current[key]:
            problems.append(
                f"{role} {key} differs (bridge made for {saved.get('name') or 'another model'!r} "
                f"with {key} {str(saved[key])[:12]}..., got {str(current[key])[:12]}...)"
            )
    old, new = saved.get("weights_fingerprint"), current.get("weights_fingerprint")
    if isinstance(old, dict) and isinstance(new, dict):
        tensor = fingerprint_mismatch(old, new)
        if tensor is not None:
            problems.append(
                f"{role} weights differ (at {tensor}): the bridge was made for "
                f"{saved.get('name') or 'another model'!r}, a model of the same shape but other "
                "weights"
            )
    return problems


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (streamed: any size in constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def recipe_identity(
    recipe: Mapping[str, Any], training: Mapping[str, Any], data: Mapping[str, Any]
) -> dict[str, Any]:
    """Digests of what decides a run's result: models and bridge, the data-order settings, and
    the data files' contents (so an edited file is noticed, not only a renamed one).

    ``recipe`` is CompositionConfig.to_dict(), ``training`` TrainingConfig.to_dict(), ``data``
    the resolved DataConfig's fields. Settings that may change between sessions (max_steps,
    lr, logging...) are not compared: changing them is allowed and logged. The data-order
    settings are recorded; a checkpoint refuses them itself, naming the setting.
    """
    models = {k: recipe.get(k) for k in ("anchor", "specialist", "bridge")}
    order = {k: training.get(k) for k in ("batch_size", "grad_accum", "seed", "max_length")}
    files = {}
    for key in ("train", "eval"):
        path = data.get(key)
        files[key] = file_digest(path) if path and Path(path).is_file() else None
    data_settings = {k: data.get(k) for k in ("eval_fraction", "format", "columns")}
    return {
        "models_and_bridge": _digest(models),
        "data_order": _digest(order),
        "data_files": _digest(files),
        "data_settings": _digest(data_settings),
        "described": {
            "anchor": (recipe.get("anchor") or {}).get("model"),
            "specialist": (recipe.get("specialist") or {}).get("model"),
            "train": data.get("train"),
            "eval": data.get("eval"),
        },
    }


_WHAT = {
    "models_and_bridge": "models or bridge settings",
    "data_files": "training or eval data (file contents)",
    "data_settings": "data settings (eval_fraction, format, columns)",
}


def read_run_identity(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(
            f"{path} is damaged (not JSON); it records what this run was made from. Delete the "
            f"folder {folder} to start fresh, or train into another --output folder"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is damaged (not a JSON object); delete {folder} to start fresh")
    return value


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a run folder's recorded identity and this run's (pure)."""
    problems = []
    for key, what in _WHAT.items():
        if key in saved and key in current and saved[key] != current[key]:
            before = saved.get("described", {})
            problems.append(f"{what} (the folder was made with {_describe(before, key)})")
    for role in ("anchor", "specialist"):
        old, new = (saved.get("weights") or {}).get(role), (current.get("weights") or {}).get(role)
        if old and new:
            tensor = fingerprint_mismatch(old, new)
            if tensor is not None:
                problems.append(f"{role} weights (they differ at {tensor})")
    return problems


def _describe(described: Mapping[str, Any], key: str) -> str:
    if key == "models_and_bridge":
        return f"anchor {described.get('anchor')!r}, specialist {described.get('specialist')!r}"
    if key == "data_files":
        return f"train {described.get('train')!r}, eval {described.get('eval')!r}"
    return "other values"


def refuse_other_identity(
    folder: Path, saved: Mapping[str, Any], current: Mapping[str, Any]
) -> None:
    """ConfigError when a run folder holds a run made from something else."""
    problems = identity_differences(saved, current)
    if problems:
        raise RunFolderMismatch(
            f"the run folder {folder} holds a run made with other "
            + "; other ".join(problems)
            + ". Resuming or finishing it would mix two runs. Train into a new --output folder, "
            f"or delete {folder} to start fresh"
        )
