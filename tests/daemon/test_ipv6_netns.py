"""Issue 15 in the namespace world: two hosts on the internet bridge (no NAT) with global IPv6
addresses (2001:db8::/32, the lab's internet) beside their public IPv4 ones. Each daemon's
engine listens on ``::`` (dual-stack), publishes its global IPv6 address as an IPV6 candidate
(never its ULA, link-local or deprecated addresses), the path manager probes it like any other
candidate, and the tunnel runs over IPv6, preferred to the public IPv4 (mapped) path. ``btmm
status`` writes IPv6 endpoints ``[address]:port``. An engine that is not built fails (never
skips)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from btmm_core.lab.netns import Lab
from btmm_core.lab.world import World, build_world

pytestmark = pytest.mark.netns

DESKTOP6, LAPTOP6 = "2001:db8:113::21", "2001:db8:113::22"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("btmm6") as lab:
        yield lab


def _status(world: World, name: str) -> dict[str, Any]:
    host = world.hosts[name]
    out = host.ns.run(world.btmm("status", "--json", "--config", str(host.config))).stdout
    st: dict[str, Any] = json.loads(out)
    return st


@pytest.mark.parametrize("planes", [("fast", "python")], ids=lambda p: f"{p[0]}-{p[1]}")
def test_global_ipv6_addresses_are_candidates_and_carry_the_tunnel(
    lab: Lab, planes: tuple[str, str]
) -> None:
    world = build_world(lab, nat=False, dataplanes=planes)
    desktop, laptop = world.hosts["desktop"], world.hosts["laptop"]
    for host, addr in ((desktop, DESKTOP6), (laptop, LAPTOP6)):
        host.ns.run(["ip", "-6", "addr", "add", f"{addr}/64", "dev", "eth0", "nodad"])
    # Addresses that must never be published: a ULA, and a deprecated global address
    # (preferred lifetime 0). The link-local one the kernel made is not either.
    laptop.ns.run(["ip", "-6", "addr", "add", "fd00:113::22/64", "dev", "eth0", "nodad"])
    laptop.ns.run(["ip", "-6", "addr", "add", "2001:db8:113::99/64", "dev", "eth0", "nodad",
                   "preferred_lft", "0"])
    for h in (desktop, laptop):
        world.start_host(h)
    world.wait_tunnels(20)

    want_host = [
        {"kind": "ipv6", "endpoint": f"[{LAPTOP6}]:4500"},
        {"kind": "mapped", "endpoint": "203.0.113.22:4500"},
    ]
    want_peer = [
        {"kind": "ipv6", "endpoint": f"[{DESKTOP6}]:4500"},
        {"kind": "mapped", "endpoint": "203.0.113.21:4500"},
    ]
    world.wait_until(lambda: _status(world, "laptop")["host"]["candidates"] == want_host, 20,
                     "the laptop's IPV6 and mapped candidates")
    world.wait_until(
        lambda: [p["candidates"] for p in _status(world, "laptop")["peers"]] == [want_peer],
        20, "the desktop's candidates at the laptop")

    # The probes found the IPv6 pair and the path moved there: IPV6 ranks above mapped.
    def on_ipv6(name: str, other6: str) -> bool:
        peers = _status(world, name)["peers"]
        return bool(peers) and peers[0]["path"] == "ipv6" \
            and peers[0]["path_endpoint"] == f"[{other6}]:4500" \
            and peers[0]["endpoint"] == f"[{other6}]:4500"

    world.wait_until(lambda: on_ipv6("laptop", DESKTOP6), 30, "the laptop's path on IPv6")
    world.wait_until(lambda: on_ipv6("desktop", LAPTOP6), 30, "the desktop's path on IPv6")
    out = laptop.ns.run(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2",
                         "desktop.bob.members.example"], check=False).stdout
    assert "3 received" in out, out
    # The ESP really travels over IPv6 now: the laptop's kernel received UDP over IPv6.
    snmp6 = laptop.ns.run(["cat", "/proc/net/snmp6"]).stdout
    assert int(next(line.split()[1] for line in snmp6.splitlines()
                    if line.startswith("Udp6InDatagrams"))) >= 3
    text = world.status_text(laptop)
    assert f"[{DESKTOP6}]:4500" in text and f"[{LAPTOP6}]:4500" in text, text
