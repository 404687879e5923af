"""Write the default preset's data (presets/data/kv-arithmetic-*.jsonl) from the seed.

Usage: python scripts/kv_preset_data.py [--seed 0]
Training rows are what `calm-composer repro kv` trains its worked bridge on (held-in keys only,
plus 20% NUM-MATH); held-out rows are its KV-MATH evaluation expressions (held-out keys only),
written in the worked form "ab+cde=" -> "210+543=7530".
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from composer.repro import kv_data as kv
from composer.repro.kv import KVSettings, bridge_rows, eval_sets, make_task

OUT = Path(__file__).resolve().parents[1] / "presets" / "data"


def main(seed: int) -> None:
    settings = replace(KVSettings(), seed=seed)
    task = make_task(settings)
    train = bridge_rows(
        task, "worked", count=settings.train_rows, num_math_share=settings.num_math_share, seed=seed
    )
    held_out = [
        kv.answer_prompt(task, row["prompt"], "worked")
        for row in eval_sets(task, settings)["KV-MATH"]
    ]
    for name, rows in (("train", train), ("heldout", held_out)):
        path = OUT / f"kv-arithmetic-{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args().seed)
