"""End to end: two `btmm tunnel` processes in two network namespaces, every engine pairing.

Topology: namespaces a and b on one veth link (192.0.2.1/24, 192.0.2.2/24); inner addresses
fd00:b7:1::1 and fd00:b7:1::2 routed (/128) into each side's TUN device. The engines run as
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
    A_OUTER,
    A_ROAMED,
    B_INNER,
    PORT,
    Tunnel,
    pair_configs,
    ping6,
    transfer,
    two_hosts,
    wait_for,
)

from btmm_core.lab.netns import Lab

# Needs root: without it Lab() raises PermissionNeeded and the tests fail (never skip).
pytestmark = pytest.mark.netns

#: (engine of a, engine of b, TUN offloads on); the fast pair runs once more with the
#: offloads forced off (BTMM_TUN_OFFLOAD=0), the engine's plain one-packet-per-read path.
PAIRS = [
    ("fast", "fast", True),
    ("python", "python", True),
    ("fast", "python", True),
    ("python", "fast", True),
    ("fast", "fast", False),
]
OFFLOAD_OFF = {"BTMM_TUN_OFFLOAD": "0"}
BIG = 100 * 1024 * 1024
#: drops that must never happen between two correctly keyed peers on a clean link
BAD_DROPS = ("auth", "unknown_spi", "replay", "malformed", "source_mismatch")


class Pair:
    def __init__(
        self, lab: Lab, a: Any, b: Any, ta: Tunnel, tb: Tunnel, offload: bool = True
    ) -> None:
        self.lab, self.a, self.b, self.ta, self.tb = lab, a, b, ta, tb
        self.offload = offload


def _pair_id(p: tuple[str, str, bool]) -> str:
    return f"{p[0]}-{p[1]}" + ("" if p[2] else "-offload-off")


@pytest.fixture(scope="module", params=PAIRS, ids=_pair_id)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    a_kind, b_kind, offload = request.param
    work: Path = tmp_path_factory.mktemp(f"e2e-{_pair_id(request.param)}")
    extra = {} if offload else dict(OFFLOAD_OFF)
    with Lab() as lab:
        a, b = two_hosts(lab)
        ca, cb = pair_configs(a_kind, b_kind)
        ta = Tunnel("a", a, a_kind, ca, work, extra_env=extra)
        tb = Tunnel("b", b, b_kind, cb, work, extra_env=extra)
        ta.start()
        tb.start()
        yield Pair(lab, a, b, ta, tb, offload)
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
    min_packets = BIG // 1420
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


def test_roaming_during_a_transfer(pair: Pair) -> None:
    pair.tb.events()  # start from an empty backlog
    size = 24 * 1024 * 1024

    def move_a() -> None:
        # a gets a new outer address and loses the old one while data is flowing.
        pair.a.run(["ip", "addr", "add", f"{A_ROAMED}/24", "dev", "eth0"])
        pair.a.run(["ip", "addr", "del", f"{A_OUTER}/24", "dev", "eth0"])

    # Paced, so that the address change happens in the middle of the stream.
    result = transfer(
        pair.a, pair.b, B_INNER, size, rate=8e6, at_fraction=0.25, action=move_a, timeout=180
    )
    assert result.received["bytes"] == size, result.received
    assert result.received["sha256"] == result.sent["sha256"]
    new = f"{A_ROAMED}:{PORT}"
    seen: list[dict[str, Any]] = []

    def roamed() -> bool:
        seen.extend(pair.tb.events())
        return any(e["type"] == "roamed" and e["new"] == new for e in seen)

    wait_for(roamed, 30, f"a roamed event to {new} on b")
    event = next(e for e in seen if e["type"] == "roamed")
    assert event["inner"] == A_INNER and event["old"] == f"{A_OUTER}:{PORT}", event
    assert pair.tb.peers()[A_INNER]["endpoint"] == new
    # And the tunnel still works both ways from the new address.
    result_ping = ping6(pair.b, A_INNER, count=2)
    assert result_ping.returncode == 0, result_ping.stdout + result_ping.stderr
    _no_bad_drops(pair.ta)
    _no_bad_drops(pair.tb)
