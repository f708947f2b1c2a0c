"""STUN messages, sans-I/O (RFC 8489: header section 5, attributes section 14).

A message is a 20-byte header (type, length, magic cookie 0x2112A442, 96-bit transaction id)
and a list of TLV attributes, each padded to 4 bytes. The codec knows the Binding method and
the attributes a Binding exchange uses: XOR-MAPPED-ADDRESS (14.2), MAPPED-ADDRESS (14.1, read
only: RFC 3489 servers sent it), ERROR-CODE (14.8), UNKNOWN-ATTRIBUTES (14.9), SOFTWARE (14.14)
and FINGERPRINT (14.7). Every other attribute is kept as raw bytes in ``Message.others``, so a
caller can tell an unknown comprehension-required one (type below 0x8000) and answer 420.

``parse`` raises ``MalformedMessage`` (``reason`` a ``Fault``) on anything truncated or
inconsistent; section 6.3 says which faults are dropped silently and which get a 400: header
faults and a wrong FINGERPRINT are dropped, a bad attribute of a request is answered.

Padding bytes are ignored, as section 14 requires of a receiver ("MUST be ignored"); padding
that would run past the end cannot occur once the length is a multiple of 4 and matches.

MESSAGE-INTEGRITY (14.5) with the long-term credential mechanism (9.2: key = MD5 of
"username:realm:password"; the SASLprep of 9.2.2 is left out, so credentials must be ASCII,
which TURN REST usernames and their base64 passwords are) is made by ``add_integrity`` and
checked by ``check_integrity``. The TURN attributes of RFC 8656 section 18 are read from a
message's ``others`` by ``turn_attributes`` into a ``TurnAttributes`` and made by the
``*_attribute`` helpers; ``stun.turn`` builds on them.

Used by ``stun.responder`` (the server core ``btmm serve`` runs), ``stun.client`` (a Binding
transaction), ``turn.client`` (a TURN allocation) and ``looks_like_stun`` by whoever shares a
UDP port with STUN.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
import zlib
from dataclasses import dataclass

from btmm_core.errors import MalformedMessage

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
TRANSACTION_ID_LEN = 12
FINGERPRINT_XOR = 0x5354554E
#: SOFTWARE and the reason phrase: fewer than 128 characters, at most 763 bytes (14.8, 14.14).
MAX_TEXT_BYTES = 763
DEFAULT_PORT = 3478

_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)


class Method(enum.IntEnum):
    BINDING = 0x001
    # TURN, RFC 8656 section 17
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class MessageClass(enum.IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class AttributeType(enum.IntEnum):
    """RFC 8489 section 18.3 (and the RFC 5389 ones it keeps)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028


#: Comprehension-required attributes of RFC 8489 that a server without authentication still
#: understands (it has no credentials to check them against, section 9): never a 420.
UNDERSTOOD = frozenset(AttributeType)


class ErrorCode(enum.IntEnum):
    """RFC 8489 section 14.8."""

    TRY_ALTERNATE = 300
    BAD_REQUEST = 400
    UNAUTHENTICATED = 401
    FORBIDDEN = 403  #: RFC 8656
    UNKNOWN_ATTRIBUTE = 420
    ALLOCATION_MISMATCH = 437  #: RFC 8656
    STALE_NONCE = 438
    WRONG_CREDENTIALS = 441  #: RFC 8656
    UNSUPPORTED_TRANSPORT = 442  #: RFC 8656
    ALLOCATION_QUOTA_REACHED = 486  #: RFC 8656
    SERVER_ERROR = 500
    INSUFFICIENT_CAPACITY = 508  #: RFC 8656


class Family(enum.IntEnum):
    IPV4 = 0x01
    IPV6 = 0x02


class Fault(enum.IntEnum):
    """Why ``parse`` refused a datagram (``MalformedMessage.reason``)."""

    TRUNCATED = 1  #: shorter than a header
    NOT_STUN = 2  #: the first two bits are not zero
    BAD_COOKIE = 3
    BAD_LENGTH = 4  #: the length field is not a multiple of 4 or does not match the datagram
    ATTRIBUTE_OVERRUN = 5  #: an attribute runs past the end
    BAD_ATTRIBUTE = 6  #: a known attribute with a value that does not fit its format
    AFTER_FINGERPRINT = 7  #: FINGERPRINT is not the last attribute
    BAD_FINGERPRINT = 8

    @property
    def header(self) -> bool:
        """A fault of the header or the FINGERPRINT: the datagram is dropped, never answered
        (section 7.3: "the message is silently discarded")."""
        return self in (Fault.TRUNCATED, Fault.NOT_STUN, Fault.BAD_COOKIE, Fault.BAD_LENGTH,
                        Fault.BAD_FINGERPRINT)


def _malformed(reason: Fault, what: str) -> MalformedMessage:
    return MalformedMessage(f"STUN: {what}", reason=reason)


@dataclass(frozen=True)
class TransportAddress:
    """An IP address (v4 or v6, text) and a port: what STUN calls a transport address.

    ``dataplane.api.Endpoint`` is the same pair for the engine; this one lives here because
    the STUN layer sits below the data plane.
    """

    host: str
    port: int

    @classmethod
    def of(cls, addr: tuple[str, int] | tuple[str, int, int, int]) -> TransportAddress:
        """From a socket address (asyncio gives IPv6 as a 4-tuple); the host normalised."""
        return cls(str(ipaddress.ip_address(addr[0].split("%", 1)[0])), int(addr[1]))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Attribute:
    """An attribute this codec does not interpret: its type and value, unpadded."""

    type: int
    value: bytes

    @property
    def comprehension_required(self) -> bool:
        return self.type < 0x8000


@dataclass(frozen=True)
class ErrorAttribute:
    code: int
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.code} {self.reason}".rstrip()


@dataclass(frozen=True)
class Header:
    method: int
    cls: MessageClass
    transaction_id: bytes
    length: int


@dataclass(frozen=True)
class Message:
    """One STUN message. On ``parse``: ``fingerprint`` says a FINGERPRINT was present (and it
    matched); on ``to_bytes``: whether to add one. Of each interpreted attribute only the first
    counts (section 14); attributes after MESSAGE-INTEGRITY other than FINGERPRINT are not
    interpreted (14.5), and we hold no credentials to check the integrity itself."""

    method: int
    cls: MessageClass
    transaction_id: bytes
    xor_mapped: TransportAddress | None = None
    mapped: TransportAddress | None = None
    error: ErrorAttribute | None = None
    unknown_attributes: tuple[int, ...] = ()
    software: str | None = None
    others: tuple[Attribute, ...] = ()
    fingerprint: bool = False

    def unknown_required(self) -> tuple[int, ...]:
        """Comprehension-required attribute types this codec does not know (a 420's list)."""
        return tuple(dict.fromkeys(
            a.type for a in self.others if a.comprehension_required and a.type not in UNDERSTOOD
        ))

    def to_bytes(self) -> bytes:
        if len(self.transaction_id) != TRANSACTION_ID_LEN:
            raise ValueError("a STUN transaction id is 12 bytes")
        body = bytearray()
        if self.xor_mapped is not None:
            body += _attribute(AttributeType.XOR_MAPPED_ADDRESS,
                               _xor_address(self.xor_mapped, self.transaction_id))
        if self.mapped is not None:
            body += _attribute(AttributeType.MAPPED_ADDRESS, _plain_address(self.mapped))
        if self.error is not None:
            body += _attribute(AttributeType.ERROR_CODE, _error_value(self.error))
        if self.unknown_attributes:
            body += _attribute(AttributeType.UNKNOWN_ATTRIBUTES,
                               b"".join(struct.pack("!H", t) for t in self.unknown_attributes))
        if self.software is not None:
            text = self.software.encode()
            if len(text) > MAX_TEXT_BYTES:
                raise ValueError(f"SOFTWARE is {len(text)} bytes, at most {MAX_TEXT_BYTES}")
            body += _attribute(AttributeType.SOFTWARE, text)
        for a in self.others:
            body += _attribute(a.type, a.value)
        extra = 8 if self.fingerprint else 0
        out = _header(self.method, self.cls, len(body) + extra, self.transaction_id) + body
        if self.fingerprint:
            out += _attribute(AttributeType.FINGERPRINT, struct.pack("!I", _crc(out)))
        return bytes(out)


