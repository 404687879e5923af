"""Presets: one YAML recipe per one-click composition, in a folder such as ``presets/``.

A preset is a composition recipe (the sections :class:`composer.config.CompositionConfig` reads)
plus, optionally, ``default: true`` on the one the app opens with. Reading a preset validates it
and makes its relative paths absolute against the preset file's folder, so the recipe can be
copied anywhere (e.g. into a training run's folder) and still find its models and data.
No torch import: listing presets is cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.config import CompositionConfig, ConfigError, read_yaml, resolve_paths

logger = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml")
BRIDGES = "bridges"  # trained bridges shipped with presets: bridges/<preset id>/
ROOT_VARIABLE = "CALM_COMPOSER_PRESETS"  # an environment variable naming another presets folder
_INSTALLED = Path(__file__).resolve().parent / "_presets"  # presets/ as copied into a wheel
_CHECKOUT = Path(__file__).resolve().parents[1] / "presets"  # the repository's presets/


def default_folder() -> Path:
    """The shipped presets (recipes, data, small models, bridges): ``$CALM_COMPOSER_PRESETS`` if
    set, else the copy installed with the package (``pip install .`` puts the repository's
    ``presets/`` there as package data), else the checkout's ``presets/`` (editable installs)."""
    chosen = os.environ.get(ROOT_VARIABLE)
    if chosen:
        return Path(os.path.expanduser(chosen)).resolve()
    return _INSTALLED if _INSTALLED.is_dir() else _CHECKOUT


@dataclass(frozen=True)
class Preset:
    """A validated preset: its id (the file name without suffix), recipe, file and flags."""

    id: str
    config: CompositionConfig  # relative model and data paths already made absolute
    path: Path
    default: bool = False  # the preset the app opens with

    @property
    def title(self) -> str:
        return self.config.name or self.id

    @property
    def shipped_bridge(self) -> Path | None:
        """The trained bridge shipped beside the preset (``bridges/<id>/`` in its folder, made
        by a script such as scripts/ship_default_bridge.py), or None when there is none."""
        folder = self.path.parent / BRIDGES / self.id
        return folder if (folder / "bridge_config.json").is_file() else None


def parse_preset(
    recipe: Mapping[str, Any], *, base: str | os.PathLike, preset_id: str = "preset"
) -> tuple[CompositionConfig, bool]:
    """Validate a parsed preset mapping; return (recipe config, default flag)."""
    if not isinstance(recipe, Mapping):
        raise ConfigError(
            f"preset {preset_id!r} is a {type(recipe).__name__}; expected a mapping with "
            "'anchor' and 'specialist' sections"
        )
    recipe = dict(recipe)
    default = recipe.pop("default", False)
    if not isinstance(default, bool):
        raise ConfigError(f"preset {preset_id!r} has default: {default!r}; expected true or false")
    try:
        config = CompositionConfig.from_dict(resolve_paths(recipe, base=Path(base)))
    except ConfigError as exc:
        raise ConfigError(f"preset {preset_id!r}: {exc}") from None
    return config, default


def read_preset(path: str | os.PathLike) -> Preset:
    """Read and validate one preset file; raises ConfigError naming the file and the problem."""
    path = Path(path)
    data = read_yaml(path, what="preset")
    config, default = parse_preset(data, base=path.resolve().parent, preset_id=path.stem)
    return Preset(id=path.stem, config=config, path=path.resolve(), default=default)


def _preset_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())


def scan_presets(folder: str | os.PathLike) -> tuple[list[Preset], list[str]]:
    """Every valid preset in ``folder`` (sorted by id) and one message per invalid file.

    A missing folder gives no presets and no problem. When several presets say
    ``default: true``, the first by id stays the default and the others are reported.
    """
    presets, problems = [], []
    for path in _preset_files(Path(folder)):
        try:
            presets.append(read_preset(path))
        except ConfigError as exc:
            logger.warning("skipped preset %s: %s", path, exc)
            problems.append(str(exc))
    defaults = [p for p in presets if p.default]
    for extra in defaults[1:]:
        problems.append(
            f"presets {defaults[0].id!r} and {extra.id!r} both say default: true; "
            f"{defaults[0].id!r} is used; keep the flag on one preset"
        )
    if len(defaults) > 1:
        keep = defaults[0].id
        presets = [
            p if p.default is False or p.id == keep else Preset(p.id, p.config, p.path, False)
            for p in presets
        ]
    return presets, problems


def list_presets(folder: str | os.PathLike) -> list[tuple[str, CompositionConfig, Path]]:
    """(id, validated recipe, file) for every preset in ``folder``, sorted by id.

    Strict: the first invalid preset raises ConfigError naming it. Relative model and data
    paths are absolute in the returned recipes (resolved against the preset file's folder).
    """
    presets = [read_preset(path) for path in _preset_files(Path(folder))]
    return [(p.id, p.config, p.path) for p in presets]


def default_preset(presets: Sequence[Preset]) -> Preset | None:
    """The preset marked ``default: true`` (the first such), or None."""
    return next((p for p in presets if p.default), None)
