"""How a composition of two tokenizers reads its specialist (composer.alignment's rule at work).

For new anchor tokens: commit the specialist tokens their text makes final, run the specialist
over them (appending to the decode state's caches), then over each new position's tentative
tail (read for this call only: the caches never hold a tail), and say which anchor query reads
which key. Training runs a whole row at once; decoding one anchor token per step, in one
specialist pass. Every key is rotated by the anchor position at which its token's text ends, so
a tail token that the same call also commits unchanged (its *twin*: same id after the same
tokens) has exactly the committed token's key and value: its query reads that committed key
instead of a copy, and the specialist does not run it twice.

Kept apart from :mod:`composer.composition` (the composed forward, one vocabulary or two) so
that module reads as the method; the functions here take the composition and use its
``specialist_states`` / ``block_keys_values``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from composer.alignment import (
    AlignedTokens,
    aligned_tokens,
    aligned_visibility,
    compacted,
    position_ids_from_mask,
    read_visibility,
    tail_attention,
    twin_visibility,
)

if TYPE_CHECKING:
    from composer.composition import Composition, DecodeState


def read_aligned(
    composition: Composition,
    input_ids: torch.Tensor,  # (B, T) new anchor tokens
    attention_mask: torch.Tensor,  # (B, S) over every anchor token so far
    readable: torch.Tensor,  # (B, S) anchor columns whose committed tokens may be read
    state: DecodeState | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None:
    """Two tokenizers: commit specialist tokens for the new anchor tokens (composer.alignment),
    run the specialist over them, then over each new position's tentative tail, and say which
    anchor query reads which. None while the specialist has read nothing yet (the bridge then
    adds nothing)."""
    assert composition.alignment is not None
    past = attention_mask.shape[1] - input_ids.shape[1]
    fresh = state is None or state.rows is None
    rows = [composition.alignment.row() for _ in range(len(input_ids))] if fresh else state.rows
    new = aligned_tokens(
        rows,
        input_ids.cpu(),
        attention_mask[:, past:].cpu(),
        column_offset=past,
        pad_id=composition.alignment.pad_id,
    )
    mask, columns = new.mask, new.columns  # (B, S_specialist) over every committed token
    if not fresh:
        mask = torch.cat([state.specialist_mask, new.mask], dim=1)
        columns = torch.cat([state.columns, new.columns], dim=1)
    if state is not None:
        state.rows, state.specialist_mask, state.columns = rows, mask, columns
    tails = composition.alignment.tails and new.tail_ids.shape[1] > 0
    keys: list[torch.Tensor] | None = state.keys if state is not None else None
    values: list[torch.Tensor] | None = state.values if state is not None else None
    device = composition.specialist.get_input_embeddings().weight.device
    # A key is rotated by the anchor position at which its token's text ends, so the bridge's
    # relative positions count anchor tokens, as with one tokenizer.
    anchor_positions = position_ids_from_mask(attention_mask.cpu())  # (B, S)
    tail_keys = tail_values = twins = None
    kept_mask, kept_columns = new.tail_mask, new.tail_columns  # the tails with keys of their own
    if tails and state is not None and input_ids.shape[1] == 1:
        keys, values, tail_keys, tail_values = _step(
            composition, new, mask, anchor_positions, state, device
        )
    else:
        # Training has no state: the tails then read the committed tokens from a cache of
        # this call only.
        if state is not None:
            cache = state.specialist_cache
        else:
            cache = DynamicCache(config=composition.specialist.config) if tails else None
        if new.ids.shape[1]:
            common = {
                "attention_mask": mask.to(device),
                "position_ids": position_ids_from_mask(mask)[:, -new.ids.shape[1] :].to(device),
            }
            states = composition.specialist_states(
                new.ids.to(device), common, real=new.mask, cache=cache
            )
            keys, values = composition.block_keys_values(
                states, anchor_positions.gather(1, new.ends), state
            )
        if tails:
            # A twin is read as its committed token (index among every committed token so far).
            reused = new.tail_source >= 0 if new.ids.shape[1] else None
            if reused is not None:
                earlier = mask.shape[1] - new.ids.shape[1]
                twins = torch.where(reused, new.tail_source + earlier, -1)
            tail_keys, tail_values, kept_mask, kept_columns = _tails(
                composition, new, mask, columns, anchor_positions, state, cache, reused, device
            )
    if keys is None or not keys or keys[0] is None:
        keys = values = None
    where = {
        "num_queries": input_ids.shape[1],
        "query_offset": past,
        "causal": composition.bridge.shape.causal,
    }
    if tail_keys is None:
        if keys is None:
            return None
        visible = aligned_visibility(mask, columns, readable.cpu(), **where)  # (B, T, S)
        if twins is not None:
            visible = visible | twin_visibility(
                twins, new.tail_columns, readable.cpu(), num_committed=mask.shape[1], **where
            )
    else:
        visible = read_visibility(
            mask,
            columns,
            kept_mask,
            kept_columns,
            readable.cpu(),
            twins=twins,
            twin_columns=new.tail_columns,
            **where,
        )  # (B, T, S + M)
        # The tails are read for this call only: the state's caches never hold them.
        if keys is None:  # nothing committed yet
            keys, values = tail_keys, tail_values
        else:
            keys = [torch.cat([k, tk], dim=2) for k, tk in zip(keys, tail_keys, strict=True)]
            values = [torch.cat([v, tv], dim=2) for v, tv in zip(values, tail_values, strict=True)]
    return keys, values, visible.to(keys[0].device)


def _step(
    composition: Composition,
    new: AlignedTokens,  # what one new anchor token gives
    mask: torch.Tensor,  # (B, S) every committed specialist token, the new ones included
    anchor_positions: torch.Tensor,  # (B, C)
    state: DecodeState,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One decoding step in one specialist pass: the newly committed tokens, then the tail.
    With one new anchor token every committed token is at or before its column, so the
    tail reads all of them and the pass is plain causal. The tail is then cropped from the
    cache; the committed tokens' keys/values are appended to the state's. Returns the
    state's keys and values (every committed token) and the tail's."""
    n, m = new.ids.shape[1], new.tail_ids.shape[1]
    ids = torch.cat([new.ids, new.tail_ids], dim=1)  # (B, N + M)
    real = torch.cat([new.mask, new.tail_mask], dim=1)
    seen = torch.cat([mask, new.tail_mask], dim=1)  # (B, S + M)
    common = {
        "attention_mask": seen.to(device),
        "position_ids": position_ids_from_mask(seen)[:, -(n + m) :].to(device),
    }
    rotate_by = anchor_positions.gather(1, torch.cat([new.ends, new.tail_ends], dim=1))
    try:
        keys, values = composition.specialist_keys_values(
            ids.to(device), common, rotate_by, None, real=real, cache=state.specialist_cache
        )
    finally:
        state.specialist_cache.crop(-m)
    for k in range(len(keys) if n else 0):
        committed_k, committed_v = keys[k][:, :, :n], values[k][:, :, :n]
        if state.keys[k] is not None:
            committed_k = torch.cat([state.keys[k], committed_k], dim=2)  # (B, H, S, hd)
            committed_v = torch.cat([state.values[k], committed_v], dim=2)
        state.keys[k], state.values[k] = committed_k, committed_v
    tail_keys = [k[:, :, n:] for k in keys]
    tail_values = [v[:, :, n:] for v in values]
    return state.keys, state.values, tail_keys, tail_values


