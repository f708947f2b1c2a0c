"""The Rust engine through its Python wrapper ``FastEngine`` (btmm_core/dataplane/fast.py).

The codec itself is tested against both engines elsewhere (and in Rust by ``cargo test``);
here: the extension's argument checking and error classes, and the wrapper's conversions
(text addresses, Endpoint, Counters, PeerInfo, events) on a real engine with a real TUN device
inside a network namespace made by the test. The engine runs in a child Python process inside
the namespace, so that its TUN device and socket never touch the host's network.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from btmm_core import _fast
from btmm_core.dataplane.api import DropReason
from btmm_core.errors import PacketDropped, SaExhausted
from btmm_core.lab.netns import Lab

KEY_A = bytes(range(36))
KEY_B = bytes(range(100, 136))


def test_codec_round_trip_and_errors() -> None:
    tx, rx = _fast.TxSa(0x1001, KEY_A), _fast.RxSa(0x1001, KEY_A)
    assert (tx.spi, tx.next_seq, rx.top) == (0x1001, 1, 0)
    for size in (0, 1, 2, 3, 40, 1280, 1500):
        inner = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        payload = tx.seal(inner)
        assert len(payload) % 4 == 0
        assert rx.open(payload) == inner
    assert (tx.next_seq, rx.top) == (8, 7)
    with pytest.raises(PacketDropped) as info:
        rx.open(payload)
    assert info.value.reason is DropReason.REPLAY
    with pytest.raises(PacketDropped) as info:
        rx.open(payload[:20])
    assert info.value.reason is DropReason.MALFORMED
    with pytest.raises(PacketDropped) as info:
        _fast.RxSa(0x1002, KEY_A).open(payload)
    assert info.value.reason is DropReason.UNKNOWN_SPI
    with pytest.raises(PacketDropped) as info:
        _fast.RxSa(0x1001, KEY_B).open(payload)
    assert info.value.reason is DropReason.AUTH
    # bytearray is accepted like bytes
    assert _fast.RxSa(0x1001, KEY_A).open(bytearray(_fast.TxSa(0x1001, KEY_A).seal(b"x"))) == b"x"


def test_exhaustion() -> None:
    tx = _fast.TxSa(7, KEY_A, 2**64 - 1)
    last = tx.seal(b"abc")
    assert last[8:16] == b"\xff" * 8
    assert tx.next_seq == 2**64
    with pytest.raises(SaExhausted):
        tx.seal(b"abc")


@pytest.mark.parametrize(
    "args",
    [
        (0, KEY_A),
        (2**32, KEY_A),
        (-1, KEY_A),
        (1, KEY_A[:35]),
        (1, KEY_A + b"x"),
        (1, "not bytes"),
        (1, KEY_A, 0),
        (1, KEY_A, 2**64 + 1),
    ],
)
def test_bad_codec_arguments_raise_value_error(args: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        _fast.TxSa(*args)


def test_benches_return_durations() -> None:
    assert _fast.bench_codec(1400, 200) > 0
    assert _fast.bench_aead(1400, 200) > 0
    with pytest.raises(ValueError):
        _fast.bench_codec(-1, 10)


# Runs inside the namespace. Every check is an assert; the test reads the exit status.
CHILD = textwrap.dedent(
    """
    import select, socket, subprocess, sys
    from btmm_core import _fast
    from btmm_core.dataplane.api import (ControlPacket, Counters, DropReason, Endpoint,
        EngineConfig, PeerInfo, PeerRoamed, TxSaExhausted, Engine)
    from btmm_core.dataplane.fast import FastEngine
    from btmm_core.errors import ConfigError, DataPlaneError, UnknownPeer

    KEY_A = bytes(range(36)); KEY_B = bytes(range(100, 136))
    PEER = "fd00:b7::2"

    def wait_events(e, n):
        got = []
        for _ in range(100):
            r, _, _ = select.select([e.fileno()], [], [], 0.05)
            if r:
                got += e.drain()
            if len(got) >= n:
                return got
        raise AssertionError(f"expected {n} events, got {got}")

    def udp6(src, dst, sport, dport, data):
        import ipaddress
        s = ipaddress.IPv6Address(src).packed; d = ipaddress.IPv6Address(dst).packed
        ulen = 8 + len(data)
        hdr = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + ulen.to_bytes(2, "big")
        body = hdr + b"\\0\\0" + data
        pseudo = s + d + ulen.to_bytes(4, "big") + b"\\0\\0\\0\\x11"
        blob = pseudo + body + (b"\\0" if len(body) % 2 else b"")
        total = sum(int.from_bytes(blob[i:i + 2], "big") for i in range(0, len(blob), 2))
        while total > 0xffff:
            total = (total & 0xffff) + (total >> 16)
        ck = (~total) & 0xffff or 0xffff
        udp = hdr + ck.to_bytes(2, "big") + data
        return (b"\\x60\\0\\0\\0" + ulen.to_bytes(2, "big") + b"\\x11\\x40" + s + d + udp)

    remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    remote.bind(("127.0.0.1", 0)); remote.settimeout(5)
    rport = remote.getsockname()[1]

    cfg = EngineConfig(tun_name="btw0", listen=Endpoint("127.0.0.1", 0), mtu=1400, event_queue=64)
    with FastEngine(cfg) as e:
        assert isinstance(e, Engine) and e.kind == "fast"
        assert e.tun_name == "btw0" and e.local_port > 0
        me = ("127.0.0.1", e.local_port)
        subprocess.run(["ip", "-6", "addr", "add", "fd00:b7::1/64", "dev", "btw0", "nodad"],
                       check=True)
        e.add_peer(PEER, Endpoint("127.0.0.1", rport))
        try:
            e.add_peer(PEER)
            raise AssertionError("duplicate peer accepted")
        except DataPlaneError:
            pass
        for bad in (lambda: e.remove_peer("fd00:b7::99"),
                    lambda: e.update_peer("fd00:b7::99", None),
                    lambda: e.install_rx_sa("fd00:b7::99", 5, KEY_B)):
            try:
                bad()
                raise AssertionError("unknown peer accepted")
            except UnknownPeer:
                pass
        try:
            e.add_peer("not-an-address")
            raise AssertionError("bad address accepted")
        except ConfigError:
            pass
        e.install_rx_sa(PEER, 0x200, KEY_B)
        e.install_tx_sa(PEER, 0x100, KEY_A)
        e.start(); e.start()

        # inbound: sealed by the Rust codec, delivered through the TUN to a local socket
        listener = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        listener.bind(("fd00:b7::1", 5555)); listener.settimeout(5)
        tx = _fast.TxSa(0x200, KEY_B)
        pkt = udp6(PEER, "fd00:b7::1", 1234, 5555, b"inbound")
        remote.sendto(tx.seal(pkt), me)
        data, src = listener.recvfrom(2000)
        assert data == b"inbound" and src[0] == PEER and src[1] == 1234

        # outbound: a local socket's packet comes out sealed for the peer
        app = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        app.bind(("fd00:b7::1", 0))
        app.sendto(b"outbound", (PEER, 7777))
        payload, _ = remote.recvfrom(4000)
        inner = _fast.RxSa(0x100, KEY_A).open(payload)
        assert inner.endswith(b"outbound")

        # control and roaming events come back as the API's dataclasses
        remote.sendto(b"\\0\\0\\0\\0hello", me)
        (ev,) = wait_events(e, 1)
        assert ev == ControlPacket(Endpoint("127.0.0.1", rport), b"hello"), ev
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind(("127.0.0.1", 0))
        other.sendto(tx.seal(pkt), me)
        listener.recvfrom(2000)
        (ev,) = wait_events(e, 1)
        assert ev == PeerRoamed(PEER, Endpoint("127.0.0.1", rport),
                                Endpoint("127.0.0.1", other.getsockname()[1])), ev
        e.update_peer(PEER, Endpoint("127.0.0.1", rport))

        e.install_tx_sa(PEER, 0x101, KEY_A, next_seq=2**64 - 1)
        app.sendto(b"a", (PEER, 7777)); app.sendto(b"b", (PEER, 7777))
        remote.recvfrom(4000)
        (ev,) = wait_events(e, 1)
        assert ev == TxSaExhausted(PEER, 0x101), ev

        e.send_control(Endpoint("127.0.0.1", rport), b"ctl")
        assert remote.recvfrom(100)[0] == b"\\0\\0\\0\\0ctl"
        e.send_keepalive(PEER)
        assert remote.recvfrom(100)[0] == b"\\xff"

        c = e.counters()
        assert isinstance(c, Counters)
        assert c.packets_in == 2 and c.bytes_in == 2 * len(pkt), c
        assert c.packets_out >= 2 and c.control_in == 1, c
        assert c.drop(DropReason.SA_EXHAUSTED) == 1, c
        assert set(c.drops) == {r.name.lower() for r in DropReason}
        (p,) = e.peers()
        assert isinstance(p, PeerInfo)
        assert p.inner == PEER and p.endpoint == Endpoint("127.0.0.1", rport)
        assert p.tx_spi == 0x101 and p.rx_spis == (0x200,)
        assert p.counters.packets_in == 2
        e.install_rx_sa(PEER, 0x201, KEY_B); e.install_rx_sa(PEER, 0x202, KEY_B)
        assert e.peers()[0].rx_spis == (0x201, 0x202)
        e.retire_rx_sa(PEER, 0x201)
        assert e.peers()[0].rx_spis == (0x202,)
        e.remove_peer(PEER)
        assert list(e.peers()) == []
    e.stop()
    try:
        e.fileno()
        raise AssertionError("fileno after stop")
    except DataPlaneError:
        pass
    try:
        e.start()
        raise AssertionError("start after stop")
    except DataPlaneError:
        pass
    print("child ok")
    """
)


@pytest.mark.netns
def test_fast_engine_wrapper_in_a_namespace() -> None:
    with Lab("btfw") as lab:
        ns = lab.ns("a")
        proc = ns.run([sys.executable, "-c", CHILD], check=False, timeout=120)
        assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
        assert "child ok" in proc.stdout


@pytest.mark.netns
def test_tun_errors_are_tun_errors() -> None:
    """Errors from opening the TUN device map onto btmm_core.errors with a hint."""
    script = textwrap.dedent(
        """
        from btmm_core.dataplane.api import EngineConfig, Endpoint
        from btmm_core.dataplane.fast import FastEngine
        from btmm_core.errors import TunError
        import os
        r, w = os.pipe()
        try:
            FastEngine(EngineConfig(tun_name=None, tun_fd=r, listen=Endpoint("127.0.0.1", 0)))
            raise AssertionError("a pipe was accepted as a TUN device")
        except TunError as err:
            assert err.hint, err
        try:
            FastEngine(EngineConfig(tun_name="x" * 20, listen=Endpoint("127.0.0.1", 0)))
            raise AssertionError("a 20-byte interface name was accepted")
        except TunError:
            pass
        print("child ok")
        """
    )
    with Lab("btfe") as lab:
        ns = lab.ns("a")
        proc = ns.run([sys.executable, "-c", script], check=False, timeout=60)
        assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"


ATTACH_CHILD = textwrap.dedent(
    """
    import fcntl, os, socket, struct, subprocess
    from btmm_core import _fast
    from btmm_core.dataplane.api import Endpoint, EngineConfig
    from btmm_core.dataplane.fast import FastEngine

    TUNSETIFF, IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x400454CA, 0x0001, 0x1000, 0x4000
    KEY = bytes(range(36))
    for i, flags in enumerate((IFF_TUN | IFF_NO_PI, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)):
        name = f"btfd{i}"
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        remote.bind(("127.0.0.1", 0))
        remote.settimeout(5)
        cfg = EngineConfig(tun_name=None, tun_fd=fd, listen=Endpoint("127.0.0.1", 0))
        with FastEngine(cfg) as e:
            assert e.tun_name == name, e.tun_name
            subprocess.run(["ip", "link", "set", name, "up"], check=True)
            subprocess.run(
                ["ip", "-6", "addr", "add", f"fd00:b8:{i}::1/64", "dev", name, "nodad"],
                check=True,
            )
            peer = f"fd00:b8:{i}::2"
            e.add_peer(peer, Endpoint("127.0.0.1", remote.getsockname()[1]))
            e.install_tx_sa(peer, 0x300 + i, KEY)
            e.start()
            app = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            app.sendto(b"attached", (peer, 9999))
            payload, _ = remote.recvfrom(4000)
            inner = _fast.RxSa(0x300 + i, KEY).open(payload)
            assert inner.endswith(b"attached"), inner
        # the engine owned the descriptor and closed it on stop
        try:
            os.fstat(fd)
            raise AssertionError(f"fd {fd} still open after stop")
        except OSError:
            pass
    print("child ok")
    """
)


@pytest.mark.netns
def test_attach_to_an_open_tun_descriptor() -> None:
    """tun_fd: the engine takes over a descriptor opened elsewhere, with or without virtio
    headers, and closes it on stop."""
    with Lab("btfa") as lab:
        ns = lab.ns("a")
        proc = ns.run([sys.executable, "-c", ATTACH_CHILD], check=False, timeout=60)
        assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
        assert "child ok" in proc.stdout
