"""When to tell a waiting person something (at least every few seconds, with an ETA; pure but for
the clock, which is injectable), and how to write times and sizes for them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

EVERY_S = 10.0  # the longest silence a long command allows itself


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m' (pure)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_bytes(n: float) -> str:
    """'512 B', '3.00 KiB', '1.50 GiB' (pure)."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def eta_seconds(done: int, total: int, elapsed_s: float) -> float | None:
    """Time left at the pace so far; None before the first unit is done (pure)."""
    if done <= 0:
        return None
    return max(0, total - done) * elapsed_s / done


@dataclass
class Pacer:
    """Says when a progress line is due: the first step, the last, and whenever ``every_s``
    passed since the previous line."""

    total: int
    every_s: float = EVERY_S
    clock: Callable[[], float] = time.monotonic
    start: float = field(init=False)
    last: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def due(self, done: int) -> bool:
        now = self.clock()
        if self.last is None or done >= self.total or now - self.last >= self.every_s:
            self.last = now
            return True
        return False

    def status(self, done: int) -> str:
        """'12/400, 0m31s, ETA 16m20s'."""
        elapsed = self.clock() - self.start
        eta = eta_seconds(done, self.total, elapsed)
        left = f", ETA {format_duration(eta)}" if eta is not None else ""
        return f"{done}/{self.total}, {format_duration(elapsed)}{left}"
