"""The llama.cpp engine: GGUF anchor and specialist co-decoded in llama.cpp, the bridge in torch.

Each frozen model runs in llama-cpp-python on its own quantised kernels, with its own context and
KV cache. The bridge (the same weights torch training saves) stays in torch and is
injected into the anchor's forward through llama.cpp's ``cb_eval`` callback: the scheduler asks
about every graph node; for ``l_out-{i}`` (the residual stream after layer i) of a connected
layer we say yes, and once that node is computed, before layer i + 1 runs, we read it, add the
blocks' output and write the sum back. The specialist's connected-layer outputs are read the same
way during its own decode of the same tokens; its compute stops after the last layer read.

Same rule as :mod:`composer.generate`: a prompt is ingested in batches (causal visibility inside a
batch, as in torch); each new token is one specialist step, one anchor step and one
cross-attention read per block against per-block caches of specialist keys/values. Sampling,
stop strings, EOS and streaming reuse that module's logits processors and transformers' stopping
criteria and streamer protocol. llama.cpp has no backward pass: this engine cannot train.

Why one module of ~650 lines: one engine's whole decode path (loading both GGUF models and a
bridge, batched ingestion, co-decoding, the bridge's per-block caches) shares the callback's state
step by step; the llama.cpp model wrapper itself is :mod:`composer.llamacpp_model`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteriaList

from composer.alignment import (
    RowAligner,
    TextAlignment,
    needs_alignment,
    read_visibility,
    visibility_mask,
)
from composer.architectures import model_shape, sliding_window
from composer.atomic import write_folder_atomically
from composer.bridge import Bridge, bridge_shape_for
from composer.cache import cache_root, file_sha256
from composer.config import CompositionConfig, ConfigError
from composer.export import read_bridge
from composer.generate import decoding
from composer.identity import config_identity
from composer.llamacpp_model import LayerHandler, LayerOutput, LlamaCppModel
from composer.loading import Location, load_config, load_tokenizer, locate

if TYPE_CHECKING:
    from composer.bridge import BridgeBlock
    from composer.config import ModelSpec

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "llama.cpp")
INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir llama-cpp-python'


# ---------------------------------------------------------------------------------------------
# Which engine (pure decisions)


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot be used here, or None when it imports."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the shared library does not load
        return f"llama-cpp-python is not importable ({type(exc).__name__}: {exc})"
    return None


def choose_engine(
    config: CompositionConfig, engine: str, *, missing: str | None
) -> tuple[str, str | None]:
    """(engine to use, why ``auto`` chose torch or None) for a recipe (pure).

    ``auto`` is llama.cpp when both models are GGUF files and llama-cpp-python imports
    (``missing`` is None), else torch. An explicit ``llama.cpp`` that cannot run is an error.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r} is not known; expected one of {', '.join(ENGINES)}")
    if engine == "torch":
        return "torch", None
    not_gguf = [
        f"the {role} {spec.model!r}"
        for role, spec in (("anchor", config.anchor), ("specialist", config.specialist))
        if not spec.is_gguf
    ]
    quantised = [
        f"the {role} asks for quantization {spec.quantization!r}"
        for role, spec in (("anchor", config.anchor), ("specialist", config.specialist))
        if spec.is_gguf and spec.quantization != "none"
    ]
    why = None
    if not_gguf:
        why = f"{' and '.join(not_gguf)} is not a .gguf file"
    elif missing:
        why = f"{missing}; install it with {INSTALL}"
    elif quantised:  # a bitsandbytes setting means the user wants the torch path
        why = f"{' and '.join(quantised)} (a torch setting)"
    if why is None:
        return "llama.cpp", None
    if engine == "llama.cpp":
        raise ConfigError(f"the llama.cpp engine cannot run this recipe: {why}")
    return "torch", f"engine auto: using torch because {why}"


# ---------------------------------------------------------------------------------------------
# The composition


