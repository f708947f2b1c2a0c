"""DNS Push Notification TLVs (RFC 8765 section 6) inside DSO messages (``btmm_core.dns.dso``).

- SUBSCRIBE (0x40, a request): NAME, TYPE, CLASS. TYPE and CLASS 255 mean *all* (6.2.1).
- PUSH (0x41, server to client, unidirectional): change notifications laid out like RRs:
  NAME, TYPE, CLASS, TTL, RDLEN, RDATA (6.3.1). The TTL says what the notification is:

    0 .. 0x7FFFFFFF   add this RR (TYPE and CLASS not ANY)
    0xFFFFFFFF        remove this RR (TYPE and CLASS not ANY)
    0xFFFFFFFE        remove collectively, RDLEN 0: the RRset TYPE/CLASS; with TYPE ANY all
                      RRsets of CLASS at the name; with CLASS ANY (TYPE sent as 0) everything
    anything else     ignored (the rest of the message still counts)

  A PUSH message is at most 16,382 bytes (with its length prefix 16 KiB).
- UNSUBSCRIBE (0x42, unidirectional): the 2-byte MESSAGE ID of the SUBSCRIBE it ends (6.4.1).
- RECONFIRM (0x43, unidirectional): NAME, TYPE, CLASS, RDATA of one disputed RR; no RDLEN,
  the DSO-LENGTH bounds it (6.5.1).

Names in SUBSCRIBE and RECONFIRM must be uncompressed (their TLVs stand alone); a PUSH may use
compression with offsets from the start of the message, so ``parse_push`` reads the whole
message. Our PUSH messages are not compressed: each notification's bytes do not depend on
where it sits, so one change is rendered once and the same bytes go to every subscriber.
Malformed data raises ``DSOError`` (no rcode: a fatal error, RFC 8490 5.3.1) except where the
RFC says to ignore a notification.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from btmm_core.dns.dso import HEADER_LEN, TLV, DSOType
from btmm_core.errors import DSOError

ANY = 255
#: Largest TTL of an added record (RFC 2181 section 8).
MAX_ADD_TTL = 0x7FFFFFFF
REMOVE_RR = 0xFFFFFFFF
REMOVE_COLLECTIVE = 0xFFFFFFFE
#: Largest PUSH message, not counting the stream's 2-byte length prefix (RFC 8765 6.3.1).
MAX_PUSH_MESSAGE = 16_382
#: PUSH message header and TLV header: what a PUSH's notifications share with nothing else.
PUSH_OVERHEAD = HEADER_LEN + 4


def _uncompressed_name(data: bytes, p: int, what: str) -> tuple[dns.name.Name, int]:
    """The name at ``p`` and the offset after it; a compression pointer is refused."""
    try:
        name, used = dns.name.from_wire(data, p)
    except (dns.exception.DNSException, IndexError, ValueError) as e:
        raise DSOError(f"{what}: malformed name ({e or type(e).__name__})") from e
    if used != len(name.to_wire() or b""):
        raise DSOError(f"{what}: compressed name (not allowed in this TLV)")
    return name, p + used


@dataclass(frozen=True)
class Subscribe:
    name: dns.name.Name
    rdtype: int
    rdclass: int = dns.rdataclass.IN

    def matches(self, name: dns.name.Name, rdtype: int, rdclass: int) -> bool:
        return name == self.name and self.rdtype in (ANY, rdtype) and self.rdclass in (ANY, rdclass)

    def tlv(self) -> TLV:
        return TLV(
            DSOType.SUBSCRIBE,
            (self.name.to_wire() or b"") + struct.pack("!HH", self.rdtype, self.rdclass),
        )

    @classmethod
    def from_tlv(cls, tlv: TLV) -> Subscribe:
        name, p = _uncompressed_name(tlv.data, 0, "SUBSCRIBE")
        if len(tlv.data) - p != 4:
            raise DSOError(f"SUBSCRIBE: {len(tlv.data) - p} bytes after the name, not 4")
        rdtype, rdclass = struct.unpack("!HH", tlv.data[p:])
        return cls(name, rdtype, rdclass)


@dataclass(frozen=True)
class Unsubscribe:
    subscribe_id: int

    def tlv(self) -> TLV:
        return TLV(DSOType.UNSUBSCRIBE, struct.pack("!H", self.subscribe_id))

    @classmethod
    def from_tlv(cls, tlv: TLV) -> Unsubscribe:
        if len(tlv.data) != 2:
            raise DSOError(f"UNSUBSCRIBE of {len(tlv.data)} bytes: it has 2")
        return cls(struct.unpack("!H", tlv.data)[0])


@dataclass(frozen=True)
class Reconfirm:
    name: dns.name.Name
    rdtype: int
    rdclass: int
    rdata: dns.rdata.Rdata

    def tlv(self) -> TLV:
        return TLV(
            DSOType.RECONFIRM,
            (self.name.to_wire() or b"")
            + struct.pack("!HH", self.rdtype, self.rdclass)
            + rdata_wire(self.rdata),
        )

    @classmethod
    def from_tlv(cls, tlv: TLV) -> Reconfirm:
        name, p = _uncompressed_name(tlv.data, 0, "RECONFIRM")
        if len(tlv.data) - p < 4:
            raise DSOError("RECONFIRM: truncated after the name")
        rdtype, rdclass = struct.unpack("!HH", tlv.data[p : p + 4])
        if ANY in (rdtype, rdclass):
            raise DSOError("RECONFIRM with TYPE or CLASS ANY (RFC 8765 6.5.1)")
        p += 4
        rdata = _rdata(tlv.data, p, len(tlv.data) - p, rdtype, rdclass, "RECONFIRM")
        return cls(name, rdtype, rdclass, rdata)


def rdata_wire(rdata: dns.rdata.Rdata) -> bytes:
    """RDATA as sent, names uncompressed."""
    return rdata.to_wire() or b""


def _rdata(
    wire: bytes, p: int, length: int, rdtype: int, rdclass: int, what: str
) -> dns.rdata.Rdata:
    try:
        return dns.rdata.from_wire(
            dns.rdataclass.RdataClass.make(rdclass),
            dns.rdatatype.RdataType.make(rdtype),
            wire,
            p,
            length,
        )
    except Exception as e:  # dnspython raises many kinds for bad RDATA from the wire
        raise DSOError(f"{what}: malformed RDATA of type {rdtype} ({e or type(e).__name__})") from e


@dataclass(frozen=True)
class Change:
    """One change notification of a PUSH. ``rdata`` is None for a collective removal."""

    name: dns.name.Name
    rdtype: int
    rdclass: int
    ttl: int
    rdata: dns.rdata.Rdata | None = None

    @property
    def is_add(self) -> bool:
        return self.ttl <= MAX_ADD_TTL

    @property
    def is_collective(self) -> bool:
        return self.ttl == REMOVE_COLLECTIVE

    @classmethod
    def add(cls, name: dns.name.Name, rdata: dns.rdata.Rdata, ttl: int) -> Change:
        return cls(name, rdata.rdtype, rdata.rdclass, min(ttl, MAX_ADD_TTL), rdata)

    @classmethod
    def remove(cls, name: dns.name.Name, rdata: dns.rdata.Rdata) -> Change:
        return cls(name, rdata.rdtype, rdata.rdclass, REMOVE_RR, rdata)

    @classmethod
    def remove_rrset(
        cls, name: dns.name.Name, rdtype: int, rdclass: int = dns.rdataclass.IN
    ) -> Change:
        return cls(name, rdtype, rdclass, REMOVE_COLLECTIVE)

    @classmethod
    def remove_name(cls, name: dns.name.Name) -> Change:
        return cls(name, 0, ANY, REMOVE_COLLECTIVE)

    def covers(self, sub: Subscribe) -> bool:
        """Whether this notification concerns the subscription (RFC 8765 6.3.1: names equal,
        TYPE and CLASS equal unless the subscription's is ANY; a collective removal concerns
        every subscription whose records it may remove)."""
        if self.name != sub.name:
            return False
        if self.is_collective:
            if self.rdclass == ANY:
                return True
            if sub.rdclass not in (ANY, self.rdclass):
                return False
            return self.rdtype == ANY or sub.rdtype in (ANY, self.rdtype)
        return sub.rdtype in (ANY, self.rdtype) and sub.rdclass in (ANY, self.rdclass)

    def to_bytes(self) -> bytes:
        rd = b"" if self.rdata is None else rdata_wire(self.rdata)
        if self.is_collective and rd:
            raise ValueError("a collective removal carries no RDATA")
        return (
            (self.name.to_wire() or b"")
            + struct.pack("!HHIH", self.rdtype, self.rdclass, self.ttl, len(rd))
            + rd
        )


def push_tlv(notifications: bytes) -> TLV:
    """A PUSH TLV around rendered change notifications (``Change.to_bytes`` joined)."""
    if not notifications:
        raise ValueError("a PUSH carries at least one change notification")
    return TLV(DSOType.PUSH, notifications)


def parse_push(wire: bytes, tlv: TLV) -> list[Change]:
    """The change notifications of a PUSH TLV parsed from ``wire`` (the whole message, since
    names may be compressed against it). Notifications with a TTL that means nothing are
    skipped; an empty PUSH, ANY in an add or single removal, or RDATA in a collective removal
    is fatal (RFC 8765 6.3.1)."""
    if tlv.at < 0 or wire[tlv.at : tlv.at + len(tlv.data)] != tlv.data:
        raise ValueError("parse_push needs the TLV as parsed from this message")
    if len(wire) > MAX_PUSH_MESSAGE:
        raise DSOError(f"PUSH message of {len(wire)} bytes: at most {MAX_PUSH_MESSAGE}")
    if not tlv.data:
        raise DSOError("PUSH without a change notification")
    out: list[Change] = []
    p, end = tlv.at, tlv.at + len(tlv.data)
    while p < end:
        try:
            name, used = dns.name.from_wire(wire[:end], p)
        except (dns.exception.DNSException, IndexError, ValueError) as e:
            raise DSOError(f"PUSH: malformed name ({e or type(e).__name__})") from e
        p += used
        if end - p < 10:
            raise DSOError("PUSH: truncated change notification")
        rdtype, rdclass, ttl, rdlen = struct.unpack("!HHIH", wire[p : p + 10])
        p += 10
        if p + rdlen > end:
            raise DSOError(f"PUSH: RDLEN {rdlen} runs past the TLV")
        start, p = p, p + rdlen
        if ttl == REMOVE_COLLECTIVE:
            if rdlen:
                raise DSOError("PUSH: collective removal with RDATA")
            out.append(Change(name, 0 if rdclass == ANY else rdtype, rdclass, ttl))
            continue
        if ttl > MAX_ADD_TTL and ttl != REMOVE_RR:
            continue  # RFC 8765 6.3.1: ignore this one, keep the others
        if ANY in (rdtype, rdclass):
            raise DSOError("PUSH: TYPE or CLASS ANY in an add or single removal")
        rd = _rdata(wire[:end], start, rdlen, rdtype, rdclass, "PUSH")
        out.append(Change(name, rdtype, rdclass, ttl, rd))
    return out
