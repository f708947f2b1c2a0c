"""Strict TSIG verification and signing, sans-I/O, for servers and clients alike.

RFC 8945 (Secret Key Transaction Authentication for DNS). The MAC is computed here rather than
by dnspython's message code so that the time is always the caller's ``now`` and the fudge is
always the server's own, whatever the message claims (section 5.2.3). Order of checks follows
section 5.2: key (BADKEY), MAC size and MAC (FORMERR/BADSIG), time (BADTIME), truncation policy
(BADTRUNC); replay and older-Time-Signed checks come last and also answer BADTIME.
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from btmm_core.dns.wire import last_rr_offset

HMAC_SHA256 = dns.name.from_text("hmac-sha256.")
HMAC_MD5 = dns.name.from_text("hmac-md5.sig-alg.reg.int.")

_DIGESTS: dict[dns.name.Name, tuple[str, int]] = {
    HMAC_SHA256: ("sha256", 32),
    HMAC_MD5: ("md5", 16),
}

#: The server's fudge: the most clock skew it tolerates, never more than 300 s (RFC 8945 10).
MAX_FUDGE = 300


class KeyRole(enum.IntEnum):
    """What a key may do in its zone (btmm_core/registry/authority.py has the rules)."""

    #: the account's own key (``btmm serve user add``): every name of its zone
    ACCOUNT = 1
    #: one device's key (``btmm join``): its own names, its entry of the browse list, reads
    DEVICE = 2
    #: a single-use enrolment token (``btmm serve user invite``): enrols one device, nothing else
    INVITE = 3


class TsigError(enum.IntEnum):
    """TSIG error field values (RFC 8945 section 3)."""

    NOERROR = 0
    BADSIG = 16
    BADKEY = 17
    BADTIME = 18
    BADTRUNC = 22


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key and where it is valid.

    Name, algorithm and secret are all that signing and verifying need (RFC 8945); the
    algorithm is fixed per key. Zone and role say what the key may do: the registry stores
    them, and every key file names them (dns/keyfile.py), so a client reads them from its
    file rather than making them up.
    """

    name: dns.name.Name
    algorithm: dns.name.Name
    secret: bytes
    zone: dns.name.Name
    role: KeyRole = KeyRole.ACCOUNT
    #: the device's name (one DNS label) for DEVICE keys; for INVITE keys the only device
    #: name the token may enrol, or None for any
    device: str | None = None
    #: INVITE keys only: seconds since the epoch after which the token is refused
    expires: float | None = None


@dataclass(frozen=True)
class TsigRecord:
    """The fields of a received TSIG RR plus where it starts in the wire message."""

    key_name: dns.name.Name
    algorithm: dns.name.Name
    time_signed: int
    fudge: int
    mac: bytes
    original_id: int
    error: int
    other: bytes
    start: int


@dataclass(frozen=True)
class TsigVerdict:
    """Outcome of verifying a request.

    ``error`` is NOERROR for a good request; ``formerr`` means answer FORMERR, unsigned.
    ``key`` is set whenever the key was known (needed to sign BADTIME/BADTRUNC answers).
    """

    error: TsigError
    key: TsigKey | None
    record: TsigRecord
    formerr: bool = False

    @property
    def ok(self) -> bool:
        return self.error == TsigError.NOERROR and not self.formerr


def _wire(name: dns.name.Name) -> bytes:
    """Uncompressed wire form of a name."""
    wire = name.to_wire()
    assert wire is not None
    return wire


def algorithm_digest_size(algorithm: dns.name.Name) -> int | None:
    entry = _DIGESTS.get(algorithm)
    return None if entry is None else entry[1]


def record_of(wire: bytes, msg: dns.message.Message) -> TsigRecord:
    """The TSIG RR of ``msg`` (parsed from ``wire``; ``msg.tsig`` must be set)."""
    assert msg.tsig is not None
    return record_from_rdata(msg.tsig.name, msg.tsig[0], last_rr_offset(wire))


def record_from_rdata(key_name: dns.name.Name, rdata: dns.rdata.Rdata, start: int) -> TsigRecord:
    """The TSIG RR owned by ``key_name`` whose rdata dnspython parsed, starting at ``start``."""
    # a TSIG rdata (dns.rdtypes.ANY.TSIG.TSIG), whose fields dnspython leaves untyped
    rd: Any = rdata
    return TsigRecord(
        key_name,
        rd.algorithm,
        rd.time_signed,
        rd.fudge,
        rd.mac,
        rd.original_id,
        rd.error,
        rd.other,
        start,
    )


