"""``btmm netcheck --stun`` behind a real nftables NAT, against the real ``btmm serve`` STUN
responder on two ports, in namespaces (``btmm_core.lab.nat``'s home network, no miniupnpd).

Linux's plain ``masquerade`` keeps a connection's source port when it is free, and a second
destination from the same socket is a new conntrack entry that may reuse it (the reply tuples
differ): endpoint-independent mapping. ``masquerade fully-random`` picks a fresh random port for
every new connection, i.e. for every destination: a NAT whose mapping depends on the
destination. Both verdicts are checked, and a server that does not answer.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from btmm_core.lab.nat import GATEWAY_WAN, WAN_HOST, HomeNetwork, build_home_network
from btmm_core.lab.netns import Lab, Netns

pytestmark = pytest.mark.netns

# The lab's own STUN responder (for miniupnpd) holds 3478/3479 on the WAN host.
PORT, ALT = 3480, 3481


def _wait_listening(ns: Netns, port: int, proc_log: Path, wait: float = 20.0) -> None:
    deadline = time.monotonic() + wait
    while ns.run(["ss", "-Hlnu", f"sport = :{port}"]).stdout.strip() == "":
        assert time.monotonic() < deadline, f"btmm serve not on UDP {port}: {proc_log.read_text()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def net() -> Iterator[HomeNetwork]:
    with Lab("stun") as lab, tempfile.TemporaryDirectory(prefix="btmm-stun-") as state:
        net = build_home_network(lab, miniupnpd=None)
        log = Path(state) / "serve.log"
        with open(log, "wb") as out:
            net.wan.popen([sys.executable, "-m", "btmm_core", "serve", "--domain",
                           "members.example", "--state-dir", state, "--listen", WAN_HOST,
                           "--port", "53", "--tls-port", "0", "--stun-port", str(PORT),
                           "--stun-alt-port", str(ALT), "--event-loop", "asyncio"],
                          stdout=out, stderr=out)
        _wait_listening(net.wan, ALT, log)
        yield net


def _netcheck(ns: Netns, spec: str) -> tuple[int, dict[str, Any]]:
    proc = ns.run([sys.executable, "-m", "btmm_core", "netcheck", "--stun", spec, "--stun-only",
                   "--json"], check=False, timeout=60)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)["stun"]


def _masquerade(net: HomeNetwork, how: str) -> None:
    gw = net.gateway
    gw.ns.run(["nft", "flush", "chain", "inet", "nat", "postrouting"])
    gw.ns.run(["nft", "add", "rule", "inet", "nat", "postrouting", "oifname", gw.wan_if,
               "masquerade", *how.split()])


def test_plain_masquerade_maps_independently_of_the_destination(net: HomeNetwork) -> None:
    _masquerade(net, "")
    code, stun = _netcheck(net.lan, f"{WAN_HOST}:{PORT},{ALT}")
    assert code == 0, stun
    assert stun["mapping"] == "endpoint-independent"
    first, second = (s["reflexive"] for s in stun["servers"])
    assert first == second and first.startswith(f"{GATEWAY_WAN}:")


def test_fully_random_masquerade_maps_per_destination(net: HomeNetwork) -> None:
    _masquerade(net, "fully-random")
    try:
        code, stun = _netcheck(net.lan, f"{WAN_HOST}:{PORT},{ALT}")
    finally:
        _masquerade(net, "")
    assert code == 0, stun
    assert stun["mapping"] == "depends on destination"
    hosts_ports = [s["reflexive"].rsplit(":", 1) for s in stun["servers"]]
    assert [h for h, _ in hosts_ports] == [GATEWAY_WAN, GATEWAY_WAN]
    assert hosts_ports[0][1] != hosts_ports[1][1]


def test_no_answer(net: HomeNetwork) -> None:
    code, stun = _netcheck(net.lan, f"{WAN_HOST}:3490")
    assert code == 1
    assert stun["mapping"] == "no answer"
    assert "no answer from 203.0.113.10:3490 after 4 requests" in stun["servers"][0]["error"]
