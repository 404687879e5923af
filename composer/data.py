"""Validated rows -> training examples -> batches, for training the bridge.

Reading files and checking their rows is :mod:`composer.datafiles` (no torch; it documents the
three row shapes). Here rows are tokenized: labels follow the Hugging Face convention, aligned
with ``input_ids`` (the model shifts them), and ``-100`` where no loss is taken; position 0 never
carries loss, since nothing predicts it. Bad rows are skipped and reported as
:class:`~composer.datafiles.RowProblem`; a file that yields no example at all is a
:class:`ConfigError`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.config import ConfigError
from composer.datafiles import (
    SHAPES,
    RowProblem,
    check_format_name,
    cut_row,
    detect_format,
    max_chars,
    read_rows,
    rename_columns,
    row_problem,
    validate_rows,
)
from composer.pacing import Pacer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross-entropy skips
_QUOTED_PROBLEMS = 3  # problems quoted in an "all rows invalid" error


@dataclass(frozen=True)
class Example:
    """One tokenized training example; ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.labels), "input_ids and labels differ in length"


@dataclass(frozen=True)
class DatasetSplit:
    """Examples ready for batching, the detected format and the rows that were skipped."""

    train: list[Example]
    eval: list[Example]
    format: str
    problems: list[RowProblem]


# ---------------------------------------------------------------------------------------------
# Tokenization and label masking


def encode(
    row: Mapping[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase, *, max_length: int
) -> Example:
    """Tokenize one valid row and mask its labels.

    Guarantees: ``input_ids`` starts with bos when the tokenizer has one (never twice); loss is
    taken on every token of a text (then eos), on the completion and the eos after it, or on
    each assistant turn as the chat template renders it (its content and end-of-turn token);
    ``labels[0]`` is ``IGNORE_INDEX``; at most ``max_length`` tokens, keeping the start.

    Raises ConfigError when the row is invalid, the chat template cannot be split into turns, or
    no token carries loss after truncation.
    """
    _check_max_length(max_length)
    input_ids, labels = _tokenize(row, fmt, tokenizer, max_length=max_length)
    return _truncate(input_ids, labels, max_length)


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(
            f"max_length is {max_length!r}; expected an integer of at least 2 (one token of "
            "context and one to predict)"
        )


def _truncate(input_ids: list[int], labels: list[int], max_length: int) -> Example:
    if not any(label != IGNORE_INDEX for label in labels):
        raise ConfigError(
            "no token carries loss (an assistant message that opens a conversation is context "
            "only); put the user's message before the reply"
        )
    if len(input_ids) > max_length and all(lab == IGNORE_INDEX for lab in labels[:max_length]):
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        raise ConfigError(
            f"no token carries loss after truncation to max_length={max_length}: the example has "
            f"{len(input_ids)} tokens and loss starts at token {first}; raise max_length or "
            "shorten the prompt"
        )
    return Example(input_ids=input_ids[:max_length], labels=labels[:max_length])


def _tokenize(
    row: Mapping[str, Any],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """input_ids and labels of one row (raises ConfigError for an invalid row); with
    ``max_length``, of the row cut to :func:`max_chars` first (the caller cuts the tokens)."""
    check_format_name(fmt)
    problem = row_problem(row, fmt)
    if problem is not None:
        raise ConfigError(problem)
    if max_length is not None:
        row = cut_row(row, fmt, max_chars(max_length))
    if fmt == "messages":
        _check_chat_tokenizer(tokenizer)
        input_ids, labels = _tokenize_messages(row["messages"], tokenizer)
    else:
        prompt = _ids(tokenizer, row["prompt"]) if fmt == "prompt_completion" else []
        target = _ids(tokenizer, row["completion" if fmt == "prompt_completion" else "text"])
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        input_ids = prompt + target + eos
        labels = [IGNORE_INDEX] * len(prompt) + target + eos
    bos = tokenizer.bos_token_id
    if bos is not None and (not input_ids or input_ids[0] != bos):
        input_ids, labels = [bos, *input_ids], [IGNORE_INDEX, *labels]
    labels[0] = IGNORE_INDEX  # nothing predicts the first token
    return input_ids, labels


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # bos/eos are placed by this module, not by the tokenizer's post-processor.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template, which the messages "
            "format needs; use a chat/instruct model's tokenizer or convert the rows to "
            f"prompt_completion: {SHAPES['prompt_completion']}"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; the messages "
            "format needs character offsets to find assistant turns; load it with use_fast=True"
        )


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[Mapping[str, Any]], *, prompt: bool
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=prompt
        )
    except Exception as exc:  # a template can raise anything (raise_exception, TypeError, ...)
        raise ConfigError(
            f"the chat template refused the conversation ({exc}); fix the conversation "
            "(e.g. alternate user and assistant turns) or the template"
        ) from exc
    assert isinstance(text, str)
    return text


