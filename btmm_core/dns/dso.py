"""DNS Stateful Operations messages (RFC 8490): the DSO header, TLVs and the three base TLVs.

A DSO message is a 12-byte DNS header with OPCODE 6 and all four count fields zero (section
5.4), followed by TLVs: DSO-TYPE (16 bits), DSO-LENGTH (16), DSO-DATA (section 5.4.4). The
first TLV of a request or unidirectional message is its Primary TLV and says what the message
is. The MESSAGE ID and QR bit say which of three a message is (section 8.1):

    QR=0, ID!=0: request (must be answered)     QR=0, ID=0: unidirectional (never answered)
    QR=1, ID!=0: response                        QR=1, ID=0: invalid, a fatal error

Base TLVs (section 7): Keepalive (1: inactivity timeout and keepalive interval, milliseconds,
32 bits each), Retry Delay (2: milliseconds, 32 bits) and Encryption Padding (3: any bytes).
DNS Push Notifications (RFC 8765) adds types 0x40..0x43 (``btmm_core.dns.push``).

Pure codec: ``DSOMessage.parse`` raises ``DSOError`` for anything that is not a well-formed
DSO message; its ``rcode`` is FORMERR when a request must be answered so (count fields that are
not zero), None when the fault is fatal and the connection must be aborted (section 5.3.1).
The session rules (what may come when) live in the cores that use it: ``btmm_core.push``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from btmm_core.errors import DSOError

DSO_OPCODE = 6
HEADER_LEN = 12
#: What a stream's 2-byte length prefix allows (RFC 7766 section 8).
MAX_MESSAGE = 0xFFFF
#: "Infinity" for either session timeout (RFC 8490 sections 6.4.2 and 6.5.2).
INFINITE = 0xFFFFFFFF
#: Both session timeouts until a Keepalive exchange says otherwise (section 6.2).
DEFAULT_TIMEOUT_MS = 15_000
#: The least keepalive interval a server may dictate (section 6.5.2).
MIN_KEEPALIVE_MS = 10_000
#: How long a client waits for the answer to the request that opens a session (section 5.1).
ESTABLISH_TIMEOUT = 30.0


class DSOType(enum.IntEnum):
    KEEPALIVE = 0x0001
    RETRY_DELAY = 0x0002
    ENCRYPTION_PADDING = 0x0003
    SUBSCRIBE = 0x0040
    PUSH = 0x0041
    UNSUBSCRIBE = 0x0042
    RECONFIRM = 0x0043


class Rcode(enum.IntEnum):
    """The RCODEs DSO and DNS Push answer with (RFC 8490 5.4.1, RFC 8765 6.2.2)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NOTIMP = 4
    REFUSED = 5
    NOTAUTH = 9
    DSOTYPENI = 11


class Kind(enum.Enum):
    REQUEST = "request"
    UNIDIRECTIONAL = "unidirectional"
    RESPONSE = "response"


@dataclass(frozen=True)
class TLV:
    dso_type: int
    data: bytes = b""
    #: Offset of ``data`` in the message it was parsed from (-1: built here). A PUSH TLV's
    #: names may be compressed with offsets from the start of the message (RFC 8765 6.3.1).
    at: int = field(default=-1, compare=False)

    def to_bytes(self) -> bytes:
        if not 0 <= self.dso_type <= 0xFFFF:
            raise ValueError(f"DSO-TYPE {self.dso_type} does not fit in 16 bits")
        if len(self.data) > 0xFFFF:
            raise ValueError(f"DSO-DATA of {len(self.data)} bytes: at most 65535")
        return struct.pack("!HH", self.dso_type, len(self.data)) + self.data


def is_dso(wire: bytes) -> bool:
    """Whether a message has the DSO OPCODE (its other fields unchecked)."""
    return len(wire) >= 4 and (wire[2] >> 3) & 0xF == DSO_OPCODE


@dataclass(frozen=True)
class DSOMessage:
    msg_id: int
    tlvs: tuple[TLV, ...] = ()
    response: bool = False
    rcode: int = 0

    @property
    def kind(self) -> Kind:
        if self.response:
            return Kind.RESPONSE
        return Kind.REQUEST if self.msg_id else Kind.UNIDIRECTIONAL

    @property
    def primary(self) -> TLV | None:
        """The Primary TLV of a request or unidirectional message (a response has none)."""
        return self.tlvs[0] if self.tlvs and not self.response else None

    def to_bytes(self) -> bytes:
        if not 0 <= self.msg_id <= 0xFFFF or not 0 <= self.rcode <= 0xF:
            raise ValueError(f"DSO header: id {self.msg_id}, rcode {self.rcode} out of range")
        if self.response and self.msg_id == 0:
            raise ValueError("a DSO response needs the request's nonzero MESSAGE ID")
        if not self.response and not self.tlvs:
            raise ValueError("a DSO request or unidirectional message needs a Primary TLV")
        flags = (0x8000 if self.response else 0) | (DSO_OPCODE << 11) | self.rcode
        wire = struct.pack("!HHHHHH", self.msg_id, flags, 0, 0, 0, 0)
        wire += b"".join(t.to_bytes() for t in self.tlvs)
        if len(wire) > MAX_MESSAGE:
            raise ValueError(f"DSO message of {len(wire)} bytes: at most {MAX_MESSAGE}")
        return wire

    @classmethod
    def parse(cls, wire: bytes) -> DSOMessage:
        if len(wire) < HEADER_LEN:
            raise DSOError(f"DSO message of {len(wire)} bytes: shorter than its header")
        msg_id, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", wire[:HEADER_LEN])
        if (flags >> 11) & 0xF != DSO_OPCODE:
            raise DSOError(f"OPCODE {(flags >> 11) & 0xF} is not DSO ({DSO_OPCODE})")
        response = bool(flags & 0x8000)
        if response and msg_id == 0:
            raise DSOError("DSO response with MESSAGE ID 0 (RFC 8490 5.4.1)", msg_id=0)
        if qd or an or ns or ar:
            # Section 5.4: FORMERR for a request; fatal for anything else (nothing answers it).
            raise DSOError(
                f"DSO message with count fields {qd}/{an}/{ns}/{ar}: all must be zero",
                rcode=Rcode.FORMERR if msg_id and not response else None,
                msg_id=msg_id,
            )
        tlvs: list[TLV] = []
        p = HEADER_LEN
        while p < len(wire):
            if len(wire) - p < 4:
                raise DSOError(f"truncated TLV header at byte {p}", msg_id=msg_id)
            dso_type, length = struct.unpack("!HH", wire[p : p + 4])
            if p + 4 + length > len(wire):
                raise DSOError(
                    f"TLV {dso_type:#06x} claims {length} bytes, {len(wire) - p - 4} left",
                    msg_id=msg_id,
                )
            tlvs.append(TLV(dso_type, wire[p + 4 : p + 4 + length], at=p + 4))
            p += 4 + length
        if not response and not tlvs:
            raise DSOError("DSO request without a Primary TLV (RFC 8490 5.4.2)", msg_id=msg_id)
        return cls(msg_id, tuple(tlvs), response, flags & 0xF)


# ---- base TLVs (section 7) ------------------------------------------------------------------


@dataclass(frozen=True)
class Keepalive:
    """Session timeouts in milliseconds (section 7.1): asked for by the client in a request,
    dictated by the server in the response or in a unidirectional message."""

    inactivity_ms: int
    interval_ms: int

    def tlv(self) -> TLV:
        return TLV(DSOType.KEEPALIVE, struct.pack("!II", self.inactivity_ms, self.interval_ms))

    @classmethod
    def from_tlv(cls, tlv: TLV) -> Keepalive:
        if tlv.dso_type != DSOType.KEEPALIVE or len(tlv.data) != 8:
            raise DSOError(f"Keepalive TLV of {len(tlv.data)} bytes: it has 8")
        inactivity, interval = struct.unpack("!II", tlv.data)
        return cls(inactivity, interval)


@dataclass(frozen=True)
class RetryDelay:
    """Milliseconds before the client may retry (section 7.2): as a server's Primary TLV, the
    session ends; as an Additional TLV of an error response, only that operation waits."""

    delay_ms: int

    def tlv(self) -> TLV:
        return TLV(DSOType.RETRY_DELAY, struct.pack("!I", self.delay_ms))

    @classmethod
    def from_tlv(cls, tlv: TLV) -> RetryDelay:
        if tlv.dso_type != DSOType.RETRY_DELAY or len(tlv.data) != 4:
            raise DSOError(f"Retry Delay TLV of {len(tlv.data)} bytes: it has 4")
        return cls(struct.unpack("!I", tlv.data)[0])


def padding(length: int) -> TLV:
    """An Encryption Padding TLV (section 7.3) of ``length`` zero bytes (any bytes are
    accepted on receipt); a request carrying one gets one back."""
    if not 0 <= length <= 0xFFFF:
        raise ValueError(f"padding of {length} bytes: 0..65535")
    return TLV(DSOType.ENCRYPTION_PADDING, bytes(length))


def find(tlvs: tuple[TLV, ...], dso_type: int) -> list[TLV]:
    return [t for t in tlvs if t.dso_type == dso_type]
