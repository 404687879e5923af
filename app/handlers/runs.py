"""Training runs: each is a separate `calm-composer train RECIPE --output runs/NAME` process;
the app writes the recipe, starts, stops and resumes the process, and reads the files it writes
(status.json, progress.jsonl, train.log), so any page (or a later app) can follow a run.

Why ~420 lines: a run's whole life as the app sees it (the form, start, stop, resume, the view)
read top to bottom; the files' formats are :mod:`composer.progress`'s and the lock is
:mod:`composer.run_lock`'s."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.handlers.recipe import current_recipe
from app.session import CODE_ROOT, Session
from composer import progress, run_lock
from composer.config import CompositionConfig, ConfigError

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
STARTING = "starting"  # a run the app launched that has not written its status yet
CONSOLE_LOG = "console.log"  # the training process's stdout and stderr
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


# The settings the Train tab's form shows, in order: each is a field of TrainingConfig (or, for
# eval_fraction, of DataConfig), whose help text and type the form takes from the class itself.
FORM_FIELDS = (
    "max_steps",
    "batch_size",
    "grad_accum",
    "lr",
    "max_length",
    "eval_fraction",
    "logging_every",
    "eval_every",
    "save_every",
    "seed",
)


def form_fields() -> list[tuple[str, str, bool]]:
    """(name, help text, whole number?) of each field of the form, read from the config classes."""
    import dataclasses

    from composer.config import field_type
    from composer.training_config import DataConfig, TrainingConfig

    found = {
        f.name: (f.metadata.get("help", ""), field_type(cls, f.name) is int)
        for cls in (TrainingConfig, DataConfig)
        for f in dataclasses.fields(cls)
    }
    return [(name, *found[name]) for name in FORM_FIELDS]


def training_defaults(session: Session) -> dict[str, Any]:
    """The hyperparameters the form shows: the recipe's training section over the defaults."""
    from composer.training_config import TrainingConfig

    try:
        training = TrainingConfig.from_mapping(session.recipe.get("training") or {})
    except ConfigError:
        training = TrainingConfig()
    values = {name: getattr(training, name) for name in FORM_FIELDS if name != "eval_fraction"}
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
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"run name {name!r} is not text; use letters, digits, '.', '_' and '-'")
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
    name = _check_run_name(run_name or new_run_name(session))
    current_recipe(session)  # both models chosen
    with _launching(session):
        return _start(session, name, hyperparameters)


@contextlib.contextmanager
def _launching(session: Session) -> Any:
    """One Start or Resume at a time, across this app's clients and across apps sharing the runs
    folder (a flock on runs/.launch.lock): the check that no run is busy and the launch are one
    step."""
    session.runs_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(session.runs_dir / ".launch.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _start(session: Session, name: str, hyperparameters: Mapping[str, Any]) -> str:
    import yaml

    from composer.training_config import DataConfig, TrainingConfig

    if not isinstance(hyperparameters, Mapping):
        raise ConfigError(f"training settings are {hyperparameters!r}; expected a mapping")
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
                data["eval_fraction"] = _number(value, "eval_fraction")
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


def _number(value: Any, what: str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} is {value!r}; expected a number") from None


def _is_whole_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and float(value).is_integer()
    )


def resume_training(session: Session, run_name: str) -> str:
    """Run the same command on the same folder: training continues from the newest checkpoint."""
    name = _check_run_name(run_name)
    with _launching(session):
        return _resume(session, name)


def _resume(session: Session, name: str) -> str:
    folder = session.runs_dir / name
    if not (folder / RECIPE_FILE).is_file():
        raise ConfigError(f"run {name!r} has no {RECIPE_FILE} in {session.runs_dir}; start it anew")
    busy = _busy_run(session)
    if busy is not None:
        raise ConfigError(f"run {busy!r} is still training; stop it before resuming another")
    status = progress.read_status(folder) or {}
    if status.get("state") == progress.RunStatus.FINISHED:
        raise ConfigError(f"run {name!r} has finished; its bridge is in {folder / progress.BRIDGE}")
    if status.get("state") in progress.LIVE and progress.pid_alive(status.get("pid")):
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
    if state in progress.ENDED:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            return name
        return None
    return name


