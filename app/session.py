"""The one object the app's handlers share: folders, the current recipe, the loaded composition,
the training processes this app started, and the lock that serialises work on the models.

No module globals: ``build_app`` makes one Session and passes it to every handler. What must
survive a page refresh lives here (or on disk, for training runs), never in the browser.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composer.presets import Preset, default_folder, default_preset, scan_presets

logger = logging.getLogger(__name__)

# The folder holding the `composer` package the app runs (a checkout or site-packages): the
# training subprocess imports the same one.
CODE_ROOT = Path(__file__).resolve().parents[1]
UPLOADS = "_uploads"  # under runs_dir: uploaded data files and bridge archives
EXPORTS = "_exports"  # under runs_dir: bridges saved from the Export tab


def default_train_command() -> list[str]:
    """The training command, without its arguments (RECIPE --output DIR are appended)."""
    return [sys.executable, "-m", "composer.cli", "train"]


@dataclass
class Loaded:
    """A composition in memory, and what it was made from (to know when to reload)."""

    composition: Any  # composer.composition.Composition
    key: str  # the models' part of the recipe, as JSON
    bridge: str  # "" for a new (untrained) bridge, else the folder it was loaded from
    engine: str = "torch"  # the engine it runs on: "torch" or "llama.cpp"
    last_reply: str = ""  # engine and measured speed of the last reply(s), shown under the chat


@dataclass
class Session:
    """Everything the app knows; one per app (one machine, one user)."""

    presets_dir: Path
    runs_dir: Path
    models_dir: Path
    train_command: list[str] = field(default_factory=default_train_command)
    presets: list[Preset] = field(default_factory=list)
    preset_problems: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)  # the recipe being edited
    preset_id: str | None = None
    loaded: Loaded | None = None
    current_run: str | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # run name -> process
    stopping: set[str] = field(default_factory=set)  # runs already sent their one SIGTERM
    model_lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)  # stops a reply
    server: Any = None  # composer.serve.BackgroundServer while the Chat tab's Serve is on
    tokenizers: dict[str, Any] = field(default_factory=dict)  # for data previews, by model
    model_configs: dict[str, Any] = field(default_factory=dict)  # read configs, by source

    @classmethod
    def create(
        cls,
        *,
        presets_dir: str | Path | None = None,
        runs_dir: str | Path | None = None,
        models_dir: str | Path | None = None,
        train_command: list[str] | None = None,
    ) -> Session:
        """A session over these folders (defaults: the shipped presets (see
        :func:`composer.presets.default_folder`), and runs/ and models/ in the current folder)."""
        session = cls(
            presets_dir=Path(presets_dir or default_folder()).resolve(),
            runs_dir=Path(runs_dir or "runs").resolve(),
            models_dir=Path(models_dir or "models").resolve(),
            train_command=list(train_command or default_train_command()),
        )
        session.reload_presets()
        preset = default_preset(session.presets)
        if preset is not None:
            session.use_preset(preset)
        return session

    def reload_presets(self) -> None:
        self.presets, self.preset_problems = scan_presets(self.presets_dir)
        for problem in self.preset_problems:
            logger.warning("%s", problem)

    def preset(self, preset_id: str) -> Preset | None:
        return next((p for p in self.presets if p.id == preset_id), None)

    def use_preset(self, preset: Preset) -> None:
        self.recipe = preset.config.to_dict()
        self.preset_id = preset.id

    @property
    def uploads_dir(self) -> Path:
        return self.runs_dir / UPLOADS

    @property
    def exports_dir(self) -> Path:
        return self.runs_dir / EXPORTS

    def running_process(self) -> tuple[str, subprocess.Popen] | None:
        """A training process this app started that is still alive, if any."""
        for name, process in self.processes.items():
            if process.poll() is None:
                return name, process
        return None

    def close(self, *, stop_runs: bool = True, wait_s: float = 10.0) -> list[str]:
        """Free the models; with ``stop_runs``, stop this app's training processes (STOP file and
        SIGTERM: each writes a checkpoint first). Returns the runs left running."""
        self.cancel.set()
        if self.server is not None:  # the Chat tab's OpenAI-compatible API
            self.server.stop()
            self.server = None
        self.loaded = None
        alive = [(name, p) for name, p in self.processes.items() if p.poll() is None]
        if not stop_runs:
            return [name for name, _ in alive]
        for name, process in alive:
            logger.info("stopping training run %s (pid %d)", name, process.pid)
            (self.runs_dir / name / "STOP").touch()
            process.terminate()  # SIGTERM: the trainer checkpoints and stops
        for name, process in alive:
            try:
                process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                logger.warning("training run %s did not stop in %.0f s; killing it", name, wait_s)
                process.kill()
                process.wait()
        return []