def _tokenize_messages(
    messages: list[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Render the whole conversation once; loss on the tokens overlapping an assistant span.

    The span of assistant message i is what rendering ``messages[:i + 1]`` adds to rendering
    ``messages[:i]`` with the generation prompt, with trailing whitespace dropped. That needs each
    rendering to be a prefix of the next; a template that rewrites earlier turns (e.g. one that
    drops past reasoning) breaks it and the row is refused. An assistant message that opens the
    conversation has no prompt to render before it and carries no loss.
    """
    full = _render(tokenizer, messages, prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        before = _render(tokenizer, messages[:i], prompt=True)
        upto = _render(tokenizer, messages[: i + 1], prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ConfigError(
                f"the chat template does not render message {i + 1} (assistant) as an extension "
                "of the conversation before it, so its tokens cannot be told apart; use a "
                "template whose renderings of longer conversations extend shorter ones, or "
                "convert the rows to prompt_completion"
            )
        end = max(len(before), len(upto.rstrip()))
        spans.append((len(before), end))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for t, (start, end) in enumerate(encoding["offset_mapping"]):
        if any(_overlaps(start, end, s, e) for s, e in spans):
            labels[t] = input_ids[t]
    return input_ids, labels


def _overlaps(start: int, end: int, span_start: int, span_end: int) -> bool:
    if start == end:  # a zero-width token belongs where it sits
        return span_start <= start < span_end
    return start < span_end and end > span_start


# ---------------------------------------------------------------------------------------------
# Datasets


def load_dataset(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    eval_fraction: float = 0.0,
    eval_path: str | Path | None = None,
    seed: int = 0,
    columns: Mapping[str, str] | None = None,
) -> DatasetSplit:
    """Read, validate and encode a data file; hold out an eval set.

    Bad rows are skipped and listed in ``problems``. The eval set is ``eval_path`` (encoded the
    same way; its format may differ) or, with ``eval_fraction > 0``, a random subset of the
    file (at least one example; the same for the same seed); both lists keep file order.

    ``columns`` renames the files' columns first ({file column: text|prompt|completion|messages}),
    so a dataset with its own column names (GSM8K's question/answer) is read as it is.

    Raises ConfigError for unreadable files, an undecidable format, bad settings, or a file
    that yields no example (quoting its first problems).
    """
    _check_max_length(max_length)
    if not isinstance(eval_fraction, (int, float)) or not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(
            f"eval_fraction is {eval_fraction!r}; expected a number in [0, 1) such as 0.1"
        )
    if eval_path is not None and eval_fraction > 0:
        raise ConfigError(
            f"both eval_path ({eval_path}) and eval_fraction ({eval_fraction}) are set; "
            "expected one way to get an eval set; drop one of them"
        )
    examples, fmt, problems = _load_examples(Path(path), tokenizer, max_length, columns)
    eval_examples: list[Example] = []
    if eval_path is not None:
        eval_examples, _, eval_problems = _load_examples(
            Path(eval_path), tokenizer, max_length, columns
        )
        problems = problems + eval_problems
    elif eval_fraction > 0:
        n_eval = max(1, round(len(examples) * eval_fraction))
        if n_eval >= len(examples):
            raise ConfigError(
                f"{path} has {len(examples)} usable example(s), too few to hold out "
                f"eval_fraction={eval_fraction}; add examples or set eval_fraction to 0"
            )
        held_out = set(random.Random(seed).sample(range(len(examples)), n_eval))
        eval_examples = [ex for i, ex in enumerate(examples) if i in held_out]
        examples = [ex for i, ex in enumerate(examples) if i not in held_out]
    logger.info(
        "%s: %d train and %d eval examples (%s format), %d row(s) skipped",
        path,
        len(examples),
        len(eval_examples),
        fmt,
        len(problems),
    )
    return DatasetSplit(train=examples, eval=eval_examples, format=fmt, problems=problems)


def _load_examples(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    columns: Mapping[str, str] | None = None,
) -> tuple[list[Example], str, list[RowProblem]]:
    rows = rename_columns(read_rows(path), columns)
    source = str(path)
    if not rows:
        raise ConfigError(
            f"{source} has no examples; expected rows shaped like one of: "
            + "; ".join(SHAPES.values())
            + "; check that you picked the right file"
        )
    fmt = detect_format(rows, source=source)
    if fmt == "messages":
        _check_chat_tokenizer(tokenizer)  # once, instead of once per row
    problems = validate_rows(rows, fmt, source=source)
    bad = {p.row for p in problems}
    examples = []
    pacer = Pacer(total=len(rows))  # a large file says how far tokenising is, every 10 s
    pacer.due(0)
    for i, row in enumerate(rows, start=1):
        if pacer.due(i) and i < len(rows):
            logger.info("tokenising %s: rows %s", path.name, pacer.status(i))
        if i in bad:
            continue
        try:
            examples.append(encode(row, fmt, tokenizer, max_length=max_length))
        except ConfigError as exc:
            problems.append(RowProblem(source, i, str(exc)))
    problems.sort(key=lambda p: p.row)
    for problem in problems[:_QUOTED_PROBLEMS]:
        logger.warning("skipped %s", problem)
    if not examples:
        quoted = "; ".join(str(p) for p in problems[:_QUOTED_PROBLEMS])
        more = len(problems) - _QUOTED_PROBLEMS
        raise ConfigError(
            f"no usable example in {source}: all {len(rows)} rows were rejected ({fmt} format). "
            f"First problems: {quoted}{f' (and {more} more)' if more > 0 else ''}"
        )
    return examples, fmt, problems


def preview(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    n: int = 5,
    columns: Mapping[str, str] | None = None,  # as in load_dataset: renamed before anything
) -> list[dict[str, Any]]:
    """Show how the first ``n`` rows of a file will be trained on, for a UI.

    Each dict has: ``row`` (1-based), ``format``, ``text`` (the truncated input decoded with its
    special tokens), ``loss_text`` (the tokens carrying loss, decoded together),
    ``loss_spans`` (each contiguous run of them, decoded), ``num_tokens`` (after truncation),
    ``num_loss_tokens``, ``truncated`` and ``problem`` (why the row would be skipped, or None).
    An invalid row has empty text fields; a row skipped for losing all its loss tokens to
    truncation is still shown as it would be cut. File-level errors raise ConfigError as in
    :func:`load_dataset`.
    """
    _check_max_length(max_length)
    rows = rename_columns(read_rows(path), columns)
    if not rows:
        raise ConfigError(f"{path} has no examples; check that you picked the right file")
    fmt = detect_format(rows, source=str(path))
    out = []
    for i, row in enumerate(rows[:n], start=1):
        entry: dict[str, Any] = {
            "row": i,
            "format": fmt,
            "text": "",
            "loss_text": "",
            "loss_spans": [],
            "num_tokens": 0,
            "num_loss_tokens": 0,
            "truncated": False,
            "problem": None,
        }
        try:
            input_ids, labels = _tokenize(row, fmt, tokenizer, max_length=max_length)
        except ConfigError as exc:  # an invalid row: nothing to show but why
            entry["problem"] = str(exc)
            out.append(entry)
            continue
        try:
            _truncate(input_ids, labels, max_length)
        except ConfigError as exc:  # shown as it would be cut, with the reason it is skipped
            entry["problem"] = str(exc)
        full_length = len(input_ids)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        loss_ids = [t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
        entry.update(
            text=tokenizer.decode(input_ids, skip_special_tokens=False),
            loss_text=tokenizer.decode(loss_ids, skip_special_tokens=False),
            loss_spans=[
                tokenizer.decode(span, skip_special_tokens=False)
                for span in _runs(input_ids, labels)
            ],
            num_tokens=len(input_ids),
            num_loss_tokens=len(loss_ids),
            truncated=full_length > max_length,
        )
        out.append(entry)
    return out


def _runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of loss-carrying tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids, labels, strict=True):
        current = label != IGNORE_INDEX
        if current and not previous:
            runs.append([])
        if current:
            runs[-1].append(token)
        previous = current
    return runs
