"""Training examples -> padded tensors, in batches of similar length (the only torch in the data
path: reading and tokenizing rows is :mod:`composer.data`)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from composer.config import ConfigError
from composer.data import IGNORE_INDEX, Example


def collate(
    examples: Sequence[Example], *, pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad examples to the longest one into int64 tensors of shape (B, T).

    ``attention_mask`` is 1 on real tokens; padding has ``pad_token_id`` in ``input_ids`` and
    ``IGNORE_INDEX`` in ``labels``. ``padding_side="left"`` puts the padding first (for
    generation), ``"right"`` last.
    """
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side is {padding_side!r}; expected 'left' or 'right'")
    if pad_token_id is None:
        raise ConfigError(
            "pad_token_id is None; the tokenizer has no pad token; pass another id "
            "(e.g. the eos id): padded positions are masked out anyway"
        )
    if not examples:
        raise ValueError("collate() needs at least one example")
    batch, longest = len(examples), max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)  # (B, T)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[b, cols] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[b, cols] = 1
        labels[b, cols] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def length_grouped_batches(
    examples: Sequence[Example], *, batch_size: int, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Group example indices into batches of similar length, to waste little padding.

    Every index appears exactly once; batches hold ``batch_size`` indices (the last of each
    mega-batch may hold fewer). Indices are (optionally) shuffled, cut into mega-batches of
    ``50 * batch_size``, sorted longest-first within each and cut into batches. With ``shuffle``
    the batch order is then shuffled, and the batch holding the longest example goes first so an
    out-of-memory error shows at the first step. The same seed gives the same batches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size is {batch_size!r}; expected a positive integer")
    lengths = [len(ex.input_ids) for ex in examples]
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    mega = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])  # stable
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    if shuffle and batches:
        rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches
