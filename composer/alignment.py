"""Which specialist positions each anchor position may read.

Shared tokenizer: both models read the same token sequence, so positions line up one to one.
Anchor position t predicts token t+1; the specialist's state at t+1 has already seen token t+1,
so reading it would leak the label. Hence the causal rule: anchor position t reads specialist
positions s <= t, and never a padding position.

Two tokenizers: the models read the same *text*, aligned by characters (the rule is written out
above ``start_ids`` below, and in docs/ALIGNMENT.md).

Why ~490 lines: the rule is stated once, and every decision that follows from it (which tokens
are committed and where their text ends, which tail tokens are twins, and each mask the bridge
and the specialist read with) sits beside it as a small pure function, for both engines; how a
composition runs them is :mod:`composer.aligned_reading`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from composer.identity import tokenizer_fingerprint


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


# --- Two tokenizers: anchor and specialist aligned by characters ------------------------------
#
# The rule. Both models read the same text, each through its own tokenizer. The anchor's text is
# what its tokens decode to (special tokens decode to nothing, so chat markers and BOS are the
# anchor's alone; a byte-level token that ends inside a UTF-8 character adds no text until the
# character is complete). The specialist reads that text as a sequence of *committed* tokens,
# built anchor position by anchor position with one recursion, the same in training and in
# decoding:
#
#   at anchor position t, with the anchor's text final up to character e_t and the specialist's
#   committed tokens covering characters [0, c): tokenize text[c:e_t] with the specialist's
#   tokenizer and commit every token before its last pre-token (the last word may still grow
#   with the text that follows; a tokenizer without a pre-tokenizer holds back its last token),
#   cut back further to the last clean boundary (a token ending at or before the next token's
#   start, so a byte token inside a character is never split from its character); c moves to
#   the end of the last committed token.
#
# Holding back a whole word, not just a token, keeps the specialist's tokenization the natural
# one for complete words (BPE never merges across pre-tokens), so it reads "Ġriver" and not
# "Ġr" "iv" "er" while the anchor spells the word out one token at a time.
#
# The held-back tokens (the last word) are anchor position t's *tentative tail*: t also reads
# them, run after the committed tokens and never cached (the next position tokenizes its own).
# So position t reads the specialist's tokenization of exactly text[:e_t], and the word being
# written is read at once instead of one word late; what is cached stays committed-only.
#
# So every specialist token anchor position t reads ends at or before the end of anchor token t's
# text: no position ever sees a character beyond its own token (no label leak), and tokens once
# committed never change (the specialist's KV cache stays exact). A specialist token straddling
# the end of anchor token t's text is not committed at t; it is at the first later position whose
# text has begun the next word (pre-token) after it. The specialist's own start tokens (its
# BOS, when its tokenizer adds one) are committed at the row's first anchor token. Padding
# commits nothing.


def needs_alignment(tokenizer: Any, specialist_tokenizer: Any) -> bool:
    """True when both tokenizers are known and map text to different ids (pure): the two models
    then read the same text aligned by characters (composer.alignment)."""
    if tokenizer is None or specialist_tokenizer is None or tokenizer is specialist_tokenizer:
        return False
    return tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(specialist_tokenizer)


def start_ids(tokenizer: Any) -> tuple[int, ...]:
    """The special tokens a tokenizer puts before any text (its BOS, or nothing), pure."""
    with_special = list(tokenizer("a").input_ids)
    plain = list(tokenizer("a", add_special_tokens=False).input_ids)
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return tuple(with_special[:i])
    return ()


def committed_cut(spans: Sequence[tuple[int, int]], limit: int) -> int:
    """How many of a remainder's tokens to commit, given their (start, end) character spans and
    the start of the text held back: the tokens ending at or before ``limit``, cut back to a
    clean boundary that consumes at least one character (pure)."""
    k = 0
    while k < len(spans) - 1 and spans[k][1] <= limit:
        k += 1
    while k > 0 and (spans[k - 1][1] > spans[k][0] or spans[k - 1][1] == 0):
        k -= 1
    return k


def held_back_from(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> int:
    """Where the held-back tail of a remainder starts: its last pre-token (word), or its last
    token when the tokenizer has no pre-tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is not None:
        pieces = pre.pre_tokenize_str(text)
        if pieces:
            return pieces[-1][1][0]
    return spans[-1][0] if spans else 0


