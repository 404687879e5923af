"""One GGUF model in llama.cpp (llama-cpp-python's low-level API), with a hook point per layer.

Its own context and KV cache (one sequence). During ``watching(handlers)``, llama.cpp's
``cb_eval`` callback hands the output of each watched layer (graph node ``l_out-{layer}``, the
residual stream after that layer) to a handler as soon as it is computed and before the next
layer runs; the handler may read it and write a replacement (``ggml_backend_tensor_get/set``).
A ctypes callback cannot raise: an error inside a handler stops the graph, and ``decode`` raises
it after restoring the cache.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from composer.config import ConfigError

logger = logging.getLogger(__name__)

_GGML_TYPE_F32 = 0


class _GGMLTensor(ctypes.Structure):
    """The head of ggml.h's ``struct ggml_tensor`` (fields up to ``name``; layout of ggml 0.9+)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


_NAME_OFFSET = _GGMLTensor.name.offset


@dataclass(frozen=True)
class _GGML:
    get: Callable[..., None]  # ggml_backend_tensor_get(tensor, dst, offset, size)
    set: Callable[..., None]  # ggml_backend_tensor_set(tensor, src, offset, size)


@functools.cache
def _ggml_functions() -> _GGML:
    """ggml's tensor copy functions (from the libggml-base llama-cpp-python ships), bound once."""
    import llama_cpp
    import llama_cpp._ctypes_extensions as ctypes_ext

    base = ctypes_ext.load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    for name in ("ggml_backend_tensor_get", "ggml_backend_tensor_set"):
        function = getattr(base, name)
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        function.restype = None
    llama_cpp.llama_backend_init()
    # llama.cpp logs every load to stderr unless its logger is raised above INFO.
    if not logger.isEnabledFor(logging.DEBUG):
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return _GGML(get=base.ggml_backend_tensor_get, set=base.ggml_backend_tensor_set)


@dataclass
class LayerOutput:
    """A connected layer's output inside llama.cpp's graph, while the callback runs."""

    layer: int
    tensor: int  # struct ggml_tensor *
    positions: torch.Tensor  # (rows,) token position of each row
    width: int

    def read(self) -> torch.Tensor:
        """(rows, width) float32 copy of the layer output."""
        out = torch.empty(len(self.positions), self.width, dtype=torch.float32)
        _ggml_functions().get(self.tensor, out.data_ptr(), 0, out.numel() * 4)
        return out

    def write(self, values: torch.Tensor) -> None:
        """Replace the layer output (the next layer reads what is written here)."""
        values = values.to(torch.float32).contiguous()
        assert values.shape == (len(self.positions), self.width), values.shape
        _ggml_functions().set(self.tensor, values.data_ptr(), 0, values.numel() * 4)


