"""Forward hooks that exist only inside a ``with`` block (trap 4: hooks that leak)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Hook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


@contextmanager
def forward_hooks(registrations: Sequence[tuple[nn.Module, Hook]]) -> Iterator[None]:
    """Attach each (module, hook) pair for the block's duration; always detach, even on error."""
    handles = []
    try:
        for module, hook in registrations:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_of(output: Any) -> torch.Tensor:
    """Hidden states from a decoder layer's output (a Tensor in transformers 5, a tuple before)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced, keeping its container type."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])
