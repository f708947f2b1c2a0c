"""The relay in the namespace world (``btmm_core.lab.world``): both homes behind gateways that
map every destination to a new port (nftables ``masquerade random``, checked: two STUN servers
see two ports), so no hole can be punched; coturn runs on the lab's internet and ``btmm
serve --turn-server`` hands the hosts its credentials. The tunnel comes up through the relay
(``btmm status``: path ``relay (203.0.113.30:3478)``), ping by name and a SHA-256-checked TCP
transfer cross it.

UNFINISHED against issue 14: the engines do not frame ChannelData themselves (the daemon
relays through loopback proxies, daemon/relay.py), and the relay -> direct upgrade, restart
and cgnat scenarios are not tested here."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from coturn import Coturn

from btmm_core.lab.netns import Lab, Netns
from btmm_core.lab.world import (
    World,
    build_world,
    finish_transfer,
    first_ping,
    start_transfer,
)

pytestmark = pytest.mark.netns

TURN = "203.0.113.30"
SECRET = "lab-relay-secret"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("btmmr") as lab:
        yield lab


def per_destination_nat(gw: Netns, random: bool = True) -> None:
    """Replace the gateway's masquerade by one that picks a random port per mapping (or,
    ``random=False``, back to the plain one, which keeps the source port: punchable)."""
    gw.run(["nft", "flush", "chain", "inet", "nat", "postrouting"])
    gw.run(["nft", "add", "rule", "inet", "nat", "postrouting", "jump", "postrouting_miniupnpd"])
    gw.run(["nft", "add", "rule", "inet", "nat", "postrouting", "oifname", "wan0",
            "masquerade", *(["random"] if random else [])])


MAPPED_PORTS = """
import json, os, socket, sys
from btmm_core.stun.message import binding_request, parse
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
out = []
for server in ("203.0.113.10", "203.0.113.11"):
    txid = os.urandom(12)
    s.sendto(binding_request(txid), (server, 3478))
    data, _ = s.recvfrom(2048)
    out.append(parse(data).xor_mapped.port)
print(json.dumps(out))
"""


def mapped_ports(ns: Netns) -> list[int]:
    r = ns.run([sys.executable, "-c", MAPPED_PORTS], check=True)
    return list(json.loads(r.stdout))


PAIRS = [("fast", "fast"), ("python", "fast")]


def relay_world(lab: Lab, tmp_path: Path, planes: tuple[str, str], *,
                per_destination: bool) -> tuple[World, Coturn]:
    """The world with coturn on the internet and the registry offering it; with
    ``per_destination`` both gateways map every destination to a new port (checked)."""
    secret_file = tmp_path / "turn.secret"
    secret_file.write_text(SECRET)
    world = build_world(lab, nat=True, dataplanes=planes, mapping=False,
                        registry_args=("--turn-server", f"{TURN}:3478", "--turn-secret-file",
                                       str(secret_file), "--turn-credential-lifetime", "3600"))
    world.inet.run(["ip", "addr", "add", f"{TURN}/24", "dev", "br0"])
    coturn = Coturn(tmp_path / "coturn", SECRET, host=TURN, port=3478, netns=world.inet.name)
    coturn.start()
    if per_destination:
        for home in world.homes.values():
            per_destination_nat(home.gw.ns)
    for host in world.hosts.values():
        a, b = mapped_ports(host.ns)
        assert (a != b) is per_destination, f"{host.name}: mapped ports {a}, {b}"
    return world, coturn


def start_and_measure(world: World) -> float:
    """Start both daemons; seconds from ``btmm up`` to the laptop's first ping answer."""
    t0 = time.monotonic()
    for h in world.hosts.values():
        world.start_host(h)
    first_ping(world, world.hosts["laptop"], world.hosts["desktop"], 120)
    return time.monotonic() - t0


