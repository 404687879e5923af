"""The bridge folder: bridge.safetensors + bridge_config.json + composition.yaml + README.md.

Only bridge tensors are saved (a few MB, no frozen weights, no pickle). The config records
both models' identity so a bridge is never silently loaded onto a pair it was not made for
(:func:`composer.loading.load_bridge` checks it, and the tensors, when it loads one).
Writes go to a temporary folder beside the target and are moved into place at the end, so a
crash never leaves a half-written bridge.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from composer.atomic import write_folder_atomically
from composer.bridge import Bridge, BridgeShape
from composer.config import ConfigError, first_line
from composer.identity import identity_mismatches, model_identity
from composer.pairing import check_pairs

if TYPE_CHECKING:
    from composer.composition import Composition

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "bridge.safetensors"
CONFIG = "bridge_config.json"
RECIPE = "composition.yaml"
CARD = "README.md"
_BRIDGE_FILES = {WEIGHTS, CONFIG, RECIPE, CARD}
# How a bridge of two tokenizers read its specialist. Bridges saved before b94b13b say
# "characters": their keys sat where each token was committed, not where its text ends.
BY_CHARACTERS = "characters, keys where their text ends"


def library_version() -> str:
    try:
        return version("calm-composer")
    except PackageNotFoundError:
        return "unknown"


def check_bridge_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Path
) -> None:
    """Every tensor present, of the expected shape, floating point and finite (ConfigError)."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"{source} does not match its {CONFIG}: missing {missing[:3]}, unexpected "
            f"{extra[:3]}; the bridge folder is damaged: save or train it again"
        )
    for name, tensor in tensors.items():
        want = expected[name]
        if not tensor.is_floating_point():
            raise ConfigError(
                f"{source}: tensor {name} holds {str(tensor.dtype).removeprefix('torch.')} "
                "values; expected floating point weights; the bridge folder is damaged"
            )
        if tuple(tensor.shape) != tuple(want.shape):
            raise ConfigError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(want.shape)} from its {CONFIG}; the bridge folder is damaged"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ConfigError(
                f"{source}: tensor {name} holds NaN or infinite values; this bridge cannot be "
                "used (was its training diverging?); train it again with a lower learning rate"
            )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """load_file with a malformed or truncated file named as such (not safetensors' internals)."""
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, or a header that is not JSON
        raise ConfigError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: "
            f"{first_line(exc)}); it is "
            "truncated or damaged: copy it again, or save or train the bridge again"
        ) from None


def bridge_config_dict(composition: Composition) -> dict[str, Any]:
    bridge = composition.bridge
    tokenizer = composition.tokenizer
    return {
        "format_version": FORMAT_VERSION,
        "library": "calm-composer",
        "library_version": library_version(),
        "bridge": bridge.shape.to_dict(),
        "dtype": str(bridge.dtype).removeprefix("torch."),
        "num_parameters": bridge.num_parameters(),
        "anchor": model_identity(
            composition.anchor, source=composition.sources.get("anchor"), tokenizer=tokenizer
        ),
        "specialist": model_identity(
            composition.specialist,
            source=composition.sources.get("specialist"),
            tokenizer=composition.specialist_tokenizer,  # the anchor's when the ids are shared
        ),
        "alignment": "shared ids" if composition.alignment is None else BY_CHARACTERS,
    }


def _describe(identity: dict[str, Any]) -> str:
    return (
        f"`{identity['name']}` ({identity['model_type']}, width {identity['width']}, "
        f"{identity['num_layers']} layers)"
    )


def model_card(config: dict[str, Any], extra: str = "") -> str:
    shape = config["bridge"]
    pairs = ", ".join(f"anchor {a} <- specialist {s}" for a, s in shape["pairs"])
    projection = (
        "s = P(RMSNorm(s_j)), P: d_specialist -> d_anchor"
        if shape["project_specialist"]
        else "s = RMSNorm(s_j)"
    )
    return f"""# CALM bridge

A bridge made with calm-composer (CALM, Bansal et al. 2024, arXiv 2401.02412). It composes two
frozen models; these files hold only the bridge ({config["num_parameters"]:,} parameters,
{config["dtype"]}).

- anchor: {_describe(config["anchor"])}
- specialist: {_describe(config["specialist"])}
- layer pairs (0-based): {pairs}
- each block: {shape["num_heads"]} heads x {shape["head_dim"]}; causal: {shape["causal"]};
  rotary positions: {shape.get("rotary", False)}

## Forward

For each layer pair (i, j), after anchor layer i and before anchor layer i + 1:

    h_i <- h_i + W_o Attn(Q = RMSNorm(h_i) W_q, K = s W_k, V = s W_v),   {projection}

where s_j are the specialist's layer-j outputs for the same tokens, and anchor position t reads
only specialist positions <= t. Both models read every token (co-decoding).

## Use

```python
import composer
composition = composer.load_bridge("path/to/this/folder", anchor_model, specialist_model)
```
or `calm-composer generate composition.yaml --bridge path/to/this/folder --prompt "..."`.
{extra}
"""


