"""The user's cache: GGUF models converted once, so later loads map safetensors instead.

Loading a GGUF file dequantises every tensor (minutes for a 1.5B model on a small CPU). The first
load stores the result as a Hugging Face folder (config, model.safetensors, tokenizer) under
``<cache>/gguf/<sha256 of the GGUF>-<dtype>/``; every later load of the same file in the same
dtype reads that folder (safetensors maps the file; nothing is converted). The GGUF's sha256
is remembered per (path, size, mtime) in ``<cache>/hashes.json``, so it is computed once too.

Where: ``$CALM_COMPOSER_CACHE`` if set, else ``$XDG_CACHE_HOME/calm-composer``, else
``~/.cache/calm-composer`` (as huggingface_hub keeps ``~/.cache/huggingface``). Setting
``CALM_COMPOSER_CACHE=off`` turns the conversion cache off. `calm-composer cache` shows the size
and place; `calm-composer cache --clear` empties it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.atomic import write_folder_atomically, write_json_atomically

logger = logging.getLogger(__name__)

VARIABLE = "CALM_COMPOSER_CACHE"  # another cache folder, or "off"
GGUF = "gguf"  # converted GGUF models: gguf/<sha256>-<dtype>/
HASHES = "hashes.json"  # "path|size|mtime_ns" -> sha256
META = "calm_composer_source.json"  # in each converted folder: what it was made from
WEIGHTS = "model.safetensors"
REMEMBER_FROM = 50_000_000  # bytes: files this big have their sha256 remembered on disk
_HASH_LOCK = threading.Lock()


def cache_root(environ: dict[str, str] | None = None) -> Path | None:
    """The cache folder (see the module), or None when ``CALM_COMPOSER_CACHE=off`` (pure)."""
    env = os.environ if environ is None else environ
    chosen = env.get(VARIABLE, "").strip()
    if chosen.lower() in ("off", "0", "none", "false"):
        return None
    if chosen:
        return Path(os.path.expanduser(chosen))
    base = env.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "calm-composer"


def converted_name(sha256: str, dtype: str) -> str:
    """The folder name of a GGUF file's converted copy in one dtype (pure)."""
    return f"{sha256}-{dtype.removeprefix('torch.')}"


@functools.lru_cache(maxsize=64)
def _hash_file(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime): in this process, and on disk in the
    cache (so a 1 GB GGUF is hashed once, not at every start)."""
    path = Path(path).resolve()
    stat = path.stat()
    if stat.st_size < REMEMBER_FROM:  # hashing it costs less than remembering it
        return _hash_file(str(path), stat.st_size, stat.st_mtime_ns)
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    root = cache_root()
    known = _read_hashes(root) if root is not None else {}
    if key in known:
        return known[key]
    start = time.perf_counter()
    sha = _hash_file(str(path), stat.st_size, stat.st_mtime_ns)
    logger.info("sha256 of %s: %.1f s (remembered)", path.name, time.perf_counter() - start)
    if root is not None:
        with _HASH_LOCK:
            hashes = _read_hashes(root)
            hashes[key] = sha
            try:
                write_json_atomically(root / HASHES, hashes)
            except OSError as exc:  # a read-only cache only costs time
                logger.warning("could not remember the hash in %s: %s", root, exc)
    return sha


def _read_hashes(root: Path) -> dict[str, str]:
    try:
        data = json.loads((root / HASHES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def converted_folder(sha256: str, dtype: str) -> Path | None:
    """The complete converted copy of a GGUF file in ``dtype``, or None (not made, or off)."""
    root = cache_root()
    if root is None:
        return None
    folder = root / GGUF / converted_name(sha256, dtype)
    complete = all((folder / name).is_file() for name in ("config.json", WEIGHTS, META))
    return folder if complete else None


def store_converted(
    model: Any, tokenizer: Any, *, sha256: str, dtype: str, source: str
) -> Path | None:
    """Write a GGUF-loaded model (and its tokenizer) as a Hugging Face folder in the cache.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights go through
    safetensors directly (an output head tied to the embeddings is stored once, as
    ``save_pretrained`` does). Returns the folder, or None when the cache is off or unwritable
    (the model loaded anyway; the next load converts again).
    """
    from safetensors.torch import save_file

    root = cache_root()
    if root is None:
        return None
    target = root / GGUF / converted_name(sha256, dtype)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr():
        for name, module in model.named_modules():  # tied: stored once, retied on load
            if module is head:
                tensors.pop(f"{name}.weight", None)

    def write(folder: Path) -> None:
        model.config.save_pretrained(folder)
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        meta = {"source": source, "sha256": sha256, "dtype": dtype, "created": time.time()}
        (folder / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    start = time.perf_counter()
    try:
        write_folder_atomically(target, write)
    except OSError as exc:
        logger.warning("could not store a converted copy of %s in %s: %s", source, root, exc)
        return None
    logger.info(
        "stored a converted copy of %s in %s (%.1f s); later loads map it",
        Path(source).name,
        target,
        time.perf_counter() - start,
    )
    return target


@dataclass(frozen=True)
class CacheEntry:
    folder: Path
    size_bytes: int
    source: str
    dtype: str


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def entries() -> list[CacheEntry]:
    """The converted models in the cache, largest first."""
    root = cache_root()
    if root is None or not (root / GGUF).is_dir():
        return []
    out = []
    for folder in (root / GGUF).iterdir():
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        out.append(
            CacheEntry(
                folder, _folder_size(folder), meta.get("source", "?"), meta.get("dtype", "?")
            )
        )
    return sorted(out, key=lambda e: -e.size_bytes)


def describe() -> str:
    """One line: where the cache is, how big, and how to clear it."""
    root = cache_root()
    if root is None:
        return f"model cache: off ({VARIABLE}=off)"
    found = entries()
    size = _folder_size(root) if root.is_dir() else 0
    return (
        f"model cache: {root} ({size / 1e9:.2f} GB, {len(found)} converted GGUF model(s)); "
        f"clear it with `calm-composer cache --clear`; move it with {VARIABLE}=folder"
    )


def clear() -> int:
    """Delete everything in the cache; returns the bytes freed."""
    root = cache_root()
    if root is None or not root.is_dir():
        return 0
    size = _folder_size(root)
    shutil.rmtree(root)
    _hash_file.cache_clear()
    return size