def transfer(world: World, size: int) -> float:
    """A SHA-256-checked TCP transfer laptop -> desktop by name; Mbit/s."""
    laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
    ping = laptop.ns.run(["ping", "-6", "-c", "3", "-W", "5", desktop.fqdn], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    src, sink = start_transfer(world, laptop, desktop, size)
    sent, got = finish_transfer(src, sink)
    assert sent["bytes"] == got["bytes"] == size
    assert sent["sha256"] == got["sha256"]
    return size * 8 / sent["seconds"] / 1e6


@pytest.mark.parametrize("planes", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_two_symmetric_nats_get_a_relayed_tunnel(lab: Lab, tmp_path: Path,
                                                 planes: tuple[str, str]) -> None:
    world, coturn = relay_world(lab, tmp_path, planes, per_destination=True)
    try:
        first = start_and_measure(world)
        world.wait_tunnels(120)
        for name in ("desktop", "laptop"):
            st = world.hosts[name].status()
            assert st is not None
            relay = st["host"]["relay"]
            assert relay is not None and relay["state"] == "allocated", st["host"]
            assert relay["relayed"].startswith(f"{TURN}:")
            assert "relay" in [c["kind"] for c in st["host"]["candidates"]]
        peers = {name: world.hosts[name].first_peer() for name in ("desktop", "laptop")}
        paths = {name: (p["path"], p["path_endpoint"]) for name, p in peers.items()}
        assert {p for p, _ in paths.values()} == {"relay"}, paths
        # each side's path ends at the peer's relayed address or at its own loopback proxy
        for name, (_, endpoint) in paths.items():
            assert endpoint.startswith((f"{TURN}:", "127.0.0.1:")), (name, endpoint)
        assert f"relay ({TURN}:3478)" in world.status_text(world.hosts["laptop"])
        mbps = transfer(world, 2_000_000)
        print(f"\nrelay {planes}: paths {paths}; btmm up -> first ping {first:.2f} s; "
              f"TCP {mbps:.1f} Mbit/s")
    finally:
        coturn.stop()


def test_a_punchable_nat_keeps_the_direct_path_with_a_relay_offered(lab: Lab,
                                                                    tmp_path: Path) -> None:
    """The relay is the last choice: both hosts hold an allocation and publish it, and the
    punched path wins."""
    world, coturn = relay_world(lab, tmp_path, ("fast", "fast"), per_destination=False)
    try:
        first = start_and_measure(world)
        world.wait_tunnels(120)

        def punched() -> bool:
            return all(world.hosts[n].first_peer().get("path") == "punched" for n in world.hosts)

        world.wait_until(punched, 60, "punched paths")

        def relay_state(name: str) -> str | None:
            relay = ((world.hosts[name].status() or {}).get("host") or {}).get("relay")
            return None if relay is None else str(relay["state"])

        # the allocation runs beside the path probes and may come after the punched path
        # (a single look here failed once in a full run: no relay yet)
        world.wait_until(lambda: all(relay_state(n) == "allocated" for n in world.hosts), 30,
                         "both relays allocated")
        mbps = transfer(world, 2_000_000)
        print(f"\ndirect (punched) fast-fast: btmm up -> first ping {first:.2f} s; "
              f"TCP {mbps:.1f} Mbit/s")
    finally:
        coturn.stop()


def test_relay_moves_to_a_punched_path_when_the_nat_allows_it(lab: Lab, tmp_path: Path) -> None:
    """Relayed first; then both gateways switch to a punchable NAT (their connection tracking
    flushed, as a rule change on a real router does): at the hosts' next STUN round (every
    20 s while on the relay) the new reflexive endpoints are published, the peers punch, and
    the path moves off the relay while a TCP transfer runs through, intact."""
    world, coturn = relay_world(lab, tmp_path, ("fast", "fast"), per_destination=True)
    try:
        for h in world.hosts.values():
            world.start_host(h)
        world.wait_tunnels(120)
        assert {world.hosts[n].first_peer()["path"] for n in world.hosts} == {"relay"}
        before = world.hosts["desktop"].first_peer()["bytes_in"]
        src, sink = start_transfer(world, world.hosts["laptop"], world.hosts["desktop"],
                                   40_000_000, rate=1_000_000)
        world.wait_until(
            lambda: world.hosts["desktop"].first_peer()["bytes_in"] > before + 500_000, 30,
            "the transfer under way through the relay")
        for home in world.homes.values():
            per_destination_nat(home.gw.ns, random=False)
            home.gw.ns.run(["conntrack", "-F"], check=False)
        t0 = time.monotonic()

        def punched() -> bool:
            return all(world.hosts[n].first_peer().get("path") == "punched" for n in world.hosts)

        world.wait_until(punched, 60, "punched paths after the NAT change")
        upgraded = time.monotonic() - t0
        assert src.poll() is None, "the transfer ended before the path moved"
        sent, got = finish_transfer(src, sink, timeout=120)
        assert sent["bytes"] == got["bytes"] == 40_000_000
        assert sent["sha256"] == got["sha256"]
        print(f"\nrelay -> punched {upgraded:.1f} s after the NAT change")
    finally:
        coturn.stop()