def _crc(data: bytes | bytearray) -> int:
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _message_type(method: int, cls: MessageClass) -> int:
    # Section 5: the class bits C1 C0 sit at bits 8 and 4, between the method's bits.
    if not 0 <= method < 0x1000:
        raise ValueError(f"STUN method {method:#x} does not fit 12 bits")
    return ((method & 0x00F) | ((method & 0x070) << 1) | ((method & 0xF80) << 2)
            | ((cls & 1) << 4) | ((cls & 2) << 7))


def _split_type(t: int) -> tuple[int, MessageClass]:
    method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)
    cls = MessageClass(((t >> 4) & 1) | ((t >> 7) & 2))
    return method, cls


def _header(method: int, cls: MessageClass, length: int, txid: bytes) -> bytearray:
    return bytearray(struct.pack("!HHI", _message_type(method, cls), length, MAGIC_COOKIE) + txid)


def _attribute(t: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"STUN attribute {t:#06x} is {len(value)} bytes, more than fits")
    return struct.pack("!HH", t, len(value)) + value + b"\0" * (-len(value) % 4)


def _xor_key(txid: bytes, family: Family) -> bytes:
    return _COOKIE_BYTES + (txid if family is Family.IPV6 else b"")


def _xor_address(addr: TransportAddress, txid: bytes) -> bytes:
    ip = ipaddress.ip_address(addr.host)
    family = Family.IPV4 if ip.version == 4 else Family.IPV6
    key = _xor_key(txid, family)
    packed = bytes(a ^ b for a, b in zip(ip.packed, key, strict=True))
    return struct.pack("!BBH", 0, family, addr.port ^ (MAGIC_COOKIE >> 16)) + packed


def _plain_address(addr: TransportAddress) -> bytes:
    ip = ipaddress.ip_address(addr.host)
    family = Family.IPV4 if ip.version == 4 else Family.IPV6
    return struct.pack("!BBH", 0, family, addr.port) + ip.packed


def _error_value(err: ErrorAttribute) -> bytes:
    if not 300 <= err.code <= 699:
        raise ValueError(f"STUN error code {err.code} is not in 300..699")
    reason = err.reason.encode()
    if len(reason) > MAX_TEXT_BYTES:
        raise ValueError(f"reason phrase is {len(reason)} bytes, at most {MAX_TEXT_BYTES}")
    return struct.pack("!HBB", 0, err.code // 100, err.code % 100) + reason


def _read_address(value: bytes, txid: bytes | None, name: str) -> TransportAddress:
    if len(value) < 4:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"{name} is {len(value)} bytes, at least 8")
    _, fam, port = struct.unpack_from("!BBH", value)
    sizes = {Family.IPV4: 4, Family.IPV6: 16}
    if fam not in sizes:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"{name} with unknown address family {fam:#04x}")
    family = Family(fam)
    if len(value) != 4 + sizes[family]:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"{name} for {family.name} is {len(value)} "
                         f"bytes, not {4 + sizes[family]}")
    raw = value[4:]
    if txid is not None:
        raw = bytes(a ^ b for a, b in zip(raw, _xor_key(txid, family), strict=True))
        port ^= MAGIC_COOKIE >> 16
    return TransportAddress(str(ipaddress.ip_address(raw)), port)


def _read_error(value: bytes) -> ErrorAttribute:
    if len(value) < 4:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"ERROR-CODE is {len(value)} bytes, at least 4")
    cls, number = value[2] & 0x07, value[3]
    if not 3 <= cls <= 6 or number > 99:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"ERROR-CODE class {cls} number {number} is not "
                         "a code in 300..699")
    return ErrorAttribute(cls * 100 + number, _read_text(value[4:], "ERROR-CODE reason"))


def _read_text(value: bytes, name: str) -> str:
    if len(value) > MAX_TEXT_BYTES:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"{name} is {len(value)} bytes, at most "
                         f"{MAX_TEXT_BYTES}")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"{name} is not UTF-8") from None


def looks_like_stun(data: bytes) -> bool:
    """The cheap test of section 7.3 for a datagram on a shared port: the first two bits zero,
    the magic cookie at offset 4, and a length that is a multiple of 4 and matches."""
    if len(data) < HEADER_LEN or data[0] & 0xC0 or data[4:8] != _COOKIE_BYTES:
        return False
    length = (data[2] << 8) | data[3]
    return length % 4 == 0 and length == len(data) - HEADER_LEN


def parse_header(data: bytes) -> Header:
    """The header alone, checked as section 7.3 says; raises ``MalformedMessage``."""
    if len(data) < HEADER_LEN:
        raise _malformed(Fault.TRUNCATED, f"{len(data)} bytes, a header needs {HEADER_LEN}")
    t, length = struct.unpack_from("!HH", data)
    if t & 0xC000:
        raise _malformed(Fault.NOT_STUN, "the first two bits are not zero")
    if data[4:8] != _COOKIE_BYTES:
        raise _malformed(Fault.BAD_COOKIE, f"magic cookie {data[4:8].hex()}, not 2112a442")
    if length % 4:
        raise _malformed(Fault.BAD_LENGTH, f"length {length} is not a multiple of 4")
    if length != len(data) - HEADER_LEN:
        raise _malformed(Fault.BAD_LENGTH, f"length field says {length} bytes of attributes, "
                         f"{len(data) - HEADER_LEN} follow")
    method, cls = _split_type(t)
    return Header(method, cls, bytes(data[8:20]), length)


def parse(data: bytes) -> Message:
    """A whole message; raises ``MalformedMessage`` (``reason``: a ``Fault``)."""
    h = parse_header(data)
    txid = h.transaction_id
    first: dict[int, bytes] = {}
    others: list[Attribute] = []
    fingerprint = False
    integrity = False
    pos = HEADER_LEN
    while pos < len(data):
        if fingerprint:
            raise _malformed(Fault.AFTER_FINGERPRINT, "an attribute follows FINGERPRINT")
        if len(data) - pos < 4:
            raise _malformed(Fault.ATTRIBUTE_OVERRUN, f"attribute header at byte {pos} runs "
                             "past the end")
        t, n = struct.unpack_from("!HH", data, pos)
        start, end = pos + 4, pos + 4 + n
        if end > len(data):
            raise _malformed(Fault.ATTRIBUTE_OVERRUN, f"attribute {t:#06x} at byte {pos} "
                             f"claims {n} bytes, {len(data) - start} are left")
        value = bytes(data[start:end])
        pos = end + (-n % 4)
        if t == AttributeType.FINGERPRINT:
            if n != 4:
                raise _malformed(Fault.BAD_ATTRIBUTE, f"FINGERPRINT is {n} bytes, not 4")
            if struct.unpack("!I", value)[0] != _crc(data[:start - 4]):
                raise _malformed(Fault.BAD_FINGERPRINT, "FINGERPRINT does not match the message")
            fingerprint = True
        elif integrity and t != AttributeType.MESSAGE_INTEGRITY_SHA256:
            continue  # section 14.5: what follows MESSAGE-INTEGRITY is ignored
        elif t in _INTERPRETED:
            first.setdefault(t, value)
        else:
            others.append(Attribute(t, value))
            integrity = integrity or t in (AttributeType.MESSAGE_INTEGRITY,
                                           AttributeType.MESSAGE_INTEGRITY_SHA256)
    xm, m = first.get(AttributeType.XOR_MAPPED_ADDRESS), first.get(AttributeType.MAPPED_ADDRESS)
    err, unk = first.get(AttributeType.ERROR_CODE), first.get(AttributeType.UNKNOWN_ATTRIBUTES)
    sw = first.get(AttributeType.SOFTWARE)
    return Message(
        h.method, h.cls, txid,
        xor_mapped=None if xm is None else _read_address(xm, txid, "XOR-MAPPED-ADDRESS"),
        mapped=None if m is None else _read_address(m, None, "MAPPED-ADDRESS"),
        error=None if err is None else _read_error(err),
        unknown_attributes=() if unk is None else _read_unknown(unk),
        software=None if sw is None else _read_text(sw, "SOFTWARE"),
        others=tuple(others),
        fingerprint=fingerprint,
    )


_INTERPRETED = frozenset({
    AttributeType.XOR_MAPPED_ADDRESS, AttributeType.MAPPED_ADDRESS, AttributeType.ERROR_CODE,
    AttributeType.UNKNOWN_ATTRIBUTES, AttributeType.SOFTWARE,
})


