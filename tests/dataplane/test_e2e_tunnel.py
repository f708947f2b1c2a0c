"""End to end: two `btmm tunnel` processes in two network namespaces, every engine pairing.

Topology: namespaces a and b on one veth link (192.0.2.1/24, 192.0.2.2/24 and 2001:db8:b7::1/64,
::2/64); inner addresses fd00:b7:1::1 and fd00:b7:1::2 routed (/128) into each side's TUN
device. Every pairing runs over an IPv4 underlay and again over an IPv6 one (the engines'
endpoints are the other side's address of that family), and a transfer moves from one family
to the other and back mid-stream. The engines run as
separate processes, exactly as a person would run them, and are checked through their control
channel. An engine that is not built fails these tests; it does not skip them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    A_INNER,
    B_INNER,
    OUTER,
    Tunnel,
    endpoint,
    pair_configs,
    ping6,
    transfer,
    two_hosts,
    wait_for,
)

from btmm_core.dataplane.api import DEFAULT_MTU
from btmm_core.lab.netns import Lab

# Needs root: without it Lab() raises PermissionNeeded and the tests fail (never skip).
pytestmark = pytest.mark.netns

#: (engine of a, engine of b, TUN offloads on); the fast pair runs once more with the
#: offloads forced off (BTMM_TUN_OFFLOAD=0), the engine's plain one-packet-per-read path.
ENGINES = [
    ("fast", "fast", True),
    ("python", "python", True),
    ("fast", "python", True),
    ("python", "fast", True),
    ("fast", "fast", False),
]
#: each pairing over each underlay family
PAIRS = [(*e, family) for family in (4, 6) for e in ENGINES]
OFFLOAD_OFF = {"BTMM_TUN_OFFLOAD": "0"}
BIG = 100 * 1024 * 1024
#: drops that must never happen between two correctly keyed peers on a clean link
BAD_DROPS = ("auth", "unknown_spi", "replay", "malformed", "source_mismatch")


class Pair:
    def __init__(
        self,
        lab: Lab,
        a: Any,
        b: Any,
        ta: Tunnel,
        tb: Tunnel,
        offload: bool = True,
        family: int = 4,
    ) -> None:
        self.lab, self.a, self.b, self.ta, self.tb = lab, a, b, ta, tb
        self.offload, self.family = offload, family


def _pair_id(p: tuple[str, str, bool, int]) -> str:
    return f"{p[0]}-{p[1]}" + ("" if p[2] else "-offload-off") + f"-v{p[3]}"


@pytest.fixture(scope="module", params=PAIRS, ids=_pair_id)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    a_kind, b_kind, offload, family = request.param
    work: Path = tmp_path_factory.mktemp(f"e2e-{_pair_id(request.param)}")
    extra = {} if offload else dict(OFFLOAD_OFF)
    with Lab() as lab:
        a, b = two_hosts(lab)
        ca, cb = pair_configs(a_kind, b_kind, family=family)
        ta = Tunnel("a", a, a_kind, ca, work, extra_env=extra)
        tb = Tunnel("b", b, b_kind, cb, work, extra_env=extra)
        ta.start()
        tb.start()
        yield Pair(lab, a, b, ta, tb, offload, family)
        # One tunnel is asked to quit, the other stops because its control channel ended.
        codes = (ta.stop(), tb.close_stdin())
        assert codes == (0, 0), f"tunnels exited with {codes}:\n{ta.log_tail()}\n{tb.log_tail()}"


def _no_bad_drops(t: Tunnel) -> None:
    drops = t.drops()
    bad = {k: drops.get(k, 0) for k in BAD_DROPS if drops.get(k, 0)}
    assert not bad, f"tunnel {t.name} ({t.kind}) dropped packets: {bad}; all counters: {drops}"


def test_tun_offloads_as_configured(pair: Pair) -> None:
    # The kernel's view of each TUN device: the fast engine asks for virtio-net headers (the
    # offloads) unless BTMM_TUN_OFFLOAD=0 reached its process; the Python engine never does.
    for t in (pair.ta, pair.tb):
        want = t.kind == "fast" and pair.offload
        assert t.tun_vnet_hdr() is want, (
            f"tunnel {t.name} ({t.kind}, env {t.extra_env}): vnet_hdr should be "
            f"{'on' if want else 'off'}"
        )


def test_endpoints_are_of_the_underlay_family(pair: Pair) -> None:
    a_out, b_out, _ = OUTER[pair.family]
    assert pair.ta.peers()[B_INNER]["endpoint"] == endpoint(b_out)
    assert pair.tb.peers()[A_INNER]["endpoint"] == endpoint(a_out)


def test_ping6_across_the_tunnel(pair: Pair) -> None:
    before_a, before_b = pair.ta.counters(), pair.tb.counters()
    result = ping6(pair.a, B_INNER, count=3)
    assert result.returncode == 0, f"ping a->b failed:\n{result.stdout}{result.stderr}"
    result = ping6(pair.b, A_INNER, count=3)
    assert result.returncode == 0, f"ping b->a failed:\n{result.stdout}{result.stderr}"
    after_a, after_b = pair.ta.counters(), pair.tb.counters()
    # 3 requests and 3 replies each way went through each engine.
    assert after_a["packets_out"] - before_a["packets_out"] >= 6
    assert after_a["packets_in"] - before_a["packets_in"] >= 6
    assert after_b["packets_out"] - before_b["packets_out"] >= 6
    assert after_b["packets_in"] - before_b["packets_in"] >= 6
    _no_bad_drops(pair.ta)
    _no_bad_drops(pair.tb)


def test_100mb_tcp_transfer_matches(pair: Pair) -> None:
    before_a, before_b = pair.ta.counters(), pair.tb.counters()
    result = transfer(pair.a, pair.b, B_INNER, BIG, timeout=240)
    assert result.sent["bytes"] == BIG
    assert result.received["bytes"] == BIG, result.received
    assert result.received["sha256"] == result.sent["sha256"]
    after_a, after_b = pair.ta.counters(), pair.tb.counters()
    # TCP payload crossed a -> b inside at least BIG / (MTU - headers) packets.
    min_packets = BIG // DEFAULT_MTU
    sent = after_a["packets_out"] - before_a["packets_out"]
    got = after_b["packets_in"] - before_b["packets_in"]
    assert sent >= min_packets, f"a sealed only {sent} packets for {BIG} bytes"
    assert got >= min_packets, f"b delivered only {got} packets for {BIG} bytes"
    assert after_b["bytes_in"] - before_b["bytes_in"] >= BIG
    assert after_a["bytes_out"] - before_a["bytes_out"] >= BIG
    # ACKs went back b -> a.
    assert after_b["packets_out"] > before_b["packets_out"]
    assert after_a["packets_in"] > before_a["packets_in"]
    _no_bad_drops(pair.ta)
    _no_bad_drops(pair.tb)
    for t in (pair.ta, pair.tb):
        peer = next(iter(t.peers().values()))
        assert peer["counters"]["packets_in"] > 0 and peer["counters"]["packets_out"] > 0, peer
    # Full-size packets fit the path: none was fragmented on the outer link (an inner MTU
    # that ignored IPv6's 40-byte header did that, at a fifth of the speed).
    for ns in (pair.a, pair.b):
        assert _fragments(ns) == (0, 0), f"outer packets were fragmented: {_fragments(ns)}"


def _fragments(ns: Any) -> tuple[int, int]:
    """Fragments created (IPv4 FragCreates, IPv6 Ip6FragCreates) in a namespace so far."""
    snmp = ns.run(["cat", "/proc/net/snmp"]).stdout.split("\n")
    rows = [line.split() for line in snmp if line.startswith("Ip:")]
    v4 = int(rows[1][rows[0].index("FragCreates")])
    v6 = next(
        int(line.split()[1])
        for line in ns.run(["cat", "/proc/net/snmp6"]).stdout.splitlines()
        if line.startswith("Ip6FragCreates")
    )
    return v4, v6


def test_roaming_during_a_transfer(pair: Pair) -> None:
    pair.tb.events()  # start from an empty backlog
    size = 24 * 1024 * 1024

    a_out, _, a_roamed = OUTER[pair.family]
    plen = 24 if pair.family == 4 else 64

    def move_a() -> None:
        # a gets a new outer address and loses the old one while data is flowing.
        nodad = ["nodad"] if pair.family == 6 else []
        pair.a.run(["ip", "addr", "add", f"{a_roamed}/{plen}", "dev", "eth0", *nodad])
        pair.a.run(["ip", "addr", "del", f"{a_out}/{plen}", "dev", "eth0"])

    # Paced, so that the address change happens in the middle of the stream.
    result = transfer(
        pair.a, pair.b, B_INNER, size, rate=8e6, at_fraction=0.25, action=move_a, timeout=180
    )
    assert result.received["bytes"] == size, result.received
    assert result.received["sha256"] == result.sent["sha256"]
    new = endpoint(a_roamed)
    seen: list[dict[str, Any]] = []

    def roamed() -> bool:
        seen.extend(pair.tb.events())
        return any(e["type"] == "roamed" and e["new"] == new for e in seen)

    wait_for(roamed, 30, f"a roamed event to {new} on b")
    event = next(e for e in seen if e["type"] == "roamed")
    assert event["inner"] == A_INNER and event["old"] == endpoint(a_out), event
    assert pair.tb.peers()[A_INNER]["endpoint"] == new
    # And the tunnel still works both ways from the new address.
    result_ping = ping6(pair.b, A_INNER, count=2)
    assert result_ping.returncode == 0, result_ping.stdout + result_ping.stderr
    _no_bad_drops(pair.ta)
    _no_bad_drops(pair.tb)


def test_roaming_across_families_during_a_transfer(pair: Pair) -> None:
    """a moves to the other family mid-transfer and then back, as a laptop going from IPv4
    Wi-Fi to an IPv6-only network and back: a loses its address of one family, keeps or
    regains one of the other and is told b's endpoint of that family; its authenticated
    packets then arrive from there, and b follows them. The stream finishes intact. (While a
    still has an address of the old family, b's packets in flight on the old path would move
    a's own view of b back there: authenticated packets move endpoints both ways.)"""
    other = 10 - pair.family
    # Where each side is now (an earlier test may have moved a within its family).
    a_here, b_here = pair.tb.peers()[A_INNER]["endpoint"], pair.ta.peers()[B_INNER]["endpoint"]
    a_here_host = a_here.rpartition(":")[0].strip("[]")
    a_there_host, b_there_host, _ = OUTER[other]
    a_there, b_there = endpoint(a_there_host), endpoint(b_there_host)

    def address(op: str, host: str) -> None:
        if ":" in host:
            pair.a.run(
                [
                    "ip",
                    "-6",
                    "addr",
                    op,
                    f"{host}/64",
                    "dev",
                    "eth0",
                    *(["nodad"] if op == "add" else []),
                ]
            )
        else:
            pair.a.run(["ip", "addr", op, f"{host}/24", "dev", "eth0"])

    def leave() -> None:
        address("del", a_here_host)
        pair.ta.ok("update_peer", inner=B_INNER, endpoint=b_there)

    def come_back() -> None:
        address("add", a_here_host)
        address("del", a_there_host)
        pair.ta.ok("update_peer", inner=B_INNER, endpoint=b_here)

    pair.tb.events()
    size = 24 * 1024 * 1024
    try:
        result = transfer(
            pair.a,
            pair.b,
            B_INNER,
            size,
            rate=8e6,
            actions=[(0.25, leave), (0.6, come_back)],
            timeout=180,
        )
    finally:
        address("add", a_there_host)
    assert result.received["bytes"] == size, result.received
    assert result.received["sha256"] == result.sent["sha256"]
    seen: list[dict[str, Any]] = []

    def back() -> bool:
        seen.extend(e for e in pair.tb.events() if e["type"] == "roamed")
        return len(seen) >= 2

    try:
        wait_for(back, 30, "b to follow a to the other family and back")
    except AssertionError as err:
        raise AssertionError(f"{err}; roamed events {seen}; b's peers {pair.tb.peers()}") from None
    moves = [(e["old"], e["new"]) for e in seen]
    assert moves[:2] == [(a_here, a_there), (a_there, a_here)], moves
    assert pair.tb.peers()[A_INNER]["endpoint"] == a_here
    _no_bad_drops(pair.ta)
    _no_bad_drops(pair.tb)
