"""Tunnels on demand with the real ``btmm up`` in a namespace world (issue 16): no tunnel until
a packet needs one, the first ping answered (held, not lost), closed on both sides after the
idle timeout and opened again by the next packet; a peer that never answers gets its senders
an ICMPv6 address unreachable after ``connect_timeout``."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from btmm_core.lab.netns import Lab
from btmm_core.lab.world import Host, World, build_world

pytestmark = pytest.mark.netns

IDLE = 6
CONNECT = 4


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("btmmo") as lab:
        yield lab


def _both_idle(*hosts: Host) -> bool:
    return all(h.first_peer().get("tunnel") == "idle" for h in hosts)


def _start(lab: Lab, planes: tuple[str, str], **extra: object) -> tuple[World, Host, Host]:
    world = build_world(lab, nat=True, dataplanes=planes,
                        host_extra={"idle_timeout": IDLE, "connect_timeout": CONNECT, **extra})
    for h in world.hosts.values():
        world.start_host(h)
    desktop, laptop = world.hosts["desktop"], world.hosts["laptop"]
    # each knows the other and where it is (a path answered), and no tunnel is up
    for h in (desktop, laptop):
        world.wait_until(
            lambda h=h: h.first_peer().get("endpoint") and h.first_peer().get("tunnel") == "idle",
            30, f"{h.name} knows its peer, tunnel idle")
    for h in (desktop, laptop):
        p = h.first_peer()
        assert p["packets_out"] == p["packets_in"] == 0 and p["on_demand"]["opens"] == 0, p
    return world, desktop, laptop


def _ping(host: Host, dest: str, count: int, wait: int = 10) -> tuple[int, str]:
    proc = host.ns.run(["ping", "-6", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait),
                        dest], check=False, timeout=wait * count + 30)
    return proc.returncode, proc.stdout + proc.stderr


def _received(output: str) -> int:
    m = re.search(r"(\d+) received", output)
    return int(m.group(1)) if m else -1


def test_first_packet_opens_idle_closes_both_sides_and_reopens(lab: Lab) -> None:
    # no hosts block: names come from the stub resolver only (the last step looks one up)
    world, desktop, laptop = _start(lab, ("fast", "python"), hosts_file="", upstream="none")
    ula = laptop.first_peer()["ula"]
    # the first pings go out while the tunnel opens: held, then delivered, none lost
    code, out = _ping(laptop, ula, 3)
    assert code == 0 and _received(out) == 3, out
    for h in (laptop, desktop):
        world.wait_until(lambda h=h: h.first_peer()["tunnel"] == "up", 10, f"{h.name} up")
    assert laptop.first_peer()["on_demand"]["opens"] == 1
    assert laptop.first_peer()["drops"].get("hold_overflow", 0) == 0
    # no packet for IDLE seconds: both sides close (the laptop opened it, the desktop
    # answered: each runs its own idle timer)
    for h in (laptop, desktop):
        world.wait_until(lambda h=h: h.first_peer()["tunnel"] == "idle", IDLE + 15,
                         f"{h.name} idle again")
        assert h.first_peer()["on_demand"]["closes"] >= 1, h.first_peer()
    # the next packet opens it again, and again the first ping is answered
    code, out = _ping(laptop, ula, 1)
    assert code == 0 and _received(out) == 1, out
    world.wait_until(lambda: laptop.first_peer()["on_demand"]["opens"] == 2, 10, "second opening")
    # and from the other side too, without a lost first packet
    world.wait_until(lambda: _both_idle(desktop, laptop), IDLE + 15, "both idle again")
    code, out = _ping(desktop, desktop.first_peer()["ula"], 1)
    assert code == 0 and _received(out) == 1, out
    # a program looking the peer's name up through the stub opens the tunnel before it sends
    world.wait_until(lambda: _both_idle(desktop, laptop), IDLE + 15, "both idle once more")
    opens = laptop.first_peer()["on_demand"]["opens"]
    found = laptop.ns.run(["getent", "ahosts", desktop.fqdn], check=False).stdout
    assert ula in found, found
    world.wait_until(lambda: laptop.first_peer()["tunnel"] == "up"
                     and laptop.first_peer()["on_demand"]["opens"] == opens + 1, 10,
                     "opened by a lookup")


def test_a_peer_that_never_answers_gets_icmpv6_unreachable(lab: Lab) -> None:
    world, desktop, laptop = _start(lab, ("python", "fast"))
    ula = laptop.first_peer()["ula"]
    # the desktop dies without withdrawing its records: the laptop still routes to it
    world.stop_host(desktop, kill=True)
    t0 = time.monotonic()
    code, out = _ping(laptop, ula, 1, wait=CONNECT + 20)
    took = time.monotonic() - t0
    assert code != 0 and _received(out) == 0, out
    assert "Address unreachable" in out, out
    assert CONNECT - 0.5 <= took < CONNECT + 15, (took, out)
    p = laptop.first_peer()
    assert p["tunnel"] == "idle" and p["held"] == 0, p
    assert p["on_demand"]["rejects"] == 1, p