def _read_unknown(value: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"UNKNOWN-ATTRIBUTES is {len(value)} bytes, "
                         "not a list of 16-bit types")
    return struct.unpack(f"!{len(value) // 2}H", value)


def binding_request(transaction_id: bytes, *, software: str | None = None,
                    fingerprint: bool = True) -> bytes:
    return Message(Method.BINDING, MessageClass.REQUEST, transaction_id, software=software,
                   fingerprint=fingerprint).to_bytes()


def binding_success(transaction_id: bytes, mapped: TransportAddress, *,
                    software: str | None = None) -> bytes:
    return Message(Method.BINDING, MessageClass.SUCCESS, transaction_id, xor_mapped=mapped,
                   software=software, fingerprint=True).to_bytes()


def error_response(method: int, transaction_id: bytes, code: ErrorCode, reason: str, *,
                   unknown: tuple[int, ...] = (), software: str | None = None) -> bytes:
    return Message(method, MessageClass.ERROR, transaction_id,
                   error=ErrorAttribute(code, reason), unknown_attributes=unknown,
                   software=software, fingerprint=True).to_bytes()


# ---- MESSAGE-INTEGRITY (RFC 8489 section 14.5) and the long-term credential (9.2) ----------

INTEGRITY_LEN = 20  #: HMAC-SHA1
_INTEGRITY_ATTR_LEN = 4 + INTEGRITY_LEN
_FINGERPRINT_ATTR_LEN = 8


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The long-term credential key of section 9.2.2: MD5(username ":" realm ":" password).
    (SASLprep is not applied: the callers' credentials are ASCII.)"""
    return hashlib.md5(f"{username}:{realm}:{password}".encode(), usedforsecurity=False).digest()


def add_integrity(message: bytes, key: bytes, *, fingerprint: bool = True) -> bytes:
    """``message`` (encoded without FINGERPRINT) with MESSAGE-INTEGRITY appended, then
    FINGERPRINT if asked. The HMAC covers the header, with the length already counting the
    MESSAGE-INTEGRITY attribute, and every attribute before it (14.5)."""
    parse_header(message)
    length = len(message) - HEADER_LEN + _INTEGRITY_ATTR_LEN
    head = message[:2] + struct.pack("!H", length) + message[4:]
    mac = hmac.new(key, head, hashlib.sha1).digest()
    out = bytearray(head + _attribute(AttributeType.MESSAGE_INTEGRITY, mac))
    if fingerprint:
        struct.pack_into("!H", out, 2, len(out) - HEADER_LEN + _FINGERPRINT_ATTR_LEN)
        out += _attribute(AttributeType.FINGERPRINT, struct.pack("!I", _crc(out)))
    return bytes(out)


def _integrity_offset(data: bytes) -> int | None:
    """Where the MESSAGE-INTEGRITY attribute starts, or None (the message is well formed:
    ``parse`` passed)."""
    pos = HEADER_LEN
    while pos + 4 <= len(data):
        t, n = struct.unpack_from("!HH", data, pos)
        if t == AttributeType.MESSAGE_INTEGRITY:
            return pos if n == INTEGRITY_LEN and pos + 4 + n <= len(data) else None
        pos += 4 + n + (-n % 4)
    return None


def check_integrity(data: bytes, key: bytes) -> bool:
    """Whether ``data`` carries a MESSAGE-INTEGRITY made with ``key`` (compared in constant
    time). False for a message without one, or one that does not parse."""
    try:
        parse_header(data)
    except MalformedMessage:
        return False
    pos = _integrity_offset(data)
    if pos is None:
        return False
    length = pos - HEADER_LEN + _INTEGRITY_ATTR_LEN
    head = data[:2] + struct.pack("!H", length) + data[4:pos]
    want = hmac.new(key, head, hashlib.sha1).digest()
    return hmac.compare_digest(want, data[pos + 4:pos + 4 + INTEGRITY_LEN])


# ---- TURN attributes (RFC 8656 section 18) --------------------------------------------------


class TurnAttributeType(enum.IntEnum):
    """RFC 8656 section 18 (kept apart from ``AttributeType``: the Binding responder does not
    understand them, and answers 420 to a request that requires one)."""

    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    RESERVATION_TOKEN = 0x0022


#: REQUESTED-TRANSPORT's protocol number for UDP (18.7), the one TURN allocation we make.
TRANSPORT_UDP = 17


@dataclass(frozen=True)
class TurnAttributes:
    """The TURN and authentication attributes of one message (the first of each type)."""

    relayed: TransportAddress | None = None
    peers: tuple[TransportAddress, ...] = ()
    lifetime: int | None = None
    channel: int | None = None
    data: bytes | None = None
    requested_transport: int | None = None
    username: str | None = None
    realm: str | None = None
    nonce: str | None = None
    integrity: bool = False


def turn_attributes(msg: Message) -> TurnAttributes:
    """The attributes of ``msg.others`` a TURN client or server reads; raises
    ``MalformedMessage`` (``Fault.BAD_ATTRIBUTE``) on one that does not fit its format."""
    first: dict[int, bytes] = {}
    peers: list[TransportAddress] = []
    for a in msg.others:
        if a.type == TurnAttributeType.XOR_PEER_ADDRESS:
            peers.append(_read_address(a.value, msg.transaction_id, "XOR-PEER-ADDRESS"))
        else:
            first.setdefault(a.type, a.value)
    relayed = first.get(TurnAttributeType.XOR_RELAYED_ADDRESS)
    lifetime = first.get(TurnAttributeType.LIFETIME)
    channel = first.get(TurnAttributeType.CHANNEL_NUMBER)
    transport = first.get(TurnAttributeType.REQUESTED_TRANSPORT)
    user = first.get(AttributeType.USERNAME)
    realm = first.get(AttributeType.REALM)
    nonce = first.get(AttributeType.NONCE)
    return TurnAttributes(
        relayed=None if relayed is None else _read_address(relayed, msg.transaction_id,
                                                           "XOR-RELAYED-ADDRESS"),
        peers=tuple(peers),
        lifetime=None if lifetime is None else _read_u32(lifetime, "LIFETIME"),
        channel=None if channel is None else _read_channel(channel),
        data=first.get(TurnAttributeType.DATA),
        requested_transport=None if transport is None else _read_transport(transport),
        username=None if user is None else _read_text(user, "USERNAME"),
        realm=None if realm is None else _read_text(realm, "REALM"),
        nonce=None if nonce is None else _read_text(nonce, "NONCE"),
        integrity=AttributeType.MESSAGE_INTEGRITY in first,
    )


def _read_u32(value: bytes, name: str) -> int:
    if len(value) != 4:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"{name} is {len(value)} bytes, not 4")
    return int(struct.unpack("!I", value)[0])


