"""The data plane interface that both engines implement.

An engine moves IPv6 packets between a TUN device and ESP-in-UDP (RFC 4303 with
AES-256-GCM per RFC 4106, inside UDP per RFC 3948). It owns its threads; Python only
configures it (peers, SAs), sends and receives control packets, and reads counters.

Wire format (both engines produce identical bytes for the same SA and sequence number):

    UDP payload = SPI(4) | seq low 32 bits(4) | IV(8) | ciphertext | ICV(16)
    IV          = the 64-bit extended sequence number, big endian (never repeats under a key)
    nonce       = salt(4, last 4 bytes of the 36-byte keying material) | IV(8)
    AAD         = SPI(4) | seq high 32 bits(4) | seq low 32 bits(4)   (RFC 4106 §5, ESN)
    plaintext   = inner IPv6 packet | padding 1,2,3.. | pad length(1) | next header 41(1),
                  padded so that len(plaintext) % 4 == 0

A UDP payload that starts with four zero bytes is a control message (non-ESP marker): the
engine strips the marker and hands the rest to Python with the source address. A payload of
one 0xFF byte is a NAT keepalive: counted and dropped.

A payload with the shape of a STUN message (RFC 8489 §5,
``btmm_core.stun.message.looks_like_stun``) whose first four bytes are not the SPI of one of
the engine's receive SAs is handed to Python whole, as a ``StunPacket``, and ``send_stun``
sends one without any marker: the daemon runs STUN from the tunnel's own socket, so the
server-reflexive address it learns is that of the tunnel port. ESP is recognised first
because an ESP packet can have STUN's shape (its sequence number's low half, at bytes 4..8,
can equal the magic cookie).

Control and STUN messages are unauthenticated until the control plane has looked at them,
so what waits for it is bounded: a message longer than ``MAX_CONTROL_MESSAGE`` (a handshake
message is under 200 bytes, a STUN Binding answer under 100) is dropped as
``control_oversize``, and the queued messages hold at most
``EngineConfig.control_queue_bytes`` payload bytes (besides ``event_queue`` events); past
either bound a message is dropped as ``control_overflow``. Every control or STUN datagram
counts in ``control_in``, dropped or not.

On-demand tunnels: a packet to a peer that has no transmit SA is held, not dropped: each
peer has a ring of ``HOLD_SLOTS`` packets (a full ring drops its oldest as ``hold_overflow``),
and the first packet held since the peer was idle queues one ``PeerWanted`` event, which tells
the control plane to open the tunnel. ``install_tx_sa`` sends the held packets, oldest first,
before anything newer; ``reject_held`` answers each with an ICMPv6 Destination Unreachable,
code 3 (RFC 4443 §3.1), written to the TUN; ``clear_tx_sa`` takes an idle tunnel back to
holding. Both engines build the same bytes (``btmm_core.dataplane.hold``).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from btmm_core.errors import ConfigError

#: keying material = 32-byte AES-256 key + 4-byte salt (RFC 4106 §8.1)
KEYMAT_LEN = 36
ICV_LEN = 16
IV_LEN = 8
ESP_HEADER_LEN = 8
#: next header value for an IPv6 inner packet
NEXT_HEADER_IPV6 = 41
#: the non-ESP marker (RFC 3948 §2.2): a UDP payload starting with it is a control message
CONTROL_MARKER = b"\x00\x00\x00\x00"
#: the NAT keepalive (RFC 3948 §2.3): a UDP payload of this one byte
KEEPALIVE = b"\xff"
#: the largest UDP payload of one IPv4 datagram (65535 - 20 - 8), so of one GSO send too (kept
#: for IPv6 as well, whose limit is 20 bytes higher, so that both families batch alike)
MAX_UDP_PAYLOAD = 65535 - 20 - 8
#: outer header bytes around the padded plaintext: UDP 8 + SPI, sequence number and IV 16 + ICV 16
ESP_UDP_OVERHEAD = 8 + ESP_HEADER_LEN + IV_LEN + ICV_LEN
IPV4_HEADER = 20
IPV6_HEADER = 40
#: the largest MTU (inner packet) whose ESP-in-UDP payload still fits ``MAX_UDP_PAYLOAD``:
#: header and IV 16 + inner + padding to 4 + pad length and next header 2 + ICV 16
MAX_MTU = 65470
#: the replay window accepts a packet this many sequence numbers behind the highest seen
REPLAY_WINDOW = 4096
#: the last sequence number an SA may send; beyond it, the SA refuses (rekey first)
SEQ_MAX = 2**64 - 1
DEFAULT_PORT = 4500


def inner_mtu(link_mtu: int, ipv6: bool) -> int:
    """The largest inner packet whose ESP-in-UDP datagram fits ``link_mtu`` unfragmented over
    an outer IPv4 (20-byte header) or IPv6 (40-byte header) path: the plaintext (inner packet,
    pad length and next header) is padded to a multiple of 4."""
    room = link_mtu - (IPV6_HEADER if ipv6 else IPV4_HEADER) - ESP_UDP_OVERHEAD
    return room // 4 * 4 - 2


#: the TUN MTU: the largest inner packet that fits a 1500-byte path over either family (1418;
#: 1438 would fit IPv4 only). An inner MTU of 1420 made every full-size packet 1504 bytes on an
#: IPv6 underlay, fragmented by the sender (IPv6 TCP then ran at a fifth of IPv4's rate).
DEFAULT_MTU = inner_mtu(1500, ipv6=True)
#: the largest control message (after the marker), and the largest STUN message, handed to
#: the control plane or sent for it
MAX_CONTROL_MESSAGE = 1024
#: RFC 8489 §5: every STUN message carries this at bytes 4..8, after a 20-byte header
#: default bound of the queued control messages, in payload bytes
DEFAULT_CONTROL_QUEUE_BYTES = 4 << 20
#: packets held per peer while its tunnel opens
HOLD_SLOTS = 16


class DropReason(enum.IntEnum):
    """Why a packet was dropped. The values are shared with the Rust engine."""

    REPLAY = 1  #: sequence number already seen, or older than the window
    AUTH = 2  #: ICV check failed
    UNKNOWN_SPI = 3  #: no receive SA with this SPI (SPI 0 is never valid)
    MALFORMED = 4  #: too short, bad padding, wrong next header, not IPv6, oversize
    NO_ROUTE = 5  #: outbound packet to an inner address with no peer
    SOURCE_MISMATCH = 6  #: inner source address is not the SA's peer
    NO_SA = 7  #: outbound packet to a peer without a transmit SA or endpoint
    SA_EXHAUSTED = 8  #: transmit SA used up its sequence space
    CONTROL_OVERFLOW = 9  #: control/event queue to Python was full (events or bytes)
    CONTROL_OVERSIZE = 10  #: control or STUN message longer than MAX_CONTROL_MESSAGE
    HOLD_OVERFLOW = 11  #: held packet pushed out of a full hold ring by a newer one


DROP_NAMES: dict[DropReason, str] = {r: r.name.lower() for r in DropReason}


@dataclass(frozen=True)
class Endpoint:
    """An outer (underlay) UDP endpoint: an IPv4 or IPv6 address (text) and a port.

    Both engines use one dual-stack socket, where an IPv4 peer is the v4-mapped address
    ``::ffff:a.b.c.d``; engines always report such an address as plain IPv4 and take either
    form (``canonical_endpoint``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def canonical_endpoint(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with its address in the form engines report: compressed IPv6 text, and
    v4-mapped IPv6 as plain IPv4. ``ValueError`` for anything but an IP address (no host names,
    no zone index) and a port in 0..65535."""
    try:
        ip = ipaddress.ip_address(endpoint.host)
    except ValueError as exc:
        raise ValueError(f"endpoint host {endpoint.host!r} is not an IPv4 or IPv6 address") from exc
    if not isinstance(endpoint.port, int) or not 0 <= endpoint.port <= 65535:
        raise ValueError(f"endpoint port must be in 0..65535, got {endpoint.port!r}")
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValueError(f"endpoint host {endpoint.host!r}: a zone index is not supported")
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return Endpoint(str(ip), endpoint.port)


@dataclass(frozen=True)
class Counters:
    """Packet and byte counters; ``drops`` is keyed by ``DropReason`` name (lowercase)."""

    packets_in: int = 0
    bytes_in: int = 0  #: inner bytes delivered to the TUN
    packets_out: int = 0
    bytes_out: int = 0  #: inner bytes sealed and sent
    keepalives_in: int = 0
    control_in: int = 0
    drops: dict[str, int] | None = None

    def drop(self, reason: DropReason) -> int:
        return (self.drops or {}).get(DROP_NAMES[reason], 0)


@dataclass(frozen=True)
class PeerInfo:
    inner: str  #: the peer's inner IPv6 address (compressed text form)
    endpoint: Endpoint | None
    tx_spi: int | None
    rx_spis: tuple[int, ...]
    counters: Counters
    held: int = 0  #: packets held while the tunnel opens


@dataclass(frozen=True)
class ControlPacket:
    """A control message received on the engine's UDP socket (non-ESP marker stripped)."""

    source: Endpoint
    payload: bytes


@dataclass(frozen=True)
class StunPacket:
    """A STUN message (RFC 8489) received on the engine's UDP socket: the whole datagram."""

    source: Endpoint
    payload: bytes


@dataclass(frozen=True)
class PeerRoamed:
    """An authenticated packet moved a peer's outer endpoint."""

    inner: str
    old: Endpoint | None
    new: Endpoint


@dataclass(frozen=True)
class TxSaExhausted:
    """A peer's transmit SA reached the end of its sequence space and now refuses to send."""

    inner: str
    spi: int


@dataclass(frozen=True)
class PeerWanted:
    """A packet was held for a peer without a transmit SA: open its tunnel. Queued once per
    opening (again only after ``install_tx_sa``, ``reject_held`` or ``clear_tx_sa``)."""

    inner: str


EngineEvent = ControlPacket | StunPacket | PeerRoamed | TxSaExhausted | PeerWanted


def parse_inner(inner: str) -> ipaddress.IPv6Address:
    """A peer's inner address as both engines take it; ``ConfigError`` when it is not IPv6."""
    try:
        return ipaddress.IPv6Address(inner)
    except ValueError as exc:
        raise ConfigError(
            f"peer inner address {inner!r} is not an IPv6 address",
            hint="use the peer's ULA, for example fd00::2",
        ) from exc


@dataclass(frozen=True)
class EngineConfig:
    """How to open an engine.

    ``tun_name``: create the TUN device with this name, or attach to an existing persistent
    one. ``tun_fd``: use an already open TUN file descriptor instead (the engine takes
    ownership). ``listen``: the UDP socket's address; port 0 picks any free port. The socket
    is always one dual-stack IPv6 socket: ``::`` (or ``0.0.0.0``, which means the same) takes
    both families, an IPv4 address only that address, an IPv6 address only itself.
    ``event_queue``: most events queued for Python; ``control_queue_bytes``: most payload
    bytes of queued control messages (at least ``MAX_CONTROL_MESSAGE``).
    """

    tun_name: str | None = "btmm0"
    tun_fd: int | None = None
    listen: Endpoint = Endpoint("::", DEFAULT_PORT)
    mtu: int = DEFAULT_MTU
    event_queue: int = 4096
    control_queue_bytes: int = DEFAULT_CONTROL_QUEUE_BYTES


@runtime_checkable
class Engine(Protocol):
    """What both engines do. All methods are safe to call from the asyncio thread."""

    kind: str  #: "fast" or "python"

    @property
    def tun_name(self) -> str: ...
    @property
    def local_port(self) -> int: ...

    def start(self) -> None:
        """Start the packet threads. Idempotent."""

    def stop(self) -> None:
        """Stop the threads and close the TUN device and socket. Idempotent."""

    def add_peer(self, inner: str, endpoint: Endpoint | None = None) -> None:
        """Add a peer by inner IPv6 address (a /128). Re-adding an existing peer fails."""

    def update_peer(self, inner: str, endpoint: Endpoint | None) -> None: ...

    def remove_peer(self, inner: str) -> None:
        """Remove the peer and every SA it has."""

    def install_tx_sa(self, inner: str, spi: int, keymat: bytes, next_seq: int = 1) -> None:
        """Replace the peer's transmit SA (make-before-break: install rx first, then tx)."""

    def install_rx_sa(self, inner: str, spi: int, keymat: bytes) -> None:
        """Add a receive SA. A peer keeps at most two (current and previous); installing a
        third retires the oldest."""

    def retire_rx_sa(self, inner: str, spi: int) -> None: ...

    def reject_held(self, inner: str) -> int:
        """Answer each packet held for the peer with ICMPv6 address unreachable (to its
        sender, over the TUN) and empty the ring; returns how many answers were written."""

    def clear_tx_sa(self, inner: str) -> None:
        """Remove the peer's transmit SA (its tunnel went idle): its next packet is held and
        asks for a new opening."""

    def send_control(self, destination: Endpoint, message: bytes) -> None:
        """Send ``CONTROL_MARKER + message`` from the engine's UDP socket."""

    def send_stun(self, destination: Endpoint, message: bytes) -> None:
        """Send one STUN message as it is (no marker) from the engine's UDP socket.
        ``ValueError`` when it is not one (``looks_like_stun``) or is longer than
        ``MAX_CONTROL_MESSAGE``: the engine sends no arbitrary datagrams."""

    def send_keepalive(self, inner: str) -> None:
        """Send a one-byte 0xFF NAT keepalive to the peer's endpoint."""

    def fileno(self) -> int:
        """A file descriptor that is readable while events are queued (for loop.add_reader)."""

    def drain(self, limit: int = 256) -> Sequence[EngineEvent]:
        """Take queued events, oldest first, and clear the readiness of ``fileno()``."""

    def counters(self) -> Counters:
        """Totals over all peers, plus drops not attributable to a peer."""

    def peers(self) -> Sequence[PeerInfo]: ...

    def __enter__(self) -> Engine: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class TxCodec(Protocol):
    """The bare outbound codec of one SA (for tests and benchmarks)."""

    @property
    def spi(self) -> int: ...

    @property
    def next_seq(self) -> int: ...

    def seal(self, inner: bytes) -> bytes:
        """Encrypt one inner packet into a UDP payload; raises ``SaExhausted`` at the end."""


@runtime_checkable
class RxCodec(Protocol):
    """The bare inbound codec of one SA, with its replay window."""

    @property
    def spi(self) -> int: ...

    def open(self, payload: bytes) -> bytes:
        """Decrypt one UDP payload into the inner packet; raises ``PacketDropped``. The
        replay window moves only after the ICV checks out."""
