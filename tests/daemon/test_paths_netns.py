"""Issue 13 in the namespace world (``btmm_core.lab.world``), real ``btmm serve`` (with its
STUN responder) and ``btmm up``: two homes whose gateways run no mapping protocol (plain
nftables masquerade: the tunnel needs a punched path), both hosts in one home behind a gateway
that does not hairpin (the tunnel needs the LAN path), a gateway that starts mapping while a
punched path carries traffic (the path becomes ``mapped`` without a lost packet), a gateway
that drops the pinhole (conntrack flushed: the tunnel comes back within seconds), a path that
stops answering (``btmm status``: stale, down with why, up again), and forged or replayed
probes from an attacker namespace, which must move no endpoint.

Figures (recovery gaps) are printed; run with ``-s`` to see them. They are measurements, not
assertions: the tests wait for each condition with a deadline."""

from __future__ import annotations

import base64
import itertools
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
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


def _no_retry(world: World) -> None:
    """The cold-start rule: neither side's first handshake went unanswered."""
    for name in world.hosts:
        peer = world.hosts[name].first_peer()
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
        peer = world.hosts[name].first_peer()
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
        peer = world.hosts[name].first_peer()
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
    world.wait_until(
        lambda: sum(world.hosts["desktop"].first_peer().get("probe_drops", {}).values()) >= 100,
        5, "the desktop counted the forged probes")
    peer = world.hosts["desktop"].first_peer()
    assert peer["endpoint"] == "192.168.1.11:4500" and peer["path"] == "lan"
    assert peer["probe_drops"].get("bad_mac", 0) >= 50
    _ping_and_transfer(world, 200_000)


# --- a ping series and a transfer across a change ------------------------------------------


class PingSeries:
    """``ping -D`` from one host to another by name, every ``interval`` s, until ``stop``.

    Replies are read from its output file while it runs (``replied_after``); ``stop`` ends it
    with SIGINT and returns the sequence numbers lost and the longest gap between replies."""

    def __init__(self, world: World, src: Host, dst: Host, out: Path,
                 interval: float = 0.05, longest: float = 20.0) -> None:
        self.out = out
        self.interval = interval
        with out.open("w") as f:
            # bounded: at most ``longest`` s of pings even if nobody stops it
            self.proc = src.ns.popen(
                ["ping", "-6", "-n", "-D", "-i", str(interval), "-W", "1",
                 "-c", str(int(longest / interval)), dst.fqdn],
                stdout=f, stderr=subprocess.STDOUT)

    def replies(self) -> dict[int, float]:
        """icmp_seq -> wall time of its reply."""
        text = self.out.read_text(errors="replace")
        return {int(seq): float(ts) for ts, seq in
                re.findall(r"^\[([\d.]+)\] \d+ bytes from .*icmp_seq=(\d+)", text, re.M)}

    def replied_after(self, wall: float, n: int = 3) -> bool:
        return sum(1 for t in self.replies().values() if t > wall) >= n

    def stop(self) -> tuple[list[int], float]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        got = self.replies()
        assert got, self.out.read_text()
        last = max(got)
        lost = [s for s in range(1, last) if s not in got]
        times = sorted(got.values())
        gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
        return lost, gap


def _paths(world: World) -> dict[str, tuple[str | None, str | None, str | None]]:
    """host -> (path, endpoint, tunnel) of its one peer, from ``btmm status --json``."""
    out = {}
    for name in world.hosts:
        peer = world.hosts[name].first_peer()
        out[name] = (peer.get("path"), peer.get("endpoint"), peer.get("tunnel"))
    return out


def _chosen(world: World, host: str) -> tuple[str | None, str | None]:
    """(path, endpoint) the host's path manager chose for its one peer."""
    peer = world.hosts[host].first_peer()
    return peer.get("path"), peer.get("path_endpoint")


def _punched(world: World, planes: tuple[str, str]) -> dict[str, str]:
    """A started no-mapping world once both hosts use their punched path; the endpoints."""
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(40)
    paths = _paths(world)
    assert {p for p, _, _ in paths.values()} == {"punched"}, paths
    return {name: str(ep) for name, (_, ep, _) in paths.items()}


UPGRADES = [(("fast", "fast"), True), (("python", "fast"), False)]


@pytest.mark.parametrize(("planes", "announce"), UPGRADES,
                         ids=["fast-fast-announced", "python-fast-retried"])
