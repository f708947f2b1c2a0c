"""``btmm_core/_fast.pyi`` tells the truth about the built extension: mypy's stubtest compares
every name, signature and property of the stub with the module as built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_stub_matches_the_built_extension() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "btmm_core._fast"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
