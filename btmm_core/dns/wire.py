"""Walking raw DNS messages: names and resource records as they stand on the wire.

RFC 1035 section 4.1 (message layout: a 12-byte header, the questions, then the answer,
authority and additional RRs) and 4.1.4 (compression pointers). For messages that dnspython
has parsed or will parse: these helpers find what its message objects do not keep, such as
where the last RR (the TSIG RR, RFC 8945 section 4.2) starts or a TTL as sent (dnspython reads
one above 2^31 - 1 as 0, RFC 2181 section 8). They do not validate: a truncated message raises
IndexError or struct.error. The strict scanner for untrusted queries is ``fastpath``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

HEADER_LEN = 12


@dataclass(frozen=True)
class RRHeader:
    """The fixed fields of one RR and where its parts start."""

    start: int
    rdtype: int
    rdclass: int
    #: as sent: unsigned 32 bits
    ttl: int
    rdata: int
    rdlength: int

    @property
    def end(self) -> int:
        return self.rdata + self.rdlength


def skip_name(wire: bytes, p: int) -> int:
    """The offset after the (possibly compressed) name at ``p``."""
    while True:
        length = wire[p]
        if length == 0:
            return p + 1
        if length & 0xC0 == 0xC0:
            return p + 2
        p += 1 + length


def after_questions(wire: bytes) -> int:
    """The offset of the first RR: after the header and the question section."""
    (qd,) = struct.unpack_from("!H", wire, 4)
    p = HEADER_LEN
    for _ in range(qd):
        p = skip_name(wire, p) + 4
    return p


def skip_rr(wire: bytes, p: int) -> int:
    """The offset after the RR at ``p``."""
    p = skip_name(wire, p)
    rdlength: int = struct.unpack_from("!H", wire, p + 8)[0]
    return p + 10 + rdlength


def rrs(wire: bytes, count: int | None = None) -> Iterator[RRHeader]:
    """The first ``count`` RRs after the questions (all that the header counts if None)."""
    if count is None:
        an, ns, ar = struct.unpack_from("!HHH", wire, 6)
        count = an + ns + ar
    p = after_questions(wire)
    for _ in range(count):
        start = p
        p = skip_name(wire, p)
        rdtype, rdclass, ttl, rdlength = struct.unpack_from("!HHIH", wire, p)
        p += 10 + rdlength
        yield RRHeader(start, rdtype, rdclass, ttl, p - rdlength, rdlength)


def last_rr_offset(wire: bytes) -> int:
    """Offset of the last RR of a well-formed message (the TSIG RR when there is one)."""
    an, ns, ar = struct.unpack_from("!HHH", wire, 6)
    p = after_questions(wire)
    for _ in range(an + ns + ar - 1):
        p = skip_rr(wire, p)
    return p
