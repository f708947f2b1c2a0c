"""``btmm lab`` itself, as a user runs it: the whole world, a transfer, roaming, teardown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]


def test_btmm_lab_roam_runs_and_cleans_up() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "btmm_core", "lab", "--dataplane", "mixed", "--roam",
         "--megabytes", "10"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert re.search(r"tunnels up [\d.]+ s after", out)
    assert out.count("$ btmm status") == 4  # both hosts, before and after roaming
    assert "10 MB to fd" in out
    assert re.search(r"[1-9]\d* Mbit/s, [1-9]\d* packets/s", out), out
    assert "the same TCP connection finished" in out
    assert out.count("SHA-256 matches") == 2 and "DIFFERS" not in out
    # the laptop walked into the desktop's home: the desktop now reaches it on the LAN
    assert "laptop now on 192.168.1.11 behind gw1" in out
    assert "path desktop -> laptop: lan 192.168.1.11:4500" in out
    # the laptop lists the desktop's service (wide-area DNS-SD through the registry)
    browsed = "  desktop._ssh._tcp  desktop.bob.members.example:22  u=root\n"
    assert "$ btmm browse\n" + browsed in out, out
    # it ends with ssh by name, no password: the desktop's own sshd answers `hostname`
    assert re.search(r"ssh root@desktop\.bob\.members\.example hostname .*\n  desktop\n", out), out
    assert "user certs: root 9h" in out
    prefix = re.search(r"namespaces (btmmlab[0-9a-f]+)-\*", out)
    assert prefix is not None
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix.group(1) not in left
    assert not list(Path("/etc/netns").glob(f"{prefix.group(1)}-*"))
