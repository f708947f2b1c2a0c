"""NAT-PMP messages (RFC 6886): every opcode and result code, short and malformed answers."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from btmm_core.errors import MalformedMessage
from btmm_core.portmap import natpmp
from btmm_core.portmap.natpmp import (
    ErrorResponse,
    MapRequest,
    MapResponse,
    Opcode,
    PublicAddressRequest,
    PublicAddressResponse,
    ResultCode,
)


def test_public_address_request_is_two_bytes() -> None:
    assert PublicAddressRequest().encode() == b"\x00\x00"


@pytest.mark.parametrize("opcode", [Opcode.MAP_UDP, Opcode.MAP_TCP])
def test_map_request_layout(opcode: Opcode) -> None:
    raw = MapRequest(opcode, 4500, 4501, 7200).encode()
    assert raw == struct.pack("!BBHHHI", 0, opcode, 0, 4500, 4501, 7200)
    assert natpmp.decode_request(raw) == MapRequest(opcode, 4500, 4501, 7200)


def test_map_request_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        MapRequest(Opcode.PUBLIC_ADDRESS, 1, 1)
    with pytest.raises(ValueError):
        MapRequest(Opcode.MAP_UDP, 70000, 1)
    with pytest.raises(ValueError):
        MapRequest(Opcode.MAP_UDP, 1, 1, -1)


def test_delete_is_lifetime_zero() -> None:
    raw = MapRequest(Opcode.MAP_UDP, 4500, 0, 0).encode()
    assert raw[-4:] == b"\0\0\0\0"


def test_public_address_answer() -> None:
    raw = bytes([0, 128, 0, 0]) + struct.pack("!I", 1234) + bytes([203, 0, 113, 7])
    resp = natpmp.decode_response(raw)
    assert resp == PublicAddressResponse(0, 1234, ipaddress.IPv4Address("203.0.113.7"))
    assert natpmp.encode_response(resp) == raw


@pytest.mark.parametrize("opcode", [Opcode.MAP_UDP, Opcode.MAP_TCP])
def test_map_answer(opcode: Opcode) -> None:
    raw = struct.pack("!BBHIHHI", 0, 128 + opcode, 0, 99, 4500, 4600, 3600)
    resp = natpmp.decode_response(raw)
    assert resp == MapResponse(opcode, 0, 99, 4500, 4600, 3600)
    assert natpmp.encode_response(resp) == raw


@pytest.mark.parametrize("code", [c for c in ResultCode if c != ResultCode.SUCCESS])
@pytest.mark.parametrize("opcode", list(Opcode))
def test_every_error_result_is_reported(opcode: Opcode, code: ResultCode) -> None:
    raw = struct.pack("!BBHI", 0, 128 + opcode, code, 5)
    resp = natpmp.decode_response(raw)
    assert resp == ErrorResponse(opcode, code, 5)
    assert natpmp.result_text(code) != natpmp.result_text(0)


def test_unknown_result_code_is_kept() -> None:
    resp = natpmp.decode_response(struct.pack("!BBHI", 0, 129, 77, 5))
    assert isinstance(resp, ErrorResponse) and resp.result == 77
    assert "77" in natpmp.result_text(77)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b"\x00\x80\x00\x00\x00\x00\x00",  # 7 bytes
        b"\x00\x80\x00\x00\x00\x00\x00\x01\xcb\x00",  # address cut short
        struct.pack("!BBHIHH", 0, 129, 0, 1, 1, 1),  # map answer without lifetime
        struct.pack("!BBHI", 1, 128, 0, 0) + b"\x01\x02\x03\x04",  # wrong version
        struct.pack("!BBHI", 0, 0, 0, 0) + b"\x01\x02\x03\x04",  # a request, not an answer
        struct.pack("!BBHI", 0, 128 + 9, 0, 0) + b"\x01\x02\x03\x04",  # unknown opcode
    ],
)
def test_malformed_answers_raise(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        natpmp.decode_response(raw)


def test_parser_accepts_only_the_matching_answer() -> None:
    req = MapRequest(Opcode.MAP_UDP, 4500, 4500)
    parse = natpmp.answer_parser(req)
    other_port = struct.pack("!BBHIHHI", 0, 129, 0, 1, 4501, 4501, 60)
    tcp = struct.pack("!BBHIHHI", 0, 130, 0, 1, 4500, 4500, 60)
    addr = struct.pack("!BBHI", 0, 128, 0, 1) + bytes(4)
    ours = struct.pack("!BBHIHHI", 0, 129, 0, 1, 4500, 4502, 60)
    assert parse(other_port) is None
    assert parse(tcp) is None
    assert parse(addr) is None
    assert parse(ours) == MapResponse(Opcode.MAP_UDP, 0, 1, 4500, 4502, 60)
    refused = struct.pack("!BBHI", 0, 129, ResultCode.NOT_AUTHORIZED, 1)
    assert parse(refused) == ErrorResponse(Opcode.MAP_UDP, ResultCode.NOT_AUTHORIZED, 1)


def test_announcement() -> None:
    raw = bytes([0, 128, 0, 0]) + struct.pack("!I", 0) + bytes([198, 51, 100, 1])
    ann = natpmp.decode_announcement(raw)
    assert ann is not None and str(ann.address) == "198.51.100.1" and ann.epoch == 0
    assert natpmp.decode_announcement(b"junk") is None
    assert natpmp.decode_announcement(struct.pack("!BBHIHHI", 0, 129, 0, 1, 1, 1, 1)) is None
