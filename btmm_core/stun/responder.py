"""The STUN server core, sans-I/O (RFC 8489 section 6.3: receiving a request; 12: the Binding
method).

``StunResponder.receive(data, source, now)`` returns the datagram to send back to ``source``, or
None. A Binding request gets a success response with XOR-MAPPED-ADDRESS of ``source`` (the
address the request came from, as the server sees it: the client's server-reflexive address);
a request with a comprehension-required attribute we do not know gets 420 with
UNKNOWN-ATTRIBUTES (6.3.1); a request whose header is sound but whose attributes are not, or
whose method is not Binding, gets 400. Everything else is dropped: non-STUN datagrams, header
faults and wrong FINGERPRINTs (7.3 says discard), responses and indications (a server answers
only requests), and datagrams over ``max_request`` bytes. No authentication: a Binding request
needs none (section 9 leaves it to the usage) and the answer only tells the sender its own
address. Every answer carries FINGERPRINT, so a client that shares its port with ESP (the
engine's) can tell it from anything else.

``receive`` raises nothing on any input; its counters say what came in. Run by
``stun.server.StunServer`` for ``btmm serve``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from btmm_core.errors import MalformedMessage
from btmm_core.stun.message import (
    ErrorCode,
    Fault,
    MessageClass,
    Method,
    TransportAddress,
    binding_success,
    error_response,
    looks_like_stun,
    parse,
    parse_header,
)

#: Larger requests are dropped. A Binding request is 20-ish bytes; RFC 8489 section 6.1 keeps
#: a message over UDP under the path MTU, and 1280 is IPv6's minimum, so nothing honest is
#: bigger.
DEFAULT_MAX_REQUEST = 1280


@dataclass
class ResponderStats:
    answered: int = 0  #: success responses sent
    unknown: int = 0  #: 420s sent (unknown comprehension-required attributes)
    malformed: int = 0  #: 400s sent, or a STUN header with a fault or a wrong FINGERPRINT
    oversized: int = 0  #: longer than ``max_request``, dropped unread
    ignored: int = 0  #: not STUN, or a response or indication

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class StunResponder:
    def __init__(self, *, software: str | None = None,
                 max_request: int = DEFAULT_MAX_REQUEST) -> None:
        self.software = software
        self.max_request = max_request
        self.stats = ResponderStats()

    def receive(self, data: bytes, source: TransportAddress, now: float) -> bytes | None:
        """The answer to ``data`` from ``source``, or None. ``now`` is unused until rate
        limits need it; it keeps the core's signature the one every core has."""
        if len(data) > self.max_request:
            self.stats.oversized += 1
            return None
        if not looks_like_stun(data):
            # A STUN-looking first byte with a bad length is a broken STUN message; anything
            # else is another protocol that reached the port.
            if len(data) >= 8 and not data[0] & 0xC0 and data[4:8] == b"\x21\x12\xa4\x42":
                self.stats.malformed += 1
            else:
                self.stats.ignored += 1
            return None
        header = parse_header(data)  # cannot fail: looks_like_stun checked all it checks
        if header.cls is not MessageClass.REQUEST:
            self.stats.ignored += 1
            return None
        txid, method = header.transaction_id, header.method
        try:
            msg = parse(data)
        except MalformedMessage as exc:
            self.stats.malformed += 1
            if exc.reason is Fault.BAD_FINGERPRINT:
                return None
            return error_response(method, txid, ErrorCode.BAD_REQUEST, _reason(exc),
                                  software=self.software)
        unknown = msg.unknown_required()
        if unknown:
            self.stats.unknown += 1
            return error_response(method, txid, ErrorCode.UNKNOWN_ATTRIBUTE,
                                  "Unknown Attribute", unknown=unknown, software=self.software)
        if method != Method.BINDING:
            self.stats.malformed += 1
            return error_response(method, txid, ErrorCode.BAD_REQUEST,
                                  f"method {method:#05x} is not served here",
                                  software=self.software)
        self.stats.answered += 1
        return binding_success(txid, source, software=self.software)


def _reason(exc: MalformedMessage) -> str:
    # The reason phrase is at most 763 bytes; ours are short, but say so rather than trust it.
    return exc.what.removeprefix("STUN: ")[:120]
