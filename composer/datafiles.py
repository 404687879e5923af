"""Data files -> validated rows, for training the bridge and for the app's preview. No torch:
listing, reading and checking a file is cheap (the app imports this at start-up).

Three row shapes are accepted, decided per file from its first rows:

- ``text``: ``{"text": str}``; every token carries loss.
- ``prompt_completion``: ``{"prompt": str, "completion": str}``; only the completion (and the eos
  after it) carries loss.
- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  rendered with the tokenizer's chat template; only assistant turns carry loss.

Bad rows are reported as :class:`RowProblem` (file, 1-based row, what is wrong). Tokenizing and
batching the rows is :mod:`composer.data`'s job.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from composer.config import ConfigError

logger = logging.getLogger(__name__)

FORMATS = ("text", "prompt_completion", "messages")
ROLES = ("system", "user", "assistant")
READABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")  # .gz allowed except parquet
_REQUIRED_KEYS = {
    "text": frozenset({"text"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
    "messages": frozenset({"messages"}),
}
SHAPES = {
    "text": '{"text": "..."}',
    "prompt_completion": '{"prompt": "...", "completion": "..."}',
    "messages": '{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}',
}
_DETECT_SAMPLE = 10  # rows looked at to decide a file's format
# Rows are cut in characters before tokenizing, so memory never grows with a row's length
# (tokenizing 1 MB of text whole took ~0.7 GB): no tokenizer we know has tokens this long on
# average, so the cut never shortens an example below max_length tokens in practice.
CHARS_PER_TOKEN_BOUND = 32


def max_chars(max_length: int) -> int:
    """Characters of a row kept before tokenizing, for examples of ``max_length`` tokens."""
    return CHARS_PER_TOKEN_BOUND * max_length


def cut_row(row: Mapping[str, Any], fmt: str, limit: int) -> Mapping[str, Any]:
    """The row with its text cut to ``limit`` characters in all (pure; a valid row stays valid).

    Tokens are kept from the start, so only text after the first ``limit`` characters goes: a
    prompt longer than that leaves an empty completion, a conversation loses its later turns.
    """
    if fmt == "text":
        return {**row, "text": row["text"][:limit]}
    if fmt == "prompt_completion":
        prompt = row["prompt"][:limit]
        return {**row, "prompt": prompt, "completion": row["completion"][: limit - len(prompt)]}
    kept, left = [], limit
    for message in row["messages"]:
        if left <= 0 and kept:
            break
        content = message["content"][: max(left, 0)]
        kept.append({**message, "content": content})
        left -= len(content)
    return {**row, "messages": kept}


@dataclass(frozen=True)
class RowProblem:
    """Why one row of a data file was skipped."""

    source: str  # the file
    row: int  # 1-based: the n-th example (CSV: header not counted; JSONL: blank lines not counted)
    message: str

    def __str__(self) -> str:
        return f"{self.source}, row {self.row}: {self.message}"


# ---------------------------------------------------------------------------------------------
# Reading files


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a data file into a list of row dicts, in file order.

    Accepts ``.jsonl``, ``.json`` (a list of objects, or ``{"data": [...]}``), ``.csv``,
    ``.parquet`` and ``.txt`` (each non-empty block between blank lines becomes
    ``{"text": block}``); all but parquet may also be gzipped (``.jsonl.gz``). In CSV, a
    ``messages`` column holding JSON text is decoded. An empty file gives ``[]``.

    Raises ConfigError, naming the file, for a missing file, an unknown extension or an unparsable
    file (for JSONL, with the line number).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"data file {path} {what}; expected a {'/'.join(READABLE_SUFFIXES)} file; "
            "check the path"
        )
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    kind = (suffixes[-2] if len(suffixes) >= 2 else "") if gzipped else (suffixes or [""])[-1]
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_txt}
    if kind == ".parquet" and not gzipped:
        return _read_parquet(path)
    if kind not in readers:
        raise ConfigError(
            f"data file {path} has an unknown extension {''.join(path.suffixes)!r}; expected one "
            f"of {', '.join(READABLE_SUFFIXES)} (optionally .gz, except .parquet); rename or "
            "convert the file"
        )
    try:
        with _open_text(path, gzipped) as f:
            rows = readers[kind](f, path)
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise ConfigError(
            f"could not read data file {path} ({exc}); expected UTF-8 text"
            f"{' compressed with gzip' if gzipped else ''}; check the file's encoding"
        ) from exc
    logger.debug("read %d rows from %s", len(rows), path)
    return rows


@contextlib.contextmanager
def _open_text(path: Path, gzipped: bool) -> Iterator[TextIO]:
    # utf-8-sig: a byte-order mark (common in CSVs saved by spreadsheets) would otherwise end up in
    # the first key.
    if gzipped:
        with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as f:
            yield f
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:
            yield f


def _read_jsonl(f: TextIO, path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path}, line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "expected one JSON object per line; fix or delete that line"
            ) from exc
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}, line {lineno}: a JSON {type(row).__name__}, expected a JSON object "
                "such as " + SHAPES["text"] + "; fix or delete that line"
            )
        rows.append(row)
    return rows


def _read_json(f: TextIO, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.load(f)
    except json.JSONDecodeError as exc:
        hint = (
            "; it looks like one object per line: rename it to .jsonl"
            if exc.msg == "Extra data"
            else "; fix the file"
        )
        raise ConfigError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            f'expected a list of objects or {{"data": [...]}}{hint}'
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        found = f"an object with keys {sorted(data)}" if isinstance(data, dict) else type(data)
        raise ConfigError(
            f'{path} holds {found}; expected a list of objects or {{"data": [...]}}; '
            "put the examples in a top-level list"
        )
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}, row {i}: a JSON {type(row).__name__}, expected an object such as "
                + SHAPES["text"]
                + "; fix or delete that row"
            )
    return data


def _read_csv(f: TextIO, path: Path) -> list[dict[str, Any]]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # the default (128 KiB per cell) is too small for documents
    try:
        reader = csv.DictReader(f)
        rows = []
        try:
            for record in reader:
                row: dict[str, Any] = {k: v for k, v in record.items() if k is not None}
                if isinstance(row.get("messages"), str):
                    with contextlib.suppress(json.JSONDecodeError):
                        row["messages"] = json.loads(row["messages"])
                rows.append(row)
        except csv.Error as exc:
            raise ConfigError(
                f"{path}, line {reader.line_num}: not valid CSV ({exc}); expected a header row "
                "then one example per row; fix the quoting on that line"
            ) from exc
        return rows
    finally:
        csv.field_size_limit(old_limit)


def _read_txt(f: TextIO, path: Path) -> list[dict[str, Any]]:
    text = f.read().replace("\r\n", "\n")
    blocks = (b.strip("\n") for b in re.split(r"\n[ \t]*\n", text))
    return [{"text": b} for b in blocks if b.strip()]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa  # lazy: only parquet needs it
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ConfigError(
            f"could not read {path} as Parquet ({exc}); expected a Parquet table with columns "
            "such as text, or prompt and completion, or messages; check the file"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Formats and validation


def detect_format(rows: Sequence[Mapping[str, Any]], *, source: str | None = None) -> str:
    """Decide the rows' format (one of :data:`FORMATS`) from the first rows that have one's keys.

    Extra keys are ignored. Rows that fit no shape are skipped here (validation reports them).
    Raises ConfigError, listing the keys found and the accepted shapes, when no row fits a
    shape, a row fits several, or the first rows mix formats.
    """
    where = f"{source}: " if source else ""
    shapes = "; ".join(f"{fmt}: {shape}" for fmt, shape in SHAPES.items())
    keys_seen: dict[str, None] = {}
    votes: list[tuple[int, list[str]]] = []  # (row, formats it fits)
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            continue
        if len(keys_seen) < 30:
            keys_seen.update(dict.fromkeys(str(k) for k in row))
        fits = [fmt for fmt, keys in _REQUIRED_KEYS.items() if keys <= row.keys()]
        if fits:
            votes.append((i, fits))
            if len(votes) == _DETECT_SAMPLE:
                break
    found = ", ".join(repr(k) for k in keys_seen) or "none"
    if not votes:
        raise ConfigError(
            f"{where}could not tell the data format: the rows have keys {found}; expected one "
            f"of these shapes: {shapes}; rename the columns to match one"
        )
    for i, fits in votes:
        if len(fits) > 1:
            raise ConfigError(
                f"{where}row {i} has keys {found}, which fit more than one format "
                f"({', '.join(fits)}); keep the keys of exactly one shape: {shapes}"
            )
    formats = dict.fromkeys(fits[0] for _, fits in votes)
    if len(formats) > 1:
        first_row = {fmt: next(i for i, fits in votes if fits[0] == fmt) for fmt in formats}
        firsts = ", ".join(f"{fmt} (row {row})" for fmt, row in first_row.items())
        raise ConfigError(
            f"{where}the first rows mix formats: {firsts}; use one shape per file: {shapes}"
        )
    return next(iter(formats))


def validate_rows(rows: Sequence[Any], fmt: str, *, source: str) -> list[RowProblem]:
    """Check every row against ``fmt``; return one :class:`RowProblem` per bad row, in row order.

    Checks: the row is an object with the format's keys; values are strings (messages: a
    non-empty list of {role, content} with role in system/user/assistant); no string is empty;
    a conversation has at least one assistant message.
    """
    check_format_name(fmt)
    problems = []
    for i, row in enumerate(rows, start=1):
        message = row_problem(row, fmt)
        if message is not None:
            problems.append(RowProblem(source, i, message))
    return problems


def check_format_name(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format is {fmt!r}; expected one of {', '.join(FORMATS)}")


def row_problem(row: Any, fmt: str) -> str | None:
    """What is wrong with one row for ``fmt``, or None."""
    if not isinstance(row, Mapping):
        return f"a {type(row).__name__}, expected an object like {SHAPES[fmt]}"
    missing = sorted(_REQUIRED_KEYS[fmt] - row.keys())
    if missing:
        return (
            f"missing {', '.join(repr(k) for k in missing)} (has {', '.join(map(repr, row))}); "
            f"this file's rows are {fmt}: {SHAPES[fmt]}"
        )
    if fmt in ("text", "prompt_completion"):
        for key in sorted(_REQUIRED_KEYS[fmt], reverse=True):  # text / prompt before completion
            value = row[key]
            if not isinstance(value, str):
                return f"{key!r} is {_describe(value)}, expected a string"
            if not value.strip():
                hint = "; use the text format for rows without a prompt" if key == "prompt" else ""
                return f"{key!r} is empty{hint}"
        return None
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return f"'messages' is {_describe(messages)}, expected a non-empty list of messages"
    for j, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            return f"message {j} is {_describe(message)}, expected {{'role': ..., 'content': ...}}"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return f"message {j} has role {role!r}, expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {j} ({role}) has content {_describe(content)}, expected a string"
        if not content.strip():
            return f"message {j} ({role}) has empty content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message, so nothing to learn from; add the assistant's reply"
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def rename_columns(
    rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str] | None
) -> list[dict[str, Any]]:
    """Rows with their keys renamed by ``columns`` ({old: new}); other keys kept as they are."""
    if not columns:
        return [dict(row) if isinstance(row, Mapping) else row for row in rows]
    return [
        {columns.get(k, k): v for k, v in row.items()} if isinstance(row, Mapping) else row
        for row in rows
    ]
