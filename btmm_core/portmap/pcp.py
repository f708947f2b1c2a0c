"""Port Control Protocol client messages, sans-I/O (RFC 6887).

Version 2 on UDP 5351, the NAT-PMP port. Every request has a 24-byte header (version, R bit and
opcode, requested lifetime, the client's address as IPv6 or IPv4-mapped) followed by the opcode's
data and options; an answer's header carries result code, lifetime and the server's epoch.
MAP and PEER carry a 96-bit nonce that every answer must echo (§11.2), else it is ignored.
A NAT-PMP-only gateway answers a version-2 request with a NAT-PMP "unsupported version"
answer (version 0): the caller then falls back to NAT-PMP (§9).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

from btmm_core.errors import MalformedMessage

VERSION = 2
SERVER_PORT = 5351
ANNOUNCE_PORT = 5350
MAX_MESSAGE = 1100
HEADER_LEN = 24
NONCE_LEN = 12
RESPONSE_BIT = 0x80

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Opcode(enum.IntEnum):
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class ResultCode(enum.IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


RESULT_TEXT: dict[int, str] = {
    ResultCode.SUCCESS: "success",
    ResultCode.UNSUPP_VERSION: "unsupported version",
    ResultCode.NOT_AUTHORIZED: "not authorized (mapping disabled or refused by policy)",
    ResultCode.MALFORMED_REQUEST: "malformed request",
    ResultCode.UNSUPP_OPCODE: "unsupported opcode",
    ResultCode.UNSUPP_OPTION: "unsupported option",
    ResultCode.MALFORMED_OPTION: "malformed option",
    ResultCode.NETWORK_FAILURE: "network failure (the gateway has no usable external address)",
    ResultCode.NO_RESOURCES: "no resources (the gateway could not create the mapping)",
    ResultCode.UNSUPP_PROTOCOL: "unsupported protocol",
    ResultCode.USER_EX_QUOTA: "user exceeded quota",
    ResultCode.CANNOT_PROVIDE_EXTERNAL: "cannot provide the suggested external address/port",
    ResultCode.ADDRESS_MISMATCH: "address mismatch (the gateway sees another source address; "
    "is there a NAT between host and gateway?)",
    ResultCode.EXCESSIVE_REMOTE_PEERS: "excessive remote peers",
}


def result_text(code: int) -> str:
    return RESULT_TEXT.get(code, f"unknown result code {code}")


class OptionCode(enum.IntEnum):
    THIRD_PARTY = 1
    PREFER_FAILURE = 2
    FILTER = 3


class Protocol(enum.IntEnum):
    ALL = 0
    TCP = 6
    UDP = 17


@dataclass(frozen=True)
class Option:
    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        pad = (-len(self.data)) % 4
        return struct.pack("!BBH", self.code, 0, len(self.data)) + self.data + b"\0" * pad


def to_ipv6(addr: IPAddress) -> bytes:
    """16-byte form: IPv4 as IPv4-mapped IPv6 (§5)."""
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed).packed
    return addr.packed


def from_ipv6(raw: bytes) -> IPAddress:
    v6 = ipaddress.IPv6Address(raw)
    return v6.ipv4_mapped if v6.ipv4_mapped is not None else v6


UNSPECIFIED_V4 = ipaddress.IPv4Address("0.0.0.0")


@dataclass(frozen=True)
class MapData:
    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: IPAddress

    def encode(self) -> bytes:
        return (
            self.nonce
            + struct.pack("!B3xHH", self.protocol, self.internal_port, self.external_port)
            + to_ipv6(self.external_address)
        )


@dataclass(frozen=True)
class PeerData:
    map: MapData
    remote_port: int
    remote_address: IPAddress

    def encode(self) -> bytes:
        return self.map.encode() + struct.pack("!H2x", self.remote_port) + to_ipv6(
            self.remote_address
        )


@dataclass(frozen=True)
class Request:
    opcode: Opcode
    lifetime: int
    client_address: IPAddress
    map: MapData | None = None
    peer: PeerData | None = None
    options: tuple[Option, ...] = ()

    def encode(self) -> bytes:
        if not 0 <= self.lifetime <= 0xFFFFFFFF:
            raise ValueError(f"lifetime out of range: {self.lifetime}")
        body = struct.pack("!BBHI", VERSION, self.opcode, 0, self.lifetime) + to_ipv6(
            self.client_address
        )
        if self.opcode is Opcode.MAP:
            if self.map is None:
                raise ValueError("a MAP request needs map data")
            body += self.map.encode()
        elif self.opcode is Opcode.PEER:
            if self.peer is None:
                raise ValueError("a PEER request needs peer data")
            body += self.peer.encode()
        body += b"".join(o.encode() for o in self.options)
        if len(body) > MAX_MESSAGE:
            raise ValueError(f"PCP request of {len(body)} bytes exceeds {MAX_MESSAGE}")
        return body


def map_request(
    *,
    nonce: bytes,
    client_address: IPAddress,
    internal_port: int,
    suggested_external_port: int,
    lifetime: int,
    protocol: int = Protocol.UDP,
    suggested_external_address: IPAddress = UNSPECIFIED_V4,
    options: tuple[Option, ...] = (),
) -> Request:
    """A MAP request; lifetime 0 deletes the mapping (§11.1)."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"PCP nonce must be {NONCE_LEN} bytes, got {len(nonce)}")
    return Request(
        Opcode.MAP, lifetime, client_address,
        map=MapData(nonce, protocol, internal_port, suggested_external_port,
                    suggested_external_address),
        options=options,
    )


@dataclass(frozen=True)
class Response:
    opcode: Opcode
    result: int
    lifetime: int
    epoch: int
    map: MapData | None = None
    peer: PeerData | None = None
    options: tuple[Option, ...] = ()


@dataclass(frozen=True)
class NatPmpOnly:
    """A NAT-PMP answer (version 0) to our PCP request: the gateway speaks only NAT-PMP."""

    result: int


_RESP_HEADER = struct.Struct("!BBBBII12x")
_MAP_DATA = struct.Struct("!12sB3xHH16s")


def _decode_map(data: bytes, off: int) -> MapData:
    nonce, proto, internal, external, addr = _MAP_DATA.unpack_from(data, off)
    return MapData(nonce, proto, internal, external, from_ipv6(addr))


def _decode_options(data: bytes, off: int) -> tuple[Option, ...]:
    options = []
    while off < len(data):
        if len(data) - off < 4:
            raise MalformedMessage("PCP option header truncated")
        code, _, length = struct.unpack_from("!BBH", data, off)
        off += 4
        if off + length > len(data):
            raise MalformedMessage(f"PCP option {code} claims {length} bytes past the end")
        options.append(Option(code, bytes(data[off:off + length])))
        off += length + (-length) % 4
    return tuple(options)


def decode_response(data: bytes) -> Response | NatPmpOnly:
    """Parse an answer (§7.2, §8.3); raises ``MalformedMessage`` for anything invalid."""
    if len(data) >= 2 and data[0] == 0 and data[1] & RESPONSE_BIT:
        # §9: a NAT-PMP gateway answers with its own version-0 format; result is at offset 2.
        result = struct.unpack_from("!H", data, 2)[0] if len(data) >= 4 else 1
        return NatPmpOnly(result)
    if len(data) < HEADER_LEN:
        raise MalformedMessage(f"PCP answer too short: {len(data)} bytes, need {HEADER_LEN}")
    if len(data) > MAX_MESSAGE:
        raise MalformedMessage(f"PCP answer too long: {len(data)} bytes, max {MAX_MESSAGE}")
    if len(data) % 4:
        raise MalformedMessage(f"PCP answer length {len(data)} is not a multiple of 4")
    version, r_op, _, result, lifetime, epoch = _RESP_HEADER.unpack_from(data)
    if not r_op & RESPONSE_BIT:
        raise MalformedMessage("PCP request (R bit clear), not an answer")
    if version != VERSION:
        if result == ResultCode.UNSUPP_VERSION:
            # A PCP server of another version; we speak only 2 (and NAT-PMP 0).
            return NatPmpOnly(result) if version == 0 else Response(
                Opcode.ANNOUNCE, result, lifetime, epoch
            )
        raise MalformedMessage(f"PCP answer with version {version}, expected {VERSION}")
    try:
        opcode = Opcode(r_op & ~RESPONSE_BIT)
    except ValueError:
        raise MalformedMessage(f"PCP answer with unknown opcode {r_op & 0x7F}") from None
    off = HEADER_LEN
    map_data = peer = None
    if opcode in (Opcode.MAP, Opcode.PEER):
        need = HEADER_LEN + (36 if opcode is Opcode.MAP else 56)
        if len(data) < need:
            if result != ResultCode.SUCCESS:
                # Some servers send only the header with an error; keep the code.
                return Response(opcode, result, lifetime, epoch)
            raise MalformedMessage(f"PCP {opcode.name} answer too short: {len(data)} < {need}")
        map_data = _decode_map(data, off)
        off += 36
        if opcode is Opcode.PEER:
            rport, raddr = struct.unpack_from("!H2x16s", data, off)
            peer = PeerData(map_data, rport, from_ipv6(raddr))
            off += 20
    options = _decode_options(data, off)
    return Response(opcode, result, lifetime, epoch, map_data, peer, options)