class LlamaCppComposition:
    """A GGUF anchor and a GGUF specialist in llama.cpp, joined by a torch bridge.

    Offers what the torch :class:`~composer.composition.Composition` offers for inference:
    ``generate`` (new tokens only, same settings and semantics as :mod:`composer.generate`),
    ``tokenizer``, ``bridge_off()`` (the anchor alone), plus ``specialist_alone()``. It cannot
    train: llama.cpp has no backward pass.
    """

    engine = "llama.cpp"

    def __init__(
        self,
        anchor: LlamaCppModel,
        specialist: LlamaCppModel,
        bridge: Bridge,
        *,
        tokenizer: Any,
        specialist_tokenizer: Any = None,  # None: the anchor's (one shared vocabulary)
        alignment: TextAlignment | None = None,  # two tokenizers: read by characters
        recipe: CompositionConfig | None = None,
        sources: dict[str, dict[str, Any]] | None = None,
        eos_token_id: int | Sequence[int] | None = None,  # the anchor config's, as torch uses
        specialist_eos_token_id: int | Sequence[int] | None = None,
    ) -> None:
        self.anchor, self.specialist, self.bridge = anchor, specialist, bridge
        self.tokenizer = tokenizer
        self.specialist_tokenizer = specialist_tokenizer or tokenizer
        self.alignment = alignment
        self.specialist_eos_token_id = specialist_eos_token_id
        # Two tokenizers: the row's aligner, and the anchor column at which each token in the
        # specialist's cache was committed (composer.alignment).
        self._row: RowAligner | None = None
        self._columns: list[int] = []
        self.recipe = recipe
        self.sources = sources or {}
        self.eos_token_id = eos_token_id
        self.bridge_enabled = True
        self._alone: str | None = None  # "specialist" inside specialist_alone()
        n = len(bridge.blocks)
        self._keys: list[torch.Tensor | None] = [None] * n  # per block (1, H, S, hd)
        self._values: list[torch.Tensor | None] = [None] * n

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return self.bridge.pairs

    def train(self, mode: bool = True) -> None:
        raise ConfigError(
            "the llama.cpp engine runs inference only (llama.cpp has no backward pass); train "
            "the bridge with engine='torch' (calm-composer train), then load its folder here"
        )

    @contextmanager
    def bridge_off(self) -> Iterator[None]:
        """Decode with the anchor alone inside the block (the specialist is not run)."""
        previous, self.bridge_enabled = self.bridge_enabled, False
        try:
            yield
        finally:
            self.bridge_enabled = previous

    @contextmanager
    def specialist_alone(self) -> Iterator[None]:
        """Decode with the specialist alone inside the block (for side-by-side comparisons)."""
        previous, self._alone = self._alone, "specialist"
        try:
            yield
        finally:
            self._alone = previous

    def reset(self) -> None:
        """Empty both KV caches and the bridge's key/value caches."""
        self._truncate(0)

    def _truncate(self, length: int) -> None:
        if self.alignment is not None and length:  # the aligner cannot go back: start over
            length = 0
        if not length:
            self._row, self._columns = None, []
        for model in (self.anchor, self.specialist):
            if model.length > length:
                model.truncate(length)
        for k, keys in enumerate(self._keys):
            if keys is not None:
                self._keys[k] = keys[:, :, :length] if length else None
                self._values[k] = self._values[k][:, :, :length] if length else None

    # -- one pass over new tokens ---------------------------------------------------------------

    def _ingest(
        self, tokens: Sequence[int], *, logits: str = "last", read_specialist: bool = True
    ) -> torch.Tensor:
        """Append tokens to every cache; returns the anchor's logits (see LlamaCppModel.decode).

        ``read_specialist`` False: the new tokens are not added to what the bridge may read
        (the prompt-only rule); the anchor still reads the specialist's earlier positions.
        On any error, every cache is as before the call (two tokenizers: emptied).
        """
        if self._alone == "specialist":
            return self.specialist.decode(tokens, logits=logits)
        if not self.bridge_enabled:
            return self.anchor.decode(tokens, logits=logits)
        start = self.anchor.length
        try:
            tails: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []
            if self.alignment is not None:
                if read_specialist:
                    tails = self._read_aligned(tokens, start)
            elif read_specialist:
                self._read_specialist(tokens)
            handlers = self._anchor_handlers(tails)
            with self.anchor.watching(handlers):
                out = self.anchor.decode(tokens, logits=logits)
                _check_seen("anchor", self.anchor, handlers)
            return out
        except BaseException:
            self._truncate(start)
            raise

    def _read_specialist(self, tokens: Sequence[int], columns: Sequence[int] | None = None) -> None:
        """Decode the tokens in the specialist; append each block's keys/values (pure torch),
        rotated by their own positions, or by the anchor ``columns`` where their text ends."""
        start = self.specialist.length
        positions = list(columns) if columns is not None else range(start, start + len(tokens))
        new_keys, new_values = self._specialist_keys_values(tokens, positions)
        for k, (keys, values) in enumerate(zip(new_keys, new_values, strict=True)):
            if self._keys[k] is not None:
                keys = torch.cat([self._keys[k], keys], dim=2)
                values = torch.cat([self._values[k], values], dim=2)
            self._keys[k], self._values[k] = keys, values

    def _specialist_keys_values(
        self, tokens: Sequence[int], positions: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decode the tokens in the specialist (appended to its cache); each block's keys and
        values from the states of its paired layer, (1, H, T, hd), rotated by ``positions``."""
        needed = sorted({s for _, s in self.pairs})
        deepest = needed[-1]
        captured: dict[int, list[torch.Tensor]] = defaultdict(list)

        def capture(view: LayerOutput) -> bool:
            captured[view.layer].append(view.read())
            return view.layer != deepest  # nothing above it is needed: stop the graph there

        handlers = dict.fromkeys(needed, capture)
        # The last layer only keeps rows whose logits are asked for: ask for all when it is read.
        wanted = "all" if deepest == self.specialist.num_layers - 1 else "last"
        with self.specialist.watching(handlers):
            self.specialist.decode(tokens, logits=wanted)
            _check_seen("specialist", self.specialist, handlers)
        device, dtype = _device_dtype(self.bridge)
        rotate_by = torch.tensor(list(positions), device=device)[None]  # (1, T)
        keys, values = [], []
        for k, (block, (_, s)) in enumerate(zip(self.bridge.blocks, self.pairs, strict=True)):
            states = torch.cat(captured[s])[None].to(device=device, dtype=dtype)  # (1, T, d_s)
            _check_width("specialist", k, self.pairs[k], s, states.shape[-1], block)
            new_keys, new_values = block.keys_values(states, rotate_by)  # (1, H, T, hd) each
            keys.append(new_keys)
            values.append(new_values)
        return keys, values

    def _read_aligned(
        self, tokens: Sequence[int], start: int
    ) -> list[tuple[int, list[torch.Tensor], list[torch.Tensor]]]:
        """Two tokenizers: push each anchor token through the row's aligner, decode the
        specialist tokens it commits (cached), then its tentative tail (read, then dropped from
        the specialist's cache); each key is rotated by the anchor column where its token's
        text ends. Returns each new column's tail keys/values per block, as the torch engine
        computes them."""
        assert self.alignment is not None
        if self._row is None:
            self._row = self.alignment.row()
        tails = []
        for column, token in enumerate(tokens, start=start):
            committed = self._row.push(token, column)
            if committed:
                self._read_specialist(committed, self._row.new_ends)
                self._columns += [column] * len(committed)
            tail = self._row.tail
            if tail and self.alignment.tails:
                length = self.specialist.length
                try:
                    keys, values = self._specialist_keys_values(tail, self._row.tail_ends)
                finally:
                    self.specialist.truncate(length)
                tails.append((column, keys, values))
        return tails

    def _anchor_handlers(
        self, tails: Sequence[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = ()
    ) -> dict[int, LayerHandler]:
        """For each connected anchor layer: add its blocks' output to the layer output.

        ``tails`` (two tokenizers): each new column's tentative tail keys/values per block,
        read by that column's query only, after the committed tokens."""
        blocks_at: dict[int, list[int]] = defaultdict(list)
        for k, (anchor_layer, _) in enumerate(self.pairs):
            blocks_at[anchor_layer].append(k)
        readable = self.specialist.length  # specialist positions 0 .. readable - 1
        device, dtype = _device_dtype(self.bridge)
        causal = self.bridge.shape.causal
        keys, values = self._keys, self._values
        if tails:
            keys = [
                torch.cat([*([] if c is None else [c]), *(t[1][k] for t in tails)], dim=2)
                for k, c in enumerate(self._keys)
            ]  # (1, H, S + M, hd)
            values = [
                torch.cat([*([] if c is None else [c]), *(t[2][k] for t in tails)], dim=2)
                for k, c in enumerate(self._values)
            ]
        tail_columns = torch.tensor(
            [[column for column, tail_keys, _ in tails for _ in range(tail_keys[0].shape[2])]],
            dtype=torch.long,
        )  # (1, M): the anchor column whose tail each tail key is

        def visibility(positions: torch.Tensor) -> torch.Tensor:  # (1, rows, S [+ M])
            offset = int(positions[0, 0])
            if self.alignment is None:
                return visibility_mask(
                    torch.ones(1, readable, dtype=torch.bool, device=device),
                    num_queries=positions.shape[1],
                    query_offset=offset,
                    causal=causal,
                )
            columns = torch.tensor([self._columns], dtype=torch.long)  # (1, S)
            return read_visibility(
                torch.ones_like(columns),
                columns,
                torch.ones_like(tail_columns),
                tail_columns,
                torch.ones(1, offset + positions.shape[1], dtype=torch.long),  # all readable
                num_queries=positions.shape[1],
                query_offset=offset,
                causal=causal,
            ).to(device)

        def handler_for(layer: int, block_ids: list[int]) -> LayerHandler:
            def handler(view: LayerOutput) -> bool:
                if keys[block_ids[0]] is None:
                    return True  # nothing read yet: the anchor alone
                hidden = view.read()  # (rows, d_anchor) float32
                positions = view.positions.to(device)[None]  # (1, rows), consecutive
                visible = visibility(positions)
                x = hidden[None].to(device=device, dtype=dtype)  # (1, rows, d_anchor)
                delta = None
                for k in block_ids:
                    block = self.bridge.blocks[k]
                    _check_width("anchor", k, self.pairs[k], layer, x.shape[-1], block)
                    out = block(x, keys[k], values[k], visible, positions)
                    delta = out if delta is None else delta + out
                view.write(hidden + delta[0].to(device="cpu", dtype=torch.float32))
                return True

            return handler

        return {layer: handler_for(layer, ks) for layer, ks in blocks_at.items()}

    # -- the public decoding API ----------------------------------------------------------------

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of one sequence, (1, T, vocab), in batches of ``n_batch``."""
        ids = _one_row(input_ids)
        self.reset()
        try:
            return self._ingest(ids, logits="all")[None]
        finally:
            self.reset()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,  # (B, T); pad on the left for a batch of different lengths
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,  # None: the anchor's; [] never stops
        pad_token_id: int | None = None,
        stop_strings: Sequence[str] = (),
        tokenizer: Any = None,
        streamer: Any = None,
        generator: torch.Generator | None = None,
        specialist_reads_prompt_only: bool | None = None,
    ) -> torch.Tensor:
        """Decode up to ``max_new_tokens``; returns only the new tokens, (B, new).

        Same settings and semantics as :func:`composer.generate.generate` (which see). Rows of a
        batch are decoded one after another (llama.cpp keeps one sequence per context); a row
        that ended early is filled with ``pad_token_id``.
        """
        # Inside specialist_alone() with two tokenizers, the ids are the specialist's own.
        own = self._alone == "specialist" and self.alignment is not None
        tokenizer = tokenizer or (self.specialist_tokenizer if own else self.tokenizer)
        chosen = decoding(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
            eos_token_id=eos_token_id,
            model_eos=self.specialist_eos_token_id if own else self.eos_token_id,
            pad_token_id=pad_token_id,
        )
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if streamer is not None and input_ids.shape[0] != 1:
            raise ConfigError(f"streaming needs one prompt; got a batch of {input_ids.shape[0]}")
        settings = dict(
            processors=chosen.processors,
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            eos=chosen.eos,
            stopping=chosen.stopping,
            streamer=streamer,
            generator=generator,
            prompt_only=self.bridge.shape.prompt_only
            if specialist_reads_prompt_only is None
            else specialist_reads_prompt_only,
        )
        rows = [
            self._generate_row(row[mask.bool()].tolist(), **settings)
            for row, mask in zip(input_ids, attention_mask, strict=True)
        ]
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), chosen.pad_token_id, dtype=torch.long)
        for b, r in enumerate(rows):
            out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def _generate_row(
        self,
        ids: list[int],
        *,
        processors: Any,
        do_sample: bool,
        max_new_tokens: int,
        eos: list[int],
        stopping: StoppingCriteriaList,
        streamer: Any,
        generator: torch.Generator | None,
        prompt_only: bool,
    ) -> list[int]:
        if not ids:
            raise ConfigError("the prompt is empty; give at least one token")
        sequence = torch.tensor([ids])  # (1, T + generated)
        if streamer is not None:
            streamer.put(sequence)
        self.reset()
        try:
            logits = self._ingest(ids)  # (1, V)
            for step in range(max_new_tokens):
                scores = processors(sequence, logits)  # (1, V)
                if do_sample:
                    probs = torch.softmax(scores, dim=-1)
                    next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    next_token = scores.argmax(dim=-1)  # (1,)
                sequence = torch.cat([sequence, next_token[:, None]], dim=1)
                if streamer is not None:
                    streamer.put(next_token)
                done = int(next_token) in eos or (
                    len(stopping) > 0 and bool(stopping(sequence, scores).all())
                )
                if done or step == max_new_tokens - 1:
                    break
                logits = self._ingest([int(next_token)], read_specialist=not prompt_only)
        finally:
            self.reset()
            if streamer is not None:
                streamer.end()
        return sequence[0, len(ids) :].tolist()

    def close(self) -> None:
        """Free both llama.cpp models now (else when the object is collected)."""
        self.anchor.close()
        self.specialist.close()


def _one_row(input_ids: torch.Tensor | Sequence[int]) -> list[int]:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ConfigError(f"expected one sequence; got a batch of {ids.shape[0]}")
        ids = ids[0]
    return ids.tolist()


def _device_dtype(bridge: Bridge) -> tuple[torch.device, torch.dtype]:
    p = next(bridge.parameters())
    return p.device, p.dtype


def _check_width(
    role: str, k: int, pair: tuple[int, int], layer: int, width: int, block: BridgeBlock
) -> None:
    expected = (
        block.q_proj.in_features
        if role == "anchor"
        else (
            block.specialist_proj.in_features
            if isinstance(block.specialist_proj, torch.nn.Linear)
            else block.k_proj.in_features
        )
    )
    if width != expected:
        raise ConfigError(
            f"bridge block {k} (anchor layer {pair[0]} <- specialist layer {pair[1]}) expects "
            f"{role} states of width {expected}, but the {role}'s layer {layer} in llama.cpp has "
            f"width {width}: this bridge was not made for this model"
        )


def _check_seen(role: str, model: LlamaCppModel, handlers: Mapping[int, Any]) -> None:
    unseen = sorted(set(handlers) - model.seen)
    if unseen:
        raise ConfigError(
            f"llama.cpp never showed the {role}'s layer output(s) {unseen} (graph nodes "
            f"'l_out-<layer>') for {model.path.name}: this architecture does not name its layer "
            "outputs that way; use engine='torch'"
        )


# ---------------------------------------------------------------------------------------------
# Loading


def load_llamacpp_composition(
    config: CompositionConfig,
    *,
    bridge: str | os.PathLike | None = None,
    seed: int | None = None,
    n_ctx: int = 4096,
    n_threads: int | None = None,
) -> LlamaCppComposition:
    """Both GGUF models of a recipe in llama.cpp, with a new bridge or the saved ``bridge``.

    A saved bridge is checked against both models exactly as the torch engine checks it (the
    same identities: shapes, tokenizer, file hashes), so a bridge trained in torch loads here
    without conversion.
    """
    locations = {role: locate(getattr(config, role)) for role in ("anchor", "specialist")}
    sources = {
        role: {
            "name": getattr(config, role).model,
            "kind": "gguf",
            "revision": None,
            "sha256": file_sha256(location.folder / location.gguf_file),
        }
        for role, location in locations.items()
    }
    configs, tokenizers = {}, {}
    for role, location in locations.items():
        spec = getattr(config, role)
        configs[role], tokenizers[role] = gguf_metadata(
            spec, location, sha256=sources[role]["sha256"]
        )
    # Two tokenizers read the same text aligned by characters, as on the torch engine.
    alignment = (
        TextAlignment(
            tokenizers["anchor"],
            tokenizers["specialist"],
            tails=not sliding_window(configs["specialist"]),
        )
        if needs_alignment(tokenizers["anchor"], tokenizers["specialist"])
        else None
    )
    if alignment is None:
        tokenizers["specialist"] = tokenizers["anchor"]
    if bridge is not None:
        loaded_bridge = read_bridge(
            bridge,
            # the file's sha256 stands for the weights (no torch weights to fingerprint)
            {
                role: config_identity(
                    configs[role], source=sources[role], tokenizer=tokenizers[role]
                )
                for role in configs
            },
            anchor_layers=model_shape(configs["anchor"]).num_layers,
            specialist_layers=model_shape(configs["specialist"]).num_layers,
            aligned=alignment is not None,
        )
    else:
        shape = bridge_shape_for(configs["anchor"], configs["specialist"], config.bridge)
        # the same new bridge as the torch engine's for a seed, the caller's generator untouched
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            loaded_bridge = Bridge(shape, dtype=config.bridge.dtype)
    loaded_bridge.requires_grad_(False)
    loaded_bridge.eval()
    models = {}
    for role, location in locations.items():
        # each context as long as asked but no longer than the model was trained for
        limited = _limited_context(configs[role], n_ctx)
        models[role] = LlamaCppModel(
            location.folder / location.gguf_file,
            n_ctx=limited.max_position_embeddings,
            n_threads=n_threads,
        )
        models[role].config = limited
    logger.info(
        "llama.cpp composition: %d blocks, layer pairs %s",
        len(loaded_bridge.pairs),
        list(loaded_bridge.pairs),
    )
    return LlamaCppComposition(
        models["anchor"],
        models["specialist"],
        loaded_bridge,
        tokenizer=tokenizers["anchor"],
        specialist_tokenizer=tokenizers["specialist"],
        alignment=alignment,
        recipe=config,
        sources=sources,
        eos_token_id=getattr(configs["anchor"], "eos_token_id", None),
        specialist_eos_token_id=getattr(configs["specialist"], "eos_token_id", None),
    )


def gguf_metadata(
    spec: ModelSpec, location: Location, *, sha256: str, with_tokenizer: bool = True
) -> tuple[Any, Any]:
    """The transformers config and tokenizer of a GGUF file, from the user's cache when there.

    transformers parses the whole GGUF (every vocabulary entry, in Python) for each: 10-40 s for
    a 150k vocabulary on a small CPU. The first load stores both as a small folder under
    ``<cache>/gguf-meta/<sha256>/`` (see composer.cache); later loads read that in a second.
    """
    from transformers import AutoConfig, AutoTokenizer

    root = cache_root()
    folder = root / "gguf-meta" / sha256 if root is not None else None
    own_tokenizer = with_tokenizer and spec.tokenizer is None  # else a named tokenizer source
    if folder is not None and (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(folder)
        if not own_tokenizer:
            return config, load_tokenizer(spec, location) if with_tokenizer else None
        if (folder / "tokenizer_config.json").is_file():
            return config, AutoTokenizer.from_pretrained(folder)
    config = load_config(spec, location)
    tokenizer = load_tokenizer(spec, location) if with_tokenizer else None
    if folder is not None:

        def write(target: Path) -> None:
            config.save_pretrained(target)
            if own_tokenizer:
                tokenizer.save_pretrained(target)

        try:
            if own_tokenizer or not (folder / "config.json").is_file():
                write_folder_atomically(folder, write)
        except OSError as exc:  # a read-only cache only costs time
            logger.warning("could not store %s's config in %s: %s", spec.model, folder, exc)
    return config, tokenizer


def _limited_context(config: Any, n_ctx: int) -> Any:
    """A copy of ``config`` whose context is the llama.cpp context (what callers may fill)."""
    limited = copy.copy(config)
    positions = getattr(config, "max_position_embeddings", None)
    limited.max_position_embeddings = min(positions, n_ctx) if positions else n_ctx
    return limited