def _launch(session: Session, name: str) -> None:
    """Start the training process holding the run folder's lock (taken here, handed down), so no
    other process (this app's other clients, another app, a CLI run) can train into it."""
    folder = session.runs_dir / name
    try:
        lock = run_lock.acquire(folder)
    except ConfigError:
        raise ConfigError(
            f"run {name!r} is being trained by another process; wait for it or stop it first"
        ) from None
    try:
        (folder / progress.STOP).unlink(missing_ok=True)
        command = [*session.train_command, str(folder / RECIPE_FILE), "--output", str(folder)]
        logger.info("starting training: %s", " ".join(command))
        path = os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")]))
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": path,
            run_lock.ENV_FD: str(lock),
        }
        with open(folder / CONSOLE_LOG, "ab") as console:
            session.processes[name] = subprocess.Popen(
                command,
                stdout=console,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(folder),
                env=env,
                pass_fds=(lock,),  # the child holds the lock from its first instruction
                start_new_session=True,  # a Ctrl-C in the app's terminal does not kill the run
            )
    finally:
        run_lock.release(lock)  # the child keeps its copy
    session.current_run = name
    session.stopping.discard(name)


def stop_training(session: Session, run_name: str) -> str:
    """Ask the run to checkpoint and stop: runs/NAME/STOP, and one SIGTERM to its process.

    The signal also reaches a run that is still loading its models (the trainer clears a STOP
    file it finds when it starts). It is sent once: a second signal would interrupt the run
    without a checkpoint.
    """
    name = _check_run_name(run_name)
    folder = session.runs_dir / name
    if not folder.is_dir():
        raise ConfigError(f"there is no run {name!r} in {session.runs_dir}")
    view = run_view(session, name)
    if view.state not in (STARTING, *progress.LIVE):
        raise ConfigError(f"run {name!r} is not running (it is {view.state})")
    (folder / progress.STOP).touch()
    if name not in session.stopping:
        session.stopping.add(name)
        process = session.processes.get(name)
        if process is not None:
            if process.poll() is None:
                process.terminate()
        else:  # a run started by an earlier app
            pid = (progress.read_status(folder) or {}).get("pid")
            if progress.pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
    return name


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
    if not isinstance(run_name, str) or not _RUN_NAME.match(run_name):
        return RunView(name=str(run_name), state="none", reason=f"no run {run_name!r}")
    folder = session.runs_dir / run_name
    if not folder.is_dir():
        return RunView(name=run_name, state="none", reason=f"no run {run_name!r}")
    status = progress.read_status(folder)
    records = progress.read_progress(folder)
    process = session.processes.get(run_name)
    exit_code = process.poll() if process is not None else None
    view = RunView(name=run_name, state=(status or {}).get("state", STARTING), records=records)
    if status is None:
        gone = process is not None and exit_code is not None
        if process is None:
            view.state = "none"
    elif view.state in progress.LIVE:
        alive = progress.pid_alive(status.get("pid"))
        gone = exit_code is not None if process is not None else not alive
    else:
        gone = False
    if gone and run_name in session.stopping:  # stopped while loading, before its first step
        view.state = progress.RunStatus.STOPPED.value
        view.reason = "stopped before its first step; press Resume to start it again"
    elif gone:  # the process ended without saying so: it crashed or was killed
        view.state = progress.RunStatus.FAILED.value
        view.reason = _exit_reason(folder, exit_code)
    if status:
        view.reason = view.reason or status.get("reason") or ""
        view.step = int(status.get("step") or 0)
        view.max_steps = status.get("max_steps")
        if status.get("state") == progress.RunStatus.FINISHED:
            view.bridge = status.get("bridge") or str(folder / progress.BRIDGE)
    if records:
        last = records[-1]
        view.step = max(view.step, int(last.get("step", 0)))
        view.max_steps = view.max_steps or last.get("max_steps")
        view.eta_s = last.get("eta_s") if view.state in progress.LIVE else 0.0
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
    found = progress.latest_checkpoint(folder)  # never promise a checkpoint that is not there
    then = (
        f"press Resume to continue from {found[1].name}"
        if found is not None
        else "no checkpoint was written: press Resume to start it again"
    )
    return (
        f"the training process ended without finishing{code}{detail}; see "
        f"{folder / CONSOLE_LOG}; {then}"
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
