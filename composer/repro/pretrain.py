"""Train the experiment's small anchor and specialist from scratch (plain next-token loss).

These are the frozen models of the key-value experiment, not bridges: a short AdamW loop over
freshly sampled rows (an endless stream, so nothing is memorised but the key-value map itself).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

from composer.batches import collate
from composer.data import encode
from composer.hardware import flushed_denormals
from composer.pacing import Pacer

logger = logging.getLogger(__name__)

Rows = list[dict[str, str]]


def small_llama(
    *, vocab_size: int, width: int, layers: int, heads: int, seed: int, tie_embeddings: bool = True
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie_embeddings,
    )
    return LlamaForCausalLM(config)


def batch_of(rows: Rows, tokenizer: Any, *, max_length: int = 64) -> dict[str, torch.Tensor]:
    examples = [encode(r, "prompt_completion", tokenizer, max_length=max_length) for r in rows]
    return collate(examples, pad_token_id=tokenizer.pad_token_id)


def train_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    sample: Callable[[random.Random, int], Rows],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 100,
    on_log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW with warmup + cosine decay; returns the logged losses."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=min(100, steps // 10), num_training_steps=steps
    )
    losses, running = [], 0.0
    pacer, since = Pacer(total=steps), 0  # a progress line at least every 10 s
    on_cpu = next(model.parameters()).device.type == "cpu"
    with flushed_denormals(enabled=on_cpu):  # as train() does: late steps stay as fast
        for step in range(1, steps + 1):
            batch = batch_of(sample(rng, batch_size), tokenizer)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            since += 1
            if step % log_every == 0:
                losses.append(running / log_every)
                if on_log is not None:
                    on_log(step, losses[-1])
            if pacer.due(step) or step % log_every == 0:
                logger.info("step %s, loss %.4f", pacer.status(step), running / since)
            if step % log_every == 0:
                running, since = 0.0, 0
    model.eval()
    return losses
