"""Progress lines: at least every 10 s, with an ETA."""

from __future__ import annotations

from composer.pacing import Pacer, eta_seconds, format_bytes, format_duration


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


def test_tokenising_a_file_reports_progress(tmp_path, monkeypatch, caplog):
    """Data tokenisation says how far it is (here every row: a Pacer that is always due)."""
    import functools
    import json
    import logging

    from composer import data
    from composer.chartok import build_char_tokenizer

    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(5)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(data, "Pacer", functools.partial(Pacer, every_s=0.0))
    with caplog.at_level(logging.INFO, logger="composer.data"):
        split = data.load_dataset(path, build_char_tokenizer(), max_length=32)
    assert len(split.train) == 5
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenising")]
    assert lines[0].startswith("tokenising sums.jsonl: rows 1/5, ") and len(lines) == 4


def test_format_bytes_picks_the_largest_unit_that_fits():
    sizes = (0, 512, 3 * 1024, 5 * 1024**2 + 1, 1.5 * 1024**3)
    assert [format_bytes(n) for n in sizes] == ["0 B", "512 B", "3.00 KiB", "5.00 MiB", "1.50 GiB"]
