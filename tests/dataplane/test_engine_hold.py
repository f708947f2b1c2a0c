"""Both engines hold packets for a peer without a transmit SA (on-demand tunnels, issue 16).

Same rules, counter names and bytes in both engines (api.py): 16 packets held, the oldest
pushed out as ``hold_overflow``, one ``PeerWanted`` per opening; ``install_tx_sa`` sends the
held packets first and in order (opened here with the *other* engine's codec too);
``reject_held`` answers each with the ICMPv6 address unreachable that
``btmm_core.dataplane.hold.icmp6_unreachable`` builds; ``clear_tx_sa`` makes the peer idle.

The engine runs in a child process inside a throwaway namespace and reports what it saw.
"""

from __future__ import annotations

import json
import secrets
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from btmm_core.dataplane import rx_codec
from btmm_core.dataplane.api import HOLD_SLOTS, DropReason, PeerInfo
from btmm_core.dataplane.hold import Held, HoldRing, icmp6_unreachable
from btmm_core.lab.netns import Lab

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    r"""
    import json, socket, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from btmm_core.dataplane import open_engine
    from btmm_core.dataplane.api import EngineConfig, Endpoint, PeerWanted

    kind, keymat = sys.argv[2], bytes.fromhex(sys.argv[3])
    obs = {"timeouts": []}

    def wait(pred, what, timeout=10.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            time.sleep(0.01)
        obs["timeouts"].append(what)

    def held():
        return eng.peers()[0].held

    def drops(name):
        return (eng.counters().drops or {}).get(name, 0)

    def wanted():
        return [e.inner for e in eng.drain(100) if isinstance(e, PeerWanted)]

    eng = open_engine(EngineConfig(tun_name="bthold0", listen=Endpoint("127.0.0.1", 0)),
                      kind=kind)
    subprocess.run(["ip", "-6", "addr", "add", "fd00::1/64", "dev", "bthold0", "nodad"],
                   check=True)
    remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    remote.bind(("127.0.0.1", 0))
    remote.settimeout(5)
    eng.add_peer("fd00::2", Endpoint("127.0.0.1", remote.getsockname()[1]))
    eng.start()
    app = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    app.bind(("fd00::1", 4444))
    app.connect(("fd00::2", 7777))
    app.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR (linux/in6.h)
    app.settimeout(5)
    icmp = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    icmp.settimeout(5)

    for i in range(20):
        app.send(bytes([i]) * 8)
    wait(lambda: held() == 16 and drops("hold_overflow") == 4, "16 held")
    obs["first"] = [held(), drops("hold_overflow"), drops("no_sa"), wanted()]
    obs["peer_overflow"] = eng.peers()[0].counters.drops.get("hold_overflow", 0)
    eng.install_tx_sa("fd00::2", 0x500, keymat)
    obs["after_install"] = held()
    obs["sealed"] = [remote.recv(2048).hex() for _ in range(16)]
    wait(lambda: eng.counters().packets_out == 16, "16 out")
    obs["packets_out"] = eng.counters().packets_out

    # Idle again: held, asked for again, then refused with ICMPv6.
    eng.clear_tx_sa("fd00::2")
    obs["tx_after_clear"] = eng.peers()[0].tx_spi
    app.send(b"idle-1")
    app.send(b"idle-2")
    wait(lambda: held() == 2, "2 held after clear")
    obs["second_wanted"] = wanted()
    obs["rejected"] = eng.reject_held("fd00::2")
    obs["after_reject"] = held()
    got = []
    while len(got) < 2:
        data, addr = icmp.recvfrom(2048)
        if data[0] == 1:
            got.append([addr[0], data.hex()])
    obs["icmp"] = got
    try:
        app.recv(64)
        obs["app_error"] = None
    except OSError as exc:
        obs["app_error"] = exc.errno
    try:
        eng.reject_held("fd00::9")
    except Exception as exc:
        obs["unknown"] = type(exc).__name__
    eng.stop()
    print(json.dumps(obs))
    """
)


