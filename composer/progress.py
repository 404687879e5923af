"""The files a training run leaves in its output folder, and how each is written.

```
DIR/status.json            state (running|stopping|stopped|finished|failed), pid, step, reason, ...
DIR/progress.jsonl         one JSON object per logged step (a UI tails it)
DIR/train.log              the run's log, with the traceback of a failure
DIR/checkpoints/step-N/    everything needed to resume exactly after step N
DIR/bridge/                the finished bridge (composer.export format)
DIR/STOP                   create it to ask a running job to checkpoint and stop
```

Every file that is replaced (status, checkpoints) is written to a temporary name and moved into
place with ``os.replace``, so a crash or SIGKILL never leaves a half-written one. progress.jsonl
is appended to; a torn last line is dropped when a run resumes.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from composer.atomic import write_folder_atomically, write_json_atomically

logger = logging.getLogger(__name__)

STATUS = "status.json"
PROGRESS = "progress.jsonl"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
BRIDGE = "bridge"
STOP = "STOP"


class RunStatus(str, enum.Enum):
    """A run's ``state`` in status.json (a str: it is written and compared as its value)."""

    RUNNING = "running"
    STOPPING = "stopping"  # a stop was asked: the checkpoint is being written
    STOPPED = "stopped"  # resumable from its last checkpoint
    FINISHED = "finished"  # the bridge folder is written
    FAILED = "failed"  # with a one-line reason


LIVE = (RunStatus.RUNNING, RunStatus.STOPPING)  # a process should be writing the folder
ENDED = (RunStatus.STOPPED, RunStatus.FINISHED, RunStatus.FAILED)
PROGRESS_KEYS = (
    "step",
    "max_steps",
    "epoch",
    "loss",
    "lr",
    "tokens_per_second",
    "elapsed_s",
    "eta_s",
    "peak_memory_bytes",
)  # plus "eval_loss" and "start_eval_loss" (the anchor alone) where the eval set was scored
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


def pid_alive(pid: Any) -> bool:
    """Whether a process with this id (a status file's ``pid``) is alive, as far as we can tell."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def write_status(output_dir: Path, state: RunStatus, **fields: Any) -> dict[str, Any]:
    """Replace status.json with ``state``, this process id, the time and ``fields``."""
    status = {
        "state": RunStatus(state).value,
        "pid": os.getpid(),
        "updated_at": time.time(),
        **fields,
    }
    write_json_atomically(Path(output_dir) / STATUS, status)
    return status


def read_status(output_dir: Path) -> dict[str, Any] | None:
    """status.json as a dict, or None when there is none (or it cannot be parsed)."""
    try:
        return json.loads((Path(output_dir) / STATUS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_progress(output_dir: Path) -> list[dict[str, Any]]:
    """Every well-formed line of progress.jsonl, in order (a torn line is skipped)."""
    path = Path(output_dir) / PROGRESS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_progress(output_dir: Path, *, upto_step: int) -> int:
    """Keep only well-formed lines with step <= ``upto_step`` (before resuming); returns the count.

    Lines written after the checkpoint a run resumes from would otherwise appear twice.
    """
    path = Path(output_dir) / PROGRESS
    kept = [r for r in read_progress(output_dir) if r["step"] <= upto_step]
    if path.exists():
        tmp = path.with_name(f".{PROGRESS}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(kept)


def append_progress(output_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(output_dir) / PROGRESS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first (temporary folders are ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> tuple[int, Path] | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def write_checkpoint(
    output_dir: Path, step: int, write: Callable[[Path], None], *, keep: int
) -> Path:
    """Fill a temporary folder with ``write``, move it to ``checkpoints/step-N``, keep the newest K.

    The rename is the commit point: a folder named ``step-N`` is always complete.
    """
    root = Path(output_dir) / CHECKPOINTS
    target = write_folder_atomically(root / f"step-{step}", write)
    for _, old_folder in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old_folder, ignore_errors=True)
    for leftover in root.glob(".step-*"):  # temporary folders of a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    logger.info("checkpoint written: %s", target)
    return target
