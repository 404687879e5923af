"""Which addresses stay on this machine, and what to tell the user when a server binds another.

Shared by the app (launch.py) and the OpenAI-compatible server (composer.serve): one rule, one
wording.
"""

from __future__ import annotations

import ipaddress
import socket

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, *, reach: str) -> str | None:
    """The warning for binding ``host`` (None on loopback); ``reach`` says what others could do,
    e.g. "use the app, read files and start training"."""
    if is_loopback(host):
        return None
    return (
        f"binding {host}: anyone who can reach this machine can {reach}. Use the default "
        "127.0.0.1 unless you mean it."
    )


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
