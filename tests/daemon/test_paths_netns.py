"""Issue 13 in the namespace world (``btmm_core.lab.world``), real ``btmm serve`` (with its
STUN responder) and ``btmm up``: two homes whose gateways run no mapping protocol (plain
nftables masquerade: the tunnel needs a punched path), both hosts in one home behind a gateway
that does not hairpin (the tunnel needs the LAN path), and forged or replayed probes from an
attacker namespace, which must move no endpoint."""

from __future__ import annotations

import base64
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from btmm_core.dataplane.api import Endpoint
from btmm_core.lab.netns import Lab
from btmm_core.lab.world import Host, World, build_world, finish_transfer, start_transfer
from btmm_core.reach.probe import MAC_LEN, ProbeReply, ProbeRequest, key_id

pytestmark = pytest.mark.netns

PAIRS = [("fast", "fast"), ("python", "fast")]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("btmmp") as lab:
        yield lab


def _wait(pred: Any, timeout: float, what: str, world: World) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s\n{world.tails()}")


def _peer(world: World, host: str) -> dict[str, Any]:
    st = world.hosts[host].status() or {}
    peers = st.get("peers", [])
    return dict(peers[0]) if peers else {}


def _no_retry(world: World) -> None:
    """The cold-start rule: neither side's first handshake went unanswered."""
    for name in world.hosts:
        peer = _peer(world, name)
        assert peer["handshake_retries"] == 0, (name, peer)


def _ping_and_transfer(world: World, size: int) -> None:
    laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
    ping = laptop.ns.run(["ping", "-6", "-c", "2", "-W", "5", desktop.fqdn], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    src, sink = start_transfer(world, laptop, desktop, size)
    sent, got = finish_transfer(src, sink)
    assert sent["bytes"] == got["bytes"] == size
    assert sent["sha256"] == got["sha256"]


@pytest.mark.parametrize("planes", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_no_mapping_two_homes_get_a_punched_path(lab: Lab, planes: tuple[str, str]) -> None:
    world = build_world(lab, nat=True, dataplanes=planes, mapping=False)
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(40)
    _no_retry(world)
    for name in ("desktop", "laptop"):
        st = world.hosts[name].status()
        assert st is not None
        assert st["host"]["external"] is None  # no mapping protocol answered
        assert st["host"]["reflexive"] is not None  # the registry's STUN responder did
        kinds = [c["kind"] for c in st["host"]["candidates"]]
        assert "reflexive" in kinds
        peer = _peer(world, name)
        assert peer["path"] == "punched" and peer["tunnel"] == "up"
        assert peer["rtt_ms"] is not None and peer["last_answer"] is not None
    _ping_and_transfer(world, 2_000_000)
    text = world.status_text(world.hosts["laptop"])
    assert "punched" in text and "reflexive" in text


@pytest.mark.parametrize("planes", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_same_home_uses_the_lan_path(lab: Lab, planes: tuple[str, str]) -> None:
    world = build_world(lab, nat=True, dataplanes=planes, same_home=True)
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(40)
    _no_retry(world)
    for name, other_lan in (("desktop", "192.168.1.11:4500"), ("laptop", "192.168.1.10:4500")):
        peer = _peer(world, name)
        assert peer["path"] == "lan" and peer["tunnel"] == "up"
        assert peer["endpoint"] == other_lan
    _ping_and_transfer(world, 2_000_000)


def test_forged_probes_from_an_attacker_move_no_endpoint(lab: Lab) -> None:
    # the attacker sits on the desktop's LAN, the nearest an off-path sender gets: it knows
    # the laptop's public key (it is in the zone) and so its probe sender id, but not the
    # MAC key; it sends probe requests and replies naming the laptop, from its own address
    world = build_world(lab, nat=True, dataplanes=("fast", "fast"), same_home=True)
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(40)
    laptop_st = world.hosts["laptop"].status()
    assert laptop_st is not None
    sender = key_id(base64.b64decode(laptop_st["host"]["public_key"]))
    stamp = int(time.time() * 1000)
    forged = [
        ProbeRequest(sender, b"\x02" * 12, stamp, Endpoint("192.168.1.10", 4500),
                     bytes(MAC_LEN)).to_bytes(),
        ProbeReply(sender, b"\x01" * 12, Endpoint("192.168.1.15", 4500),
                   bytes(MAC_LEN)).to_bytes(),
    ]
    attacker = Host("attacker", lab.ns("attacker"), world.workdir,
                    world.workdir / "attacker.toml")
    world.plug(attacker, world.homes["gw1"], 5)
    payloads = [b"\0\0\0\0" + m for m in forged]
    script = ("import socket\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "s.bind(('0.0.0.0', 4500))\n"
              f"for m in {payloads!r} * 50:\n"
              "    s.sendto(m, ('192.168.1.10', 4500))\n")
    attacker.ns.run([sys.executable, "-c", script])
    _wait(lambda: sum(_peer(world, "desktop").get("probe_drops", {}).values()) >= 100, 5,
          "the desktop counted the forged probes", world)
    peer = _peer(world, "desktop")
    assert peer["endpoint"] == "192.168.1.11:4500" and peer["path"] == "lan"
    assert peer["probe_drops"].get("bad_mac", 0) >= 50
    _ping_and_transfer(world, 200_000)
