"""Every script in benchmarks/ runs to the end in its tiny mode, so none can rot unnoticed.

Each script must accept ``--tiny``: the whole script at toy size in well under a minute, on the
CPU when there is no GPU, writing nothing into docs/. A new script is picked up by the glob; one
without ``--tiny`` fails here with that said.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
TINY = "--tiny"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_runs_in_tiny_mode(script, tmp_path):
    assert TINY in script.read_text(encoding="utf-8"), (
        f"{script.name} has no {TINY} mode; add one (toy sizes, seconds, nothing written) so CI "
        "can run it"
    )
    docs = REPO / "docs" / "BENCHMARKS.md"
    before = docs.read_bytes() if docs.exists() else None
    result = subprocess.run(
        [sys.executable, str(script), TINY],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, f"{script.name} --tiny failed:\n{result.stderr[-4000:]}"
    assert result.stdout.strip(), f"{script.name} --tiny printed nothing"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    after = docs.read_bytes() if docs.exists() else None
    assert after == before, f"{script.name} --tiny wrote into docs/BENCHMARKS.md"
