"""Both engines, and each against the other, over IPv4 and IPv6 underlays and across them.

Host a runs the engine under test (`btmm tunnel`), host b the other kind; they share one veth
link with addresses of both families (192.0.2.0/24 and 2001:db8:b7::/64). Besides the real
peer b, a has a peer c (fd00:b7:1::3) whose SAs the test holds: it crafts c's ESP with the
bare codec and sends it from plain UDP sockets of either family in namespace b. Each engine
has one dual-stack socket, so:

- the tunnel works over either family, and the endpoint of each side says which;
- an authenticated packet from the other family moves the peer there (a roamed event whose
  endpoints are written ``a.b.c.d:port`` and ``[IPv6]:port``), and back;
- forged, replayed, truncated and unknown packets from the other family change no endpoint
  and are counted as drops like any others.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    A_INNER,
    B_INNER,
    OUTER,
    PORT,
    Tunnel,
    endpoint,
    flat_counters,
    helper_argv,
    icmp6_echo,
    keymat,
    pair_configs,
    ping6,
    two_hosts,
    wait_for,
)

from btmm_core.dataplane import rx_codec, tx_codec
from btmm_core.dataplane.api import CONTROL_MARKER, KEEPALIVE, TxCodec
from btmm_core.lab.netns import Lab

# Needs root: without it Lab() raises PermissionNeeded and the tests fail (never skip).
pytestmark = pytest.mark.netns

C_INNER = "fd00:b7:1::3"
C_PORT = 5555
#: packets the kernel itself may send into a TUN (multicast listener reports) have no peer
NOISE = {"drops.no_route", "packets_out", "bytes_out"}
BAD_DROPS = ("auth", "unknown_spi", "replay", "malformed", "source_mismatch")
#: (engine under test on a, engine on b)
PAIRS = [("fast", "python"), ("python", "fast")]


def c_endpoint(family: int) -> str:
    return endpoint(OUTER[family][1], C_PORT)


class Families:
    def __init__(self, kind: str, a: Any, b: Any, ta: Tunnel, tb: Tunnel) -> None:
        self.kind, self.a, self.b, self.ta, self.tb = kind, a, b, ta, tb
        self.c_tx: TxCodec
        self.c_rx_spi = 0
        self.c_rx_key = b""

    def udp(
        self, payloads: list[bytes], family: int, wait: float = 0.0, most: int = 100
    ) -> list[dict[str, Any]]:
        """Send from c's socket of ``family`` in namespace b to a's engine (at its address of
        that family); collect up to ``most`` replies for up to ``wait`` seconds."""
        a_out, b_out, _ = OUTER[family]
        result = self.b.run(
            helper_argv("udp", b_out, str(C_PORT), a_out, str(PORT), str(wait), str(most)),
            input=json.dumps([p.hex() for p in payloads]),
            timeout=90 + wait,
        )
        replies: list[dict[str, Any]] = json.loads(result.stdout)["replies"]
        return replies

    def counters(self) -> dict[str, int]:
        return flat_counters(self.ta.counters())

    def expect(self, before: dict[str, int], expected: dict[str, int]) -> dict[str, int]:
        """Wait until a's counters moved by ``expected``; then nothing else may have moved
        (but the kernel's own noise)."""

        def reached() -> dict[str, int] | None:
            now = self.counters()
            ok = all(now.get(k, 0) - before.get(k, 0) >= v for k, v in expected.items())
            return now if ok else None

        try:
            wait_for(reached, 30, f"counters of a ({self.kind}) to move by {expected}")
        except AssertionError as err:
            raise AssertionError(f"{err}; counters: {self.ta.counters()}") from None
        time.sleep(0.3)  # let any wrongly counted duplicate show up
        now = self.counters()
        for key in set(now) | set(before):
            moved, want = now.get(key, 0) - before.get(key, 0), expected.get(key, 0)
            if key in NOISE and key not in expected:
                continue
            assert moved == want, f"{key} moved by {moved}, expected {want}"
        return now

    def c_endpoint_at_a(self) -> str | None:
        return self.ta.peers()[C_INNER]["endpoint"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}-vs-{p[1]}")
def fam(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Families]:
    a_kind, b_kind = request.param
    work: Path = tmp_path_factory.mktemp(f"families-{a_kind}-{b_kind}")
    k_ca, k_ac = keymat(), keymat()
    spi_ca, spi_ac = 0x3000 + secrets.randbelow(1 << 16), 0x4000000 + secrets.randbelow(1 << 16)
    c_peer = {
        "inner": C_INNER,
        "endpoint": c_endpoint(4),
        "tx_spi": spi_ac,
        "tx_key": k_ac,
        "rx_spi": spi_ca,
        "rx_key": k_ca,
    }
    with Lab() as lab:
        a, b = two_hosts(lab)
        ca, cb = pair_configs(a_kind, b_kind, a_extra_peers=[c_peer])
        ta = Tunnel("a", a, a_kind, ca, work)
        tb = Tunnel("b", b, b_kind, cb, work)
        ta.start()
        tb.start()
        f = Families(a_kind, a, b, ta, tb)
        f.c_tx = tx_codec(spi_ca, bytes.fromhex(k_ca), kind=a_kind)
        f.c_rx_spi, f.c_rx_key = spi_ac, bytes.fromhex(k_ac)
        time.sleep(0.5)  # the kernel's own first packets into the new TUN devices
        yield f
        codes = (ta.stop(), tb.stop())
        assert codes == (0, 0), f"tunnels exited with {codes}:\n{ta.log_tail()}\n{tb.log_tail()}"


def _udp6_in(ns: Any) -> int:
    """UDP datagrams received over IPv6 in a namespace (v4-mapped ones count as IPv4)."""
    for line in ns.run(["cat", "/proc/net/snmp6"]).stdout.splitlines():
        if line.startswith("Udp6InDatagrams"):
            return int(line.split()[1])
    raise AssertionError("no Udp6InDatagrams in /proc/net/snmp6")


def _no_bad_drops(t: Tunnel) -> None:
    drops = t.drops()
    bad = {k: drops.get(k, 0) for k in BAD_DROPS if drops.get(k, 0)}
    assert not bad, f"tunnel {t.name} ({t.kind}) dropped packets: {bad}"


def test_the_tunnel_over_each_family(fam: Families) -> None:
    for family in (6, 4, 6, 4):
        a_out, b_out, _ = OUTER[family]
        fam.ta.ok("update_peer", inner=B_INNER, endpoint=endpoint(b_out))
        fam.tb.ok("update_peer", inner=A_INNER, endpoint=endpoint(a_out))
        udp6 = _udp6_in(fam.a), _udp6_in(fam.b)
        for ns, dest in ((fam.a, B_INNER), (fam.b, A_INNER)):
            result = ping6(ns, dest, count=3)
            assert result.returncode == 0, f"IPv{family} underlay: {result.stdout}{result.stderr}"
        assert fam.ta.peers()[B_INNER]["endpoint"] == endpoint(b_out)
        assert fam.tb.peers()[A_INNER]["endpoint"] == endpoint(a_out)
        # The ESP really crossed the link in that family: 6 requests and replies each side.
        moved = _udp6_in(fam.a) - udp6[0], _udp6_in(fam.b) - udp6[1]
        if family == 6:
            assert min(moved) >= 6, moved
        else:
            assert max(moved) == 0, moved
    _no_bad_drops(fam.ta)
    _no_bad_drops(fam.tb)


def _echo(seq: int) -> bytes:
    return icmp6_echo(C_INNER, A_INNER, 0xB7, seq, b"btmm families test " + bytes(range(32)))


def test_cross_family_roaming_is_authenticated(fam: Families) -> None:
    assert fam.c_endpoint_at_a() == c_endpoint(4)
    fam.ta.events()
    seq1, seq2, seq3 = (fam.c_tx.seal(_echo(n)) for n in (1, 2, 3))
    echo_len = len(_echo(1))

    # An authenticated packet from c's IPv6 address moves c there; a's answer goes there.
    before = fam.counters()
    replies = fam.udp([seq1], family=6, wait=20.0, most=1)
    before = fam.expect(before, {"packets_in": 1, "bytes_in": echo_len, "packets_out": 1})
    assert fam.c_endpoint_at_a() == c_endpoint(6)
    events = wait_for(lambda: [e for e in fam.ta.events() if e["type"] == "roamed"], 30, "roam")
    assert events == [
        {"type": "roamed", "inner": C_INNER, "old": c_endpoint(4), "new": c_endpoint(6)}
    ], events
    assert len(replies) == 1 and replies[0]["source"] == endpoint(OUTER[6][0]), replies
    inner = rx_codec(fam.c_rx_spi, fam.c_rx_key, kind=fam.kind).open(
        bytes.fromhex(replies[0]["payload"])
    )
    assert inner[40] == 129, inner.hex()  # an ICMPv6 echo reply, sealed to the v6 endpoint

    # From the old family: a forgery (ICV flipped), a replay, garbage, a cut packet and an
    # unknown SPI are dropped and counted, and c stays where it is.
    forged = seq2[:-1] + bytes([seq2[-1] ^ 1])
    stranger = tx_codec(0x7777_0001, bytes.fromhex(keymat()), kind=fam.kind).seal(_echo(9))
    fam.udp([forged, seq1, b"\x13\x37\x42", seq2[:24], stranger], family=4)
    before = fam.expect(
        before,
        {"drops.auth": 1, "drops.replay": 1, "drops.malformed": 2, "drops.unknown_spi": 1},
    )
    assert fam.c_endpoint_at_a() == c_endpoint(6)
    # The same from the new family: nothing moves either.
    fam.udp([forged, seq1], family=6)
    before = fam.expect(before, {"drops.auth": 1, "drops.replay": 1})
    assert fam.c_endpoint_at_a() == c_endpoint(6)
    assert not [e for e in fam.ta.events() if e["type"] == "roamed"]

    # Control messages and keepalives from either family; sources in their own notation.
    fam.udp([CONTROL_MARKER + b"six", KEEPALIVE], family=6)
    fam.udp([CONTROL_MARKER + b"four", KEEPALIVE], family=4)
    before = fam.expect(before, {"control_in": 2, "keepalives_in": 2})
    got: list[dict[str, Any]] = []

    def controls() -> bool:
        got.extend(e for e in fam.ta.events() if e["type"] == "control")
        return len(got) >= 2

    wait_for(controls, 30, "two control events")
    assert sorted((e["source"], e["payload"]) for e in got) == sorted(
        [(c_endpoint(6), b"six".hex()), (c_endpoint(4), b"four".hex())]
    ), got

    # A newer authenticated packet from IPv4 moves c back.
    fam.udp([seq3], family=4, wait=20.0, most=1)
    fam.expect(before, {"packets_in": 1, "bytes_in": echo_len, "packets_out": 1})
    assert fam.c_endpoint_at_a() == c_endpoint(4)
    events = wait_for(lambda: [e for e in fam.ta.events() if e["type"] == "roamed"], 30, "back")
    assert events == [
        {"type": "roamed", "inner": C_INNER, "old": c_endpoint(6), "new": c_endpoint(4)}
    ], events


def test_control_messages_between_engines_over_ipv6(fam: Families) -> None:
    fam.tb.events()
    fam.ta.ok("send_control", endpoint=endpoint(OUTER[6][1]), payload=b"\x01v6".hex())

    def arrived() -> list[dict[str, Any]]:
        return [e for e in fam.tb.events() if e["type"] == "control"]

    got = wait_for(arrived, 30, "a's control message at b over IPv6")
    assert got == [{"type": "control", "source": endpoint(OUTER[6][0]), "payload": "017636"}]
