"""``btmm lab --scenario NAME`` as a user runs it, for the cases issue 13 is about: both hosts
behind one gateway that does not hairpin, gateways that map nothing, and a laptop that walks
into the desktop's home mid-transfer. Each run pings by name and checks a TCP transfer by
SHA-256; fast/fast and fast/python (``--dataplane mixed``: python on the laptop)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]

# the path each scenario's tunnel settles on (``path`` in ``btmm status --json``)
PATHS = {"same-home": "lan", "no-mapping": "punched", "roam-home": "lan"}


def _lab(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "btmm_core", "lab", *args, "--megabytes", "10"],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    prefix = re.search(r"namespaces (btmmlab[0-9a-f]+)-\*", out)
    assert prefix is not None
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix.group(1) not in left
    assert not list(Path("/etc/netns").glob(f"{prefix.group(1)}-*"))
    return out


@pytest.mark.parametrize("dataplane", ["fast", "mixed"])
@pytest.mark.parametrize("scenario", ["same-home", "no-mapping", "roam-home"])
def test_scenario_pings_by_name_and_transfers(scenario: str, dataplane: str) -> None:
    out = _lab("--scenario", scenario, "--dataplane", dataplane)
    assert re.search(r"first ping by name answered after [\d.]+ s", out), out
    assert "10 MB to fd" in out
    assert "DIFFERS" not in out
    assert out.count("SHA-256 matches") == (2 if scenario == "roam-home" else 1), out
    # the path in use, as `btmm status` reports it, on both hosts (after the move, roam-home)
    paths = re.findall(r"path (desktop|laptop) -> \w+: (\w+)", out)
    assert paths[-2:] and {p for _, p in paths[-2:]} == {PATHS[scenario]}, out
    if scenario == "roam-home":
        assert "the same TCP connection finished" in out
        assert "laptop now on 192.168.1.11 behind gw1" in out
