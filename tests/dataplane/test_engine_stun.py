"""STUN (RFC 8489) shares the engine's UDP port (issue 13, part "enginestun").

The daemon runs STUN from the engine's own socket, so that the server-reflexive address it
learns is the tunnel port's. Both engines: ``send_stun`` puts a STUN message on the wire as it
is (no marker) and refuses anything else; a STUN-shaped datagram that names none of the
engine's receive SAs comes out as a ``StunPacket`` under the control messages' bounds; one
that names a receive SA is ESP, whatever it looks like; garbage is dropped as before.

The engines run in a child process inside a throwaway namespace and talk over its loopback;
the child reports what it saw as JSON.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from btmm_core.dataplane.api import MAX_CONTROL_MESSAGE
from btmm_core.lab.netns import Lab
from btmm_core.stun.message import HEADER_LEN as STUN_HEADER_LEN
from btmm_core.stun.message import MAGIC_COOKIE, looks_like_stun

REPO = Path(__file__).resolve().parents[2]
STUN_MAGIC_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")


def stun_message(kind: int, attrs: int, fill: int = 0x11) -> bytes:
    """A STUN message of type ``kind`` with ``attrs`` bytes of attributes (RFC 8489 §5)."""
    header = kind.to_bytes(2, "big") + attrs.to_bytes(2, "big") + STUN_MAGIC_COOKIE
    return header + bytes([0x5A]) * 12 + bytes([fill]) * attrs


def test_looks_like_stun() -> None:
    assert looks_like_stun(stun_message(0x0001, 0))
    assert looks_like_stun(stun_message(0x0101, 12))
    assert not looks_like_stun(b"")
    assert not looks_like_stun(stun_message(0x0001, 0)[:19])
    for top in (0x40, 0x80, 0xC0):
        assert not looks_like_stun(bytes([top]) + stun_message(0x0001, 4)[1:])
    no_cookie = bytearray(stun_message(0x0001, 4))
    no_cookie[7] ^= 1
    assert not looks_like_stun(bytes(no_cookie))
    assert not looks_like_stun(stun_message(0x0001, 4) + b"\0")  # more than the length says
    assert not looks_like_stun(stun_message(0x0001, 6))  # length 6 is not whole words
    assert STUN_HEADER_LEN == 20
    assert bytes.fromhex("2112a442") == STUN_MAGIC_COOKIE


_HELPERS = r"""
import json, select, socket, sys, time
sys.path.insert(0, sys.argv[1])
from btmm_core.dataplane import open_engine, tx_codec
from btmm_core.dataplane.api import (MAX_CONTROL_MESSAGE as MAX,
    ControlPacket, EngineConfig, Endpoint, StunPacket)
from btmm_core.stun.message import MAGIC_COOKIE
STUN_MAGIC_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")

obs = {}

