"""NAT-PMP client messages, sans-I/O (RFC 6886).

Requests go to UDP 5351 on the default gateway; the gateway multicasts address announcements to
224.0.0.1:5350 in the same format as an external-address answer. Version is 0. An answer's
opcode is the request's plus 128. Every answer carries the gateway's epoch (seconds since its
mapping table started), checked by ``epoch.EpochTracker`` with the §3.6 rule.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

from btmm_core.errors import MalformedMessage

VERSION = 0
SERVER_PORT = 5351
ANNOUNCE_PORT = 5350
ANNOUNCE_GROUP = "224.0.0.1"
DEFAULT_LIFETIME = 7200
RESPONSE_BIT = 0x80


class Opcode(enum.IntEnum):
    PUBLIC_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class ResultCode(enum.IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


RESULT_TEXT: dict[int, str] = {
    ResultCode.SUCCESS: "success",
    ResultCode.UNSUPPORTED_VERSION: "unsupported version",
    ResultCode.NOT_AUTHORIZED: "not authorized/refused (mapping disabled on the gateway?)",
    ResultCode.NETWORK_FAILURE: "network failure (the gateway has no usable external address)",
    ResultCode.OUT_OF_RESOURCES: "out of resources (the gateway's mapping table is full)",
    ResultCode.UNSUPPORTED_OPCODE: "unsupported opcode",
}


def result_text(code: int) -> str:
    return RESULT_TEXT.get(code, f"unknown result code {code}")


@dataclass(frozen=True)
class PublicAddressRequest:
    def encode(self) -> bytes:
        return struct.pack("!BB", VERSION, Opcode.PUBLIC_ADDRESS)


@dataclass(frozen=True)
class MapRequest:
    """Map (or, with lifetime 0, delete) an inbound port. A suggested port of 0: any port."""

    opcode: Opcode
    internal_port: int
    suggested_external_port: int
    lifetime: int = DEFAULT_LIFETIME

    def __post_init__(self) -> None:
        if self.opcode not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
            raise ValueError(f"not a mapping opcode: {self.opcode!r}")
        for port in (self.internal_port, self.suggested_external_port):
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"port out of range: {port}")
        if not 0 <= self.lifetime <= 0xFFFFFFFF:
            raise ValueError(f"lifetime out of range: {self.lifetime}")

    def encode(self) -> bytes:
        return struct.pack(
            "!BBHHHI", VERSION, self.opcode, 0, self.internal_port,
            self.suggested_external_port, self.lifetime,
        )


@dataclass(frozen=True)
class ErrorResponse:
    """An answer with a non-zero result code; only the common header is meaningful."""

    opcode: Opcode
    result: int
    epoch: int


@dataclass(frozen=True)
class PublicAddressResponse:
    result: int
    epoch: int
    address: ipaddress.IPv4Address

    @property
    def opcode(self) -> Opcode:
        return Opcode.PUBLIC_ADDRESS


@dataclass(frozen=True)
class MapResponse:
    opcode: Opcode
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


Response = ErrorResponse | PublicAddressResponse | MapResponse

_HEADER = struct.Struct("!BBHI")


def decode_response(data: bytes) -> Response:
    """Parse an answer from the gateway; raises ``MalformedMessage`` when it cannot."""
    if len(data) < _HEADER.size:
        raise MalformedMessage(f"NAT-PMP answer too short: {len(data)} bytes, need at least 8")
    version, op, result, epoch = _HEADER.unpack_from(data)
    if version != VERSION:
        raise MalformedMessage(f"NAT-PMP answer with version {version}, expected 0")
    if not op & RESPONSE_BIT:
        raise MalformedMessage(f"NAT-PMP request (opcode {op}), not an answer")
    try:
        opcode = Opcode(op & ~RESPONSE_BIT)
    except ValueError:
        raise MalformedMessage(f"NAT-PMP answer with unknown opcode {op}") from None
    if result != ResultCode.SUCCESS:
        # RFC 6886 §3.5: on error only the header is defined, so nothing else is read.
        return ErrorResponse(opcode, result, epoch)
    if opcode is Opcode.PUBLIC_ADDRESS:
        if len(data) < 12:
            raise MalformedMessage(f"NAT-PMP address answer too short: {len(data)} bytes, need 12")
        return PublicAddressResponse(result, epoch, ipaddress.IPv4Address(data[8:12]))
    if len(data) < 16:
        raise MalformedMessage(f"NAT-PMP mapping answer too short: {len(data)} bytes, need 16")
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    return MapResponse(opcode, result, epoch, internal, external, lifetime)


def decode_request(data: bytes) -> PublicAddressRequest | MapRequest:
    """Parse a request (used by tests and by a gateway simulator); raises ``MalformedMessage``."""
    if len(data) < 2:
        raise MalformedMessage(f"NAT-PMP request too short: {len(data)} bytes")
    version, op = data[0], data[1]
    if version != VERSION:
        raise MalformedMessage(f"NAT-PMP request with version {version}")
    if op == Opcode.PUBLIC_ADDRESS:
        return PublicAddressRequest()
    if op in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        if len(data) < 12:
            raise MalformedMessage(f"NAT-PMP map request too short: {len(data)} bytes, need 12")
        _, _, _, internal, external, lifetime = struct.unpack_from("!BBHHHI", data)
        return MapRequest(Opcode(op), internal, external, lifetime)
    raise MalformedMessage(f"NAT-PMP request with unknown opcode {op}")


def encode_response(resp: Response) -> bytes:
    """Build an answer as a gateway would (tests and simulators)."""
    if isinstance(resp, ErrorResponse):
        return _HEADER.pack(VERSION, RESPONSE_BIT | resp.opcode, resp.result, resp.epoch)
    if isinstance(resp, PublicAddressResponse):
        return _HEADER.pack(
            VERSION, RESPONSE_BIT | Opcode.PUBLIC_ADDRESS, resp.result, resp.epoch
        ) + resp.address.packed
    return _HEADER.pack(VERSION, RESPONSE_BIT | resp.opcode, resp.result, resp.epoch) + (
        struct.pack("!HHI", resp.internal_port, resp.external_port, resp.lifetime)
    )


def answer_parser(
    request: PublicAddressRequest | MapRequest,
) -> Callable[[bytes], Response | None]:
    """A parser for ``retry.Exchange``: accepts only an answer to this request's opcode.

    A mapping answer must also name our internal port (the gateway may serve several requests
    of ours at once after a restart). Error answers are accepted: the caller reports them.
    """
    want = Opcode.PUBLIC_ADDRESS if isinstance(request, PublicAddressRequest) else request.opcode

    def parse(data: bytes) -> Response | None:
        resp = decode_response(data)
        if resp.opcode is not want:
            return None
        if (
            isinstance(resp, MapResponse)
            and isinstance(request, MapRequest)
            and resp.internal_port != request.internal_port
        ):
            return None
        return resp

    return parse


def decode_announcement(data: bytes) -> PublicAddressResponse | None:
    """A multicast address announcement (RFC 6886 §3.2.1), or None if it is something else."""
    try:
        resp = decode_response(data)
    except MalformedMessage:
        return None
    return resp if isinstance(resp, PublicAddressResponse) else None
