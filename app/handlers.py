"""What every button does, as plain functions of a Session and plain values (no gradio here).

Each handler validates its inputs and raises ``ConfigError`` with a message meant for the page;
the tab builders turn that into a visible message. Heavy libraries (torch, transformers) are
imported inside the handlers that need them, so the app starts fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.session import REPO_ROOT, Loaded, Session
from composer import progress
from composer.config import CompositionConfig, ConfigError, GenerationConfig, ModelSpec

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "nf4", "int8")
NEW_BRIDGE = ""  # the bridge choice meaning "a new, untrained bridge"
RECIPE_FILE = "recipe.yaml"
CONSOLE_LOG = "console.log"  # the training process's stdout and stderr
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


# ---------------------------------------------------------------------------------------------
# Recipe: presets and the models form


def preset_choices(session: Session) -> list[tuple[str, str]]:
    """(label, id) for the preset dropdown."""
    return [(p.title if p.title == p.id else f"{p.title} ({p.id})", p.id) for p in session.presets]


def apply_preset(session: Session, preset_id: str) -> dict[str, Any]:
    """Make a preset the recipe being edited; returns that recipe (a plain dict)."""
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
        if (model or "").strip() != section.get("model"):
            section = {"model": (model or "").strip()}  # another model: drop its old settings
        section["quantization"] = quantization or "none"
        recipe[role] = section
    bridge = dict(recipe.get("bridge") or {})
    bridge.update(
        every=_whole(every, "bridge every", default=4),
        num_heads=_whole(num_heads, "bridge heads") or None,  # 0 / empty: the anchor's own
        head_dim=_whole(head_dim, "bridge head size") or None,
        project_specialist=bool(project_specialist),
    )
    recipe["bridge"] = bridge
    session.recipe = recipe
    return recipe


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
    if models_dir.is_dir():
        for path in sorted(models_dir.rglob("*")):
            depth = len(path.relative_to(models_dir).parts)
            if depth > 3:
                continue
            if path.is_file() and path.suffix.lower() == ".gguf":
                found.append(str(path))
            elif path.is_dir() and (path / "config.json").is_file():
                found.append(str(path))
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


@dataclass
class PairReport:
    """What the Compose tab shows before anything is loaded."""

    compatible: bool
    problems: list[str] = field(default_factory=list)  # why it is not compatible
    notes: list[str] = field(default_factory=list)  # facts about each model and the vocabulary
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (anchor layer, specialist layer)
    anchor_layers: int = 0
    specialist_layers: int = 0
    bridge_parameters: int = 0
    anchor_parameters: int = 0
    memory: list[str] = field(default_factory=list)  # the training plan, line by line
    fits: bool | None = None


def check_pair(session: Session) -> PairReport:
    """Read both models' configs (no weights) and decide: compatible? pairs? size? memory?

    Raises ConfigError only for a recipe that cannot even be read; model problems (missing
    files, unknown architectures, different vocabularies) are reported in ``problems``.
    """
    from composer.architectures import model_shape
    from composer.loading import load_config

    config = current_recipe(session)
    report = PairReport(compatible=False)
    configs: dict[str, Any] = {}
    for role in ("anchor", "specialist"):
        spec: ModelSpec = getattr(config, role)
        try:
            configs[role] = load_config(spec)
        except ConfigError as exc:
            report.problems.append(f"{role}: {exc}")
            continue
        shape = model_shape(configs[role])
        report.notes.append(
            f"{role}: {spec.model} — {shape.model_type}, {shape.num_layers} layers x "
            f"{shape.width}, {shape.num_heads} heads, vocabulary {shape.vocab_size:,}, "
            f"quantization {spec.quantization}"
        )
    if len(configs) < 2:
        return report
    anchor, specialist = (model_shape(configs[r]) for r in ("anchor", "specialist"))
    report.anchor_layers, report.specialist_layers = anchor.num_layers, specialist.num_layers
    if anchor.vocab_size != specialist.vocab_size:
        report.problems.append(
            f"vocabulary: the anchor has {anchor.vocab_size:,} tokens and the specialist "
            f"{specialist.vocab_size:,}; both models must read the same token ids (choose two "
            "models of the same family)"
        )
    else:
        same = _same_tokenizer(session, config)
        if same is False:
            report.problems.append(
                "vocabulary: same size, but the tokenizers map tokens to different ids; choose "
                "two models of the same family"
            )
        else:
            checked = "identical tokenizers" if same else "tokenizers compared when loading"
            report.notes.append(f"vocabulary: shared, {anchor.vocab_size:,} tokens ({checked})")
    from composer.composition import bridge_shape_for
    from composer.memory import count_parameters, plan

    try:
        shape = bridge_shape_for(configs["anchor"], configs["specialist"], config.bridge)
    except ConfigError as exc:
        report.problems.append(f"bridge: {exc}")
        return report
    report.pairs = [tuple(p) for p in shape.pairs]
    report.bridge_parameters = shape.num_parameters()
    report.anchor_parameters = count_parameters(configs["anchor"]).total
    try:
        estimate = plan(config)
        report.memory, report.fits = estimate.format(), estimate.fits
    except ConfigError as exc:
        report.memory = [f"no memory estimate: {exc}"]
    report.compatible = not report.problems
    return report


def _same_tokenizer(session: Session, config: CompositionConfig) -> bool | None:
    """True/False when both tokenizers are cheap to read (not GGUF); None when not compared."""
    if config.anchor.is_gguf or config.specialist.is_gguf:
        return None  # building a tokenizer from GGUF can take tens of seconds
    from composer.export import tokenizer_fingerprint

    try:
        a = tokenizer_for(session, config.anchor)
        s = tokenizer_for(session, config.specialist)
    except ConfigError:
        return None
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(s)


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
    path = (path or "").strip()
    data = dict(session.recipe.get("data") or {})
    if path:
        data["train"] = str(Path(path).expanduser().resolve())
    else:
        data.pop("train", None)
    session.recipe = {**session.recipe, "data": data}
    return session.recipe


def keep_upload(session: Session, uploaded: str) -> str:
    """Copy an uploaded file (a temporary path) into the runs folder; returns the new path."""
    source = Path(uploaded)
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
    from composer.data import detect_format, preview, read_rows, validate_rows
    from composer.training_config import TrainingConfig

    path = (path or "").strip()
    if not path:
        raise ConfigError(
            "no data file chosen; pick or upload a .jsonl, .json, .csv, .parquet or .txt"
        )
    config = current_recipe(session)
    if max_length is None:
        max_length = TrainingConfig.from_mapping(config.training).max_length
    rows = read_rows(path)
    if not rows:
        raise ConfigError(f"{path} has no rows; check that you picked the right file")
    fmt = detect_format(rows, source=path)
    problems = [(p.row, p.message) for p in validate_rows(rows, fmt, source=path)]
    tokenizer = tokenizer_for(session, config.anchor)
    shown = preview(path, tokenizer, max_length=max_length, n=n)
    return DataView(format=fmt, rows=len(rows), preview=shown, problems=problems)


# ---------------------------------------------------------------------------------------------
# Training runs: a separate process per run; the UI reads the files it writes


TRAINING_FIELDS = (
    "max_steps",
    "batch_size",
    "grad_accum",
    "lr",
    "max_length",
    "logging_every",
    "eval_every",
    "save_every",
    "seed",
)


def training_defaults(session: Session) -> dict[str, Any]:
    """The hyperparameters the form shows: the recipe's training section over the defaults."""
    from composer.training_config import TrainingConfig

    try:
        training = TrainingConfig.from_mapping(session.recipe.get("training") or {})
    except ConfigError:
        training = TrainingConfig()
    values = {name: getattr(training, name) for name in TRAINING_FIELDS}
    values["eval_fraction"] = (session.recipe.get("data") or {}).get("eval_fraction", 0.0)
    return values