def _tails(
    composition: Composition,
    new: AlignedTokens,
    mask: torch.Tensor,  # (B, S) every committed specialist token so far
    columns: torch.Tensor,  # (B, S)
    anchor_positions: torch.Tensor,  # (B, C) position of each anchor column
    state: DecodeState | None,
    cache: Any,  # the committed tokens' cache (None: nothing committed yet)
    reused: torch.Tensor | None,  # (B, M) True: a twin of a token this call commits
    device: torch.device,
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None, torch.Tensor, torch.Tensor]:
    """The keys of each new position's tentative tail that is not a twin: the specialist runs
    over those tokens after the committed ones (reading a twin's committed state in its place:
    the same ids at the same positions) and they are then dropped from its cache (its
    committed tokens are never rewritten). Returns per block the (B, H, K, hd) keys (rotated by
    where each token's text ends) and values of the K run tail tokens of the widest row (None
    when there are none), and their (B, K) mask and anchor columns."""
    run = new.tail_mask.bool() if reused is None else new.tail_mask.bool() & ~reused
    order, real = compacted(run)  # the tail tokens to run, first in each row
    if not order.shape[1]:  # every tail is a committed token's twin
        return None, None, real, new.tail_columns.gather(1, order)
    reads, positions = tail_attention(
        mask, columns, new.tail_mask, new.tail_columns, new.tail_index, reused=reused
    )  # (B, M, S + M), (B, M)
    s, k = mask.shape[1], order.shape[1]
    reads = reads.gather(1, order[..., None].expand(-1, -1, reads.shape[2]))  # (B, K, S + M)
    own = reads[..., s:].gather(2, order[:, None, :].expand(-1, k, -1))  # (B, K, K)
    own = (own & real.bool()[:, None, :]) | torch.eye(k, dtype=torch.bool)[None]
    reads = torch.cat([reads[..., :s], own], dim=-1)  # (B, K, S + K)
    if cache is None or cache.get_seq_length() == 0:
        reads, cache = reads[:, :, s:], None  # nothing committed yet
    dtype = composition.specialist.get_input_embeddings().weight.dtype
    additive = torch.zeros(reads.shape, dtype=dtype).masked_fill(~reads, torch.finfo(dtype).min)[
        :, None
    ]  # (B, 1, K, S + K): a custom 4D mask, used as given
    common = {
        "attention_mask": additive.to(device),
        "position_ids": positions.gather(1, order).to(device),
    }
    try:
        states = composition.specialist_states(
            new.tail_ids.gather(1, order).to(device), common, real=real, cache=cache
        )
    finally:
        if cache is not None and state is not None:
            cache.crop(-k)
    rotate_by = anchor_positions.gather(1, new.tail_ends.gather(1, order))  # (B, K)
    keys, values = [], []
    for block, x in zip(composition.bridge.blocks, states, strict=True):
        tail_k, tail_v = block.keys_values(x, rotate_by.to(x.device))
        keys.append(tail_k)
        values.append(tail_v)
    return keys, values, real, new.tail_columns.gather(1, order)
