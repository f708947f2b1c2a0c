"""Recognise plain queries without dnspython, so their answers can come from a cache.

RFC 1035 4.1 (message layout), RFC 6891 6.1.2 (OPT RR), RFC 8945 4.2 (TSIG RR). A plain query
is: QR=0, opcode QUERY, one question, no answer/authority RRs, and in the additional section at
most an OPT RR without options and then a TSIG RR, all names uncompressed, nothing after the
last RR. Anything else returns None and takes the full path; so does anything this scanner is
unsure about. The cache key holds every byte an answer depends on besides the zone data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.name

from btmm_core.dns.tsig import TsigRecord

_QR_OPCODE = 0xF800
_RD_CD = 0x0110


@dataclass(frozen=True)
class PlainQuery:
    key: bytes
    tsig: TsigRecord | None


def _labels(wire: bytes, p: int) -> tuple[list[bytes], int] | None:
    labels: list[bytes] = []
    total = 1
    while True:
        if p >= len(wire):
            return None
        n = wire[p]
        if n == 0:
            labels.append(b"")
            return labels, p + 1
        if n > 63:
            return None  # a pointer or an extended label type: leave it to dnspython
        total += n + 1
        if total > 255 or p + 1 + n > len(wire):
            return None
        labels.append(wire[p + 1 : p + 1 + n])
        p += 1 + n


# One long function on purpose: it runs for every query, and helper calls would cost there.
def scan(wire: bytes, stream: bool) -> PlainQuery | None:
    if len(wire) < 17:
        return None
    _, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", wire)
    if flags & _QR_OPCODE or qd != 1 or an or ns or ar > 2:
        return None
    got = _labels(wire, 12)
    if got is None:
        return None
    p = got[1] + 4
    if p > len(wire):
        return None
    question = wire[12:p]
    opt = b""
    tsig: TsigRecord | None = None
    for i in range(ar):
        start = p
        got = _labels(wire, p)
        if got is None:
            return None
        labels, p = got
        if p + 10 > len(wire):
            return None
        rdtype, _, _, rdlen = struct.unpack_from("!HHIH", wire, p)
        p += 10
        if p + rdlen > len(wire):
            return None
        if rdtype == 41 and i == 0 and labels == [b""] and rdlen == 0 and not opt:
            opt = wire[start:p]
            continue
        if rdtype != 250 or i != ar - 1:
            return None
        end = p + rdlen
        alg = _labels(wire, p)
        if alg is None:
            return None
        alg_labels, q = alg
        if q + 10 > end:
            return None
        hi, lo, fudge, mac_len = struct.unpack_from("!HIHH", wire, q)
        q += 10
        if q + mac_len + 6 > end:
            return None
        mac = wire[q : q + mac_len]
        q += mac_len
        original_id, error, other_len = struct.unpack_from("!HHH", wire, q)
        q += 6
        if q + other_len != end:
            return None
        try:
            tsig = TsigRecord(
                dns.name.Name(labels),
                dns.name.Name(alg_labels),
                (hi << 32) | lo,
                fudge,
                mac,
                original_id,
                error,
                wire[q:end],
                start,
            )
        except dns.name.NameTooLong:
            return None
        p = end
    if p != len(wire):
        return None
    signer = b"" if tsig is None else tsig.key_name.canonicalize().to_text().encode()
    key = b"%c%s%s|%s|%s" % (
        0x53 if stream else 0x55,
        struct.pack("!H", flags & _RD_CD),
        question,
        opt,
        signer,
    )
    return PlainQuery(key, tsig)