def list_runs(session: Session) -> list[str]:
    """Run folders, newest first."""
    root = session.runs_dir
    if not root.is_dir():
        return []
    runs = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and not p.name.startswith(("_", "."))
        and ((p / RECIPE_FILE).is_file() or (p / progress.STATUS).is_file())
    ]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def new_run_name(session: Session) -> str:
    stem = session.preset_id or (session.recipe.get("name") or "run")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", str(stem)).strip("-") or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_run_name(name: str) -> str:
    name = (name or "").strip()
    if not _RUN_NAME.match(name):
        raise ConfigError(
            f"run name {name!r} is not usable as a folder name; use letters, digits, '.', '_' "
            "and '-' (e.g. kv-arithmetic-1)"
        )
    return name


def start_training(session: Session, *, run_name: str, hyperparameters: Mapping[str, Any]) -> str:
    """Write runs/NAME/recipe.yaml from the recipe and the form, then start the training process.

    Refuses (ConfigError) a second run while one is running, an existing run folder (use
    resume), and bad settings (validated here, before anything starts).
    """
    import yaml

    from composer.training_config import DataConfig, TrainingConfig

    name = _check_run_name(run_name or new_run_name(session))
    current_recipe(session)  # both models chosen
    busy = _busy_run(session)
    if busy is not None:
        raise ConfigError(
            f"run {busy!r} is still training; stop it (or wait for it) before starting another"
        )
    folder = session.runs_dir / name
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"run {name!r} already exists in {session.runs_dir}; press Resume to continue it or "
            "choose another run name"
        )
    recipe = dict(session.recipe)
    training = dict(recipe.get("training") or {})
    data = dict(recipe.get("data") or {})
    for key, value in hyperparameters.items():
        if key == "eval_fraction":
            if value:
                data["eval_fraction"] = float(value)
                data.pop("eval", None)
            else:
                data.pop("eval_fraction", None)
        elif value is not None and value != "":
            training[key] = int(value) if _is_whole_number(value) and key != "lr" else value
    recipe["training"], recipe["data"] = training, data
    config = CompositionConfig.from_dict(recipe)  # validate everything before starting
    TrainingConfig.from_mapping(config.training)
    DataConfig.from_mapping(config.data).require_train()
    if not Path(config.data["train"]).is_file():
        raise ConfigError(
            f"the training file {config.data['train']} does not exist; choose one in the Data tab"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECIPE_FILE).write_text(
        yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8"
    )
    session.recipe = recipe
    _launch(session, name)
    return name


