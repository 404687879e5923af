"""One training process per run folder: an exclusive ``flock`` on ``DIR/run.lock``.

The kernel drops a flock when its last holder closes the file or dies (also by SIGKILL), so a
stale lock never blocks a resume, and two processes that race for a folder cannot both win. A
launcher (the app) may take the lock first and hand it to the training process it starts:
the child inherits the open file and finds its number in :data:`ENV_FD`; the lock then never has
a moment without an owner between the launcher's check and the child's start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from composer.config import ConfigError

LOCK = "run.lock"
ENV_FD = "CALM_COMPOSER_RUN_LOCK_FD"  # a lock handed down by the process that started this one


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def acquire(folder: str | os.PathLike) -> int:
    """Take the folder's lock without waiting; returns its file descriptor (close it to release).

    Raises ConfigError naming the holder's pid when another process holds it, or when the folder
    cannot be written.
    """
    folder = Path(folder)
    path = folder / LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the run folder {folder} ({exc.strerror or exc}); choose a folder you "
            "can write to (e.g. --output runs/my-bridge) or fix its permissions"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"another training process{_holder(path)} is using the run folder {folder}; stop it "
            f"first (create {folder / 'STOP'}), wait for it to end, or train into another folder"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def inherited(folder: str | os.PathLike) -> int | None:
    """The lock of ``folder`` handed down through :data:`ENV_FD`, if this process holds it."""
    value = os.environ.get(ENV_FD, "")
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(Path(folder) / LOCK))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already ours: succeeds at once
    except OSError:
        return None
    if not same:
        return None
    os.environ.pop(ENV_FD, None)  # a training process this one starts must not reuse it
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
