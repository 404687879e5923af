"""Progress lines: at least every 10 s, with an ETA."""

from __future__ import annotations

from composer.pacing import Pacer, eta_seconds, format_duration


def test_durations_and_eta():
    assert [format_duration(s) for s in (0, 42.4, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]
    assert eta_seconds(0, 10, 5.0) is None
    assert eta_seconds(5, 10, 5.0) == 5.0
    assert eta_seconds(12, 10, 5.0) == 0


def test_a_line_is_due_first_then_every_ten_seconds_and_at_the_end():
    now = [100.0]
    pacer = Pacer(total=1000, clock=lambda: now[0])
    due = []
    for step in range(1, 1001):
        now[0] += 0.75  # a step every 0.75 s
        if pacer.due(step):
            due.append(step)
    assert due[0] == 1 and due[-1] == 1000
    gaps = [(b - a) * 0.75 for a, b in zip(due[:-2], due[1:-1], strict=True)]
    assert all(10.0 <= gap < 10.75 for gap in gaps), gaps
    assert pacer.status(500).startswith("500/1000, 12m30s, ETA 12m30s")