def _variables(
    key_name: dns.name.Name,
    algorithm: dns.name.Name,
    time_signed: int,
    fudge: int,
    error: int,
    other: bytes,
) -> bytes:
    return (
        _wire(key_name.canonicalize())
        + struct.pack("!HI", dns.rdataclass.ANY, 0)
        + _wire(algorithm.canonicalize())
        + struct.pack("!HIH", (time_signed >> 32) & 0xFFFF, time_signed & 0xFFFFFFFF, fudge)
        + struct.pack("!HH", error, len(other))
        + other
    )


def compute_mac(
    key: TsigKey,
    message_without_tsig: bytes,
    *,
    original_id: int,
    time_signed: int,
    fudge: int,
    error: int,
    other: bytes,
    request_mac: bytes | None,
) -> bytes:
    """HMAC over (request MAC), the message with its original ID, and the TSIG variables."""
    digest_name, _ = _DIGESTS[key.algorithm]
    h = hmac.new(key.secret, digestmod=digest_name)
    if request_mac is not None:
        h.update(struct.pack("!H", len(request_mac)) + request_mac)
    h.update(struct.pack("!H", original_id) + message_without_tsig[2:])
    h.update(_variables(key.name, key.algorithm, time_signed, fudge, error, other))
    return h.digest()


def expected_mac(
    key: TsigKey, wire: bytes, record: TsigRecord, *, request_mac: bytes | None
) -> bytes:
    """The MAC ``key`` gives the received message ``wire`` whose TSIG RR is ``record``.

    ``request_mac`` is None for a request, the MAC of the request for its answer (RFC 8945
    section 5.3): an answer checked with the MAC its asker sent counts for that request only.
    """
    return compute_mac(
        key,
        strip_tsig(wire, record.start),
        original_id=record.original_id,
        time_signed=record.time_signed,
        fudge=record.fudge,
        error=record.error,
        other=record.other,
        request_mac=request_mac,
    )


def strip_tsig(wire: bytes, start: int) -> bytes:
    """The message as it was before the TSIG RR was appended (ARCOUNT one less)."""
    (arcount,) = struct.unpack("!H", wire[10:12])
    return wire[:10] + struct.pack("!H", arcount - 1) + wire[12:start]