LayerHandler = Callable[[LayerOutput], bool]  # returns False to stop computing the graph


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class LlamaCppModel:
    """One GGUF file in llama.cpp: its own context and KV cache (one sequence), and a hook point.

    ``decode`` appends tokens to the cache; ``watching`` routes chosen layers' outputs to
    handlers for the duration of a ``with`` block; ``truncate`` forgets cached tokens.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int = 4096,
        n_batch: int = 256,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
    ) -> None:
        import llama_cpp

        _ggml_functions()
        self.path = Path(path)
        self.config: Any = None  # the transformers config, its context limited to n_ctx (loader)
        self._model = self._ctx = self._batch = None
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise ConfigError(
                f"llama.cpp could not load {str(self.path)!r}; check that it is a complete GGUF "
                "file of an architecture this llama-cpp-python supports"
            )
        self.width = llama_cpp.llama_model_n_embd(self._model)
        self.num_layers = llama_cpp.llama_model_n_layer(self._model)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(
            llama_cpp.llama_model_get_vocab(self._model)
        )
        self.n_ctx, self.n_batch = n_ctx, n_batch
        threads = n_threads or default_threads()
        # Kept on self: llama.cpp holds only a C pointer to this Python callable.
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.cb_eval = self._callback
        params.cb_eval_user_data = None
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            self.close()
            raise ConfigError(
                f"llama.cpp could not create a context of {n_ctx} tokens for {self.path.name}; "
                "try a smaller context"
            )
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.length = 0  # tokens in the KV cache, positions 0 .. length - 1
        self._watch: dict[bytes, int] = {}  # b"l_out-{i}" -> i
        self._handlers: dict[int, LayerHandler] = {}
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # chunk and output positions
        self._error: BaseException | None = None
        self.seen: set[int] = set()  # layers whose output the last decode passed to a handler

    # The callback runs for every graph node (about 35 per layer): keep the "ask" path cheap.
    def _on_tensor(self, tensor: int, ask: bool, _user_data: Any) -> bool:
        layer = self._watch.get(ctypes.string_at(tensor + _NAME_OFFSET)) if self._watch else None
        if ask:
            return layer is not None
        try:
            view = self._layer_output(layer, tensor)
            self.seen.add(layer)
            return bool(self._handlers[layer](view))
        except BaseException as exc:  # a ctypes callback cannot raise: keep it for decode()
            self._error = exc
            return False  # stop computing this graph

    def _layer_output(self, layer: int, tensor: int) -> LayerOutput:
        head = _GGMLTensor.from_address(tensor)
        rows, width = head.ne[1], head.ne[0]
        if head.type != _GGML_TYPE_F32 or head.nb[1] != width * 4 or head.ne[2] != 1:
            raise ConfigError(
                f"llama.cpp's l_out-{layer} of {self.path.name} is not a contiguous float32 "
                f"(tokens, width) tensor (type {head.type}); this build cannot host a bridge"
            )
        chunk, outputs = self._rows
        # The last layer keeps only the rows whose logits were asked for (llama.cpp skips the rest).
        positions = chunk if rows == len(chunk) else outputs
        if rows != len(positions) or width != self.width:
            raise ConfigError(
                f"llama.cpp's l_out-{layer} of {self.path.name} is ({rows}, {width}); expected "
                f"({len(chunk)}, {self.width})"
            )
        return LayerOutput(layer=layer, tensor=tensor, positions=positions, width=width)

    @contextmanager
    def watching(self, handlers: Mapping[int, LayerHandler]) -> Iterator[None]:
        """Pass layer i's output to ``handlers[i]`` during decodes inside the block only."""
        for layer in handlers:
            if not 0 <= layer < self.num_layers:
                raise ConfigError(
                    f"layer {layer} does not exist in {self.path.name} ({self.num_layers} layers, "
                    "counted from 0)"
                )
        self._watch = {f"l_out-{layer}".encode(): layer for layer in handlers}
        self._handlers = dict(handlers)
        try:
            yield
        finally:
            self._watch, self._handlers, self._error = {}, {}, None

    def decode(self, tokens: Sequence[int], *, logits: str = "last") -> torch.Tensor:
        """Append ``tokens`` to the cache, in chunks of ``n_batch``; returns float32 logits.

        ``logits``: "last" gives (1, vocab) for the final token, "all" gives (T, vocab).
        On any error the cache is as before the call.
        """
        import llama_cpp

        start = self.length
        if start + len(tokens) > self.n_ctx:
            raise ConfigError(
                f"{start + len(tokens)} tokens do not fit the llama.cpp context of {self.n_ctx} "
                "tokens; shorten the prompt or lower max_new_tokens"
            )
        rows: list[torch.Tensor] = []
        self.seen = set()
        try:
            for c0 in range(0, len(tokens), self.n_batch):
                chunk = tokens[c0 : c0 + self.n_batch]
                final = c0 + len(chunk) == len(tokens)
                wanted = [
                    logits == "all" or (final and i == len(chunk) - 1) for i in range(len(chunk))
                ]
                batch = self._batch
                for i, token in enumerate(chunk):
                    batch.token[i] = int(token)
                    batch.pos[i] = start + c0 + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = wanted[i]
                batch.n_tokens = len(chunk)
                positions = torch.arange(start + c0, start + c0 + len(chunk))
                self._rows = (positions, positions[torch.tensor(wanted)])
                code = llama_cpp.llama_decode(self._ctx, batch)
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if code != 0:
                    raise RuntimeError(f"llama_decode failed on {self.path.name} (code {code})")
                self.length = start + c0 + len(chunk)
                n_out = sum(wanted)
                if n_out:
                    pointer = llama_cpp.llama_get_logits(self._ctx)
                    flat = (ctypes.c_float * (n_out * self.vocab_size)).from_address(
                        ctypes.addressof(pointer.contents)
                    )
                    rows.append(
                        torch.frombuffer(flat, dtype=torch.float32)
                        .view(n_out, self.vocab_size)
                        .clone()
                    )
        except BaseException:
            self.truncate(start)
            raise
        finally:
            self._rows = None
        return torch.cat(rows) if rows else torch.empty(0, self.vocab_size)

    def truncate(self, length: int = 0) -> None:
        """Forget cached tokens from position ``length`` on."""
        import llama_cpp

        if length == 0:
            llama_cpp.llama_memory_clear(self._memory, True)
        else:
            llama_cpp.llama_memory_seq_rm(self._memory, -1, length, -1)
        self.length = length

    def cached_positions(self) -> int:
        """How many positions llama.cpp's KV cache holds (from llama.cpp itself, for tests)."""
        import llama_cpp

        return llama_cpp.llama_memory_seq_pos_max(self._memory, 0) + 1

    def close(self) -> None:
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass
