"""launch.py: loopback by default, a free port when the asked one is taken, serving quickly,
and the app module imports neither torch nor transformers (they load when a model is needed)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import launch
from tests.test_app_support import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_loopback_detection():
    assert launch.is_loopback("127.0.0.1") and launch.is_loopback("localhost")
    assert launch.is_loopback("::1") and launch.is_loopback("127.0.0.2")
    assert not launch.is_loopback("0.0.0.0") and not launch.is_loopback("192.168.1.5")


def test_a_taken_port_gives_the_next_free_one(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        chosen = launch.choose_port("127.0.0.1", port)
        assert chosen != port and port < chosen < port + launch.PORT_TRIES
        assert f"port {port} is taken; using {chosen}" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="all taken"):
            launch.choose_port("127.0.0.1", port, tries=1)


def test_the_app_imports_no_torch():
    code = (
        "import sys; from app.main import build_app; build_app(runs_dir=sys.argv[1]); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "/tmp/calm-no-runs"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.stdout.split()[-2:] == ["False", "False"], out.stderr


@pytest.mark.slow
def test_launch_serves_on_loopback_and_warns_for_other_hosts(tmp_path):
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [
            sys.executable,
            "launch.py",
            "--no-browser",
            "--port",
            str(port),
            "--runs",
            str(tmp_path / "runs"),
            "--presets",
            str(tmp_path / "none"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while time.monotonic() - started < 60:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as page:
                    assert page.status == 200
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.2)
        elapsed = time.monotonic() - started
        print(f"launch.py served after {elapsed:.1f} s")
        assert elapsed < 60
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_exposing_the_app_needs_a_flag_and_warns():
    args = launch.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.share is False
    assert launch.exposure_warnings(args.host, share=False) == []
    (warning,) = launch.exposure_warnings("0.0.0.0", share=False)
    assert warning.startswith("binding 0.0.0.0: anyone who can reach this machine")
    assert "public link" in launch.exposure_warnings("127.0.0.1", share=True)[0]
