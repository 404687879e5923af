"""Write a small Llama-architecture transformers model as a GGUF file, so that the llama.cpp
engine can run it (the key-value preset's models, models trained with ``repro kv``).

Only what llama.cpp's ``llama`` architecture reads: float32 tensors under llama.cpp's names (the
``gguf`` package's own name map), the hyperparameters, and the vocabulary in token-id order with
its special tokens. llama.cpp applies rotary embeddings to adjacent pairs of each head's
dimensions, transformers' Llama to its two halves: the query and key rows are reordered so that
both compute the same attention (transformers' GGUF loader undoes exactly this, which the tests
use to check a round trip). Quantising is llama.cpp's job (``llama-quantize``), not ours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from composer.config import ConfigError, ModelSpec

SPECIAL = ("pad", "bos", "eos", "unk")


def halves_to_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query/key projection, (heads * head_dim, d), from transformers' rotary layout
    (dimension i paired with i + head_dim/2) to llama.cpp's (2i paired with 2i + 1)."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def _check_supported(config: Any) -> None:
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"model_type is {getattr(config, 'model_type', None)!r}, not 'llama'")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type is {rope.get('rope_type')!r}, not 'default'")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            problems.append(f"{flag} is on")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config.hidden_act!r}, not 'silu'")
    if problems:
        raise ConfigError(
            "write_gguf writes plain Llama models only: " + "; ".join(problems) + ". Use "
            "llama.cpp's convert_hf_to_gguf.py for other architectures"
        )


def write_gguf(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The transformers Llama model in ``folder`` as a float32 GGUF file at ``path``."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from composer.loading import locate

    # the loader's own lookup: a missing folder or config.json is named the same way
    location = locate(ModelSpec(model=str(folder)))
    if location.gguf_file:
        raise ConfigError(f"{folder} is already a GGUF file; give the transformers model folder")
    folder, path = location.folder, Path(path)
    config = AutoConfig.from_pretrained(folder)
    _check_supported(config)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(
            f"{weights} is missing; write_gguf reads one unsharded model.safetensors (save the "
            "model with save_pretrained(..., max_shard_size='100GB'))"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # The vocabulary in id order; llama.cpp needs it to load, our engines tokenize with the
    # transformers tokenizer (the recipe names the folder as the model's `tokenizer`).
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    if [index for _, index in vocab] != list(range(config.vocab_size)):
        raise ConfigError(
            f"the tokenizer in {folder} has {len(vocab)} tokens with gaps or extra ids for a "
            f"vocab_size of {config.vocab_size}; write_gguf needs ids 0..vocab_size-1"
        )
    tensors = load_file(weights)  # torch, not numpy: numpy has no bfloat16
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    # Written beside the target and renamed at the end: a failure leaves no truncated GGUF.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch="llama")
    writer.add_name(folder.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((config.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    special_ids = {getattr(tokenizer, f"{name}_token_id", None) for name in SPECIAL}
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if index in special_ids else gguf.TokenType.NORMAL
            for _, index in vocab
        ]
    )
    for name in SPECIAL:
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(False)  # the callers put BOS first themselves

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, value in tensors.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd for a missing output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise ConfigError(f"{folder}: no GGUF name for tensor {hf_name!r}")
        value = value.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            value = halves_to_pairs(value, heads)
        elif hf_name.endswith("k_proj.weight"):
            value = halves_to_pairs(value, kv_heads)
        writer.add_tensor(name, np.ascontiguousarray(value))

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