def _is_whole_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and float(value).is_integer()
    )


def resume_training(session: Session, run_name: str) -> str:
    """Run the same command on the same folder: training continues from the newest checkpoint."""
    name = _check_run_name(run_name)
    folder = session.runs_dir / name
    if not (folder / RECIPE_FILE).is_file():
        raise ConfigError(f"run {name!r} has no {RECIPE_FILE} in {session.runs_dir}; start it anew")
    busy = _busy_run(session)
    if busy is not None:
        raise ConfigError(f"run {busy!r} is still training; stop it before resuming another")
    status = progress.read_status(folder) or {}
    if status.get("state") == "finished":
        raise ConfigError(f"run {name!r} has finished; its bridge is in {folder / progress.BRIDGE}")
    if status.get("state") in ("running", "stopping") and _pid_alive(status.get("pid")):
        raise ConfigError(f"run {name!r} is still running (pid {status.get('pid')})")
    _launch(session, name)
    return name


def _busy_run(session: Session, *, grace_s: float = 15.0) -> str | None:
    """The run whose process is still training, if any. A process whose run has already
    stopped, finished or failed is only exiting: wait for it a little."""
    busy = session.running_process()
    if busy is None:
        return None
    name, process = busy
    state = (progress.read_status(session.runs_dir / name) or {}).get("state")
    if state in ("stopped", "finished", "failed"):
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            return name
        return None
    return name


def _launch(session: Session, name: str) -> None:
    folder = session.runs_dir / name
    (folder / progress.STOP).unlink(missing_ok=True)
    command = [*session.train_command, str(folder / RECIPE_FILE), "--output", str(folder)]
    logger.info("starting training: %s", " ".join(command))
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    with open(folder / CONSOLE_LOG, "ab") as console:
        session.processes[name] = subprocess.Popen(
            command,
            stdout=console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(folder),
            env=env,
            start_new_session=True,  # a Ctrl-C in the app's terminal does not kill the run
        )
    session.current_run = name


