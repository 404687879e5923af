"""Run composer.train.train in its own process, for the SIGKILL, signal and torchrun tests.

Usage: python tests/train_helper.py RECIPE OUTPUT [--slow SECONDS]
``--slow`` sleeps before every composed forward (numerics unchanged), so that a test can kill
the process between two checkpoints. Exit status: 0 finished, 3 stopped, 1 failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from composer.composition import Composition  # noqa: E402
from composer.train import TrainingStopped, train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("output")
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.slow:
        forward = Composition.forward

        def slow_forward(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            time.sleep(args.slow)
            return forward(self, *a, **k)

        Composition.forward = slow_forward
    try:
        train(args.recipe, output_dir=args.output)
    except TrainingStopped:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