def verify(
    wire: bytes,
    record: TsigRecord,
    lookup: Callable[[dns.name.Name], TsigKey | None],
    *,
    now: int,
    fudge: int,
) -> TsigVerdict:
    """Check key, MAC and time of a request. Replay is the caller's (it owns the state)."""
    key = lookup(record.key_name)
    # An unknown key and a key used with another algorithm are the same answer: BADKEY
    # (RFC 8945 5.2.1); the algorithm is a property of the key, not of the message.
    if key is None or key.algorithm != record.algorithm or key.algorithm not in _DIGESTS:
        return TsigVerdict(TsigError.BADKEY, None, record)
    _, full = _DIGESTS[key.algorithm]
    size = len(record.mac)
    # RFC 8945 5.2.2.1: longer than the hash or shorter than max(10, half the hash) is FORMERR.
    if size > full or size < max(10, full // 2):
        return TsigVerdict(TsigError.NOERROR, key, record, formerr=True)
    expected = expected_mac(key, wire, record, request_mac=None)
    if not hmac.compare_digest(expected[:size], record.mac):
        return TsigVerdict(TsigError.BADSIG, None, record)
    if abs(record.time_signed - now) > min(fudge, MAX_FUDGE):
        return TsigVerdict(TsigError.BADTIME, key, record)
    if size < full:
        # Our local policy accepts no truncation at all (RFC 8945 5.2.4).
        return TsigVerdict(TsigError.BADTRUNC, key, record)
    return TsigVerdict(TsigError.NOERROR, key, record)


def tsig_rr(
    key_name: dns.name.Name,
    algorithm: dns.name.Name,
    *,
    time_signed: int,
    fudge: int,
    mac: bytes,
    original_id: int,
    error: int,
    other: bytes,
) -> bytes:
    """Wire form of a TSIG RR (names uncompressed, as section 4.2 requires)."""
    rdata = (
        _wire(algorithm)
        + struct.pack("!HIH", (time_signed >> 32) & 0xFFFF, time_signed & 0xFFFFFFFF, fudge)
        + struct.pack("!H", len(mac))
        + mac
        + struct.pack("!HHH", original_id, error, len(other))
        + other
    )
    return (
        _wire(key_name)
        + struct.pack("!HHIH", dns.rdatatype.TSIG, dns.rdataclass.ANY, 0, len(rdata))
        + rdata
    )


def rr_size(key_name: dns.name.Name, algorithm: dns.name.Name, other_len: int = 6) -> int:
    """Upper bound of the bytes a TSIG RR adds to a response."""
    mac = algorithm_digest_size(algorithm) or 64
    return len(_wire(key_name)) + 10 + len(_wire(algorithm)) + 16 + mac + other_len


def append_tsig(
    response: bytes,
    *,
    key: TsigKey | None,
    key_name: dns.name.Name,
    algorithm: dns.name.Name,
    request_mac: bytes | None,
    time_signed: int,
    fudge: int,
    error: int,
    other: bytes = b"",
) -> bytes:
    """Append a TSIG RR to a rendered message: signed when ``key`` is given, else MAC-less.

    ``request_mac`` is None when signing a request, the request's MAC when signing a response.
    """
    (original_id,) = struct.unpack("!H", response[:2])
    if key is None:
        mac = b""
    else:
        mac = compute_mac(
            key,
            response,
            original_id=original_id,
            time_signed=time_signed,
            fudge=fudge,
            error=error,
            other=other,
            request_mac=request_mac,
        )
    rr = tsig_rr(
        key_name,
        algorithm,
        time_signed=time_signed,
        fudge=fudge,
        mac=mac,
        original_id=original_id,
        error=error,
        other=other,
    )
    (arcount,) = struct.unpack("!H", response[10:12])
    return response[:10] + struct.pack("!H", arcount + 1) + response[12:] + rr


def sign(
    wire: bytes,
    key: TsigKey,
    *,
    time_signed: int,
    fudge: int,
    request_mac: bytes | None = None,
) -> tuple[bytes, bytes]:
    """``wire`` signed by ``key`` (TSIG RR appended, error 0), and the MAC.

    The MAC is returned because the answer to a signed message is signed over it: keep it to
    check that answer (``expected_mac``).
    """
    signed = append_tsig(
        wire,
        key=key,
        key_name=key.name,
        algorithm=key.algorithm,
        request_mac=request_mac,
        time_signed=time_signed,
        fudge=fudge,
        error=0,
    )
    # The RR ends with the MAC, then Original ID, Error and Other Len (0): six bytes.
    _, size = _DIGESTS[key.algorithm]
    return signed, signed[-6 - size : -6]


def time_other_data(now: int) -> bytes:
    """Other Data of a BADTIME answer: the server's time, 48 bits (RFC 8945 5.2.3)."""
    return struct.pack("!HI", (now >> 32) & 0xFFFF, now & 0xFFFFFFFF)


@dataclass
class ReplayGuard:
    """Refuses a MAC seen before and a Time Signed older than the newest seen for the key.

    Entries older than the fudge window are forgotten: such messages fail the time check anyway.
    Keys are held by the canonical wire form of their name (``check_raw``/``remember_raw``
    take it as it is, so the signed-query fast path never builds a ``dns.name.Name``).
    """

    fudge: int
    last_time: dict[bytes, int]
    seen: dict[tuple[bytes, bytes], int]

    @classmethod
    def empty(cls, fudge: int) -> ReplayGuard:
        return cls(fudge, {}, {})

    def check(self, key: dns.name.Name, time_signed: int, mac: bytes) -> bool:
        return self.check_raw(_wire(key.canonicalize()), time_signed, mac)

    def remember(self, key: dns.name.Name, time_signed: int, mac: bytes) -> None:
        self.remember_raw(_wire(key.canonicalize()), time_signed, mac)

    def check_raw(self, key: bytes, time_signed: int, mac: bytes) -> bool:
        """``check`` for a key given as the canonical wire form of its name."""
        if (key, mac) in self.seen:
            return False
        return time_signed >= self.last_time.get(key, 0)

    def remember_raw(self, key: bytes, time_signed: int, mac: bytes) -> None:
        self.seen[(key, mac)] = time_signed
        if time_signed > self.last_time.get(key, 0):
            self.last_time[key] = time_signed

    def admit(self, key: dns.name.Name, time_signed: int, mac: bytes) -> bool:
        """``check``, and ``remember`` what passes: in one step (a shared guard locks once)."""
        return self.admit_raw(_wire(key.canonicalize()), time_signed, mac)

    def admit_raw(self, key: bytes, time_signed: int, mac: bytes) -> bool:
        if not self.check_raw(key, time_signed, mac):
            return False
        self.remember_raw(key, time_signed, mac)
        return True

    def prune(self, now: int) -> None:
        horizon = now - 2 * self.fudge
        for k in [k for k, t in self.seen.items() if t < horizon]:
            del self.seen[k]


_TIME_FUDGE = struct.Struct("!HIH")
#: class ANY and TTL 0 of the TSIG variables (RFC 8945 4.3.3)
_ANY_TTL0 = struct.pack("!HI", dns.rdataclass.ANY, 0)


@dataclass(frozen=True)
class RawKey:
    """A key made ready to verify and sign on bytes, for the signed-query fast path.

    ``verify`` and ``sign`` give what ``verify`` and ``append_tsig`` give for the same message,
    without a ``dns.name.Name`` (names are the canonical wire forms computed once here). Only
    the outcome "this request is good" is decided here: any other case (wrong algorithm, a
    truncated MAC, a bad MAC, the time outside the fudge) is ``False``, and the caller takes
    the full path, which gives the answer that case gets.
    """

    key: TsigKey
    #: canonical (lower-case) wire forms of the key's name and algorithm
    name_wire: bytes
    alg_wire: bytes
    digest: str
    size: int

    @classmethod
    def of(cls, key: TsigKey) -> RawKey | None:
        """None for an algorithm this module does not know (the full path says BADKEY)."""
        entry = _DIGESTS.get(key.algorithm)
        if entry is None:
            return None
        return cls(
            key,
            _wire(key.name.canonicalize()),
            _wire(key.algorithm.canonicalize()),
            entry[0],
            entry[1],
        )

    def verify(
        self,
        wire: bytes,
        *,
        alg_wire: bytes,
        time_signed: int,
        fudge: int,
        mac: bytes,
        original_id: int,
        error: int,
        other: bytes,
        start: int,
        now: int,
        server_fudge: int,
    ) -> bool:
        """Whether the request ``wire``, whose TSIG RR (these fields) starts at ``start``, is
        signed by this key, with a full-length MAC, within the time window."""
        if alg_wire.lower() != self.alg_wire or len(mac) != self.size:
            return False
        if abs(time_signed - now) > min(server_fudge, MAX_FUDGE):
            return False
        (arcount,) = struct.unpack_from("!H", wire, 10)
        data = b"".join((
            struct.pack("!H", original_id), wire[2:10], struct.pack("!H", arcount - 1),
            wire[12:start], self.name_wire, _ANY_TTL0, self.alg_wire,
            _TIME_FUDGE.pack((time_signed >> 32) & 0xFFFF, time_signed & 0xFFFFFFFF, fudge),
            struct.pack("!HH", error, len(other)), other,
        ))  # fmt: skip
        return hmac.compare_digest(hmac.digest(self.key.secret, data, self.digest), mac)

    def sign(
        self, response: bytes, *, key_wire: bytes, alg_wire: bytes, request_mac: bytes,
        now: int, fudge: int,
    ) -> bytes:
        """``response`` with a TSIG RR (error 0) signed over ``request_mac``, as ``append_tsig``
        makes it; ``key_wire``/``alg_wire``: the names as the request spelt them."""
        tf = _TIME_FUDGE.pack((now >> 32) & 0xFFFF, now & 0xFFFFFFFF, fudge)
        data = b"".join((
            struct.pack("!H", len(request_mac)), request_mac, response, self.name_wire,
            _ANY_TTL0, self.alg_wire, tf, b"\0\0\0\0",
        ))  # fmt: skip
        mac = hmac.digest(self.key.secret, data, self.digest)
        rdata = b"".join((
            alg_wire, tf, struct.pack("!H", len(mac)), mac, response[:2], b"\0\0\0\0",
        ))  # fmt: skip
        (arcount,) = struct.unpack_from("!H", response, 10)
        return b"".join((
            response[:10], struct.pack("!H", arcount + 1), response[12:], key_wire,
            struct.pack("!HHIH", dns.rdatatype.TSIG, dns.rdataclass.ANY, 0, len(rdata)), rdata,
        ))  # fmt: skip