def stop_training(session: Session, run_name: str) -> str:
    """Ask the run to checkpoint and stop (creates runs/NAME/STOP)."""
    name = _check_run_name(run_name)
    folder = session.runs_dir / name
    if not folder.is_dir():
        raise ConfigError(f"there is no run {name!r} in {session.runs_dir}")
    view = run_view(session, name)
    if view.state not in ("starting", "running", "stopping"):
        raise ConfigError(f"run {name!r} is not running (it is {view.state})")
    (folder / progress.STOP).touch()
    return name


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunView:
    """What the Train tab shows about one run, read from its folder."""

    name: str
    state: str  # starting, running, stopping, stopped, finished, failed, or none
    step: int = 0
    max_steps: int | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    reason: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    log_tail: str = ""
    bridge: str | None = None  # the finished bridge folder

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0


def run_view(session: Session, run_name: str | None, *, log_lines: int = 20) -> RunView:
    """Read status.json, progress.jsonl and the log of a run (also runs of earlier sessions)."""
    if not run_name:
        return RunView(name="", state="none")
    folder = session.runs_dir / run_name
    if not folder.is_dir():
        return RunView(name=run_name, state="none", reason=f"no run {run_name!r}")
    status = progress.read_status(folder)
    records = progress.read_progress(folder)
    process = session.processes.get(run_name)
    exit_code = process.poll() if process is not None else None
    view = RunView(name=run_name, state=(status or {}).get("state", "starting"), records=records)
    if status is None:
        if process is None or exit_code is not None:
            view.state = "failed" if process is not None else "none"
            view.reason = _exit_reason(folder, exit_code) if process is not None else ""
    elif view.state in ("running", "stopping"):
        gone = exit_code is not None if process is not None else not _pid_alive(status.get("pid"))
        if gone:
            view.state = "failed"
            view.reason = _exit_reason(folder, exit_code)
    if status:
        view.reason = view.reason or status.get("reason") or ""
        view.step = int(status.get("step") or 0)
        view.max_steps = status.get("max_steps")
        if status.get("state") == "finished":
            view.bridge = status.get("bridge") or str(folder / progress.BRIDGE)
    if records:
        last = records[-1]
        view.step = max(view.step, int(last.get("step", 0)))
        view.max_steps = view.max_steps or last.get("max_steps")
        view.eta_s = last.get("eta_s") if view.state in ("running", "stopping") else 0.0
        view.elapsed_s = last.get("elapsed_s")
        view.tokens_per_second = last.get("tokens_per_second")
        view.peak_memory_bytes = last.get("peak_memory_bytes")
    view.log_tail = _tail(folder / progress.LOG, log_lines) or _tail(
        folder / CONSOLE_LOG, log_lines
    )
    return view


def _exit_reason(folder: Path, exit_code: int | None) -> str:
    last = [line for line in _tail(folder / CONSOLE_LOG, 30).splitlines() if line.strip()]
    code = f" (exit code {exit_code})" if exit_code is not None else ""
    detail = f": {last[-1].strip()}" if last else ""
    return (
        f"the training process ended without finishing{code}{detail}; see "
        f"{folder / CONSOLE_LOG}; press Resume to continue from the last checkpoint"
    )


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def loss_series(
    records: Sequence[Mapping[str, Any]], *, smoothing: float = 0.8
) -> list[dict[str, Any]]:
    """Rows (step, loss, series) for the loss plot: raw, smoothed (EMA, bias-corrected), eval."""
    rows: list[dict[str, Any]] = []
    ema, weight = 0.0, 0.0
    for record in records:
        loss = record.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            rows.append({"step": record["step"], "loss": float(loss), "series": "raw"})
            ema = smoothing * ema + (1 - smoothing) * loss
            weight = smoothing * weight + (1 - smoothing)
            rows.append({"step": record["step"], "loss": ema / weight, "series": "smoothed"})
        eval_loss = record.get("eval_loss")
        if isinstance(eval_loss, (int, float)) and math.isfinite(eval_loss):
            rows.append({"step": record["step"], "loss": float(eval_loss), "series": "eval"})
    return rows


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def format_bytes(n: float | None) -> str:
    if not n:
        return "—"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------
# Models in memory: load once, serialised by the session's lock


def bridge_choices(session: Session) -> list[tuple[str, str]]:
    """(label, folder) for the chat's bridge dropdown: new, finished runs, exported bridges."""
    choices = [("new (untrained) bridge", NEW_BRIDGE)]
    for name in list_runs(session):
        folder = session.runs_dir / name / progress.BRIDGE
        if (folder / "bridge_config.json").is_file():
            choices.append((f"run {name}", str(folder)))
    if session.exports_dir.is_dir():
        for folder in sorted(session.exports_dir.iterdir()):
            if (folder / "bridge_config.json").is_file():
                choices.append((f"saved {folder.name}", str(folder)))
    if session.loaded and session.loaded.bridge not in {value for _, value in choices}:
        choices.append((f"loaded {Path(session.loaded.bridge).name}", session.loaded.bridge))
    return choices


def _models_key(config: CompositionConfig) -> str:
    data = config.to_dict()
    return json.dumps({k: data[k] for k in ("anchor", "specialist", "bridge")}, sort_keys=True)


def load_models(session: Session, *, bridge: str | None = NEW_BRIDGE) -> str:
    """Load the recipe's two models and a bridge (new, or a saved folder); returns a summary.

    Reuses what is loaded when the models and the bridge are the same.
    """
    config = current_recipe(session)
    key, bridge = _models_key(config), (bridge or NEW_BRIDGE)
    with session.model_lock:
        loaded = session.loaded
        if loaded is not None and loaded.key == key and loaded.bridge == bridge:
            return describe_loaded(session)
        from composer.loading import load_composition

        session.loaded = None  # free the old models before loading new ones
        composition = load_composition(config, bridge=bridge or None, seed=0)
        session.loaded = Loaded(composition=composition, key=key, bridge=bridge)
    return describe_loaded(session)


def describe_loaded(session: Session) -> str:
    if session.loaded is None:
        return "no models loaded"
    composition = session.loaded.composition
    bridge = session.loaded.bridge or "a new (untrained) bridge: the composition is the anchor"
    recipe = composition.recipe
    names = f"{recipe.anchor.model} + {recipe.specialist.model}" if recipe is not None else "models"
    return (
        f"loaded {names}; {len(composition.pairs)} block(s), "
        f"{composition.bridge.num_parameters():,} bridge parameters; bridge: {bridge}"
    )


def require_loaded(session: Session) -> Any:
    if session.loaded is None:
        raise ConfigError("no models are loaded; press Load in the Chat tab first")
    return session.loaded.composition


# ---------------------------------------------------------------------------------------------
# Chat


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str = ""
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    bridge: bool = True  # False: the anchor alone

    def generation(self) -> GenerationConfig:
        """Validated decoding settings (ConfigError names a bad one)."""
        return GenerationConfig(
            max_new_tokens=int(self.max_new_tokens),
            do_sample=bool(self.do_sample),
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=int(self.top_k),
            repetition_penalty=float(self.repetition_penalty),
        )