def _read_channel(value: bytes) -> int:
    if len(value) != 4:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"CHANNEL-NUMBER is {len(value)} bytes, not 4")
    return int(struct.unpack("!H", value[:2])[0])


def _read_transport(value: bytes) -> int:
    if len(value) != 4:
        raise _malformed(Fault.BAD_ATTRIBUTE, f"REQUESTED-TRANSPORT is {len(value)} bytes, "
                         "not 4")
    return value[0]


def xor_address_attribute(t: int, addr: TransportAddress, txid: bytes) -> Attribute:
    """XOR-PEER-ADDRESS or XOR-RELAYED-ADDRESS (same format as XOR-MAPPED-ADDRESS)."""
    return Attribute(t, _xor_address(addr, txid))


def lifetime_attribute(seconds: int) -> Attribute:
    return Attribute(TurnAttributeType.LIFETIME, struct.pack("!I", seconds))


def channel_attribute(channel: int) -> Attribute:
    return Attribute(TurnAttributeType.CHANNEL_NUMBER, struct.pack("!HH", channel, 0))


def transport_attribute(protocol: int = TRANSPORT_UDP) -> Attribute:
    return Attribute(TurnAttributeType.REQUESTED_TRANSPORT, struct.pack("!B3x", protocol))


def data_attribute(data: bytes) -> Attribute:
    return Attribute(TurnAttributeType.DATA, data)


def text_attribute(t: int, text: str) -> Attribute:
    """USERNAME (at most 513 bytes), REALM or NONCE (at most 763)."""
    raw = text.encode()
    limit = 513 if t == AttributeType.USERNAME else MAX_TEXT_BYTES
    if len(raw) > limit:
        raise ValueError(f"attribute {t:#06x} is {len(raw)} bytes, at most {limit}")
    return Attribute(t, raw)
