"""How a composition of two tokenizers reads its specialist (composer.alignment's rule at work).

For new anchor tokens: commit the specialist tokens their text makes final, run the specialist
over them (appending to the decode state's caches), then over each new position's tentative
tail (read for this call only: the caches never hold a tail), and say which anchor query reads
which key. Training runs a whole row at once; decoding one anchor token per step, in one
specialist pass. A tail token that the same call also commits unchanged takes the committed
token's states, keys (before rotation) and values instead of a second pass.

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
    # A key is rotated by the anchor position at which its token was read, so the bridge's
    # relative positions count anchor tokens, as with one tokenizer.
    anchor_positions = position_ids_from_mask(attention_mask.cpu())  # (B, S)
    tail_keys = tail_values = None
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
        committed = None  # per block, this call's committed keys (unrotated) and values
        if new.ids.shape[1]:
            common = {
                "attention_mask": mask.to(device),
                "position_ids": position_ids_from_mask(mask)[:, -new.ids.shape[1] :].to(device),
            }
            states = composition.specialist_states(
                new.ids.to(device), common, real=new.mask, cache=cache
            )
            committed = []
            keys, values = composition.block_keys_values(
                states, anchor_positions.gather(1, new.columns), state, projected=committed
            )
        if tails:
            tail_keys, tail_values = _tails(
                composition, new, mask, columns, anchor_positions, state, cache, committed, device
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
    else:
        visible = read_visibility(
            mask, columns, new.tail_mask, new.tail_columns, readable.cpu(), **where
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
    rotate_by = anchor_positions.gather(1, torch.cat([new.columns, new.tail_columns], dim=1))
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
    committed: list[tuple[torch.Tensor, torch.Tensor]] | None,  # per block, see below
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each new position's tentative tail, read after the committed tokens and then dropped
    from the specialist's cache (its committed tokens are never rewritten). A tail token
    that this call also commits unchanged (``new.tail_source``) has the committed token's
    states, so it takes that token's keys (before rotation: a tail key is rotated by its own
    anchor position) and values from ``committed`` (per block, (B, H, N, hd) each); the
    specialist runs over the others only."""
    reused = new.tail_source >= 0 if committed is not None else None
    run = new.tail_mask.bool() if reused is None else new.tail_mask.bool() & ~reused
    order, real, slot = compacted(run)  # the tail tokens to run, first in each row
    ran = None  # per block, the run tokens' keys (unrotated) and values, (B, H, K, hd)
    if order.shape[1]:  # (nothing to run: every tail is a committed token's twin)
        reads, positions = tail_attention(
            mask, columns, new.tail_mask, new.tail_columns, new.tail_index, reused=reused
        )  # (B, M, S + M), (B, M)
        s, k = mask.shape[1], order.shape[1]
        reads = reads.gather(1, order[..., None].expand(-1, -1, reads.shape[2]))  # (B, K, S+M)
        own = reads[..., s:].gather(2, order[:, None, :].expand(-1, k, -1))  # (B, K, K)
        own = (own & real.bool()[:, None, :]) | torch.eye(k, dtype=torch.bool)[None]
        reads = torch.cat([reads[..., :s], own], dim=-1)  # (B, K, S + K)
        if cache is None or cache.get_seq_length() == 0:
            reads, cache = reads[:, :, s:], None  # nothing committed yet
        dtype = composition.specialist.get_input_embeddings().weight.dtype
        additive = torch.zeros(reads.shape, dtype=dtype).masked_fill(
            ~reads, torch.finfo(dtype).min
        )[:, None]  # (B, 1, K, S + K): a custom 4D mask, used as given
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
        ran = [block.project(x) for block, x in zip(composition.bridge.blocks, states, strict=True)]
    source = new.tail_source.clamp(min=0)  # (B, M) the committed twin, where reused
    rotate_by = anchor_positions.gather(1, new.tail_columns)  # (B, M) each tail's own position
    keys, values = [], []
    for b, block in enumerate(composition.bridge.blocks):
        parts = []
        if ran is not None:  # back to one slot per tail token
            parts.append(tuple(x.gather(2, _slots(slot, x)) for x in ran[b]))
        if committed is not None:
            parts.append(tuple(x.gather(2, _slots(source, x)) for x in committed[b]))
        if len(parts) == 2:
            take = reused.to(parts[0][0].device)[:, None, :, None]  # (B, 1, M, 1)
            parts = [tuple(torch.where(take, c, r) for r, c in zip(*parts, strict=True))]
        tail_k, tail_v = parts[0]
        keys.append(block.rotated(tail_k, rotate_by.to(tail_k.device)))
        values.append(tail_v)
    return keys, values


def _slots(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, M) token indices expanded to gather (B, H, M, hd) from ``x`` (B, H, N, hd)."""
    b, h, _, d = x.shape
    return index.to(x.device)[:, None, :, None].expand(b, h, -1, d)
