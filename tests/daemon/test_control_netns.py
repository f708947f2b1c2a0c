"""The control socket of a real ``btmm up`` in the namespace world: ``btmm status`` shows the
state of now (pings just answered are in its counters), ``btmm ping`` answers through the
tunnel and names the path, ``btmm down`` stops the daemon and its records leave the zone, and
then every command says that no daemon runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from btmm_core.daemon.control import Op
from btmm_core.daemon.control_client import ask
from btmm_core.lab.netns import Lab
from btmm_core.lab.world import REGISTRY, USER, Host, World, build_world

pytestmark = pytest.mark.netns


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("btmmc") as lab:
        yield lab


def _btmm(world: World, host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return host.ns.run(world.btmm(*args, "--config", str(host.config)), check=False)


def _dig(world: World, name: str, rdtype: str) -> list[str]:
    creds = world.workdir / "registry" / "credentials" / f"{USER}.key"
    out = world.inet.run(["dig", f"@{REGISTRY}", "-k", str(creds), "+short", "+norecurse",
                          name, rdtype]).stdout
    return sorted(line for line in out.splitlines() if line)


def _packets_out(host: Host) -> int:
    st = host.status() or {}
    return sum(p["packets_out"] for p in st.get("peers", []))


def _metrics(host: Host) -> dict[str, float]:
    text = host.ns.run([sys.executable, "-c", "import sys, urllib.request; sys.stdout.write("
                        "urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
                        "http://127.0.0.1:9430/metrics"]).stdout
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_status_ping_and_down_over_the_control_socket(lab: Lab) -> None:
    world = build_world(lab, nat=False, dataplanes=("fast", "python"))
    desktop, laptop = world.hosts["desktop"], world.hosts["laptop"]
    world.start_host(desktop)
    world.start_host(laptop, "--metrics", "127.0.0.1:9430")  # the namespace's own loopback
    world.wait_tunnels(15)
    for h in (desktop, laptop):
        mode = os.stat(h.control_socket).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, h.name
    assert not (laptop.workdir / "state" / "status.json").exists()
    hello = ask(laptop.control_socket, Op.HELLO)
    assert hello["versions"] == [1] and hello["ops"] == ["hello", "status", "ping", "down"]
    assert laptop.proc is not None and hello["pid"] == laptop.proc.pid

    # status is asked, not read from a file written once a second: the counters are the
    # engine's as of the request. Each engine bumps its counter right after its send call
    # returns, so a reply can in principle overtake it by a few microseconds: awaited, with
    # a deadline far below the old file's second
    before = _packets_out(laptop)
    out = laptop.ns.run(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2",
                         desktop.fqdn]).stdout
    assert "3 received" in out
    deadline = time.monotonic() + 0.5
    while _packets_out(laptop) < before + 3:
        assert time.monotonic() < deadline, "the pings are not in the status"
        time.sleep(0.01)
    st: Any = json.loads(_btmm(world, laptop, "status", "--json").stdout)
    assert st["peers"][0]["packets_out"] >= before + 3
    assert abs(st["time"] - time.time()) < 5

    # btmm ping: ICMPv6 echo from the daemon through the tunnel, and the path in use
    r = _btmm(world, laptop, "ping", "desktop", "--count", "3", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["peer"] == "desktop.bob.members.example." and res["received"] == 3
    assert all(isinstance(t, float) and t > 0 for t in res["rtt_ms"])
    assert res["tunnel"] == "up" and res["path"] == "mapped"
    assert res["path_endpoint"] == "203.0.113.21:4500" == res["endpoint"]
    text = _btmm(world, desktop, "ping", laptop.fqdn, "--count", "2")
    assert text.returncode == 0, text.stdout + text.stderr
    assert "through the tunnel (up); path mapped 203.0.113.22:4500" in text.stdout
    assert "2 sent, 2 received, rtt min/avg/max" in text.stdout
    unknown = _btmm(world, laptop, "ping", "printer")
    assert unknown.returncode == 1
    assert "no peer 'printer'" in unknown.stderr and "peers: desktop" in unknown.stderr

    # its metrics, scraped inside its namespace: the same counters, the peer by its label
    m = _metrics(laptop)
    assert m['btmm_peer_packets_total{direction="out",peer="desktop"}'] >= before + 3 + 3
    assert m['btmm_peer_packets_total{direction="in",peer="desktop"}'] >= 6
    assert m['btmm_peer_bytes_total{direction="out",peer="desktop"}'] > 0
    assert m['btmm_peer_handshakes_total{peer="desktop"}'] >= 1
    assert m['btmm_peer_rekeys_total{peer="desktop"}'] >= 0
    assert m['btmm_peer_path_changes_total{peer="desktop"}'] >= 1
    assert m['btmm_peer_tunnel_up{peer="desktop"}'] == 1
    # the lab's tunnels are always on: never opened on demand
    assert m['btmm_peer_tunnel_opens_total{peer="desktop"}'] == 0
    assert m["btmm_peers"] == 1
    assert m['btmm_control_requests_total{result="ok"}'] >= 3
    assert m['btmm_control_requests_total{result="failed"}'] == 1  # the unknown peer

    # btmm down: answered once the daemon has stopped and withdrawn its records
    assert _dig(world, laptop.fqdn, "AAAA")
    r = _btmm(world, laptop, "down")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "btmm up stopped: its records withdrawn; 1 peer(s) dropped" in r.stdout
    assert laptop.proc is not None and laptop.proc.wait(timeout=10) == 0
    assert _dig(world, laptop.fqdn, "AAAA") == []
    assert _dig(world, f"_autotunnel._udp.{USER}.members.example", "PTR") == [
        "desktop.bob.members.example."]
    assert not laptop.control_socket.exists()
    hosts = (Path("/etc/netns") / laptop.ns.name / "hosts").read_text()
    assert "btmm" not in hosts
    for cmd in (["status"], ["status", "--json"], ["ping", "desktop"], ["down"]):
        r = _btmm(world, laptop, *cmd)
        assert r.returncode == 1, cmd
        assert "the btmm daemon is not running" in r.stderr, cmd
        assert "start it with `btmm up`" in r.stderr, cmd
    assert laptop.status() is None


def test_a_killed_daemons_socket_is_taken_over_on_restart(lab: Lab) -> None:
    world = build_world(lab, nat=False, dataplanes=("python", "python"))
    laptop = world.hosts["laptop"]
    world.start_host(laptop)
    deadline = time.monotonic() + 15
    while laptop.status() is None:
        assert time.monotonic() < deadline, world.tails()
        time.sleep(0.1)
    world.stop_host(laptop, kill=True)
    assert laptop.control_socket.exists()  # SIGKILL: nothing cleaned up
    r = _btmm(world, laptop, "status")
    assert r.returncode == 1 and "left from a run that ended" in r.stderr
    # the TUN device a killed daemon leaves goes with its process; the next run starts clean
    world.start_host(laptop)
    deadline = time.monotonic() + 15
    while laptop.status() is None:
        assert laptop.proc is not None and laptop.proc.poll() is None, world.tails()
        assert time.monotonic() < deadline, world.tails()
        time.sleep(0.1)
