"""Which specialist positions each anchor position may read (pure functions).

Both models read the same token sequence (shared tokenizer), so positions line up one to one.
Anchor position t predicts token t+1; the specialist's state at t+1 has already seen token t+1,
so reading it would leak the label. Hence the causal rule: anchor position t reads specialist
positions s <= t, and never a padding position.
"""

from __future__ import annotations

import torch


def visibility_mask(
    key_padding_mask: torch.Tensor,  # (B, S) 1/True = real token
    *,
    num_queries: int,
    query_offset: int = 0,  # absolute position of the first query (tokens already cached)
    causal: bool = True,
) -> torch.Tensor:
    """(B, T, S) bool: True where anchor query t may read specialist key s.

    Query t sits at absolute position ``query_offset + t``; keys are absolute positions 0..S-1.
    A row may be all False (a padding query with no real token at or before it); the bridge
    returns zero for such rows.
    """
    keys = key_padding_mask.bool()  # (B, S)
    b, s = keys.shape
    if not causal:
        return keys[:, None, :].expand(b, num_queries, s)
    query_pos = torch.arange(num_queries, device=keys.device) + query_offset  # (T,)
    key_pos = torch.arange(s, device=keys.device)  # (S,)
    causal_mask = key_pos[None, :] <= query_pos[:, None]  # (T, S)
    return keys[:, None, :] & causal_mask[None, :, :]  # (B, T, S)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) positions that count only real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
