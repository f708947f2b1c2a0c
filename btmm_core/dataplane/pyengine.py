"""The pure-Python data plane engine: TUN <-> ESP (AES-256-GCM) <-> UDP.

Standards: RFC 4303 (ESP), RFC 4106 (AES-GCM in ESP), RFC 3948 (ESP in UDP, the one-byte NAT
keepalive and the non-ESP marker), RFC 8489 §5 (the shape of a STUN message sharing the port).
The wire format and the drop rules are those of ``btmm_core/dataplane/api.py``; the
per-packet crypto is ``btmm_core.dataplane.esp``.

This engine is the readable twin of the Rust one, meant for debugging and for machines where
the extension is not built. It owns two threads: one reads the TUN device and sends ESP, the
other reads the UDP socket and writes to the TUN. Both wait in ``poll`` together with a wake
eventfd so that ``stop`` ends them promptly. One lock guards the peer and SA tables, the
codecs' state and the counters; the asyncio thread only takes it for configuration calls.

Like the Rust engine, opening sets the TUN device's MTU and brings it up; addresses and routes
are the caller's business. Packets are counted once they really left (UDP send succeeded) or
arrived (the TUN write succeeded).

Two Linux UDP features (udp(7)) save system calls, which dominate this engine's cost once the
crypto is in OpenSSL: a run of equal-size datagrams to one endpoint goes out in one ``sendmsg``
with the ``UDP_SEGMENT`` control message (GSO: the kernel cuts it into the same datagrams; on
a path or kernel that refuses, the run is sent one datagram at a time), and the socket asks for
``UDP_GRO``, so that such a run sent by a peer (either engine) arrives in one ``recvmsg`` with
its segment size. The datagrams on the wire, and what is counted, stay exactly the same.
``BTMM_UDP_GSO=0`` and ``BTMM_UDP_GRO=0`` in the environment turn either off.

The socket is one dual-stack IPv6 socket (``IPV6_V6ONLY`` off, RFC 3493 §5.3), like the Rust
engine's: an IPv4 peer is seen as its v4-mapped address (RFC 4291 §2.5.5.2) and reported as
plain IPv4, so a peer moving between families is one more endpoint change (``_to_wire`` and
``_from_wire`` convert, cached, so no parsing per packet).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import ipaddress
import os
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from btmm_core.dataplane.api import (
    CONTROL_MARKER,
    DEFAULT_CONTROL_QUEUE_BYTES,
    DROP_NAMES,
    KEEPALIVE,
    MAX_CONTROL_MESSAGE,
    MAX_MTU,
    MAX_UDP_PAYLOAD,
    ControlPacket,
    Counters,
    DropReason,
    Endpoint,
    EngineConfig,
    EngineEvent,
    PeerInfo,
    PeerRoamed,
    PeerWanted,
    StunPacket,
    TxSaExhausted,
    canonical_endpoint,
    parse_inner,
)
from btmm_core.dataplane.esp import MIN_PAYLOAD, EspRxSa, EspTxSa
from btmm_core.dataplane.hold import Held, HoldRing, icmp6_unreachable
from btmm_core.dataplane.tun import close_quietly, open_tun, set_mtu, set_up, tun_name_of
from btmm_core.errors import (
    ConfigError,
    DataPlaneError,
    PacketDropped,
    SaExhausted,
    UnknownPeer,
)
from btmm_core.stun.message import looks_like_stun

#: packets handled per wake-up before looking at the wake fd again
BATCH = 64
MAX_RX_SAS = 2
_IPV6_HEADER = 40
_UDP_MAX = 65535
#: udp(7) socket options (linux/udp.h); older Python builds do not name them
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
#: the kernel's limit on segments per GSO send (UDP_MAX_SEGMENTS in older kernels)
GSO_MAX_SEGMENTS = 64
#: no UDP GSO on this path or kernel at all: stop trying
_GSO_UNSUPPORTED = frozenset({errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
#: GSO refused for this run only (e.g. a segment above the path MTU): send it unsegmented
_GSO_REFUSED = _GSO_UNSUPPORTED | {errno.EMSGSIZE, errno.EINVAL}
_CMSG_INT = socket.CMSG_SPACE(struct.calcsize("i"))


def _enabled(variable: str) -> bool:
    """A UDP batching feature is on unless its variable is "0" (for comparisons and
    debugging, like ``BTMM_TUN_OFFLOAD`` for the Rust engine)."""
    return os.environ.get(variable, "1") != "0"


def gso_runs(
    datagrams: Sequence[tuple[bytes, Endpoint]], limit: int = GSO_MAX_SEGMENTS
) -> list[tuple[int, int]]:
    """Split ``datagrams`` into runs ``[i, j)`` that one GSO send can carry: one destination,
    every datagram as long as the first except a shorter last one, at most ``limit`` of them
    and ``MAX_UDP_PAYLOAD`` bytes in all. Single datagrams are runs of one."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(datagrams)
    while i < n:
        first, dest = datagrams[i]
        size = total = len(first)
        j = i + 1
        while (
            j < n
            and j - i < limit
            and datagrams[j][1] == dest
            and len(datagrams[j - 1][0]) == size
            and len(datagrams[j][0]) <= size
            and total + len(datagrams[j][0]) <= MAX_UDP_PAYLOAD
        ):
            total += len(datagrams[j][0])
            j += 1
        runs.append((i, j))
        i = j
    return runs


