"""Start the calm-composer app: `python launch.py [--host 127.0.0.1] [--port 7860]`.

Binds the loopback address unless ``--host`` says otherwise (with a warning), opens the browser
unless ``--no-browser``, and takes the next free port when the requested one is taken. Heavy
libraries (torch, transformers) load only when a model is first needed, so the page is up in a
few seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys

from composer.network import (  # noqa: F401 (launch.is_loopback stays importable)
    exposure_warning,
    is_loopback,
    port_is_free,
)

PORT_TRIES = 20  # the requested port and the next 19
MAX_UPLOAD = "2gb"  # bounds what one request can make the server store


def choose_port(host: str, port: int, *, tries: int = PORT_TRIES) -> int:
    """``port`` if free, else the next free one (saying so); SystemExit when none is."""
    for candidate in range(port, port + tries):
        if port_is_free(host, candidate):
            if candidate != port:
                print(f"calm-composer: port {port} is taken; using {candidate} instead")
            return candidate
    raise SystemExit(
        f"calm-composer: ports {port}-{port + tries - 1} on {host} are all taken; "
        "free one or pass --port"
    )


def exposure_warnings(host: str, *, share: bool) -> list[str]:
    """What to tell the user when the app is reachable from other machines."""
    exposed = exposure_warning(host, reach="use the app, read files and start training")
    warnings = [exposed] if exposed else []
    if share:
        warnings.append(
            "--share creates a public link; anyone with it can use the app on this machine."
        )
    return warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Start the calm-composer app.")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the app "
        "to your network, with a warning)",
    )
    parser.add_argument("--port", type=int, default=7860, help="default 7860, or the next free")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    parser.add_argument(
        "--share",
        action="store_true",
        help="also create a public gradio.live link (off by default; anyone with it can use "
        "the app)",
    )
    parser.add_argument("--presets", help="presets folder (default: presets/)")
    parser.add_argument("--runs", help="training runs folder (default: runs/)")
    parser.add_argument("--models", help="folder searched for local models (default: models/)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for warning in exposure_warnings(args.host, share=args.share):
        print(f"calm-composer: WARNING: {warning}", file=sys.stderr)
    port = choose_port(args.host, args.port)

    from app.main import build_app  # imports gradio (a few seconds), not torch

    demo = build_app(presets_dir=args.presets, runs_dir=args.runs, models_dir=args.models)
    try:
        demo.queue().launch(
            server_name=args.host,
            server_port=port,
            inbrowser=not args.no_browser,
            share=args.share,
            show_error=True,
            # Uploads (data files, bridge archives) above this are refused by Gradio with a
            # message; a larger data file can still be named by its path in the Data tab.
            max_file_size=MAX_UPLOAD,
            footer_links=["api", "gradio"],
        )
    finally:
        for name in demo.calm_session.close(stop_runs=False):
            print(
                f"calm-composer: training run {name} goes on in the background; start the app "
                "again to follow or stop it"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