def test_a_mapping_that_starts_late_upgrades_the_punched_path_without_loss(
        lab: Lab, planes: tuple[str, str], announce: bool) -> None:
    """Both gateways start miniupnpd while a punched path carries a ping series and a TCP
    transfer. Outcome: the path becomes ``mapped`` on both hosts *in place*: the lab's
    masquerade kept the engine's port (4500) for the pinhole and miniupnpd grants that same
    port, so each host republishes its reflexive endpoint as a MAPPED candidate, the peer's
    LLQ delivers it, and the path manager gives the path in use the better kind without
    moving it (``UsePath`` to the same endpoint). That is right: the endpoint no longer needs
    the pinhole (a DNAT rule forwards it, so it survives a flushed conntrack table:
    ``test_a_dropped_pinhole_recovers_...``), and not moving loses nothing. (Where the
    granted port differs, the peer moves to it once it answered a probe: the next test.)

    ``announced``: miniupnpd's start-up announcement (PCP ANNOUNCE, RFC 6887 14.1.3) makes
    the daemon ask at once. ``retried``: the gateway's announcements are dropped, so the
    daemon's periodic retry (5 s after a failure, doubling up to 300 s) finds it."""
    world = build_world(lab, nat=True, dataplanes=planes, mapping=False)
    before = _punched(world, planes)
    laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
    ping = PingSeries(world, laptop, desktop, world.workdir / "ping.txt")
    src, sink = start_transfer(world, laptop, desktop, 8_000_000, rate=1e6)
    world.wait_until(lambda: ping.replied_after(0, 10), 10, "the ping series")
    t0 = time.monotonic()
    for home in ("gw1", "gw2"):
        world.start_mapping(home, announce=announce)
    world.wait_until(lambda: {p for p, _, _ in _paths(world).values()} == {"mapped"}, 30,
                     "both paths mapped")
    took = time.monotonic() - t0
    mapped_at = time.time()
    world.wait_until(lambda: ping.replied_after(mapped_at, 20), 10, "pings after the upgrade")
    lost, gap = ping.stop()
    sent, got = finish_transfer(src, sink)
    print(f"\nupgrade ({'announced' if announce else 'retried'}): mapped {took:.1f} s after "
          f"miniupnpd started; pings lost {len(lost)}, longest gap {gap * 1000:.0f} ms")
    assert lost == [], (lost, _paths(world))
    assert sent["bytes"] == got["bytes"] == 8_000_000 and sent["sha256"] == got["sha256"]
    for name, (path, endpoint, tunnel) in _paths(world).items():
        assert (path, endpoint, tunnel) == ("mapped", before[name], "up")
        st = world.hosts[name].status()
        assert st is not None and st["host"]["external"] is not None
        assert st["host"]["mapping"].startswith("pcp via")
        assert "mapped" in [c["kind"] for c in st["host"]["candidates"]]
    _no_retry(world)
    assert 'path=mapped' in (desktop.log.read_text() if desktop.log else "")


def test_a_mapping_on_another_port_moves_the_path_without_loss(lab: Lab) -> None:
    """The desktop's gateway starts mapping but grants 4501, not the 4500 its pinhole uses:
    the desktop publishes a MAPPED candidate beside its reflexive one, the laptop probes it,
    and once it answers moves its path there (``UsePath``: only the outer endpoint changes)
    under a running ping series and TCP transfer, losing nothing."""
    world = build_world(lab, nat=True, dataplanes=("fast", "fast"), mapping=False)
    before = _punched(world, ("fast", "fast"))
    assert before["laptop"] == "203.0.113.2:4500"
    laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
    ping = PingSeries(world, laptop, desktop, world.workdir / "ping.txt")
    src, sink = start_transfer(world, laptop, desktop, 6_000_000, rate=1e6)
    world.wait_until(lambda: ping.replied_after(0, 10), 10, "the ping series")
    world.start_mapping("gw1", external_ports="4501-4600")
    # the path manager's choice, not the engine's endpoint: the desktop's gateway may send the
    # desktop's packets out through the older pinhole (4500) or the new mapping (4501), as its
    # connection tracking finds them, and the engine follows whichever authenticated source
    # spoke last ("peer roamed"); either carries the traffic
    world.wait_until(lambda: _chosen(world, "laptop") == ("mapped", "203.0.113.2:4501"), 30,
                     "the laptop's path moved to the mapping")
    moved_at = time.time()
    world.wait_until(lambda: ping.replied_after(moved_at, 20), 10, "pings after the move")
    lost, gap = ping.stop()
    sent, got = finish_transfer(src, sink)
    print(f"\nmove to the mapping: pings lost {len(lost)}, longest gap {gap * 1000:.0f} ms")
    assert lost == [], lost
    assert sent["bytes"] == got["bytes"] == 6_000_000 and sent["sha256"] == got["sha256"]
    st = desktop.status()
    assert st is not None and st["host"]["external"] == "203.0.113.2:4501"
    kinds = {c["kind"]: c["endpoint"] for c in st["host"]["candidates"]}
    assert kinds["mapped"] == "203.0.113.2:4501" and kinds["reflexive"] == "203.0.113.2:4500"
    # the laptop still answers the desktop, whichever of its endpoints the desktop uses
    assert _paths(world)["desktop"][2] == "up"
    assert _paths(world)["laptop"][1] in ("203.0.113.2:4500", "203.0.113.2:4501")


