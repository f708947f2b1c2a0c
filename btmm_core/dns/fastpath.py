"""Recognise plain queries without dnspython, so their answers can come from a cache.

RFC 1035 4.1 (message layout), RFC 6891 6.1.2 (OPT RR), RFC 8945 4.2 (TSIG RR). A plain query
is: QR=0, opcode QUERY, one question, no answer/authority RRs, and in the additional section at
most an OPT RR without options and then a TSIG RR, all names uncompressed, nothing after the
last RR. Anything else returns None and takes the full path; so does anything this scanner is
unsure about. The cache key holds every byte an answer depends on besides the zone data.

The TSIG RR is kept as raw bytes (``RawTsig``): no ``dns.name.Name`` is built, so a signed
query answered from the cache is verified and signed on bytes (``dns.tsig.RawKey``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.name

from btmm_core.dns.tsig import TsigRecord

_QR_OPCODE = 0xF800
_RD_CD = 0x0110
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_TSIG_FIXED = struct.Struct("!HIHH")
_TSIG_TAIL = struct.Struct("!HHH")


@dataclass(frozen=True, slots=True)
class RawTsig:
    """A received TSIG RR as bytes: the key and algorithm names exactly as sent
    (uncompressed wire form, case kept), the other fields decoded, ``start`` where the RR
    starts in the message."""

    key_wire: bytes
    alg_wire: bytes
    time_signed: int
    fudge: int
    mac: bytes
    original_id: int
    error: int
    other: bytes
    start: int

    def record(self) -> TsigRecord:
        """The same RR as the full path's ``TsigRecord`` (dnspython names)."""
        return TsigRecord(
            dns.name.from_wire(self.key_wire, 0)[0],
            dns.name.from_wire(self.alg_wire, 0)[0],
            self.time_signed,
            self.fudge,
            self.mac,
            self.original_id,
            self.error,
            self.other,
            self.start,
        )


@dataclass(frozen=True, slots=True)
class PlainQuery:
    key: bytes
    tsig: RawTsig | None


def _name_end(wire: bytes, p: int) -> int:
    """The offset after the uncompressed name at ``p``, or -1: past the end, a pointer or an
    extended label type (left to dnspython), or longer than 255 bytes."""
    start = p
    size = len(wire)
    while p < size:
        n = wire[p]
        if n == 0:
            return p + 1
        if n > 63:
            return -1
        p += 1 + n
        if p - start >= 255:
            return -1
    return -1


# One long function on purpose: it runs for every query, and helper calls would cost there.
def scan(wire: bytes, stream: bool) -> PlainQuery | None:
    size = len(wire)
    if size < 17:
        return None
    _, flags, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if flags & _QR_OPCODE or qd != 1 or an or ns or ar > 2:
        return None
    p = _name_end(wire, 12)
    if p < 0:
        return None
    p += 4
    if p > size:
        return None
    question = wire[12:p]
    opt = b""
    tsig: RawTsig | None = None
    for i in range(ar):
        start = p
        p = _name_end(wire, p)
        if p < 0 or p + 10 > size:
            return None
        rdtype, rdclass, _, rdlen = _RR.unpack_from(wire, p)
        owner_end = p
        p += 10
        if p + rdlen > size:
            return None
        if rdtype == 41 and i == 0 and owner_end == start + 1 and rdlen == 0 and not opt:
            opt = wire[start:p]
            continue
        if rdtype != 250 or rdclass != 255 or i != ar - 1:
            return None  # not a TSIG RR as RFC 8945 4.2 has it (class ANY): the full path
        end = p + rdlen
        q = _name_end(wire, p)
        if q < 0 or q + 10 > end:
            return None
        alg_end = q
        hi, lo, fudge, mac_len = _TSIG_FIXED.unpack_from(wire, q)
        q += 10
        if q + mac_len + 6 > end:
            return None
        mac = wire[q : q + mac_len]
        q += mac_len
        original_id, error, other_len = _TSIG_TAIL.unpack_from(wire, q)
        q += 6
        if q + other_len != end:
            return None
        tsig = RawTsig(
            wire[start:owner_end],
            wire[p:alg_end],
            (hi << 32) | lo,
            fudge,
            mac,
            original_id,
            error,
            wire[q:end],
            start,
        )
        p = end
    if p != size:
        return None
    # the signer as its canonical (lower-case) wire form: the same key however it is spelt
    signer = b"" if tsig is None else tsig.key_wire.lower()
    key = b"%c%s%s|%s|%s" % (
        0x53 if stream else 0x55,
        struct.pack("!H", flags & _RD_CD),
        question,
        opt,
        signer,
    )
    return PlainQuery(key, tsig)
