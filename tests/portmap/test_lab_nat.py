"""Port mapping against Debian's real miniupnpd, behind real nftables NAT, in namespaces.

Each test builds its own home network (``btmm_core.lab.nat``), runs ``btmm netcheck`` in the
LAN host's namespace, and where a mapping is made, checks that a datagram sent from the WAN host
to the public address and port arrives at the LAN host.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from btmm_core.lab.nat import (
    GATEWAY_WAN,
    MINIUPNPD,
    WAN_HOST,
    HomeNetwork,
    MiniupnpdConfig,
    build_home_network,
)
from btmm_core.lab.netns import Lab, Netns

pytestmark = pytest.mark.netns

PORT = 4500

_RECV = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    data, src = s.recvfrom(2048)
    print(data.decode(), src[0], flush=True)
except socket.timeout:
    print("timeout", flush=True)
"""

_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[4])):  # bounded: count and spacing
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.2)
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    if not os.path.exists(MINIUPNPD):
        pytest.fail(f"{MINIUPNPD} missing: install miniupnpd-nftables (see .ci/apt-packages)")
    with Lab("pm") as lab:
        yield lab


def netcheck(ns: Netns, *args: str, timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    proc = ns.run([sys.executable, "-m", "btmm_core", "netcheck", "--json", *args],
                  check=False, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"netcheck printed no JSON: {proc.stdout!r} {proc.stderr!r}"
    return proc.returncode, json.loads(lines[-1])


def datagram_reaches_lan(net: HomeNetwork, public: str, port: int, tag: str) -> str:
    """Send from the WAN host to public:port; return the source the LAN host saw."""
    recv = net.lan.popen([sys.executable, "-c", _RECV, str(PORT), "10"],
                         stdout=subprocess.PIPE, text=True)
    assert recv.stdout is not None
    assert recv.stdout.readline().strip() == "ready"
    net.wan.run([sys.executable, "-c", _SEND, public, str(port), tag, "10"], timeout=30)
    out, _ = recv.communicate(timeout=15)
    assert out.strip() != "timeout", f"no datagram reached the LAN host via {public}:{port}"
    data, src = out.split()
    assert data == tag
    return src


def test_pcp_mapping_reaches_lan_host(lab: Lab) -> None:
    net = build_home_network(lab, miniupnpd=MiniupnpdConfig(natpmp=True, upnp=True))
    # Before any mapping, the WAN host cannot reach the LAN host through the NAT.
    recv = net.lan.popen([sys.executable, "-c", _RECV, str(PORT), "2"],
                         stdout=subprocess.PIPE, text=True)
    assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
    net.wan.run([sys.executable, "-c", _SEND, GATEWAY_WAN, str(PORT), "early", "3"])
    assert recv.communicate(timeout=15)[0].strip() == "timeout"

    code, out = netcheck(net.lan, "--port", str(PORT), "--keep", "--lifetime", "600")
    assert code == 0, out
    assert out["verdict"] == "mapped"
    assert out["protocol"] == "pcp"
    assert out["gateway"] == "192.168.7.1"
    assert out["public_address"] == GATEWAY_WAN
    assert out["external_port"] == PORT
    assert 0 < out["remaining"] <= 600
    assert datagram_reaches_lan(net, out["public_address"], out["external_port"], "hello") \
        == WAN_HOST


@pytest.mark.parametrize("protocol", ["natpmp", "upnp"])
def test_each_protocol_alone(lab: Lab, protocol: str) -> None:
    net = build_home_network(lab, miniupnpd=MiniupnpdConfig(natpmp=True, upnp=True))
    code, out = netcheck(net.lan, "--protocol", protocol, "--keep", "--lifetime", "600")
    assert code == 0, out
    assert out["protocol"] == protocol and out["public_address"] == GATEWAY_WAN
    datagram_reaches_lan(net, out["public_address"], out["external_port"], protocol)


def test_mapping_deleted_after_netcheck(lab: Lab) -> None:
    net = build_home_network(lab, miniupnpd=MiniupnpdConfig(natpmp=True, upnp=False))
    code, out = netcheck(net.lan, "--lifetime", "600")
    assert code == 0 and out["verdict"] == "mapped"
    rules = net.gateway.ns.run(["nft", "list", "chain", "inet", "nat", "prerouting_miniupnpd"])
    assert "dnat" not in rules.stdout, rules.stdout


def test_natpmp_off_falls_back_to_upnp(lab: Lab) -> None:
    net = build_home_network(lab, miniupnpd=MiniupnpdConfig(natpmp=False, upnp=True))
    code, out = netcheck(net.lan, "--keep", "--lifetime", "600")
    assert code == 0, out
    assert out["protocol"] == "upnp"
    assert "pcp: no answer" in out["tried"]
    datagram_reaches_lan(net, out["public_address"], out["external_port"], "viaupnp")


def test_everything_off_is_diagnosed(lab: Lab) -> None:
    net = build_home_network(lab, miniupnpd=None)
    code, out = netcheck(net.lan)
    assert code == 1
    assert out["verdict"] == "gateway without a mapping protocol", out
    assert "pcp: no answer" in out["tried"] and "upnp: no answer" in out["tried"]


def test_refused_mapping_is_diagnosed(lab: Lab) -> None:
    # miniupnpd learns (by STUN) that unsolicited traffic is filtered upstream and refuses.
    # The hop-2 probe finds the public WAN host, so this is not called double NAT.
    net = build_home_network(
        lab, miniupnpd=MiniupnpdConfig(natpmp=True, upnp=False), upstream_filters=True
    )
    code, out = netcheck(net.lan, "--port", str(PORT), "--probe", WAN_HOST)
    assert code == 1
    assert out["verdict"] == "mapping refused", out
    assert "pcp" in out["diagnosis"]


def test_double_nat_is_diagnosed(lab: Lab) -> None:
    net = build_home_network(lab, miniupnpd=MiniupnpdConfig(natpmp=True, upnp=True),
                             double_nat=True)
    code, out = netcheck(net.lan)  # the default TTL-2 probe target dies in the ISP namespace
    assert code == 1
    assert out["verdict"] == "double NAT", out
    assert "100.64.0.1" in out["diagnosis"]


def test_public_host_is_no_nat(lab: Lab) -> None:
    net = build_home_network(lab, miniupnpd=None)
    code, out = netcheck(net.gateway.ns)  # the gateway itself has the public address
    assert code == 0
    assert out["verdict"] == "no NAT" and out["local_address"] == GATEWAY_WAN


def _read_events(
    proc: subprocess.Popen[str], until: set[str], timeout: float,
) -> list[dict[str, Any]]:
    """Read JSON event lines until one of kind ``until`` (bounded by ``timeout``)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            events.append(json.loads(line))
            if events[-1]["event"] in until:
                return events
    raise AssertionError(f"no {until} event within {timeout} s; got {events}")


@pytest.mark.parametrize("announce", [True, False], ids=["restart", "restart-renewal-only"])
def test_gateway_restart_is_noticed_and_mapping_recreated(lab: Lab, announce: bool) -> None:
    net = build_home_network(lab, miniupnpd=MiniupnpdConfig(natpmp=True, upnp=False))
    # lifetime 20 s: renewals every 10 s. With announcements the reboot is seen at once;
    # without (the multicast group blocked at the LAN host), the next renewal's epoch shows it.
    if not announce:
        net.lan.run(["nft", "-f", "-"], input="""
table inet block {
    chain input { type filter hook input priority 0; udp dport 5350 drop; }
}
""")
    watch = net.lan.popen(
        [sys.executable, "-m", "btmm_core", "netcheck", "--watch", "60", "--lifetime", "20",
         "--reboot-delay", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = _read_events(watch, {"mapped"}, 30)[-1]
    assert first["public_address"] == GATEWAY_WAN
    time.sleep(2.5)  # let the epoch grow, so that going back to 0 is unmistakable
    net.gateway.restart_miniupnpd()
    if not announce:
        # The restart really emptied the table. (With announcements the client may already
        # have re-created the mapping by now, so the check is only race-free here.)
        rules = net.gateway.ns.run(
            ["nft", "list", "chain", "inet", "nat", "prerouting_miniupnpd"])
        assert "dnat" not in rules.stdout
    again = _read_events(watch, {"recreated", "changed"}, 25 if announce else 40)[-1]
    assert again["public_address"] == GATEWAY_WAN
    if announce:
        assert "ANNOUNCE" in again["reason"] or "announcement" in again["reason"], again
    else:
        assert "epoch" in again["reason"], again
    datagram_reaches_lan(net, again["public_address"], again["external_port"], "afterboot")
    watch.terminate()  # SIGTERM: the service stops and deletes its mapping
    rest, _ = watch.communicate(timeout=30)
    assert '"event": "deleted"' in rest, rest
    rules = net.gateway.ns.run(["nft", "list", "chain", "inet", "nat", "prerouting_miniupnpd"])
    assert "dnat" not in rules.stdout, rules.stdout


def test_cleared_table_is_repaired_by_the_next_renewal(lab: Lab) -> None:
    # Clearing miniupnpd's rules without a restart changes neither its epoch nor sends an
    # announcement: no client can notice. The mapping comes back with the next renewal, which
    # is at half the lifetime (here 4 s of 8).
    net = build_home_network(lab, miniupnpd=MiniupnpdConfig(natpmp=True, upnp=False))
    watch = net.lan.popen(
        [sys.executable, "-m", "btmm_core", "netcheck", "--watch", "40", "--lifetime", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = _read_events(watch, {"mapped"}, 30)[-1]
    net.gateway.clear_mappings()
    rules = net.gateway.ns.run(["nft", "list", "chain", "inet", "nat", "prerouting_miniupnpd"])
    assert "dnat" not in rules.stdout
    _read_events(watch, {"renewed", "recreated"}, 15)
    rules = net.gateway.ns.run(["nft", "list", "chain", "inet", "nat", "prerouting_miniupnpd"])
    assert "dnat" in rules.stdout
    datagram_reaches_lan(net, first["public_address"], first["external_port"], "repaired")
    watch.terminate()
    watch.communicate(timeout=30)