def flatten_content(content: Any) -> str:
    """Gradio 6 message content (a string, or a list of parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, Sequence):
        return "".join(flatten_content(part) for part in content)
    return "" if content is None else str(content)


def flatten_history(history: Sequence[Mapping[str, Any]] | None) -> list[dict[str, str]]:
    """[{"role", "content": str}, ...] from a Chatbot value (other roles dropped)."""
    out = []
    for message in history or []:
        role = message.get("role")
        if role in ("user", "assistant", "system"):
            out.append({"role": role, "content": flatten_content(message.get("content"))})
    return out


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], system_prompt: str) -> Any:
    """(1, T) prompt ids: the chat template when the tokenizer has one, else plain text."""
    import torch

    from composer.generate import chat_input_ids

    if getattr(tokenizer, "chat_template", None):
        return chat_input_ids(tokenizer, messages, system_prompt=system_prompt or None)
    text = "\n".join(
        [*([system_prompt] if system_prompt else []), *(m["content"] for m in messages)]
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return torch.tensor([ids])


class GenerationCancelled(Exception):
    """Raised inside the decoding thread when Stop was pressed."""


def _streamer(tokenizer: Any, cancel: threading.Event) -> Any:
    from transformers import TextIteratorStreamer

    class CancellableStreamer(TextIteratorStreamer):
        def put(self, value: Any) -> None:
            if cancel.is_set():
                raise GenerationCancelled
            super().put(value)

    return CancellableStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.2)


def _stream(decode: Callable[[Any], Any], tokenizer: Any, cancel: threading.Event) -> Iterator[str]:
    """Run ``decode(streamer)`` in a thread; yield the growing text until it ends or Stop."""
    from queue import Empty

    streamer = _streamer(tokenizer, cancel)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            decode(streamer)
        except GenerationCancelled:
            streamer.end()
        except BaseException as exc:  # surfaced in the request thread below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, name="calm-generate", daemon=True)
    thread.start()
    text = ""
    try:
        while True:
            try:
                piece = next(streamer)
            except StopIteration:
                break
            except Empty:
                if not thread.is_alive() and streamer.text_queue.empty():
                    break
                continue
            text += piece
            yield text
    finally:
        if thread.is_alive():
            cancel.set()  # the caller stopped reading (Stop, closed page): end the decoding
        thread.join(timeout=30)
    if errors:
        raise errors[0]


def _decode_kwargs(settings: GenerationConfig) -> dict[str, Any]:
    return dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        repetition_penalty=settings.repetition_penalty,
    )


def stream_reply(
    session: Session,
    messages: Sequence[Mapping[str, str]],
    settings: ChatSettings,
    *,
    model: str = "composition",  # or "anchor" (bridge off) or "specialist"
) -> Iterator[str]:
    """Stream the reply to the conversation's last user message; yields the text so far.

    Holds the model lock while decoding. Stop (``stop_reply``) ends it within one token.
    """
    generation = settings.generation()
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ConfigError("type a message first")
    with session.model_lock:
        composition = require_loaded(session)
        tokenizer = composition.tokenizer
        input_ids = prompt_ids(tokenizer, messages, settings.system_prompt)
        kwargs = _decode_kwargs(generation)
        session.cancel.clear()
        if model == "specialist":
            decode = _specialist_decode(composition, input_ids, kwargs, tokenizer)
        elif model == "anchor" or not settings.bridge:

            def decode(streamer: Any) -> None:
                with composition.bridge_off():
                    composition.generate(input_ids, streamer=streamer, **kwargs)

        else:

            def decode(streamer: Any) -> None:
                composition.generate(input_ids, streamer=streamer, **kwargs)

        yield from _stream(decode, tokenizer, session.cancel)


def _specialist_decode(composition: Any, input_ids: Any, kwargs: dict[str, Any], tokenizer: Any):  # noqa: ANN202
    import torch

    specialist = composition.specialist
    sample = kwargs["do_sample"]
    options: dict[str, Any] = {
        "max_new_tokens": kwargs["max_new_tokens"],
        "do_sample": sample,
        "repetition_penalty": kwargs["repetition_penalty"],
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    }
    if sample:
        options.update(
            temperature=kwargs["temperature"], top_p=kwargs["top_p"], top_k=kwargs["top_k"]
        )
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    device = specialist.get_input_embeddings().weight.device

    def decode(streamer: Any) -> None:
        ids = input_ids.to(device)
        with torch.no_grad():
            specialist.generate(
                ids, attention_mask=torch.ones_like(ids), streamer=streamer, **options
            )

    return decode


def stop_reply(session: Session) -> None:
    session.cancel.set()


def training_notice(session: Session) -> str | None:
    """Why a reply may be slow now (a training run shares the machine), or None."""
    busy = session.running_process()
    if busy is None:
        return None
    return (
        f"training run {busy[0]!r} is running on this machine; replies share the processor with "
        "it and will be slower until it ends"
    )


# ---------------------------------------------------------------------------------------------
# Export


def save_bridge(session: Session, folder: str | None = None) -> str:
    """Save the loaded composition's bridge folder; returns its path."""
    with session.model_lock:
        composition = require_loaded(session)
        target = (
            Path(folder).expanduser() if folder and folder.strip() else _default_export(session)
        )
        target = target.resolve()
        composition.save_bridge(str(target))
    return str(target)