def wait(pred, what, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    obs.setdefault("timeouts", []).append(what)

def stun(kind, attrs, fill=0x11):
    return (kind.to_bytes(2, "big") + attrs.to_bytes(2, "big") + STUN_MAGIC_COOKIE
            + b"\x5a" * 12 + bytes([fill]) * attrs)

def plain():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    return s

def events(eng):
    out = []
    for e in eng.drain(100):
        out.append([type(e).__name__, e.source.host, e.source.port, e.payload.hex()]
                   if isinstance(e, (ControlPacket, StunPacket)) else [type(e).__name__])
    return out
"""

_ONE_ENGINE = _HELPERS + textwrap.dedent(
    r"""
    kind = sys.argv[2]
    cfg = EngineConfig(tun_name="btst0", listen=Endpoint("127.0.0.1", 0),
                       control_queue_bytes=2 * MAX)
    eng = open_engine(cfg, kind=kind)
    eng.start()
    me = ("127.0.0.1", eng.local_port)
    server = plain()
    to_server = Endpoint("127.0.0.1", server.getsockname()[1])

    def drops(name):
        return (eng.counters().drops or {}).get(name, 0)

    # Out: a Binding request leaves as it is, from the engine's port.
    request = stun(0x0001, 8)
    eng.send_stun(to_server, request)
    data, src = server.recvfrom(2000)
    obs["sent"] = [data.hex(), src[1] == eng.local_port]
    refused = []
    for bad in (b"hello", b"\0\0\0\0" + request, request[:27], stun(0x0101, MAX - 16),
                bytes([0x80]) + request[1:]):
        try:
            eng.send_stun(to_server, bad)
            refused.append("sent")
        except ValueError:
            refused.append("ValueError")
    obs["refused"] = refused
    server.settimeout(0.3)
    try:
        obs["leaked"] = server.recvfrom(2000)[0].hex()
    except TimeoutError:
        obs["leaked"] = None

    # In: the answer comes out whole with its source, counted in control_in.
    answer = stun(0x0101, 12)
    server.sendto(answer, me)
    wait(lambda: eng.counters().control_in == 1, "the answer")
    obs["answer"] = events(eng)
    obs["server_port"] = server.getsockname()[1]

    # Bounds: one over 1 KiB is control_oversize; the byte budget (2 KiB here) is shared with
    # control messages, so the third large message overflows.
    server.sendto(stun(0x0101, MAX - 16), me)
    server.sendto(stun(0x0101, MAX - 20, fill=1), me)
    server.sendto(b"\0\0\0\0" + bytes([2]) * MAX, me)
    server.sendto(stun(0x0101, MAX - 20, fill=3), me)
    wait(lambda: eng.counters().control_in == 5, "the bounded four")
    obs["bounds"] = [drops("control_oversize"), drops("control_overflow")]
    obs["bounded"] = [[e[0], e[3][-2:], len(e[3]) // 2] for e in events(eng)]

    # Garbage is judged as before: too short for ESP is malformed; a 40-byte datagram with a
    # STUN header but the wrong cookie is ESP for an unknown SPI.
    bad_cookie = bytearray(stun(0x0101, 20))
    bad_cookie[7] ^= 1
    server.sendto(b"\x13\x37\x42", me)
    server.sendto(bytes(bad_cookie), me)
    wait(lambda: drops("malformed") == 1 and drops("unknown_spi") == 1, "garbage")
    obs["garbage"] = [drops("malformed"), drops("unknown_spi"), eng.counters().control_in]

    # ESP whose SPI reads "Binding request, length 60" and whose sequence number's low half
    # is the magic cookie has STUN's shape exactly. Before the SA is installed it is STUN ...
    spi, key, peer = 0x0001003C, bytes(range(36)), "fd00:b7:5::2"
    inner = (b"\x60\0\0\0\0\x04\x3b\x40" + __import__("ipaddress").IPv6Address(peer).packed
             + __import__("ipaddress").IPv6Address("fd00:b7:5::1").packed + b"data")
    esp = tx_codec(spi, key, 0x2112A442, kind=kind).seal(inner)
    obs["esp_shape"] = [len(esp), esp[4:8] == STUN_MAGIC_COOKIE]
    server.sendto(esp, me)
    wait(lambda: eng.counters().control_in == 6, "esp as stun")
    obs["esp_before"] = [e[0] for e in events(eng)]
    # ... and once it names our receive SA it is ESP: delivered, no event.
    eng.add_peer(peer, Endpoint("127.0.0.1", obs["server_port"]))
    eng.install_rx_sa(peer, spi, key)
    server.sendto(esp, me)
    wait(lambda: eng.counters().packets_in == 1, "esp delivered")
    c = eng.counters()
    obs["esp_after"] = [c.packets_in, c.control_in, events(eng)]
    eng.stop()
    print(json.dumps(obs))
    """
)


@pytest.mark.netns
def test_stun_shares_the_engine_port(kind: str) -> None:
    with Lab("btst") as lab:
        res = lab.ns("a").run([sys.executable, "-c", _ONE_ENGINE, str(REPO), kind], timeout=120)
    obs: dict[str, Any] = json.loads(res.stdout)
    assert obs.get("timeouts") is None, obs
    assert obs["sent"] == [stun_message(0x0001, 8).hex(), True]
    assert obs["refused"] == ["ValueError"] * 5
    assert obs["leaked"] is None
    answer = stun_message(0x0101, 12)
    assert obs["answer"] == [["StunPacket", "127.0.0.1", obs["server_port"], answer.hex()]]
    assert obs["bounds"] == [1, 1]
    assert obs["bounded"] == [
        ["StunPacket", "01", MAX_CONTROL_MESSAGE],
        ["ControlPacket", "02", MAX_CONTROL_MESSAGE],
    ]
    assert obs["garbage"] == [1, 1, 5]
    assert obs["esp_shape"] == [80, True]
    assert obs["esp_before"] == ["StunPacket"]
    assert obs["esp_after"] == [1, 6, []]


_TWO_ENGINES = _HELPERS + textwrap.dedent(
    r"""
    engines = {}
    for n, kind in enumerate(("fast", "python")):
        cfg = EngineConfig(tun_name=f"btsx{n}", listen=Endpoint("127.0.0.1", 0))
        engines[kind] = open_engine(cfg, kind=kind)
        engines[kind].start()
    for kind, other in (("fast", "python"), ("python", "fast")):
        msg = stun(0x0001, 4, fill=len(kind))
        engines[kind].send_stun(Endpoint("127.0.0.1", engines[other].local_port), msg)
        wait(lambda: engines[other].counters().control_in == 1, f"{kind} to {other}")
        obs[f"{kind}->{other}"] = [events(engines[other]), engines[kind].local_port, msg.hex()]
    for e in engines.values():
        e.stop()
    print(json.dumps(obs))
    """
)


@pytest.mark.netns
def test_stun_between_the_two_engines() -> None:
    with Lab("btsx") as lab:
        res = lab.ns("a").run([sys.executable, "-c", _TWO_ENGINES, str(REPO)], timeout=120)
    obs: dict[str, Any] = json.loads(res.stdout)
    assert obs.pop("timeouts", None) is None, obs
    for pair, (got, port, msg) in obs.items():
        assert got == [["StunPacket", "127.0.0.1", port, msg]], pair
