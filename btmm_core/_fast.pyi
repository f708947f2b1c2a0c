"""Types of ``btmm_core._fast``, the Rust data plane (btmm_fast/src/python.rs).

Private: use it through ``btmm_core.dataplane`` (``FastEngine``, ``tx_codec``, ``rx_codec``).
Errors are the classes of ``btmm_core.errors`` (``ConfigError`` for a bad engine setting,
``TunError``, ``PermissionNeeded``, ``UnknownPeer``, ``DataPlaneError``, ``PacketDropped``,
``SaExhausted``); a malformed argument of a call (an SPI or keying material out of range)
raises ``ValueError``, as the Python codec does. Inner addresses are 16 raw bytes, endpoints
``(IPv4 or IPv6 text, port)`` tuples (v4-mapped IPv6 comes back as plain IPv4).
"""

from typing import Literal, TypedDict, final

__all__ = ["BATCH", "Engine", "RxSa", "TxSa", "bench_aead", "bench_codec"]

#: packets handled per batch by each engine thread
BATCH: int

_Endpoint = tuple[str, int]

class _Counters(TypedDict):
    packets_in: int
    bytes_in: int
    packets_out: int
    bytes_out: int
    keepalives_in: int
    control_in: int
    #: keyed by the lowercase ``DropReason`` name, every reason present
    drops: dict[str, int]

class _Peer(TypedDict):
    inner: bytes
    endpoint: _Endpoint | None
    tx_spi: int | None
    rx_spis: list[int]
    counters: _Counters
    #: packets held while the tunnel opens
    held: int

#: ("control", source host, source port, message without the non-ESP marker)
_ControlEvent = tuple[Literal["control"], str, int, bytes]
#: ("stun", source host, source port, the whole STUN message)
_StunEvent = tuple[Literal["stun"], str, int, bytes]
#: ("roamed", inner, old endpoint, new endpoint)
_RoamedEvent = tuple[Literal["roamed"], bytes, _Endpoint | None, _Endpoint]
#: ("exhausted", inner, SPI of the transmit SA)
_ExhaustedEvent = tuple[Literal["exhausted"], bytes, int]
#: ("wanted", inner): a packet was held for a peer without a transmit SA
_WantedEvent = tuple[Literal["wanted"], bytes]
_Event = _ControlEvent | _StunEvent | _RoamedEvent | _ExhaustedEvent | _WantedEvent

@final
class TxSa:
    """Outbound ESP codec of one SA."""

    def __new__(cls, spi: int, keymat: bytes, next_seq: int | None = None) -> TxSa: ...
    @property
    def spi(self) -> int: ...
    @property
    def next_seq(self) -> int: ...
    def seal(self, inner: bytes) -> bytes:
        """Encrypt one inner packet into a UDP payload; raises SaExhausted after seq 2**64-1."""

@final
class RxSa:
    """Inbound ESP codec of one SA, with its replay window."""

    def __new__(cls, spi: int, keymat: bytes) -> RxSa: ...
    @property
    def spi(self) -> int: ...
    @property
    def top(self) -> int:
        """Highest sequence number accepted so far (0 before the first packet)."""
    def open(self, payload: bytes) -> bytes:
        """Decrypt one UDP payload into the inner packet; raises PacketDropped."""

@final
class Engine:
    """The data plane engine: TUN <-> ESP <-> UDP, two native threads."""

    def __new__(
        cls,
        tun_name: str | None,
        tun_fd: int | None,
        listen_host: str,
        listen_port: int,
        mtu: int,
        event_queue: int,
        control_queue_bytes: int,
    ) -> Engine: ...
    @property
    def tun_name(self) -> str: ...
    @property
    def local_port(self) -> int: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def add_peer(self, inner: bytes, endpoint: _Endpoint | None = None) -> None: ...
    def update_peer(self, inner: bytes, endpoint: _Endpoint | None) -> None: ...
    def remove_peer(self, inner: bytes) -> None: ...
    def install_tx_sa(
        self, inner: bytes, spi: int, keymat: bytes, next_seq: int | None = None
    ) -> None: ...
    def install_rx_sa(self, inner: bytes, spi: int, keymat: bytes) -> None: ...
    def retire_rx_sa(self, inner: bytes, spi: int) -> None: ...
    def reject_held(self, inner: bytes) -> int:
        """Answer the held packets with ICMPv6 address unreachable; how many were."""
    def clear_tx_sa(self, inner: bytes) -> None: ...
    def send_control(self, endpoint: _Endpoint, message: bytes) -> None: ...
    def send_stun(self, endpoint: _Endpoint, message: bytes) -> None:
        """Send one STUN message without the marker; ValueError for anything that is not
        one (RFC 8489 header, length field matching) or is longer than 1024 bytes."""
    def send_keepalive(self, inner: bytes) -> None: ...
    def fileno(self) -> int:
        """An eventfd that is readable while events are queued."""
    def drain(self, limit: int | None = None) -> list[_Event]: ...
    def counters(self) -> _Counters: ...
    def peers(self) -> list[_Peer]: ...

def bench_codec(size: int, count: int) -> float:
    """Seconds for ``count`` seal+open pairs of ``size``-byte inner packets (in place)."""

def bench_aead(size: int, count: int) -> float:
    """Seconds for ``count`` bare AES-256-GCM seal+open of ``size`` bytes with ring."""