def _default_export(session: Session) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", session.preset_id or "bridge").strip("-") or "bridge"
    return session.exports_dir / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def archive_bridge(session: Session, folder: str | None = None) -> str:
    """A .zip of a bridge folder (the loaded bridge is saved first when no folder is given)."""
    from composer.export import read_bridge_config

    source = Path(folder).expanduser() if folder and folder.strip() else None
    if source is None or not source.exists():
        source = Path(save_bridge(session, folder))
    read_bridge_config(source)  # a folder that is not a bridge is refused with the reason
    out_dir = Path(tempfile.mkdtemp(prefix="calm-bridge-"))
    archive = shutil.make_archive(str(out_dir / source.name), "zip", root_dir=source)
    return archive


def _bridge_folder_in(root: Path) -> Path:
    if (root / "bridge_config.json").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("bridge_config.json"))
    if not found:
        raise ConfigError(
            f"no bridge_config.json in {root}; expected a bridge folder or an archive of one "
            "(made by Save or Download here, or by calm-composer train)"
        )
    return found[0]


def unpack_bridge(session: Session, archive: str) -> Path:
    """Extract an uploaded .zip/.tar(.gz) into the runs folder; returns the bridge folder in it."""
    source = Path(archive)
    target = Path(tempfile.mkdtemp(prefix="bridge-", dir=_ensure(session.uploads_dir)))
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as bundle:
                for member in bundle.namelist():
                    _check_member(member, source)
                bundle.extractall(target)
        elif tarfile.is_tarfile(source):
            with tarfile.open(source) as bundle:
                bundle.extractall(target, filter="data")
        else:
            raise ConfigError(
                f"{source.name} is neither a .zip nor a .tar archive; upload the archive that "
                "Download made, or give the bridge folder"
            )
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ConfigError(f"could not unpack {source.name}: {exc}") from None
    return _bridge_folder_in(target)


def _check_member(member: str, source: Path) -> None:
    path = Path(member)
    if path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"{source.name} holds an unsafe path {member!r}; refusing to unpack it")


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_bridge(session: Session, *, folder: str | None = None, archive: str | None = None) -> str:
    """Put a saved bridge (a folder, or an uploaded archive) on the loaded models.

    Refused with the reason (ConfigError from composer.export.load_bridge) when the bridge was
    made for other models; the models stay loaded either way.
    """
    from composer.export import load_bridge as compose_with_bridge

    if archive:
        path = unpack_bridge(session, archive)
    elif folder and folder.strip():
        path = _bridge_folder_in(Path(folder.strip()).expanduser())
    else:
        raise ConfigError("give a bridge folder or upload an archive of one")
    with session.model_lock:
        current = require_loaded(session)
        composition = compose_with_bridge(
            path,
            current.anchor,
            current.specialist,
            tokenizer=current.tokenizer,
            recipe=current.recipe,
            sources=current.sources,
        )
        session.loaded = dataclasses.replace(
            session.loaded, composition=composition, bridge=str(path.resolve())
        )
    return describe_loaded(session)


def hub_token() -> str | None:
    """The Hugging Face token configured on this machine (HF_TOKEN or `hf auth login`)."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return os.environ.get("HF_TOKEN")
    return get_token()


def push_to_hub(session: Session, *, folder: str | None, repo_id: str, private: bool = True) -> str:
    """Upload a bridge folder (the loaded bridge, saved first, when none is given) to the hub."""
    from composer.export import read_bridge_config

    repo_id = (repo_id or "").strip()
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", repo_id):
        raise ConfigError(f"hub repository {repo_id!r} is not of the form 'owner/name'")
    token = hub_token()
    if not token:
        raise ConfigError(
            "no Hugging Face token is configured; run `hf auth login` or set HF_TOKEN, then "
            "push again (the bridge can still be saved and downloaded here)"
        )
    source = Path(folder).expanduser() if folder and folder.strip() else None
    if source is None or not source.exists():
        source = Path(save_bridge(session, folder))
    read_bridge_config(source)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(source), commit_message="Upload CALM bridge"
        )
    except Exception as exc:  # network, permissions, rate limits: a message, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"could not push to {repo_id} ({type(exc).__name__}: {first}); check the network "
            "and that the token may write to that repository"
        ) from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
