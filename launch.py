"""Start the calm-composer app: `python launch.py [--host 127.0.0.1] [--port 7860]`.

The browser app is not built yet (see the open issue "The app"); until it lands this prints
how to use the library and the command line instead.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start the calm-composer app.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--no-browser", action="store_true")
    parser.parse_args(argv)
    print(
        "calm-composer: the browser app is not built yet.\n"
        "Use the command line meanwhile:\n"
        "  .venv/bin/calm-composer info RECIPE.yaml\n"
        "  .venv/bin/calm-composer generate RECIPE.yaml --bridge DIR --prompt TEXT\n"
        "or the Python API (see README.md)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