def encode_response(resp: Response) -> bytes:
    """Build an answer as a server would (tests and simulators)."""
    body = _RESP_HEADER.pack(
        VERSION, RESPONSE_BIT | resp.opcode, 0, resp.result, resp.lifetime, resp.epoch
    )
    if resp.peer is not None:
        body += resp.peer.encode()
    elif resp.map is not None:
        body += resp.map.encode()
    return body + b"".join(o.encode() for o in resp.options)


def decode_request(data: bytes) -> Request:
    """Parse a request (tests, simulators); raises ``MalformedMessage``."""
    if len(data) < HEADER_LEN or len(data) % 4 or len(data) > MAX_MESSAGE:
        raise MalformedMessage(f"PCP request of bad length {len(data)}")
    version, r_op, _, lifetime = struct.unpack_from("!BBHI", data)
    if version != VERSION or r_op & RESPONSE_BIT:
        raise MalformedMessage("not a PCP version 2 request")
    try:
        opcode = Opcode(r_op)
    except ValueError:
        raise MalformedMessage(f"PCP request with unknown opcode {r_op}") from None
    client = from_ipv6(data[8:24])
    off = HEADER_LEN
    map_data = peer = None
    if opcode in (Opcode.MAP, Opcode.PEER):
        need = HEADER_LEN + (36 if opcode is Opcode.MAP else 56)
        if len(data) < need:
            raise MalformedMessage(f"PCP {opcode.name} request too short: {len(data)} < {need}")
        map_data = _decode_map(data, off)
        off += 36
        if opcode is Opcode.PEER:
            rport, raddr = struct.unpack_from("!H2x16s", data, off)
            peer = PeerData(map_data, rport, from_ipv6(raddr))
            off += 20
    return Request(opcode, lifetime, client, map_data, peer, _decode_options(data, off))


def answer_parser(request: Request) -> Callable[[bytes], Response | NatPmpOnly | None]:
    """A parser for ``retry.Exchange``: only an answer to ``request`` with its nonce counts.

    An answer with a wrong nonce, opcode, protocol or internal port is not ours (§11.3, §8.3)
    and is ignored; an UNSUPP_VERSION answer is accepted whatever its shape, so that the caller
    can fall back to NAT-PMP.
    """

    def parse(data: bytes) -> Response | NatPmpOnly | None:
        resp = decode_response(data)
        if isinstance(resp, NatPmpOnly) or resp.result == ResultCode.UNSUPP_VERSION:
            return resp
        if resp.opcode is not request.opcode:
            return None
        if request.map is not None:
            if resp.map is None:
                # An error answer with no MAP data cannot prove it is ours: ignore it.
                return None
            if resp.map.nonce != request.map.nonce:
                return None
            if (resp.map.protocol, resp.map.internal_port) != (
                request.map.protocol, request.map.internal_port
            ):
                return None
        return resp

    return parse


def decode_announce(data: bytes) -> Response | None:
    """An unsolicited ANNOUNCE (§14.1.3), or None if the datagram is not one."""
    try:
        resp = decode_response(data)
    except MalformedMessage:
        return None
    if isinstance(resp, NatPmpOnly) or resp.opcode is not Opcode.ANNOUNCE:
        return None
    return resp
