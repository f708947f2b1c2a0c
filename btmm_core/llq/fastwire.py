"""LLQ events and their acknowledgements as bytes, without dnspython objects on the hot path.

RFC 8764 section 6 (event messages and acknowledgements), RFC 6891 section 6 (the OPT RR),
RFC 8945 sections 4 and 5.3 (TSIG RR layout, the MAC of a response), RFC 1035 section 4.1
(message layout, name compression).

One update to a name that thousands watch makes thousands of events with the same question
and records; only the message id, the LLQ option (id and lease) and the TSIG RR differ. The
server renders the rest once (``EventTemplate``), and signs each event with a ``KeyWire``: the
key's names in wire and canonical form and a keyed HMAC state, made once per key, so signing
is one HMAC copy and a few byte joins. The bytes are exactly those of ``dns.tsig``'s ``sign``
over the rendered message (tests/llq/test_llq_fastwire.py compares them).

Acknowledgements come back as many: ``parse_ack`` reads the one shape our client sends (one
question, no answer or authority, an OPT RR holding exactly one LLQ option, optionally a TSIG
RR last) and returns None for anything else, which the server then parses with dnspython as
before. So the fast path only ever decides messages the slow path would read the same way; a
malformed, truncated or unusual message costs the slow parse and is refused there.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

import dns.name

from btmm_core.dns.llq_option import LLQ_CODE, LLQ_LENGTH, LLQ_VERSION, LLQError, LLQOpcode
from btmm_core.dns.tsig import TsigKey, algorithm_digest_size

_OPT = 41
_TSIG = 250
_ANY = 255
_LLQ = struct.Struct("!HHHQI")
_RR_FIXED = struct.Struct("!HHIH")
#: digest names hmac takes, by the TSIG algorithm's digest size (dns.tsig's table decides which
#: algorithms exist; this only maps the size back to the hash)
_HASH_BY_SIZE = {20: "sha1", 28: "sha224", 32: "sha256", 48: "sha384", 64: "sha512", 16: "md5"}


def llq_option_data(opcode: int, error: int, llq_id: int, lease: int) -> bytes:
    """The 18 bytes of an LLQ option (``LLQOption.data()``, without building the object)."""
    return _LLQ.pack(LLQ_VERSION, opcode, error, llq_id, lease)


@dataclass(frozen=True)
class EventTemplate:
    """An event rendered once with message id 0 and a zero LLQ option at the very end: what
    lies between the two is shared by every LLQ that gets this change."""

    body: bytes

    @classmethod
    def of(cls, rendered: bytes) -> EventTemplate:
        if rendered[-LLQ_LENGTH:] != llq_option_data(LLQOpcode.EVENT, LLQError.NO_ERROR, 0, 0):
            raise ValueError("an event template ends with its zero LLQ option")
        return cls(rendered[2:-LLQ_LENGTH])

    def event(self, msg_id: int, llq_id: int, lease: int) -> bytes:
        """The unsigned event for one LLQ."""
        return b"".join(
            (
                struct.pack("!H", msg_id),
                self.body,
                _LLQ.pack(LLQ_VERSION, LLQOpcode.EVENT, LLQError.NO_ERROR, llq_id, lease),
            )
        )


class KeyWire:
    """A TSIG key prepared for signing and checking many messages (RFC 8945 4.2, 4.3)."""

    __slots__ = (
        "_hmac",
        "_variables",
        "algorithm",
        "algorithm_canonical",
        "canonical",
        "key",
        "owner",
        "size",
    )  # fmt: skip

    def __init__(self, key: TsigKey) -> None:
        size = algorithm_digest_size(key.algorithm)
        if size is None or size not in _HASH_BY_SIZE:
            raise ValueError(f"TSIG algorithm {key.algorithm} is not supported")
        self.key = key
        self.owner = key.name.to_wire() or b""
        self.canonical = self.owner.lower()
        self.algorithm = key.algorithm.to_wire() or b""
        self.algorithm_canonical = self.algorithm.lower()
        self.size = size
        self._hmac = hmac.new(key.secret, digestmod=_HASH_BY_SIZE[size])
        #: the TSIG variables up to Time Signed: key name, class ANY, TTL 0, algorithm
        self._variables = self.canonical + struct.pack("!HI", _ANY, 0) + self.algorithm_canonical

    def mac(
        self,
        message_without_tsig: bytes,
        *,
        original_id: int,
        time_signed: int,
        fudge: int,
        error: int = 0,
        other: bytes = b"",
        request_mac: bytes | None = None,
    ) -> bytes:
        """What ``dns.tsig.compute_mac`` gives for this key."""
        h = self._hmac.copy()
        if request_mac is not None:
            h.update(struct.pack("!H", len(request_mac)) + request_mac)
        h.update(struct.pack("!H", original_id))
        h.update(memoryview(message_without_tsig)[2:])
        h.update(
            self._variables
            + struct.pack(
                "!HIHHH",
                (time_signed >> 32) & 0xFFFF,
                time_signed & 0xFFFFFFFF,
                fudge,
                error,
                len(other),
            )
            + other
        )
        return h.digest()

    def sign(
        self, wire: bytes, *, time_signed: int, fudge: int, request_mac: bytes | None = None
    ) -> tuple[bytes, bytes]:
        """``wire`` with a TSIG RR appended, and its MAC: the bytes of ``dns.tsig.sign``."""
        (original_id,) = struct.unpack_from("!H", wire)
        mac = self.mac(
            wire, original_id=original_id, time_signed=time_signed, fudge=fudge,
            request_mac=request_mac,
        )  # fmt: skip
        rdata = b"".join(
            (
                self.algorithm,
                struct.pack(
                    "!HIHH", (time_signed >> 32) & 0xFFFF, time_signed & 0xFFFFFFFF, fudge, len(mac)
                ),
                mac,
                struct.pack("!HHH", original_id, 0, 0),
            )
        )
        (arcount,) = struct.unpack_from("!H", wire, 10)
        signed = b"".join(
            (
                wire[:10],
                struct.pack("!H", arcount + 1),
                memoryview(wire)[12:],
                self.owner,
                _RR_FIXED.pack(_TSIG, _ANY, 0, len(rdata)),
                rdata,
            )
        )
        return signed, mac


@dataclass(frozen=True)
class AckTsig:
    """The TSIG RR of an acknowledgement; names in canonical (lower-case) wire form."""

    key_name: bytes
    algorithm: bytes
    time_signed: int
    fudge: int
    mac: bytes
    original_id: int
    error: int
    other: bytes
    #: where the TSIG RR starts: the message before it is what the MAC covers
    start: int


@dataclass(frozen=True)
class Ack:
    """What the server needs of a message that may acknowledge an event."""

    msg_id: int
    #: LLQ options in the OPT RR; only 1 with ``malformed`` False can acknowledge anything
    llq_options: int
    malformed: bool
    opcode: int
    llq_id: int
    tsig: AckTsig | None


def _name(wire: bytes, p: int) -> tuple[bytes, int] | None:
    """The name at ``p`` in canonical wire form and the offset after it, following pointers
    only backwards (as dnspython does); None for anything unusual."""
    labels: list[bytes] = []
    total = 1
    after = -1
    #: every pointer must go below the one before (and the first below the name's start)
    lowest = p
    n = len(wire)
    while True:
        if p >= n:
            return None
        length = wire[p]
        if length == 0:
            if after < 0:
                after = p + 1
            break
        if length & 0xC0 == 0xC0:
            if p + 1 >= n:
                return None
            target = ((length & 0x3F) << 8) | wire[p + 1]
            if target >= lowest:
                return None
            if after < 0:
                after = p + 2
            p = lowest = target
            continue
        if length & 0xC0:
            return None
        if p + 1 + length > n:
            return None
        total += 1 + length
        if total > 255:
            return None
        labels.append(bytes((length,)) + wire[p + 1 : p + 1 + length].lower())
        p += 1 + length
    return b"".join(labels) + b"\x00", after


def parse_ack(wire: bytes) -> Ack | None:
    """The acknowledgement read without dnspython, or None when the message is not of the one
    shape our client sends (the caller then parses it the slow way)."""
    if len(wire) < 12:
        return None
    msg_id, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", wire)
    if (flags >> 11) & 0xF != 0 or qd != 1 or an or ns or ar not in (1, 2):
        return None  # opcode QUERY, one question, OPT and maybe TSIG
    q = _name(wire, 12)
    if q is None or q[1] + 4 > len(wire):
        return None
    p = q[1] + 4
    # the OPT RR: root owner, TYPE 41, one option of code 1 and 18 bytes
    if p + 11 > len(wire) or wire[p] != 0:
        return None
    rdtype, _, ttl, rdlen = _RR_FIXED.unpack_from(wire, p + 1)
    p += 11
    if rdtype != _OPT or ttl != 0 or rdlen != 4 + LLQ_LENGTH or p + rdlen > len(wire):
        return None
    code, olen = struct.unpack_from("!HH", wire, p)
    if code != LLQ_CODE or olen != LLQ_LENGTH:
        return None
    _, opcode, _, llq_id, _ = _LLQ.unpack_from(wire, p + 4)
    p += rdlen
    if ar == 1:
        if p != len(wire):
            return None
        return Ack(msg_id, 1, False, opcode, llq_id, None)
    start = p
    owner = _name(wire, p)
    if owner is None:
        return None
    p = owner[1]
    if p + 10 > len(wire):
        return None
    rdtype, rdclass, ttl, rdlen = _RR_FIXED.unpack_from(wire, p)
    p += 10
    if rdtype != _TSIG or rdclass != _ANY or ttl != 0 or p + rdlen != len(wire):
        return None
    # the algorithm name, uncompressed (a pointer: the slow path decides)
    alg_start = p
    while p < len(wire) and 0 < wire[p] < 64:
        p += 1 + wire[p]
    if p >= len(wire) or wire[p] != 0:
        return None
    p += 1
    if p - alg_start > 255:
        return None
    algorithm = wire[alg_start:p].lower()
    if p + 10 > len(wire):
        return None
    hi, lo, fudge, mac_size = struct.unpack_from("!HIHH", wire, p)
    p += 10
    if p + mac_size + 6 > len(wire):
        return None
    mac = wire[p : p + mac_size]
    p += mac_size
    original_id, error, other_len = struct.unpack_from("!HHH", wire, p)
    p += 6
    if p + other_len != len(wire):
        return None
    other = wire[p:]
    tsig = AckTsig(owner[0], algorithm, (hi << 32) | lo, fudge, mac, original_id, error, other,
                   start)  # fmt: skip
    return Ack(msg_id, 1, False, opcode, llq_id, tsig)


def canonical(name: dns.name.Name) -> bytes:
    """A dnspython name in the form ``AckTsig`` holds names: its wire form, lower-cased
    (RFC 4034 6.2; ``bytes.lower`` changes only A-Z, never a label length, which is < 64),
    the bytes of ``name.canonicalize().to_wire()`` without building another name."""
    return (name.to_wire() or b"").lower()