def _check_replaceable(path: Path) -> None:
    """Only an earlier bridge folder may be replaced: never a folder holding the user's files."""
    if path.exists() and (not path.is_dir() or (set(os.listdir(path)) - _BRIDGE_FILES)):
        raise ConfigError(
            f"{path} exists and is not a bridge folder; choose a new or empty folder so nothing "
            "of yours is overwritten"
        )


def save_bridge(composition: Composition, path: str | os.PathLike, *, card_extra: str = "") -> Path:
    """Write the bridge folder at ``path`` atomically; returns the folder."""
    path = Path(path)
    config = bridge_config_dict(composition)
    tensors = {k: v.detach().cpu().contiguous() for k, v in composition.bridge.state_dict().items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ConfigError(
            f"the bridge holds NaN or infinite values (in {bad[0]}); refusing to save it to "
            f"{path}. Train it again (a lower training.lr) or load a finite bridge"
        )
    if composition.recipe is not None:
        recipe = composition.recipe.to_dict()
    else:
        recipe = {
            "anchor": {"model": config["anchor"]["name"]},
            "specialist": {"model": config["specialist"]["name"]},
            "bridge": {
                "pairs": config["bridge"]["pairs"],
                "num_heads": config["bridge"]["num_heads"],
                "head_dim": config["bridge"]["head_dim"],
            },
        }

    def write(folder: Path) -> None:
        save_file(
            tensors, str(folder / WEIGHTS), metadata={"format": "pt", "library": "calm-composer"}
        )
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        (folder / CARD).write_text(model_card(config, card_extra), encoding="utf-8")

    _check_replaceable(path)
    write_folder_atomically(path, write)
    logger.info("saved bridge (%s parameters) to %s", f"{config['num_parameters']:,}", path)
    return path


def read_bridge_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    config_file = path / CONFIG
    if not (path / WEIGHTS).is_file() or not config_file.is_file():
        raise ConfigError(
            f"{path} is not a bridge folder: expected {WEIGHTS} and {CONFIG} in it (made by "
            "save_bridge or calm-composer train)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{config_file} is not valid JSON ({exc}); the bridge folder is damaged"
        ) from None
    if not isinstance(config, dict) or not all(
        isinstance(config.get(key), dict) for key in ("bridge", "anchor", "specialist")
    ):
        raise ConfigError(
            f"{config_file} lacks its 'bridge', 'anchor' or 'specialist' section; the bridge "
            "folder is damaged: save or train it again"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{config_file} has format_version {config.get('format_version')!r}; "
            "this calm-composer "
            f"reads version {FORMAT_VERSION}. Upgrade calm-composer or re-export the bridge."
        )
    return config


def read_bridge(
    path: str | os.PathLike,
    identities: Mapping[str, dict[str, Any]],
    *,
    anchor_layers: int,
    specialist_layers: int,
    aligned: bool,
) -> Bridge:
    """The bridge saved in ``path``, refused unless it was made for the two models whose current
    identities (role -> :func:`composer.identity.config_identity`) and layer counts are given,
    and, when they read two tokenizers (``aligned``), for this way of aligning them.

    Every engine reads a bridge here, so a bridge is checked the same way whichever loads it.
    """
    path = Path(path)
    config = read_bridge_config(path)
    if aligned and config.get("alignment") == "shared ids":
        raise ConfigError(
            f"the bridge in {path} was trained for two models that share one tokenizer; these "
            "two read different tokenizers, so it would read the wrong positions: train it again"
        )
    if aligned and config.get("alignment") not in (BY_CHARACTERS, None):
        raise ConfigError(
            f"the bridge in {path} was trained by an earlier calm-composer, whose keys of a "
            f"two-tokenizer composition sat where each token was committed (alignment "
            f"{config.get('alignment')!r}); this one places them where the token's text ends, "
            "so the bridge would read the wrong positions: train it again"
        )
    problems = []
    for role in ("anchor", "specialist"):
        problems += identity_mismatches(role, config[role], identities[role])
    if problems:
        raise ConfigError(
            f"the bridge in {path} was not made for these models: " + "; ".join(problems)
        )
    try:
        shape = BridgeShape.from_dict(config["bridge"])
        # Never build a bridge larger than its weights file could hold (a damaged or hostile
        # config would otherwise allocate whatever it names).
        bytes_needed = shape.num_parameters() * 2  # at least 2 bytes per value (bf16/fp16)
        if bytes_needed > os.path.getsize(path / WEIGHTS):
            raise ConfigError(
                f"{path / CONFIG} describes a bridge of {shape.num_parameters():,} parameters but "
                f"{path / WEIGHTS} is only {os.path.getsize(path / WEIGHTS):,} bytes; the bridge "
                "folder is damaged: save or train it again"
            )
        bridge = Bridge(shape, dtype=config.get("dtype", "float32"))
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"{path / CONFIG} describes no usable bridge ({type(exc).__name__}: {exc}); the "
            "bridge folder is damaged: save or train it again"
        ) from None
    check_pairs(shape.pairs, anchor_layers=anchor_layers, specialist_layers=specialist_layers)
    tensors = read_safetensors(path / WEIGHTS)
    check_bridge_tensors(tensors, bridge.state_dict(), path / WEIGHTS)
    bridge.load_state_dict(tensors)
    return bridge