@pytest.mark.netns
def test_engine_holds_sends_in_order_and_rejects(kind: str) -> None:
    keymat = secrets.token_bytes(36)
    with Lab("bthd") as lab:
        res = lab.ns("a").run(
            [sys.executable, "-c", _SCRIPT, str(REPO), kind, keymat.hex()], timeout=120
        )
    obs: dict[str, Any] = json.loads(res.stdout)
    assert obs["timeouts"] == [], obs
    # 20 packets: the 16 newest held, 4 pushed out, no no_sa drop, one PeerWanted.
    assert obs["first"] == [HOLD_SLOTS, 4, 0, ["fd00::2"]]
    assert obs["peer_overflow"] == 4
    assert obs["after_install"] == 0
    assert obs["packets_out"] == HOLD_SLOTS
    # The held packets went out first, oldest first, and either engine's codec opens them.
    for other in ("fast", "python"):
        rx = rx_codec(0x500, keymat, kind=other)
        inners = [rx.open(bytes.fromhex(h)) for h in obs["sealed"]]
        assert [p[-8:] for p in inners] == [bytes([i]) * 8 for i in range(4, 20)], other
    assert obs["tx_after_clear"] is None
    assert obs["second_wanted"] == ["fd00::2"]
    assert obs["rejected"] == 2 and obs["after_reject"] == 0
    # Each answer is exactly what hold.py builds for the packet it quotes (the kernel checked
    # its checksum before the raw socket saw it), from the unreachable peer.
    for source, message in obs["icmp"]:
        raw = bytes.fromhex(message)
        assert source == "fd00::2"
        assert raw[:2] == b"\x01\x03"
        quoted = raw[8:]
        expected = icmp6_unreachable(quoted)
        assert expected is not None and expected[40:] == raw
    assert sorted(bytes.fromhex(m)[-6:] for _, m in obs["icmp"]) == [b"idle-1", b"idle-2"]
    assert obs["app_error"] == 113  # EHOSTUNREACH, as ping would report it
    assert obs["unknown"] == "UnknownPeer"


def _packet(src: int, dst: int, next_header: int, body: bytes) -> bytes:
    header = bytearray(40)
    header[0] = 0x60
    header[4:6] = len(body).to_bytes(2, "big")
    header[6], header[7] = next_header, 64
    header[8], header[23], header[24], header[39] = 0xFD, src, 0xFD, dst
    return bytes(header) + body


def test_ring_keeps_the_newest_and_asks_once_per_opening() -> None:
    ring = HoldRing()
    seen = [ring.push(_packet(1, 2, 17, bytes([i])), 1280) for i in range(20)]
    assert seen[0] is Held.FIRST
    assert set(seen[1:16]) == {Held.HELD} and set(seen[16:]) == {Held.OVERFLOW}
    assert [p[-1] for p in ring.take()] == list(range(4, 20))
    assert len(ring) == 0 and ring.push(_packet(1, 2, 17, b""), 1280) is Held.FIRST
    assert ring.push(b"\x60" * 1281, 1280) is Held.TOO_LONG


def test_icmp_answer_rules() -> None:
    answer = icmp6_unreachable(_packet(1, 2, 17, b"\x09" * 2000))
    assert answer is not None and len(answer) == 1280
    assert answer[8:24] == _packet(1, 2, 17, b"")[24:40]  # from the unreachable address
    # RFC 4443 §2.4 (e): never about an ICMPv6 error, nor to or from multicast/unspecified.
    assert icmp6_unreachable(_packet(1, 2, 58, b"\x01\x00\x00\x00")) is None
    assert icmp6_unreachable(_packet(1, 2, 58, b"\x80\x00\x00\x00")) is not None
    multicast = bytearray(_packet(1, 2, 17, b""))
    multicast[24] = 0xFF
    assert icmp6_unreachable(bytes(multicast)) is None
    unspecified = bytearray(_packet(0, 2, 17, b""))
    unspecified[8] = 0
    assert icmp6_unreachable(bytes(unspecified)) is None
    assert icmp6_unreachable(b"\x45" + bytes(39)) is None


def test_drop_reason_and_peer_info_default() -> None:
    assert DropReason.HOLD_OVERFLOW == 11
    info = PeerInfo("fd00::2", None, None, (), counters=None)  # type: ignore[arg-type]
    assert info.held == 0
