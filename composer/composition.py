"""Anchor + specialist + bridge: the composed forward pass and its loss.

One forward (or one decode step) runs:
1. the specialist without autograd, capturing the outputs of the paired specialist layers;
2. each block's keys/values from those states (appended to a per-block cache when decoding);
3. the anchor, with forward hooks (attached only for this call) that add each block's output to
   the residual stream after its anchor layer.
Anchor layers below the lowest connected layer see no tensor that needs grad, so autograd
records nothing there; the specialist runs under ``no_grad``. With two tokenizers, step 1 reads
the specialist's tokens of the same text (composer.aligned_reading).
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from composer.aligned_reading import read_aligned
from composer.alignment import (
    TextAlignment,
    needs_alignment,
    position_ids_from_mask,
    visibility_mask,
)
from composer.architectures import decoder_layers, model_shape, sliding_window
from composer.bridge import Bridge, bridge_shape_for
from composer.config import BridgeConfig, CompositionConfig, ConfigError
from composer.export import save_bridge
from composer.generate import generate
from composer.hooks import forward_hooks, hidden_of, with_hidden

logger = logging.getLogger(__name__)


@dataclass
class CompositionOutput:
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100


@dataclass
class DecodeState:
    """What co-decoding keeps between steps: a cache per model plus per-block keys/values."""

    anchor_cache: Any
    specialist_cache: Any
    attention_mask: torch.Tensor | None = None  # (B, S) over every token seen so far
    keys: list[torch.Tensor | None] = field(default_factory=list)  # per block, (B, H, S, hd)
    values: list[torch.Tensor | None] = field(default_factory=list)
    # Two tokenizers only: each row's aligner, and per committed specialist token its mask and
    # the anchor column at which it was committed, both (B, S_specialist).
    rows: list[Any] | None = None
    specialist_mask: torch.Tensor | None = None
    columns: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]


def _cache_kwarg(module: nn.Module) -> str:
    """transformers 5 names the cache argument ``cache``; older releases ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Composition(nn.Module):
    """A frozen anchor and a frozen specialist joined by a trainable bridge.

    ``composition(input_ids, attention_mask=None, labels=None)`` returns logits (and a loss).
    This module's only child is ``bridge``: ``parameters()``, ``state_dict()``, ``train()`` and
    wrappers such as DDP see exactly the trainable part. The frozen models are reachable as
    ``anchor`` and ``specialist`` but are not registered as submodules, so ``.to()`` moves only
    the bridge (the frozen models stay where they were loaded, e.g. 4-bit on the GPU).
    """

    engine = "torch"  # the other inference engine is composer.llamacpp's (GGUF files only)

    def __init__(
        self,
        anchor: nn.Module,
        specialist: nn.Module,
        bridge: Bridge,
        *,
        tokenizer: Any = None,
        specialist_tokenizer: Any = None,
        recipe: CompositionConfig | None = None,
        sources: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.bridge = bridge
        # A tuple is not registered by nn.Module: the frozen models stay out of parameters().
        self._frozen = (anchor, specialist, decoder_layers(anchor), decoder_layers(specialist))
        self.tokenizer = tokenizer
        self.specialist_tokenizer = specialist_tokenizer if specialist_tokenizer else tokenizer
        # None: one shared vocabulary, positions line up one to one (the paper's setting).
        self.alignment: TextAlignment | None = (
            TextAlignment(
                tokenizer, specialist_tokenizer, tails=not sliding_window(specialist.config)
            )
            if needs_alignment(tokenizer, specialist_tokenizer)
            else None
        )
        self.recipe = recipe
        self.sources = sources or {}  # identity of each model (see composer.export)
        self.bridge_enabled = True

    @property
    def anchor(self) -> nn.Module:
        return self._frozen[0]

    @property
    def specialist(self) -> nn.Module:
        return self._frozen[1]

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return self.bridge.pairs

    @contextmanager
    def bridge_off(self) -> Iterator[None]:
        """Run as the anchor alone inside the block (the specialist is not run at all).

        A DecodeState started in one mode must be finished in the same mode.
        """
        previous, self.bridge_enabled = self.bridge_enabled, False
        try:
            yield
        finally:
            self.bridge_enabled = previous

    def new_decode_state(self) -> DecodeState:
        n = len(self.bridge.blocks)
        return DecodeState(
            anchor_cache=DynamicCache(config=self.anchor.config),
            specialist_cache=DynamicCache(config=self.specialist.config),
            keys=[None] * n,
            values=[None] * n,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = padding
        labels: torch.Tensor | None = None,  # (B, T), -100 = ignored; shifted inside
        *,
        specialist_mask: torch.Tensor | None = None,  # (B, T) extra limit on what the bridge reads
    ) -> CompositionOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if specialist_mask is None and labels is not None and self.bridge.shape.prompt_only:
            specialist_mask = prompt_mask(labels)
        logits = self.step(input_ids, attention_mask, specialist_mask=specialist_mask)
        loss = next_token_loss(logits, labels) if labels is not None else None
        return CompositionOutput(logits=logits, loss=loss)

    def step(
        self,
        input_ids: torch.Tensor,  # (B, T) the new tokens only when ``state`` holds earlier ones
        attention_mask: torch.Tensor,  # (B, S) over every token so far, S = state.length + T
        *,
        state: DecodeState | None = None,
        logits_to_keep: int = 0,  # 0: all positions; 1: only the last (decoding)
        specialist_mask: torch.Tensor | None = None,  # (B, S)
    ) -> torch.Tensor:
        """One pass over new tokens; updates ``state`` in place when given. Returns logits."""
        past = state.length if state is not None else 0
        if attention_mask.shape[1] != past + input_ids.shape[1]:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} tokens; expected "
                f"{past} cached + {input_ids.shape[1]} new"
            )
        positions = position_ids_from_mask(attention_mask)[:, past:]  # (B, T)
        anchor, _, anchor_layers, _ = self._frozen
        common = {"attention_mask": attention_mask, "position_ids": positions}
        anchor_kwargs: dict[str, Any] = {**common, "use_cache": state is not None}
        if state is not None:
            anchor_kwargs[_cache_kwarg(anchor)] = state.anchor_cache
        registrations = []
        readable = attention_mask if specialist_mask is None else attention_mask * specialist_mask
        read: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None
        if self.bridge_enabled and self.alignment is None:
            keys, values = self.specialist_keys_values(
                input_ids, common, common["position_ids"], state
            )
            device = keys[0].device
            visible = visibility_mask(
                readable.to(device),
                num_queries=input_ids.shape[1],
                query_offset=past,
                causal=self.bridge.shape.causal,
            )  # (B, T, S)
            read = keys, values, visible
        elif self.bridge_enabled:
            read = read_aligned(self, input_ids, attention_mask, readable, state)
        if read is not None:
            keys, values, visible = read
            device = keys[0].device
            blocks_at: dict[int, list[int]] = defaultdict(list)
            for k, (anchor_layer, _) in enumerate(self.bridge.pairs):
                blocks_at[anchor_layer].append(k)
            registrations = [
                (
                    anchor_layers[layer],
                    self._residual_hook(ks, keys, values, visible, positions.to(device)),
                )
                for layer, ks in blocks_at.items()
            ]
        with forward_hooks(registrations):
            out = anchor(input_ids=input_ids, logits_to_keep=logits_to_keep, **anchor_kwargs)
        if state is not None:
            state.attention_mask = attention_mask
        return out.logits

    def specialist_keys_values(
        self,
        input_ids: torch.Tensor,  # (B, N) new specialist tokens
        common: dict[str, torch.Tensor],  # the specialist's attention_mask (B, S), position_ids
        key_positions: torch.Tensor,  # (B, N) positions the bridge's keys are rotated by
        state: DecodeState | None,
        real: torch.Tensor | None = None,  # (B, N) 0 = padding whose states are zeroed
        *,
        cache: Any = None,  # the specialist's cache when not the state's (tails, training)
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the specialist over new tokens and make each block's keys/values from the states
        of its paired layer; appended to the state's per-block caches when ``state`` is given."""
        if cache is None and state is not None:
            cache = state.specialist_cache
        states = self.specialist_states(input_ids, common, real=real, cache=cache)
        return self.block_keys_values(states, key_positions, state)

    def specialist_states(
        self,
        input_ids: torch.Tensor,  # (B, N) new specialist tokens
        common: dict[str, torch.Tensor],  # the specialist's attention_mask, position_ids
        *,
        real: torch.Tensor | None = None,  # (B, N) 0 = padding whose states are zeroed
        cache: Any = None,  # appended to when given
    ) -> list[torch.Tensor]:
        """Run the specialist over new tokens: for each block, the (B, N, d_specialist) states
        of its paired layer, on the bridge's device and dtype."""
        _, specialist, _, specialist_layers = self._frozen
        needed = sorted({s for _, s in self.bridge.pairs})
        captured: dict[int, torch.Tensor] = {}

        def capture(layer: int):  # noqa: ANN202
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                captured[layer] = hidden_of(output)

            return hook

        kwargs: dict[str, Any] = {**common, "use_cache": cache is not None}
        base = specialist.base_model  # skips the LM head: only layer outputs are needed
        if cache is not None:
            kwargs[_cache_kwarg(base)] = cache
        with torch.no_grad(), forward_hooks([(specialist_layers[j], capture(j)) for j in needed]):
            base(input_ids=input_ids, **kwargs)
        device, dtype = self.bridge_device_dtype()
        out = []
        for _, s in self.bridge.pairs:
            states = captured[s].to(device=device, dtype=dtype)  # (B, N, d_specialist)
            if real is not None:  # a padding slot's state may be anything, even NaN
                states = torch.where(real.to(device)[..., None].bool(), states, 0.0)
            out.append(states)
        return out

    def block_keys_values(
        self,
        states: list[torch.Tensor],  # per block (B, N, d_specialist)
        key_positions: torch.Tensor,  # (B, N) positions the bridge's keys are rotated by
        state: DecodeState | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each block's keys/values (B, H, N, hd) of specialist states; appended to the state's
        per-block caches when ``state`` is given (the result is then all of them)."""
        device, _ = self.bridge_device_dtype()
        keys, values = [], []
        for k, (block, block_states) in enumerate(zip(self.bridge.blocks, states, strict=True)):
            new_k, new_v = block.keys_values(block_states, key_positions.to(device))
            if state is not None:
                if state.keys[k] is not None:
                    new_k = torch.cat([state.keys[k], new_k], dim=2)  # (B, H, S, hd)
                    new_v = torch.cat([state.values[k], new_v], dim=2)
                state.keys[k], state.values[k] = new_k, new_v
            keys.append(new_k)
            values.append(new_v)
        return keys, values

    def _residual_hook(
        self,
        block_ids: list[int],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        visible: torch.Tensor,
        positions: torch.Tensor,
    ):  # noqa: ANN202
        blocks = self.bridge.blocks
        device, dtype = self.bridge_device_dtype()

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = hidden_of(output)  # (B, T, d_anchor)
            x = hidden.to(device=device, dtype=dtype)
            delta = blocks[block_ids[0]](
                x, keys[block_ids[0]], values[block_ids[0]], visible, positions
            )
            for k in block_ids[1:]:
                delta = delta + blocks[k](x, keys[k], values[k], visible, positions)
            return with_hidden(output, hidden + delta.to(device=hidden.device, dtype=hidden.dtype))

        return hook

    def bridge_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.bridge.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Co-decode; returns only the new tokens, (B, new). See composer.generate.generate."""
        return generate(self, input_ids, **kwargs)

    def save_bridge(self, path: str, **kwargs: Any) -> None:
        """Write the bridge folder (see :func:`composer.export.save_bridge`)."""
        save_bridge(self, path, **kwargs)


def prompt_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) 1 at the prompt: the positions before a row's first labelled token (pure)."""
    return ((labels != -100).long().cumsum(-1) == 0).long()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t predicting labels[t+1], ignoring -100 (as transformers)."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (B, T-1)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    count = (shift_labels != -100).sum().clamp(min=1)
    return total / count


def freeze(model: nn.Module) -> nn.Module:
    """Frozen and in eval mode: no parameter of a frozen model ever gets a gradient."""
    model.requires_grad_(False)
    model.eval()
    return model


def compose(
    anchor_model: nn.Module,
    specialist_model: nn.Module,
    *,
    bridge_config: BridgeConfig | None = None,
    tokenizer: Any = None,
    specialist_tokenizer: Any = None,
    recipe: CompositionConfig | None = None,
    sources: dict[str, dict[str, Any]] | None = None,
    seed: int | None = None,
) -> Composition:
    """Compose two already-loaded Hugging Face causal LMs.

    With one shared vocabulary (the same tokenizer, or none given and equal vocabulary sizes)
    both models read the same ids. With two different tokenizers (pass both) they read the same
    text, aligned by characters (composer.alignment); the composition is still called with the
    anchor's ids. Both models are frozen (``requires_grad_(False)``, eval mode). The new bridge
    lives on the anchor's input device and is initialised so the composition equals the anchor
    exactly.
    """
    config = bridge_config or (recipe.bridge if recipe else BridgeConfig())
    check_vocabularies(anchor_model, specialist_model, tokenizer, specialist_tokenizer)
    shape = bridge_shape_for(anchor_model.config, specialist_model.config, config)
    # A seed makes the initialisation repeatable without reseeding the caller's global generator.
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        bridge = Bridge(shape, dtype=config.dtype)
    bridge.to(anchor_model.get_input_embeddings().weight.device)
    freeze(anchor_model)
    freeze(specialist_model)
    logger.info(
        "composed: %d blocks, layer pairs %s, %s bridge parameters",
        len(shape.pairs),
        list(shape.pairs),
        f"{bridge.num_parameters():,}",
    )
    return Composition(
        anchor_model,
        specialist_model,
        bridge,
        tokenizer=tokenizer,
        specialist_tokenizer=specialist_tokenizer,
        recipe=recipe,
        sources=sources,
    )


def check_vocabularies(
    anchor: nn.Module,
    specialist: nn.Module,
    tokenizer: Any = None,
    specialist_tokenizer: Any = None,
) -> None:
    """Refuse a pair that can be composed neither on shared ids nor aligned by characters: two
    vocabularies of different sizes with a tokenizer missing."""
    if tokenizer is not None and specialist_tokenizer is not None:
        return  # the same ids, or two tokenizers aligned by characters
    a = model_shape(anchor.config).vocab_size
    s = model_shape(specialist.config).vocab_size
    if a != s:
        raise ConfigError(
            f"the anchor's vocabulary has {a} tokens and the specialist's {s}; pass both "
            "tokenizers (tokenizer= and specialist_tokenizer=) so the two models can read the "
            "same text aligned by characters"
        )
