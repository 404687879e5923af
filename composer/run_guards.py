"""What guards a training run from outside: stop signals (a first SIGINT/SIGTERM asks for a clean
stop, a second ends at once), the run's log file, out-of-memory and non-finite values turned into
messages that say what to change, and another live run in the same folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from composer import progress
from composer.config import ConfigError, first_line
from composer.training_config import TrainingConfig

logger = logging.getLogger(__name__)

TRACEBACK = logging.getLogger("composer.train.traceback")
TRACEBACK.propagate = False
TRACEBACK.addHandler(logging.NullHandler())  # not logging's last resort (stderr) elsewhere


class TrainingInterrupted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM ended the run at once; the message says what can be resumed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NonFiniteError(Exception):
    """A step produced a non-finite loss or gradient (internal: becomes TrainingFailed)."""


# Only the run's log file gets the traceback of a failure; the console gets one line (a CLI user
# asks for more with -v).


@contextlib.contextmanager
def log_to_file(path: Path | None) -> Iterator[None]:
    """Copy the library's log records (INFO and up) to ``path`` for the run's duration."""
    if path is None:
        yield
        return
    root = logging.getLogger("composer")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    previous_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    TRACEBACK.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        TRACEBACK.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


class StopRequest:
    """SIGINT/SIGTERM handlers that ask for a clean stop; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise TrainingInterrupted(f"{signal.Signals(signum).name} received twice")
        self.requested = True
        self.reason = signal.Signals(signum).name
        logger.warning("%s received: stopping after this step", self.reason)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    previous[signum] = signal.signal(signum, self._handle)
                except ValueError:  # not the main thread: signals stay with the caller
                    break
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def out_of_memory_reason(config: TrainingConfig, step: int) -> str:
    advice = [
        f"lower training.batch_size (now {config.batch_size}; raise grad_accum to keep the "
        "effective batch)",
        f"lower training.max_length (now {config.max_length})",
    ]
    if not config.gradient_checkpointing:
        advice.append("set training.gradient_checkpointing: true")
    return f"out of memory at step {step + 1}: " + ", or ".join(advice)


def refuse_a_live_run(output: Path) -> None:
    """Two runs writing one folder would interleave checkpoints: refuse while another is alive."""
    status = progress.read_status(output) or {}
    pid = status.get("pid")
    if status.get("state") not in progress.LIVE or not isinstance(pid, int):
        return
    if pid == os.getpid() or not progress.pid_alive(pid):
        return  # this process, or one that died (e.g. killed): this run resumes from its checkpoint
    raise ConfigError(
        f"another training run (pid {pid}) is still writing to {output}; stop it first "
        f"(create {output / progress.STOP}) or train into another --output folder"
    )


def check_finite(loss: float, grad_norm: float, *, step: int, config: TrainingConfig) -> None:
    """Stop before a non-finite loss or gradient reaches the bridge (the step is not taken, so
    the bridge and every checkpoint stay finite)."""
    values = (("loss", loss), ("gradient norm", grad_norm))
    bad = [name for name, v in values if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(
            f"non-finite {' and '.join(bad)} at step {step} (loss {loss}, gradient norm "
            f"{grad_norm}); the step was not taken. Lower training.lr (now {config.lr:g}), keep "
            "training.max_grad_norm set, or use float32 (bf16: false); check the data for "
            "empty or extreme rows"
        )


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for a failed run's status."""
    first = first_line(exc)
    return first if first == type(exc).__name__ else f"{type(exc).__name__}: {first}"