@pytest.mark.parametrize("planes", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_a_dropped_pinhole_recovers_and_a_mapped_path_never_loses_it(
        lab: Lab, planes: tuple[str, str]) -> None:
    """The desktop's gateway flushes its connection tracking (``conntrack -F``) while the
    laptop pings the desktop and sends it a TCP stream. On the punched path that drops the
    pinhole: the laptop's packets die at the desktop's gateway, and the desktop, which only
    answers, hears nothing. Its path manager notices the peer's traffic stopped, probes once
    from inside (``quiet_after``, 1 s), which opens the pinhole again: the gap is about a
    second. Then both gateways start mapping, the path becomes ``mapped``, and the same flush
    costs nothing: the gateway's DNAT rule does not live in the conntrack table."""
    world = build_world(lab, nat=True, dataplanes=planes, mapping=False)
    _punched(world, planes)
    laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
    gw1 = world.homes["gw1"].gw
    gaps = []
    for round_, path in enumerate(("punched", "mapped")):
        if path == "mapped":
            for home in ("gw1", "gw2"):
                world.start_mapping(home)
            world.wait_until(lambda: {p for p, _, _ in _paths(world).values()} == {"mapped"}, 30,
                             "both paths mapped")
        ping = PingSeries(world, laptop, desktop, world.workdir / f"ping{round_}.txt")
        src, sink = start_transfer(world, laptop, desktop, 4_000_000, rate=1e6,
                                   port=5001 + round_)
        world.wait_until(lambda: ping.replied_after(0, 20), 10, "the ping series")  # noqa: B023
        flushed = time.time()
        gw1.ns.run(["conntrack", "-F"])
        world.wait_until(lambda: ping.replied_after(flushed, 20), 10,  # noqa: B023
                         f"pings answered after the flush ({path})")
        lost, gap = ping.stop()
        sent, got = finish_transfer(src, sink)
        assert sent["bytes"] == got["bytes"] and sent["sha256"] == got["sha256"]
        gaps.append(gap)
        print(f"\n{path} path, desktop's gateway flushed: pings lost {len(lost)}, longest "
              f"gap {gap * 1000:.0f} ms ({planes[0]}/{planes[1]})")
        assert {p for p, _, t in _paths(world).values()} == {path}
        assert {t for _, _, t in _paths(world).values()} == {"up"}
        if path == "mapped":
            assert lost == [], lost


#: a gateway that drops everything of the tunnel both ways, ahead of its own rules
_CUT = """
table inet lab_cut {
    chain forward {
        type filter hook forward priority -10; policy accept;
        udp sport 4500 drop
        udp dport 4500 drop
    }
}
"""


def test_a_path_that_stops_answering_goes_stale_then_down_and_comes_back(lab: Lab) -> None:
    """The desktop's gateway drops the tunnel's packets both ways for a while (no flush: the
    pinholes stay). ``btmm status`` on the laptop, which keeps pinging, says ``stale`` (5 s:
    still used, a search runs) and then ``down`` (10 s) with why; once the gateway forwards
    again the search, backing off from 1 s, finds the path and the tunnel is ``up``."""
    world = build_world(lab, nat=True, dataplanes=("fast", "fast"), mapping=False)
    _punched(world, ("fast", "fast"))
    laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
    gw1 = world.homes["gw1"].gw
    seen: list[tuple[str, str | None]] = []

    def laptop_state(want: str) -> bool:
        peer = world.hosts["laptop"].first_peer()
        state = (peer.get("tunnel"), peer.get("why"))
        if not seen or seen[-1] != state:
            seen.append(state)
        return state[0] == want

    ping = PingSeries(world, laptop, desktop, world.workdir / "ping.txt", interval=0.2,
                      longest=60)
    world.wait_until(lambda: ping.replied_after(0, 3), 10, "the ping series")
    cut = time.monotonic()
    gw1.ns.run(["nft", "-f", "-"], input=_CUT)
    world.wait_until(lambda: laptop_state("down"), 20, "the laptop's tunnel down")
    down_after = time.monotonic() - cut
    gw1.ns.run(["nft", "delete", "table", "inet", "lab_cut"])
    healed, healed_wall = time.monotonic(), time.time()
    world.wait_until(lambda: laptop_state("up") and ping.replied_after(healed_wall, 3), 30,
                     "the laptop's tunnel up again")
    back_after = time.monotonic() - healed
    ping.stop()
    print(f"\ncut: the laptop said {[t for t, _ in seen]}, down {down_after:.1f} s after the "
          f"cut, up again {back_after:.1f} s after the gateway forwarded again")
    states = [t for t, _ in seen]
    assert states.index("stale") < states.index("down") < len(states) - 1
    assert states[-1] == "up"
    why = next(w for t, w in seen if t == "down")
    assert why is not None and "no authenticated packet" in why
    assert _paths(world)["desktop"][2] == "up"
    assert _paths(world)["laptop"][1] in ("203.0.113.2:4500", "203.0.113.2:4501")
    _ping_and_transfer(world, 500_000)


# --- replayed probes -------------------------------------------------------------------------


def _pcap_udp_payload(path: Path) -> bytes:
    """The UDP payload of the first packet of an Ethernet pcap file (tcpdump -w)."""
    data = path.read_bytes()
    (incl,) = struct.unpack_from("<I", data, 24 + 8)
    frame = data[24 + 16: 24 + 16 + incl]
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    return ip[ihl + 8:]


def _capture(world: World, host: Host, bpf: str, out: Path) -> subprocess.Popen[Any]:
    """tcpdump of one packet matching ``bpf`` on the host's eth0, once it listens."""
    err = out.with_suffix(".err")
    with err.open("w") as f:
        proc = host.ns.popen(["tcpdump", "-i", "eth0", "-n", "-U", "-c", "1", "-w", str(out),
                              bpf], stdout=subprocess.DEVNULL, stderr=f)
    world.wait_until(lambda: "listening on" in err.read_text(), 10, "tcpdump listening")
    return proc


#: sends each (payload, source address, source port) as a UDP datagram to the desktop's
#: engine with that source, raw, so the attacker can also use the laptop's address
_SPOOF = """
import socket, struct, sys
def send(payload, src, sport, dst='192.168.1.10', dport=4500):
    udp = struct.pack('!HHHH', sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(ip + udp, (dst, 0))
for payload, src, sport in eval(sys.argv[1]):
    send(payload, src, sport)
"""


def test_replayed_probes_from_an_attacker_or_the_genuine_address_move_nothing(
        lab: Lab) -> None:
    # one genuine request and one genuine reply of the laptop's, captured on the desktop's
    # link (each correctly MACed with the laptop's and the desktop's keys), then sent again
    # from the attacker's address and from the laptop's own: the request was answered once
    # (its txid is remembered), the reply's txid is no longer in flight
    world = build_world(lab, nat=True, dataplanes=("fast", "fast"), same_home=True)
    for h in world.hosts.values():
        world.start_host(h)
    world.wait_tunnels(40)
    laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
    base = "udp dst port 4500 and src host 192.168.1.11 and udp[8:4] = 0"
    req_file, rep_file = world.workdir / "request.pcap", world.workdir / "reply.pcap"
    caps = [_capture(world, desktop, f"{base} and udp[12] = 6", req_file),
            _capture(world, desktop, f"{base} and udp[12] = 7", rep_file)]

    pinged = [0.0]

    def captured() -> bool:
        if all(c.poll() is not None for c in caps):
            return True
        # traffic that stops (for a second) makes each side check its path once: a request
        # each way, and its reply
        if time.monotonic() - pinged[0] > 3.0:
            laptop.ns.run(["ping", "-6", "-c", "1", "-W", "1", desktop.fqdn], check=False)
            pinged[0] = time.monotonic()
        return False

    world.wait_until(captured, 20, "a request and a reply of the laptop captured")
    request, reply = _pcap_udp_payload(req_file), _pcap_udp_payload(rep_file)
    assert request[4] == 6 and reply[4] == 7
    # the messages are genuine: the laptop's sender id, and the desktop accepted them once
    sender = key_id(base64.b64decode((laptop.status() or {})["host"]["public_key"]))
    assert request[8:16] == reply[8:16] == sender
    before = dict(world.hosts["desktop"].first_peer().get("probe_drops", {}))
    attacker = Host("attacker", lab.ns("attacker"), world.workdir,
                    world.workdir / "attacker.toml")
    world.plug(attacker, world.homes["gw1"], 5)
    sends = [(m, src, 4500) for m in (request, reply)
             for src in ("192.168.1.15", "192.168.1.11")] * 5
    attacker.ns.run([sys.executable, "-c", _SPOOF, repr(sends)])

    def drops() -> dict[str, int]:
        now = world.hosts["desktop"].first_peer().get("probe_drops", {})
        return {k: now.get(k, 0) - before.get(k, 0) for k in now}

    world.wait_until(
        lambda: drops().get("replay", 0) >= 10 and drops().get("unsolicited", 0) >= 10, 10,
        "the desktop counted the replays")
    assert drops() == {"replay": 10, "unsolicited": 10}
    peer = world.hosts["desktop"].first_peer()
    assert peer["endpoint"] == "192.168.1.11:4500" and peer["path"] == "lan"
    assert peer["tunnel"] == "up"
    _ping_and_transfer(world, 200_000)
