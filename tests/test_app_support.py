"""Shared builders for the app tests (no tests here): a pico preset folder and a free port.

The preset is what the app's default preset is at CPU size: two pico models with the character
tokenizer (saved as real folders), a small prompt/completion JSONL file with one bad row, and a
YAML file marked ``default: true`` whose paths are relative to it.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

BAD_ROW = 7  # 1-based row of the data file that has no completion


def make_pico_preset(root: Path, *, default: bool = True, max_steps: int = 40) -> Path:
    """Write ``root/presets/pico.yaml`` with models and data beside it; returns the folder."""
    from composer.chartok import build_char_tokenizer
    from tests.conftest import pico_llama, pico_qwen2

    presets = root / "presets"
    models = presets / "models"
    tokenizer = build_char_tokenizer()
    for name, model in (
        ("anchor", pico_llama(vocab_size=len(tokenizer))),
        ("specialist", pico_qwen2(vocab_size=len(tokenizer))),
    ):
        model.save_pretrained(models / name)
        tokenizer.save_pretrained(models / name)
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    rows[BAD_ROW - 1] = {"prompt": "1+1="}
    data = presets / "data" / "sums.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "Pico sums",
        "description": "Two pico models with a character tokenizer, for tests.",
        "expect": "loss goes down within a few dozen steps",
        "default": default,
        "anchor": {"model": "models/anchor"},
        "specialist": {"model": "models/specialist"},
        "bridge": {"every": 2, "num_heads": 2, "head_dim": 16},
        "generation": {"max_new_tokens": 8},
        "training": {
            "max_steps": max_steps,
            "batch_size": 4,
            "lr": 1e-3,
            "max_length": 32,
            "logging_every": 2,
            "save_every": 20,
        },
        "data": {"train": "data/sums.jsonl", "eval_fraction": 0.1},
    }
    (presets / "pico.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return presets


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served_pico_app(root: Path) -> Iterator[Any]:
    """The app over a pico preset in ``root``, served on a free loopback port; closed on exit."""
    from app.main import build_app

    presets = make_pico_preset(root, max_steps=400)
    demo = build_app(
        presets_dir=presets,
        runs_dir=root / "runs",
        models_dir=presets / "models",
        poll_seconds=0.5,
    )
    demo.queue().launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        yield demo
    finally:
        demo.calm_session.close()
        demo.close()
