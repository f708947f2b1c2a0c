"""Packets held for a peer without a transmit SA: the Python engine's half of on-demand tunnels.

Standards: RFC 4443 §3.1 (ICMPv6 Destination Unreachable, code 3 "address unreachable") and
§2.4 (when an error message must not be sent, and its 1280-byte bound); RFC 8200 §8.1 (the
upper-layer checksum's pseudo-header).

The rules are those of ``btmm_core/dataplane/api.py``; the Rust twin is
``btmm_fast/src/engine/hold.rs`` and both build the same ICMPv6 bytes. The ring has
``HOLD_SLOTS`` fixed slots; a full ring overwrites its oldest packet.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator

from btmm_core.dataplane.api import HOLD_SLOTS

ICMP_MAX = 1280
_IPV6_HEADER = 40
_NEXT_HEADER_ICMPV6 = 58
_DEST_UNREACHABLE = 1
_ADDRESS_UNREACHABLE = 3


class Held(enum.IntEnum):
    """What holding one packet did."""

    FIRST = 1  #: held, the first since idle: queue ``PeerWanted``
    HELD = 2
    OVERFLOW = 3  #: held in place of the oldest, which was dropped
    TOO_LONG = 4  #: longer than the MTU: dropped as malformed


class HoldRing:
    """The held packets of one peer, oldest first."""

    __slots__ = ("_count", "_head", "_slots", "wanted")

    def __init__(self) -> None:
        self._slots: list[bytes] = [b""] * HOLD_SLOTS
        self._head = 0
        self._count = 0
        #: ``PeerWanted`` was queued for this opening
        self.wanted = False

    def __len__(self) -> int:
        return self._count

    def push(self, packet: bytes, mtu: int) -> Held:
        if len(packet) > mtu:
            return Held.TOO_LONG
        overflow = self._count == HOLD_SLOTS
        if overflow:
            at = self._head
            self._head = (self._head + 1) % HOLD_SLOTS
        else:
            self._count += 1
            at = (self._head + self._count - 1) % HOLD_SLOTS
        self._slots[at] = packet
        if overflow:
            return Held.OVERFLOW
        if not self.wanted:
            self.wanted = True
            return Held.FIRST
        return Held.HELD

    def take(self) -> Iterator[bytes]:
        """The held packets, oldest first; the ring is empty and the opening over after."""
        out = [self._slots[(self._head + k) % HOLD_SLOTS] for k in range(self._count)]
        self.reset()
        return iter(out)

    def reset(self) -> None:
        for i in range(HOLD_SLOTS):
            self._slots[i] = b""  # the slots stay; only the packets go
        self._head = self._count = 0
        self.wanted = False


def _checksum(data: bytes, start: int = 0) -> int:
    """The ones' complement sum of ``data`` as big-endian 16-bit words, plus ``start``."""
    if len(data) % 2:
        data += b"\x00"
    total: int = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def icmp6_unreachable(packet: bytes) -> bytes | None:
    """The ICMPv6 Destination Unreachable, code 3, that answers ``packet``: from its
    destination to its source, quoting as much of it as fits in 1280 bytes. None where RFC
    4443 §2.4 (e) forbids one (an ICMPv6 error, an unspecified or multicast source, a multicast
    destination) or when ``packet`` is not IPv6."""
    if len(packet) < _IPV6_HEADER or packet[0] >> 4 != 6:
        return None
    src, dst = packet[8:24], packet[24:40]
    if src == bytes(16) or src[0] == 0xFF or dst[0] == 0xFF:
        return None
    if packet[6] == _NEXT_HEADER_ICMPV6 and len(packet) > _IPV6_HEADER and packet[40] < 128:
        return None
    quoted = packet[: ICMP_MAX - _IPV6_HEADER - 8]
    length = 8 + len(quoted)
    body = bytes([_DEST_UNREACHABLE, _ADDRESS_UNREACHABLE, 0, 0, 0, 0, 0, 0]) + quoted
    pseudo = dst + src + length.to_bytes(4, "big") + bytes([0, 0, 0, _NEXT_HEADER_ICMPV6])
    csum = ~_checksum(body, _checksum(pseudo)) & 0xFFFF
    header = (
        b"\x60\x00\x00\x00"
        + length.to_bytes(2, "big")
        + bytes([_NEXT_HEADER_ICMPV6, 255])
        + dst
        + src
    )
    return header + body[:2] + csum.to_bytes(2, "big") + body[4:]