def backend_of(tokenizer: Any) -> Any | None:
    """The ``tokenizers`` tokenizer behind a transformers one whose encode and decode add nothing
    to it (a TokenizersBackend whose class overrides neither), else None. Called directly it
    gives the same ids, offsets and text without transformers' per-call work, which was most of
    the aligner's time (one call per anchor token)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not isinstance(tokenizer, TokenizersBackend):
        return None
    methods = ("__call__", "_encode_plus", "decode", "_decode")
    if any(getattr(type(tokenizer), m) is not getattr(TokenizersBackend, m) for m in methods):
        return None
    return tokenizer.backend_tokenizer


class RowAligner:
    """The recursion above for one row: feed anchor tokens, get the specialist tokens each one
    commits. Decoding keeps one per row across steps; training runs a fresh one over the row."""

    def __init__(self, anchor_tokenizer: Any, specialist_tokenizer: Any, start: tuple[int, ...]):
        self._anchor = anchor_tokenizer
        self._specialist = specialist_tokenizer
        self._anchor_backend = backend_of(anchor_tokenizer)
        self._specialist_backend = backend_of(specialist_tokenizer)
        self._start = start
        self._ids: list[int] = []  # the row's anchor tokens so far (padding excluded)
        self._window = (0, 0)  # incremental detokenisation: (first token decoded, tokens read)
        self.text = ""  # the anchor's text, final so far
        self.committed_chars = 0  # c: characters covered by committed specialist tokens
        self.committed: list[int] = []
        self.tail: list[int] = []  # the tentative tail at the latest position (never cached)
        # Where each token's text ends: the anchor column of the first anchor token whose text
        # reaches its last character (see ``push``), for the tokens the latest push committed
        # and for its tail.
        self.new_ends: list[int] = []
        self.tail_ends: list[int] = []
        self._columns: list[int] = []  # the anchor column of each push
        self._text_ends: list[int] = []  # len(text) after each push (non-decreasing)

    def push(self, anchor_id: int, column: int | None = None) -> list[int]:
        """Specialist tokens committed at the position of this anchor token (often none);
        ``column`` is its anchor column (default: how many tokens were pushed before it)."""
        new = list(self._start) if not self._ids else []
        ends = [0] * len(new)  # the start tokens have no text: they end where the row starts
        self._columns.append(len(self._ids) if column is None else column)
        self._ids.append(int(anchor_id))
        self._extend_text()
        self._text_ends.append(len(self.text))
        rest = self.text[self.committed_chars :]
        self.tail, tail_ends = [], []
        if rest:
            ids, spans = self._encode(rest)
            k = committed_cut(spans, held_back_from(self._specialist, rest, spans))
            at = self.committed_chars
            new += ids[:k]
            ends += [at + end for _, end in spans[:k]]
            tail_ends = [at + end for _, end in spans[k:]]
            if k:
                self.committed_chars += spans[k - 1][1]
            self.tail = ids[k:]
        self.committed += new
        self.new_ends, self.tail_ends = self._end_columns(ends), self._end_columns(tail_ends)
        return new

    def _end_columns(self, char_ends: list[int]) -> list[int]:
        """The anchor column whose text first reaches each character end (pure but for state)."""
        return [self._columns[bisect.bisect_left(self._text_ends, e)] for e in char_ends]

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The specialist's ids of ``text`` (no special tokens) and their character spans."""
        if self._specialist_backend is not None:
            encoding = self._specialist_backend.encode(text, add_special_tokens=False)
            return list(encoding.ids), [tuple(span) for span in encoding.offsets]
        encoded = self._specialist(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]

    def _decode(self, ids: list[int]) -> str:
        if self._anchor_backend is not None:
            return self._anchor_backend.decode(ids, skip_special_tokens=True)
        return self._anchor.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _extend_text(self) -> None:
        # Decode a short window twice (with and without the new token) so tokenizers that strip a
        # leading space from the first decoded token are read the same at every step.
        first, read = self._window
        before = self._decode(self._ids[first:read])
        after = self._decode(self._ids[first:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return  # an incomplete UTF-8 character, or a token with no text: nothing final yet
        if not after.startswith(before):  # a decoder that rewrites earlier text: read it all
            whole = self._decode(self._ids)
            if whole.startswith(self.text):
                self.text = whole
            self._window = (len(self._ids), len(self._ids))
            return
        self.text += after[len(before) :]
        self._window = (read, len(self._ids))


@dataclass(frozen=True)
class TextAlignment:
    """The two tokenizers of a composition whose models read different token ids."""

    anchor_tokenizer: Any
    specialist_tokenizer: Any
    # Read each position's tentative tail (see the rule). Off only for a specialist with
    # sliding-window attention, whose cache cannot drop the tail exactly: it then reads one word
    # late (docs/ALIGNMENT.md).
    tails: bool = True

    @cached_property
    def start(self) -> tuple[int, ...]:
        return start_ids(self.specialist_tokenizer)

    @cached_property
    def pad_id(self) -> int:
        tok = self.specialist_tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def row(self) -> RowAligner:
        return RowAligner(self.anchor_tokenizer, self.specialist_tokenizer, self.start)


@dataclass(frozen=True)
class AlignedTokens:
    """What new anchor tokens give the specialist (see :func:`aligned_tokens`). Rows with fewer
    entries than the widest are padded on the right (mask 0)."""

    ids: torch.Tensor  # (B, N) newly committed specialist tokens
    mask: torch.Tensor  # (B, N) 1 = real
    columns: torch.Tensor  # (B, N) anchor column at which each was committed
    ends: torch.Tensor  # (B, N) anchor column at which its text ends (<= its column)
    # Each new anchor position's tentative tail (the tokens it holds back), one tail after
    # another: (B, M) ids, mask, anchor column, place within its tail (0 first), and the anchor
    # column at which its text ends (<= its column).
    tail_ids: torch.Tensor
    tail_mask: torch.Tensor
    tail_columns: torch.Tensor
    tail_index: torch.Tensor
    tail_ends: torch.Tensor
    # (B, M) where a tail token's state is already computed: the index in ``ids`` of the
    # committed token with the same id after the same tokens (see :func:`tail_sources`), or -1.
    tail_source: torch.Tensor


def _padded(rows: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, longest) tensor of ``rows`` padded on the right with ``fill``, and its 1/0 mask."""
    n = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), n), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return out, mask


def aligned_tokens(
    rows: list[RowAligner],
    input_ids: torch.Tensor,  # (B, T) new anchor tokens
    attention_mask: torch.Tensor,  # (B, T) their mask, 1 = real token
    *,
    column_offset: int,  # anchor column of input_ids[:, 0] (tokens already seen)
    pad_id: int,
) -> AlignedTokens:
    """Push new anchor tokens through each row's aligner: the specialist tokens they commit, and
    every new position's tentative tail."""
    names = ("ids", "columns", "ends", "tail_ids", "tail_columns", "tail_index", "tail_ends")
    per_row: dict[str, list[list[int]]] = {name: [] for name in (*names, "tail_source")}
    for row, ids, mask in zip(rows, input_ids.tolist(), attention_mask.tolist(), strict=True):
        got: dict[str, list[int]] = {name: [] for name in names}
        before = len(row.committed)  # committed in earlier calls
        tails_read: list[tuple[int, list[int]]] = []  # (tokens committed before it, the tail)
        for t, (token, real) in enumerate(zip(ids, mask, strict=True)):
            if real:
                new = row.push(token, column_offset + t)
                got["ids"] += new
                got["columns"] += [column_offset + t] * len(new)
                got["ends"] += row.new_ends
                got["tail_ids"] += row.tail
                got["tail_columns"] += [column_offset + t] * len(row.tail)
                got["tail_index"] += list(range(len(row.tail)))
                got["tail_ends"] += row.tail_ends
                tails_read.append((len(row.committed) - before, row.tail))
        for name in names:
            per_row[name].append(got[name])
        per_row["tail_source"].append(
            [j for at, tail in tails_read for j in tail_sources(got["ids"], at, tail)]
        )
    ids, mask = _padded(per_row["ids"], pad_id)
    tail_ids, tail_mask = _padded(per_row["tail_ids"], pad_id)
    rest = ("columns", "ends", "tail_columns", "tail_index", "tail_ends", "tail_source")
    return AlignedTokens(
        ids=ids,
        mask=mask,
        tail_ids=tail_ids,
        tail_mask=tail_mask,
        **{name: _padded(per_row[name], -1 if name == "tail_source" else 0)[0] for name in rest},
    )


def tail_sources(committed: Sequence[int], start: int, tail: Sequence[int]) -> list[int]:
    """For each token of a tail read after ``committed[:start]``: the index of the committed
    token it equals, or -1 (pure). Tail token i equals ``committed[start + i]`` when the tail's
    tokens up to i were all later committed unchanged: the same ids after the same tokens, at
    the same positions, so the specialist's states there are the same and are computed once.
    The word being written while its tokenization still changes ("Ġr" before "Ġriver") is not."""
    out = []
    for i, token in enumerate(tail):
        j = start + i
        if j >= len(committed) or committed[j] != token:
            return out + [-1] * (len(tail) - i)
        out.append(j)
    return out


def tail_attention(
    specialist_mask: torch.Tensor,  # (B, S) 1 = a committed specialist token (all so far)
    columns: torch.Tensor,  # (B, S) anchor column at which each was committed
    tail_mask: torch.Tensor,  # (B, M) 1 = a real tail token
    tail_columns: torch.Tensor,  # (B, M) the anchor column whose tail it is
    tail_index: torch.Tensor,  # (B, M) its place within that tail
    *,
    reused: torch.Tensor | None = None,  # (B, M) True: its state is a committed token's
) -> tuple[torch.Tensor, torch.Tensor]:
    """How the specialist reads the tails after its committed tokens (pure). Returns the
    (B, M, S + M) bool mask (a tail token of column t reads the tokens committed at or before t,
    then its own tail's earlier tokens and itself: exactly what decoding at t computes) and the
    (B, M) positions (the committed tokens before it, plus its place in the tail).

    With ``reused`` (a prefix of each tail whose tokens are committed unchanged later, see
    :func:`tail_sources`), the tail's other tokens read those committed tokens in place of the
    reused tail tokens: the same ids at the same positions, so the same states."""
    real = specialist_mask.bool()
    before = (real[:, None, :] & (columns[:, None, :] <= tail_columns[:, :, None])).sum(-1)
    same_tail = (tail_columns[:, None, :] == tail_columns[:, :, None]) & (
        tail_index[:, None, :] <= tail_index[:, :, None]
    )  # (B, M, M)
    readable = tail_mask.bool()
    if reused is not None:
        readable = readable & ~reused
        before_reads = before + (same_tail & reused[:, None, :]).sum(-1)  # (B, M)
    else:
        before_reads = before
    # Committed tokens are in column order, so those at or before t are the first ``before``.
    rank = real.long().cumsum(-1)  # (B, S) 1-based rank of each committed token
    committed = real[:, None, :] & (rank[:, None, :] <= before_reads[:, :, None])  # (B, M, S)
    own = same_tail & readable[:, None, :]
    own = own | torch.eye(tail_mask.shape[1], dtype=torch.bool)[None]  # padding reads itself
    positions = before + tail_index  # (B, M)
    return torch.cat([committed, own], dim=-1), positions


def compacted(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) bool: each row's selected entries moved to its front (pure). Returns the (B, K)
    indices of the selected entries (K the most any row has; padding 0) and their (B, K) 1/0
    mask."""
    counts = selected.sum(1)  # (B,)
    k = int(counts.max()) if selected.numel() else 0
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :k]
    real = (torch.arange(k)[None, :] < counts[:, None]).long()
    return order, real


def tail_visibility(
    tail_mask: torch.Tensor,  # (B, M)
    tail_columns: torch.Tensor,  # (B, M)
    readable: torch.Tensor,  # (B, C) anchor columns whose specialist tokens the bridge may read
    *,
    num_queries: int,
    query_offset: int = 0,
    causal: bool = True,
) -> torch.Tensor:
    """(B, T, M) bool: anchor query t reads the tail tokens of its own column only."""
    keys = tail_mask.bool() & readable.bool().gather(1, tail_columns)  # (B, M)
    b, m = keys.shape
    if not causal:
        return keys[:, None, :].expand(b, num_queries, m)
    query_cols = torch.arange(num_queries, device=keys.device) + query_offset  # (T,)
    return keys[:, None, :] & (tail_columns[:, None, :] == query_cols[None, :, None])


def aligned_visibility(
    specialist_mask: torch.Tensor,  # (B, S) 1 = a committed specialist token
    columns: torch.Tensor,  # (B, S) anchor column at which each was committed
    readable: torch.Tensor,  # (B, C) anchor columns whose committed tokens the bridge may read
    *,
    num_queries: int,
    query_offset: int = 0,
    causal: bool = True,
) -> torch.Tensor:
    """(B, T, S) bool: anchor query t reads specialist token j iff j was committed at or before
    t's column (and is real, and was committed at a readable column)."""
    keys = specialist_mask.bool() & readable.bool().gather(1, columns)  # (B, S)
    b, s = keys.shape
    if not causal:
        return keys[:, None, :].expand(b, num_queries, s)
    query_cols = torch.arange(num_queries, device=keys.device) + query_offset  # (T,)
    seen = columns[:, None, :] <= query_cols[None, :, None]  # (B, T, S)
    return keys[:, None, :] & seen


def twin_visibility(
    twins: torch.Tensor,  # (B, M) the committed token each tail token equals, or -1
    tail_columns: torch.Tensor,  # (B, M) the anchor column whose tail it is
    readable: torch.Tensor,  # (B, C) anchor columns whose specialist tokens the bridge may read
    *,
    num_committed: int,
    num_queries: int,
    query_offset: int = 0,
    causal: bool = True,
) -> torch.Tensor:
    """(B, T, S) bool: anchor query t reads, among the committed tokens, the twins of its own
    column's tail tokens (a twin has the tail token's key and value: see
    :mod:`composer.aligned_reading`). Without the causal rule every committed token is read
    anyway: nothing is added."""
    b = twins.shape[0]
    out = torch.zeros(b, num_queries, num_committed, dtype=torch.bool)
    if not causal:
        return out
    query = tail_columns - query_offset  # (B, M) which query reads it
    ok = (twins >= 0) & (query >= 0) & (query < num_queries)
    ok &= readable.bool().gather(1, tail_columns)
    rows = torch.arange(b)[:, None].expand_as(twins)
    out[rows[ok], query[ok], twins[ok]] = True
    return out


def read_visibility(
    specialist_mask: torch.Tensor,  # (B, S) 1 = a committed specialist token
    columns: torch.Tensor,  # (B, S) anchor column at which each was committed
    tail_mask: torch.Tensor,  # (B, M) 1 = a real tail token with a key of its own
    tail_columns: torch.Tensor,  # (B, M) the anchor column whose tail it is
    readable: torch.Tensor,  # (B, C) anchor columns whose specialist tokens the bridge may read
    *,
    twins: torch.Tensor | None = None,  # (B, M2) tail tokens read as their committed twins
    twin_columns: torch.Tensor | None = None,  # (B, M2) the anchor column whose tail each is
    num_queries: int,
    query_offset: int = 0,
    causal: bool = True,
) -> torch.Tensor:
    """(B, T, S + M) bool: what anchor query t reads of the committed tokens (with the twins of
    its tail), then of the new positions' other tail tokens (:func:`aligned_visibility`,
    :func:`twin_visibility`, :func:`tail_visibility`); both engines."""
    where = {"num_queries": num_queries, "query_offset": query_offset, "causal": causal}
    committed = aligned_visibility(specialist_mask, columns, readable, **where)
    if twins is not None and twin_columns is not None:
        committed = committed | twin_visibility(
            twins, twin_columns, readable, num_committed=committed.shape[2], **where
        )
    tail = tail_visibility(tail_mask, tail_columns, readable, **where)
    return torch.cat([committed, tail], dim=-1)
