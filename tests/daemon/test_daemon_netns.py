"""The real ``btmm serve`` / ``btmm up`` in a namespace world (``btmm_core.lab.world``): a
registry on the "internet", a desktop and a laptop each behind a NAT gateway running
miniupnpd. Tunnels, names, roaming, expiry, restarts; every engine pairing. An engine that is
not built fails (never skips)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from btmm_core.lab.netns import Lab
from btmm_core.lab.world import (
    REGISTRY,
    USER,
    World,
    build_world,
    finish_transfer,
    start_transfer,
)

pytestmark = pytest.mark.netns

PAIRS = [("fast", "fast"), ("python", "python"), ("fast", "python")]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("btmmd") as lab:
        yield lab


def _transfer(world: World, size: int) -> None:
    src, sink = start_transfer(world, world.hosts["laptop"], world.hosts["desktop"], size)
    sent, got = finish_transfer(src, sink)
    assert sent["bytes"] == got["bytes"] == size
    assert sent["sha256"] == got["sha256"]


def _dig(world: World, name: str, rdtype: str) -> list[str]:
    creds = world.workdir / "registry" / "credentials" / f"{USER}.key"
    out = world.inet.run(["dig", f"@{REGISTRY}", "-k", str(creds), "+short", "+norecurse",
                          name, rdtype]).stdout
    return sorted(line for line in out.splitlines() if line)


def _peers(world: World, host: str) -> list[str]:
    st = world.hosts[host].status() or {}
    return [p["name"] for p in st.get("peers", [])]


@pytest.mark.parametrize("planes", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_cold_start_reach_by_name_within_15s(lab: Lab, planes: tuple[str, str]) -> None:
    world = build_world(lab, nat=True, dataplanes=planes)
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(15)
    # issue 13's cold-start rule: the first handshake follows an answered path probe, so it
    # is never lost to an endpoint that did not exist yet (no retry on either side)
    for h in world.hosts.values():
        assert [(p["handshake_retries"], p["path"]) for p in (h.status() or {})["peers"]] == [
            (0, "mapped")], h.name
    _transfer(world, 4_000_000)
    st = world.hosts["laptop"].status()
    assert st is not None
    assert st["host"]["external"] == "203.0.113.3:4500"  # the miniupnpd mapping
    assert st["host"]["mapping"].startswith(("pcp", "natpmp"))
    # its endpoint candidates, published beside the seed's records and read by the desktop
    laptop_cands = [{"kind": "lan", "endpoint": "192.168.2.11:4500"},  # lab/world.py
                    {"kind": "mapped", "endpoint": "203.0.113.3:4500"}]
    assert st["host"]["candidates"] == laptop_cands
    world.wait_until(lambda: [p["candidates"] for p in world.hosts["desktop"].status()["peers"]]
                     == [laptop_cands], 5, "the laptop's candidates at the desktop")
    hosts = (Path("/etc/netns") / world.hosts["laptop"].ns.name / "hosts").read_text()
    assert "desktop.bob.members.example" in hosts


def test_roaming_keeps_the_tcp_connection(lab: Lab) -> None:
    world = build_world(lab, nat=True, dataplanes=("fast", "python"), cafe=True)
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(15)
    rate = 1_000_000
    src, sink = start_transfer(world, world.hosts["laptop"], world.hosts["desktop"], 8 * rate,
                               rate=rate)
    time.sleep(3)
    world.plug(world.hosts["laptop"], world.homes["gw3"], 1)
    sent, got = finish_transfer(src, sink)
    assert sent["bytes"] == got["bytes"] == 8 * rate and sent["sha256"] == got["sha256"]
    # the laptop published its new endpoint, and the desktop's tunnel follows it
    srv = _dig(world, "_autotunnel._udp.laptop.bob.members.example", "SRV")
    assert len(srv) == 1
    target = srv[0].split()[3]
    world.wait_until(lambda: _dig(world, target, "A") == ["203.0.113.4"], 10,
                     "new address published")
    st = world.hosts["desktop"].status()
    assert st is not None and st["peers"][0]["endpoint"] == "203.0.113.4:4500"


def test_host_dies_records_expire_and_peer_drops(lab: Lab) -> None:
    # short update leases (the registry allows 10 s here): the daemons refresh every ~8 s
    world = build_world(lab, nat=True, dataplanes=("python", "python"), lease=10, lease_min=10)
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(15)
    time.sleep(12)  # longer than one lease: refreshes keep both published and connected
    world.wait_tunnels(5)
    # killed just after a refresh, so that its records have most of their 10 s left when the
    # dig below looks (killed at a random moment they could have had well under a second)
    laptop = world.hosts["laptop"]
    world.wait_until(
        lambda: ((laptop.status() or {}).get("host", {}).get("lease_left") or 0) >= 9, 15,
        "a refresh of the laptop's records")
    world.stop_host(laptop, kill=True)  # no goodbye
    assert _dig(world, "laptop.bob.members.example", "AAAA")  # still there until the lease ends
    world.wait_until(lambda: not _peers(world, "desktop"), 30, "desktop dropped the dead laptop")
    assert _dig(world, "laptop.bob.members.example", "AAAA") == []
    assert _dig(world, "_autotunnel._udp.bob.members.example", "PTR") == [
        "desktop.bob.members.example."]
    hosts = (Path("/etc/netns") / world.hosts["desktop"].ns.name / "hosts").read_text()
    assert "laptop" not in hosts


def test_daemon_restart_withdraws_and_reconnects(lab: Lab) -> None:
    world = build_world(lab, nat=True, dataplanes=("fast", "fast"))
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(15)
    laptop = world.hosts["laptop"]
    world.stop_host(laptop)  # SIGTERM: clean shutdown withdraws the records at once
    # (the logs say why if not: "could not withdraw", or no "daemon stopped" = killed after 15 s)
    assert _dig(world, "laptop.bob.members.example", "AAAA") == [], world.tails(40)
    assert _dig(world, "_autotunnel._udp.laptop.bob.members.example", "SRV") == []
    world.wait_until(lambda: not _peers(world, "desktop"), 10, "desktop saw the withdrawal")
    world.start_host(laptop)
    world.wait_tunnels(15)
    _transfer(world, 2_000_000)
    # one set of records per host: nothing stale from the first run
    assert _dig(world, "_autotunnel._udp.bob.members.example", "PTR") == [
        "desktop.bob.members.example.", "laptop.bob.members.example."]
    assert len(_dig(world, "laptop.bob.members.example", "AAAA")) == 1
    assert len(_dig(world, "_autotunnel._udp.laptop.bob.members.example", "SRV")) == 1


def test_gateway_reboot_tunnel_recovers(lab: Lab) -> None:
    world = build_world(lab, nat=True, dataplanes=("fast", "python"))
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(15)
    gw = world.homes["gw2"].gw
    # a reboot: miniupnpd restarts with an empty table and no connection tracking survives
    laptop = world.hosts["laptop"]
    assert laptop.log is not None
    recreated_before = laptop.log.read_text().count("kind=recreated")
    gw.restart_miniupnpd(lose_state=True)  # empties its chains before it starts again
    gw.ns.run(["conntrack", "-F"], check=False)
    # the laptop hears the new epoch and maps again (no single look at the emptied table:
    # the new mapping may already be back by then)
    world.wait_until(lambda: laptop.log.read_text().count("kind=recreated") > recreated_before
                     and "4500" in gw.ns.run(["nft", "list", "chain", "inet", "nat",
                                              "prerouting_miniupnpd"]).stdout,
                     40, "the laptop re-created its mapping")
    # inbound through the laptop's gateway again: the desktop sends to the laptop
    src, sink = start_transfer(world, world.hosts["desktop"], world.hosts["laptop"], 2_000_000)
    sent, got = finish_transfer(src, sink)
    assert sent["bytes"] == got["bytes"] == 2_000_000 and sent["sha256"] == got["sha256"]
    world.wait_tunnels(5)


def test_no_nat_ping_by_name_and_status_json(lab: Lab) -> None:
    world = build_world(lab, nat=False, dataplanes=("python", "fast"))
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(15)
    laptop = world.hosts["laptop"]
    out = laptop.ns.run(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2",
                         "desktop.bob.members.example"]).stdout
    assert "3 received" in out

    def status() -> dict[str, object]:
        st: dict[str, object] = json.loads(laptop.ns.run(
            world.btmm("status", "--json", "--config", str(laptop.config))).stdout)
        return st

    # asked on the control socket: the engine's counters as of now (bumped right after each
    # send call returns, so awaited with a deadline rather than looked at once)
    world.wait_until(lambda: status()["peers"][0]["packets_out"] >= 3, 5,  # type: ignore[index]
                     "the pings in the status")
    st: Any = status()
    assert st["host"]["external"] == "203.0.113.22:4500"  # its own address: nothing to map
    assert st["host"]["mapping"].startswith("not needed")
    (peer,) = st["peers"]
    assert peer["name"] == "desktop.bob.members.example." and peer["tunnel"] == "up"
    assert peer["packets_out"] >= 3 and peer["endpoint"] == "203.0.113.21:4500"
    # a public address is a MAPPED candidate (no LAN one: it is not private)
    assert st["host"]["candidates"] == [{"kind": "mapped", "endpoint": "203.0.113.22:4500"}]
    assert peer["candidates"] == [{"kind": "mapped", "endpoint": "203.0.113.21:4500"}]
    assert peer["candidates_refused"] == []


def test_bad_credentials_stop_the_daemon_with_a_clear_error(lab: Lab) -> None:
    world = build_world(lab, nat=False)
    laptop = world.hosts["laptop"]
    creds = laptop.workdir / "state" / "credentials.key"
    text = creds.read_text()
    start = text.index('secret "') + len('secret "')
    creds.write_text(text[:start] + "AAAA" + text[start + 4:])  # same key name, wrong secret
    world.start_host(laptop)
    assert laptop.proc is not None
    rc = laptop.proc.wait(timeout=30)
    assert rc != 0
    log = laptop.log.read_text() if laptop.log else ""
    assert "BADSIG" in log and "btmm join" in log


def test_a_revoked_laptop_is_cut_off_and_the_desktop_carries_on(lab: Lab) -> None:
    world = build_world(lab, nat=False, dataplanes=("python", "python"))
    desktop, laptop = world.hosts["desktop"], world.hosts["laptop"]
    for h in (desktop, laptop):
        world.start_host(h)
    world.wait_tunnels(15)
    r = world.serve_cli("user", "revoke", USER, "laptop")
    assert r.returncode == 0, r.stderr
    # the registry deletes the laptop's records and tells the desktop's watches at once
    world.wait_until(lambda: not _peers(world, "desktop"), 10, "desktop dropped the revoked laptop")
    assert _dig(world, "laptop.bob.members.example", "AAAA") == []
    assert _dig(world, "_autotunnel._udp.bob.members.example", "PTR") == [
        "desktop.bob.members.example."]
    # the laptop's next signed request is BADKEY: it stops and says what to do
    assert laptop.proc is not None
    rc = laptop.proc.wait(timeout=30)
    assert rc != 0
    log = laptop.log.read_text() if laptop.log else ""
    assert "BADKEY" in log and "revoked" in log and "btmm join" in log
    st = desktop.status()
    assert st is not None and st["host"]["registry_error"] is None
    assert desktop.proc is not None and desktop.proc.poll() is None
    assert _dig(world, "desktop.bob.members.example", "AAAA")


def test_double_nat_no_mapping_is_reported_and_the_tunnel_still_comes_up(lab: Lab) -> None:
    # the laptop's home gateway sits behind a carrier-grade NAT: miniupnpd's STUN check fails,
    # so it refuses every mapping; the laptop reaches the (mapped) desktop first, and the
    # desktop answers to where the laptop's packets come from
    world = build_world(lab, nat=True, dataplanes=("fast", "python"), laptop_double_nat=True)
    for h in world.hosts.values():
        world.start_host(h)
    laptop = world.hosts["laptop"]
    world.wait_until(lambda: (laptop.status() or {}).get("host", {}).get("mapping") == "failed", 40,
                     "the laptop reports the failed mapping")
    st = laptop.status()
    assert st is not None and st["host"]["mapping_error"]
    text = world.status_text(laptop)
    assert "mapping: failed" in text
    world.wait_tunnels(30)
    _transfer(world, 1_000_000)


def test_link_down_and_up_remaps_and_the_tunnel_carries_on(lab: Lab) -> None:
    # a fallback poll of 60 s: only rtnetlink notifications can make the daemon act in time
    world = build_world(lab, nat=True, dataplanes=("python", "fast"),
                        host_extra={"netcheck_interval": 60.0})
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(15)
    laptop = world.hosts["laptop"]

    def host() -> dict[str, object]:
        return dict((laptop.status() or {}).get("host", {}))

    laptop.ns.run(["ip", "link", "set", "eth0", "down"])
    world.wait_until(lambda: host().get("local_address") is None, 10, "the daemon saw the link go")
    assert host()["mapping"] == "no route to the registry"
    laptop.ns.run(["ip", "link", "set", "eth0", "up"])
    laptop.ns.run(["ip", "route", "replace", "default", "via", "192.168.2.1"])
    world.wait_until(lambda: str(host().get("mapping", "")).startswith(("pcp", "natpmp"))
                     and host().get("external") == "203.0.113.3:4500", 15, "mapped again")
    _transfer(world, 1_000_000)