def split_gro(data: bytes, segment: int) -> list[bytes]:
    """The datagrams of one ``UDP_GRO`` read: ``segment`` bytes each, the last may be shorter."""
    if segment <= 0 or len(data) <= segment:
        return [data]
    return [data[k : k + segment] for k in range(0, len(data), segment)]


@functools.lru_cache(maxsize=4096)
def _to_wire(dest: Endpoint) -> tuple[str, int]:
    """The AF_INET6 socket address of a canonical endpoint (IPv4 v4-mapped)."""
    return (f"::ffff:{dest.host}" if ":" not in dest.host else dest.host, dest.port)


@functools.lru_cache(maxsize=4096)
def _from_wire(host: str, port: int) -> Endpoint:
    """The endpoint of a datagram's source as the kernel wrote it (v4-mapped shown as IPv4)."""
    if host.startswith("::ffff:") and "." in host:
        return Endpoint(host[7:], port)
    return Endpoint(host, port)


def _retry_once_when_full(send: Callable[[], object], sock: socket.socket) -> None:
    try:
        send()
    except BlockingIOError:
        # The socket buffer is full: wait briefly once, then give up like a lossy link.
        select.select([], [sock], [], 0.05)
        send()


class UdpBatchSender:
    """Sends batches of ESP-in-UDP datagrams from one non-blocking socket, runs of them with
    UDP GSO while the kernel takes it (``gso`` turns false for good once it says it cannot)."""

    def __init__(self, sock: socket.socket, gso: bool = True) -> None:
        self._sock = sock
        self.gso = gso
        #: GSO sends that went out, runs the kernel refused (sent one by one instead)
        self.gso_sends = 0
        self.gso_refused = 0

    def send(self, datagrams: Sequence[tuple[bytes, Endpoint]]) -> list[bool]:
        """Send every datagram; for each, whether it left (a failure loses it like a lossy
        link would, e.g. no route to the endpoint)."""
        sent = [False] * len(datagrams)
        runs = gso_runs(datagrams) if self.gso else [(i, i + 1) for i in range(len(datagrams))]
        for i, j in runs:
            if j - i > 1 and self.gso:
                try:
                    self._send_run(datagrams[i:j])
                except OSError as exc:
                    if exc.errno not in _GSO_REFUSED:
                        continue  # the whole run is lost, as its datagrams would have been
                    self.gso_refused += 1
                    if exc.errno in _GSO_UNSUPPORTED:
                        self.gso = False
                else:
                    self.gso_sends += 1
                    sent[i:j] = [True] * (j - i)
                    continue
            for k in range(i, j):
                payload, dest = datagrams[k]
                with contextlib.suppress(OSError):
                    self.send_one(payload, dest)
                    sent[k] = True
        return sent

    def send_one(self, payload: bytes, dest: Endpoint) -> None:
        sock = self._sock
        _retry_once_when_full(lambda: sock.sendto(payload, _to_wire(dest)), sock)

    def _send_run(self, run: Sequence[tuple[bytes, Endpoint]]) -> None:
        dest = run[0][1]
        # Scatter-gather: the kernel reads the payloads where they are, no joined copy.
        cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(run[0][0])))]
        buffers = [p for p, _ in run]
        sock = self._sock
        _retry_once_when_full(lambda: sock.sendmsg(buffers, cmsg, 0, _to_wire(dest)), sock)


def receive_batch(sock: socket.socket, most: int) -> list[tuple[bytes, Endpoint]]:
    """Read what the socket has, up to about ``most`` reads, splitting ``UDP_GRO`` reads into
    their datagrams; stops at EAGAIN (or any other error: the next wake-up tries again)."""
    received: list[tuple[bytes, Endpoint]] = []
    with contextlib.suppress(OSError):
        for _ in range(most):
            data, anc, _flags, addr = sock.recvmsg(_UDP_MAX, _CMSG_INT)
            source = _from_wire(addr[0], addr[1])
            segment = 0
            for level, kind, value in anc:
                if level == socket.SOL_UDP and kind == UDP_GRO:
                    segment = int.from_bytes(value[: struct.calcsize("i")], sys.byteorder)
            received.extend((d, source) for d in split_gro(data, segment))
    return received


@dataclass
class _Count:
    """Mutable counters; snapshots are the frozen ``api.Counters``."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    keepalives_in: int = 0
    control_in: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: DropReason) -> None:
        name = DROP_NAMES[reason]
        self.drops[name] = self.drops.get(name, 0) + 1

    def snapshot(self) -> Counters:
        return Counters(
            packets_in=self.packets_in,
            bytes_in=self.bytes_in,
            packets_out=self.packets_out,
            bytes_out=self.bytes_out,
            keepalives_in=self.keepalives_in,
            control_in=self.control_in,
            drops=dict(self.drops),
        )


@dataclass
class _Peer:
    inner: ipaddress.IPv6Address
    endpoint: Endpoint | None
    tx: EspTxSa | None = None
    tx_exhausted_reported: bool = False
    rx: list[EspRxSa] = field(default_factory=list)  # oldest first
    count: _Count = field(default_factory=_Count)
    #: packets waiting for the transmit SA (on-demand tunnels, ``hold.py``)
    hold: HoldRing = field(default_factory=HoldRing)

    @property
    def key(self) -> bytes:
        return self.inner.packed


def _check_listen(listen: Endpoint) -> tuple[str, int]:
    """The dual-stack socket's address for ``listen``, which must be an IP address of either
    family and a port, as the Rust engine demands (``socket.bind`` would take a host name, or
    raise OverflowError for the port). ``0.0.0.0`` means ``::``, both families."""
    try:
        ip = ipaddress.ip_address(listen.host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise ValueError("a zone index is not supported")
    except ValueError as exc:
        raise ConfigError(
            f"listen host {listen.host!r} is not an IPv4 or IPv6 address",
            hint="use an address of this host, or :: (or 0.0.0.0) for every address of both "
            "families",
        ) from exc
    if not 0 <= listen.port <= 65535:
        raise ConfigError(
            f"listen_port must be in 0..65535, got {listen.port}",
            hint="see EngineConfig for the meaning and defaults of each field",
        )
    if ip.version == 4:
        return ("::" if ip.is_unspecified else f"::ffff:{ip}", listen.port)
    return (str(ip), listen.port)


class PythonEngine:
    """A data plane engine in pure Python (``kind = "python"``); see ``api.Engine``."""

    kind = "python"

    def __init__(self, config: EngineConfig) -> None:
        if not 1280 <= config.mtu <= MAX_MTU:
            raise ConfigError(
                f"mtu {config.mtu} is out of range",
                hint=f"IPv6 needs at least 1280 and ESP in UDP allows at most {MAX_MTU}",
            )
        if config.event_queue < 1:
            raise ConfigError(
                f"event_queue {config.event_queue} must be at least 1",
                hint="the default (4096) suits every use",
            )
        if config.control_queue_bytes < MAX_CONTROL_MESSAGE:
            raise ConfigError(
                f"control_queue_bytes {config.control_queue_bytes} must be at least "
                f"{MAX_CONTROL_MESSAGE} (one control message)",
                hint=f"the default ({DEFAULT_CONTROL_QUEUE_BYTES}) suits every use",
            )
        bind_to = _check_listen(config.listen)
        self._config = config
        if config.tun_fd is not None:
            self._tun_name = tun_name_of(config.tun_fd)  # refuses anything but a TUN fd
            self._tun_fd = config.tun_fd
            os.set_blocking(self._tun_fd, False)
        elif config.tun_name is not None:
            self._tun_fd, self._tun_name = open_tun(config.tun_name)
        else:
            raise ConfigError(
                "the engine needs a TUN device", hint="set EngineConfig.tun_name or tun_fd"
            )
        try:
            set_mtu(self._tun_name, config.mtu)
            set_up(self._tun_name)
            self._sock = self._open_socket(bind_to)
            self._sender = UdpBatchSender(self._sock, gso=_enabled("BTMM_UDP_GSO"))
            self._port = int(self._sock.getsockname()[1])
        except BaseException:
            close_quietly(self._tun_fd)
            raise
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._events: collections.deque[EngineEvent] = collections.deque()
        #: Payload bytes of the control messages in ``_events``.
        self._control_bytes = 0
        self._lock = threading.Lock()
        self._peers: dict[bytes, _Peer] = {}
        self._by_spi: dict[int, tuple[_Peer, EspRxSa]] = {}
        self._total = _Count()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._closed = False

    @staticmethod
    def _open_socket(bind_to: tuple[str, int]) -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            # Dual stack whatever net.ipv6.bindv6only says: IPv4 peers arrive v4-mapped.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(bind_to)
        except OSError as exc:
            sock.close()
            where = _from_wire(*bind_to)
            raise DataPlaneError(
                f"cannot bind the tunnel UDP socket to {where}: {exc.strerror}",
                hint="choose another port (0 picks a free one) or stop whatever holds it",
            ) from exc
        sock.setblocking(False)
        # Coalesced reads of a peer's GSO runs; a kernel without UDP_GRO (before 5.0) reads
        # datagram by datagram, as before.
        if _enabled("BTMM_UDP_GRO"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        return sock

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def tun_name(self) -> str:
        return self._tun_name

    @property
    def local_port(self) -> int:
        return self._port

    def start(self) -> None:
        if self._closed:
            raise DataPlaneError("the engine was stopped", hint="open a new engine")
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._tun_loop, name="btmm-py-tun", daemon=True),
            threading.Thread(target=self._udp_loop, name="btmm-py-udp", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        for t in self._threads:
            t.join()
        self._threads = []
        self._sock.close()
        for fd in (self._tun_fd, self._wake, self._events_fd):
            close_quietly(fd)

    def __enter__(self) -> PythonEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration ---------------------------------------------------------------------

    def _peer(self, inner: str) -> _Peer:
        peer = self._peers.get(parse_inner(inner).packed)
        if peer is None:
            raise UnknownPeer(
                f"no peer with inner address {inner}", hint="add it with add_peer first"
            )
        return peer

    def add_peer(self, inner: str, endpoint: Endpoint | None = None) -> None:
        addr = parse_inner(inner)
        endpoint = None if endpoint is None else canonical_endpoint(endpoint)
        with self._lock:
            if addr.packed in self._peers:
                raise DataPlaneError(
                    f"peer {addr} already exists", hint="use update_peer to change its endpoint"
                )
            self._peers[addr.packed] = _Peer(addr, endpoint)

    def update_peer(self, inner: str, endpoint: Endpoint | None) -> None:
        endpoint = None if endpoint is None else canonical_endpoint(endpoint)
        with self._lock:
            self._peer(inner).endpoint = endpoint

    def remove_peer(self, inner: str) -> None:
        with self._lock:
            peer = self._peer(inner)
            for sa in peer.rx:
                del self._by_spi[sa.spi]
            del self._peers[peer.key]

    def install_tx_sa(self, inner: str, spi: int, keymat: bytes, next_seq: int = 1) -> None:
        sa = EspTxSa(spi, keymat, next_seq)
        with self._lock:
            peer = self._peer(inner)
            peer.tx = sa
            peer.tx_exhausted_reported = False
            self._send_held(peer)

    def install_rx_sa(self, inner: str, spi: int, keymat: bytes) -> None:
        sa = EspRxSa(spi, keymat)
        with self._lock:
            peer = self._peer(inner)
            if spi in self._by_spi:
                owner = self._by_spi[spi][0].inner
                raise DataPlaneError(
                    f"SPI {spi:#010x} is already in use by peer {owner}",
                    hint="choose a fresh random SPI for every receive SA",
                )
            if len(peer.rx) >= MAX_RX_SAS:
                old = peer.rx.pop(0)
                del self._by_spi[old.spi]
            peer.rx.append(sa)
            self._by_spi[spi] = (peer, sa)

    def retire_rx_sa(self, inner: str, spi: int) -> None:
        with self._lock:
            peer = self._peer(inner)
            for i, sa in enumerate(peer.rx):
                if sa.spi == spi:
                    del peer.rx[i]
                    del self._by_spi[spi]
                    return
            raise DataPlaneError(
                f"peer {peer.inner} has no receive SA with SPI {spi:#010x}",
                hint="see peers() for the SPIs it has",
            )

    # -- on-demand tunnels (api.py; the rules of hold.py) ----------------------------------

    def _hold(self, peer: _Peer, packet: bytes) -> None:
        """Hold an outbound packet for a peer without a transmit SA (``_lock`` held)."""
        held = peer.hold.push(packet, self._config.mtu)
        if held is Held.FIRST:
            if not self._queue_event(PeerWanted(str(peer.inner))):
                peer.hold.wanted = False  # lost: the next packet asks again
        elif held is Held.OVERFLOW:
            self._drop(DropReason.HOLD_OVERFLOW, peer)
        elif held is Held.TOO_LONG:
            self._drop(DropReason.MALFORMED, peer)

    def _send_held(self, peer: _Peer) -> None:
        """Seal and send the packets held for a peer that just got its transmit SA, oldest
        first, before anything newer can be sealed (``_lock`` held)."""
        for packet in peer.hold.take():
            if peer.endpoint is None or peer.tx is None:
                self._drop(DropReason.NO_SA, peer)
                continue
            try:
                payload = peer.tx.seal(packet)
            except SaExhausted:
                self._drop(DropReason.SA_EXHAUSTED, peer)
                continue
            with contextlib.suppress(OSError):
                self._sender.send_one(payload, peer.endpoint)
                self.sent(peer, len(packet))

    def reject_held(self, inner: str) -> int:
        if self._closed:
            raise DataPlaneError(
                "the engine is stopped and its TUN device and socket are closed",
                hint="open a new engine",
            )
        written = 0
        with self._lock:
            for packet in self._peer(inner).hold.take():
                answer = icmp6_unreachable(packet)
                if answer is not None:
                    with contextlib.suppress(OSError):
                        os.write(self._tun_fd, answer)
                        written += 1
        return written

    def clear_tx_sa(self, inner: str) -> None:
        with self._lock:
            peer = self._peer(inner)
            peer.tx = None
            peer.hold.reset()

    # -- control traffic -------------------------------------------------------------------

    def _send(self, payload: bytes, dest: Endpoint) -> None:
        self._sender.send_one(payload, canonical_endpoint(dest))

    def send_control(self, destination: Endpoint, message: bytes) -> None:
        try:
            self._send(CONTROL_MARKER + message, destination)
        except OSError as exc:
            raise DataPlaneError(
                f"sending a control message to {destination} failed: {exc.strerror or exc}",
                hint="check the address and that the network is up",
            ) from exc

    def send_stun(self, destination: Endpoint, message: bytes) -> None:
        if not looks_like_stun(message):
            raise ValueError(
                f"send_stun refuses a {len(message)}-byte message that is not a STUN message "
                "(RFC 8489 header with the magic cookie and a length field matching its size)"
            )
        if len(message) > MAX_CONTROL_MESSAGE:
            raise ValueError(
                f"send_stun refuses a {len(message)}-byte STUN message; "
                f"at most {MAX_CONTROL_MESSAGE}"
            )
        try:
            self._send(message, destination)
        except OSError as exc:
            raise DataPlaneError(
                f"sending a STUN message to {destination} failed: {exc.strerror or exc}",
                hint="check the address and that the network is up",
            ) from exc

    def send_keepalive(self, inner: str) -> None:
        with self._lock:
            peer = self._peer(inner)
            endpoint = peer.endpoint
        if endpoint is None:
            raise DataPlaneError(
                f"peer {inner} has no endpoint to send a keepalive to",
                hint="set one with update_peer",
            )
        try:
            self._send(KEEPALIVE, endpoint)
        except OSError as exc:
            raise DataPlaneError(
                f"sending a keepalive to {endpoint} failed: {exc.strerror or exc}",
                hint="check the peer's endpoint and that the network is up",
            ) from exc

    # -- events and counters ---------------------------------------------------------------

    def fileno(self) -> int:
        return self._events_fd

    def _queue_event(self, event: EngineEvent) -> bool:
        """Queue an event for Python (call with ``_lock`` held); False when the queue is full
        (in events, or in control bytes for a control or STUN message)."""
        size = len(event.payload) if isinstance(event, ControlPacket | StunPacket) else 0
        if (
            len(self._events) >= self._config.event_queue
            or self._control_bytes + size > self._config.control_queue_bytes
        ):
            self._total.drop(DropReason.CONTROL_OVERFLOW)
            return False
        self._control_bytes += size
        self._events.append(event)
        os.eventfd_write(self._events_fd, 1)
        return True

    def drain(self, limit: int = 256) -> Sequence[EngineEvent]:
        with self._lock:
            out = [self._events.popleft() for _ in range(min(limit, len(self._events)))]
            self._control_bytes -= sum(
                len(e.payload) for e in out if isinstance(e, ControlPacket | StunPacket)
            )
            if not self._events:
                # Cleared under the lock, so a producer cannot slip an event in between the
                # last pop and the read and leave it queued with the fd not readable.
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._events_fd)
        return out

    def counters(self) -> Counters:
        with self._lock:
            return self._total.snapshot()

    def peers(self) -> Sequence[PeerInfo]:
        with self._lock:
            return [
                PeerInfo(
                    inner=str(p.inner),
                    endpoint=p.endpoint,
                    tx_spi=p.tx.spi if p.tx else None,
                    rx_spis=tuple(sa.spi for sa in p.rx),
                    counters=p.count.snapshot(),
                    held=len(p.hold),
                )
                for p in self._peers.values()
            ]

    def _drop(self, reason: DropReason, peer: _Peer | None) -> None:
        self._total.drop(reason)
        if peer is not None:
            peer.count.drop(reason)

    # -- packet paths (called from the engine threads) -------------------------------------

    def outbound(self, packet: bytes) -> tuple[bytes, Endpoint, _Peer] | None:
        """Seal one packet read from the TUN; return the UDP payload, where to send it and the
        peer, or None when it is dropped (counted). Call with ``_lock`` held; count the packet
        with ``sent`` once it left."""
        if len(packet) < _IPV6_HEADER or packet[0] >> 4 != 6:
            self._drop(DropReason.MALFORMED, None)
            return None
        peer = self._peers.get(packet[24:40])
        if peer is None:
            self._drop(DropReason.NO_ROUTE, None)
            return None
        if peer.tx is None:
            self._hold(peer, packet)
            return None
        if peer.endpoint is None:
            self._drop(DropReason.NO_SA, peer)
            return None
        try:
            payload = peer.tx.seal(packet)
        except SaExhausted:
            self._drop(DropReason.SA_EXHAUSTED, peer)
            if not peer.tx_exhausted_reported:
                peer.tx_exhausted_reported = True
                self._queue_event(TxSaExhausted(str(peer.inner), peer.tx.spi))
            return None
        return payload, peer.endpoint, peer

    def sent(self, peer: _Peer, inner_len: int) -> None:
        for c in (self._total, peer.count):
            c.packets_out += 1
            c.bytes_out += inner_len

    def delivered(self, peer: _Peer, inner_len: int) -> None:
        for c in (self._total, peer.count):
            c.packets_in += 1
            c.bytes_in += inner_len

    def inbound(self, payload: bytes, source: Endpoint) -> tuple[bytes, _Peer] | None:
        """Handle one UDP payload; return the inner packet to write to the TUN and its peer, or
        None when it was a control or STUN message, a keepalive or a drop (counted). Call with
        ``_lock`` held; count the delivery with ``delivered`` once the write succeeded."""
        if payload == KEEPALIVE:
            self._total.keepalives_in += 1
            return None
        if payload.startswith(CONTROL_MARKER):
            self._total.control_in += 1
            message = payload[len(CONTROL_MARKER) :]
            if len(message) > MAX_CONTROL_MESSAGE:
                self._total.drop(DropReason.CONTROL_OVERSIZE)
                return None
            self._queue_event(ControlPacket(source, message))
            return None
        # STUN shares the port so that the reflexive address the daemon learns is this
        # socket's. STUN's shape cannot rule out ESP: ESP's bytes 4..8 are the low half of its
        # sequence number, which does reach the magic cookie, and its first four bytes (the
        # SPI) can read as a STUN type and length. So a datagram that names one of our receive
        # SAs is ESP, whatever it looks like, and only one that names none and has STUN's
        # shape is STUN. The reverse collision (a real STUN message whose type and length spell
        # one of our SPIs, odds about one in 2**32 per SA) is dropped as ESP until a rekey
        # replaces that SPI; the STUN client then times out and asks again, as for any loss.
        if looks_like_stun(payload) and int.from_bytes(payload[:4], "big") not in self._by_spi:
            self._total.control_in += 1
            if len(payload) > MAX_CONTROL_MESSAGE:
                self._total.drop(DropReason.CONTROL_OVERSIZE)
                return None
            self._queue_event(StunPacket(source, payload))
            return None
        if len(payload) < MIN_PAYLOAD or (len(payload) - MIN_PAYLOAD) % 4:
            # Checked before the SPI lookup, in the codec's own order.
            self._drop(DropReason.MALFORMED, None)
            return None
        entry = self._by_spi.get(int.from_bytes(payload[:4], "big"))
        if entry is None:
            self._drop(DropReason.UNKNOWN_SPI, None)
            return None
        peer, sa = entry
        before = sa.top
        try:
            inner = sa.open(payload)
        except PacketDropped as exc:
            assert isinstance(exc.reason, DropReason)
            self._drop(exc.reason, peer)
            return None
        if len(inner) < _IPV6_HEADER or inner[0] >> 4 != 6:
            self._drop(DropReason.MALFORMED, peer)
            return None
        if inner[8:24] != peer.key:
            self._drop(DropReason.SOURCE_MISMATCH, peer)
            return None
        if sa.top != before and source != peer.endpoint:
            # Only the holder of the key can move ``top``: the peer is really there now. An
            # older packet (reordered) must not drag the endpoint back.
            old, peer.endpoint = peer.endpoint, source
            self._queue_event(PeerRoamed(str(peer.inner), old, source))
        return inner, peer

    def _waiter(self, fd: int) -> Callable[[], bool]:
        """A function that blocks until ``fd`` is readable and returns False once the engine
        is stopping."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)

        def wait() -> bool:
            while not self._stopping:
                for ready, _ in poller.poll():
                    if ready == fd:
                        return not self._stopping
            return False

        return wait

    def _tun_loop(self) -> None:
        tun, bufsize = self._tun_fd, max(self._config.mtu, 1280) + 512
        wait = self._waiter(tun)
        while wait():
            packets: list[bytes] = []
            with contextlib.suppress(OSError):  # EAGAIN ends the batch
                while len(packets) < BATCH:
                    packets.append(os.read(tun, bufsize))
            with self._lock:
                sends = [(p, out) for p in packets if (out := self.outbound(p)) is not None]
            # A send error (no route to the endpoint, buffer full) loses the packet like a
            # lossy link would; only packets that left are counted.
            left = self._sender.send([(payload, dest) for _, (payload, dest, _) in sends])
            done = [(out[2], len(p)) for (p, out), ok in zip(sends, left, strict=True) if ok]
            if done:
                with self._lock:
                    for peer, size in done:
                        self.sent(peer, size)

    def _udp_loop(self) -> None:
        sock = self._sock
        wait = self._waiter(sock.fileno())
        while wait():
            received = receive_batch(sock, BATCH)
            with self._lock:
                inners = [i for i in (self.inbound(d, s) for d, s in received) if i is not None]
            done: list[tuple[_Peer, int]] = []
            for inner, peer in inners:
                # A full TUN queue (or a device that is down) loses the packet like a congested
                # link would; only packets the kernel took are counted.
                with contextlib.suppress(OSError):
                    os.write(self._tun_fd, inner)
                    done.append((peer, len(inner)))
            if done:
                with self._lock:
                    for peer, size in done:
                        self.delivered(peer, size)
