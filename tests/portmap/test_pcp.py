"""PCP messages (RFC 6887): opcodes, result codes, options, nonce, malformed answers."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from btmm_core.errors import MalformedMessage
from btmm_core.portmap import pcp
from btmm_core.portmap.pcp import (
    MapData,
    NatPmpOnly,
    Opcode,
    Option,
    OptionCode,
    PeerData,
    Protocol,
    Request,
    Response,
    ResultCode,
)

NONCE = bytes(range(12))
CLIENT = ipaddress.IPv4Address("192.168.7.10")
EXT = ipaddress.IPv4Address("203.0.113.2")


def _map_req(**kw: object) -> Request:
    args: dict[str, object] = dict(
        nonce=NONCE, client_address=CLIENT, internal_port=4500, suggested_external_port=4500,
        lifetime=7200,
    )
    args.update(kw)
    return pcp.map_request(**args)  # type: ignore[arg-type]


def test_map_request_layout() -> None:
    raw = _map_req().encode()
    assert len(raw) == 60
    assert raw[0] == 2 and raw[1] == Opcode.MAP and raw[2:4] == b"\0\0"
    assert struct.unpack("!I", raw[4:8])[0] == 7200
    assert raw[8:24] == b"\0" * 10 + b"\xff\xff" + CLIENT.packed
    assert raw[24:36] == NONCE
    assert raw[36] == Protocol.UDP and raw[37:40] == b"\0\0\0"
    assert struct.unpack("!HH", raw[40:44]) == (4500, 4500)
    assert raw[44:60] == b"\0" * 10 + b"\xff\xff" + b"\0\0\0\0"
    assert pcp.decode_request(raw) == _map_req()


def test_peer_request_and_announce_request() -> None:
    peer = PeerData(MapData(NONCE, Protocol.UDP, 1, 2, EXT), 3478,
                    ipaddress.IPv4Address("198.51.100.9"))
    req = Request(Opcode.PEER, 60, CLIENT, peer=peer)
    raw = req.encode()
    assert len(raw) == 80
    assert pcp.decode_request(raw) == Request(Opcode.PEER, 60, CLIENT, peer.map, peer)
    ann = Request(Opcode.ANNOUNCE, 0, CLIENT).encode()
    assert len(ann) == 24 and ann[1] == 0


def test_options_are_padded_and_parsed() -> None:
    opts = (Option(OptionCode.PREFER_FAILURE), Option(OptionCode.THIRD_PARTY, to16(CLIENT)),
            Option(OptionCode.FILTER, b"\x00\x18\x00\x00" + b"\0" * 16), Option(99, b"abc"))
    raw = _map_req(options=opts).encode()
    assert len(raw) % 4 == 0
    back = pcp.decode_request(raw)
    assert back.options == opts


def to16(a: ipaddress.IPv4Address) -> bytes:
    return pcp.to_ipv6(a)


def test_bad_request_arguments() -> None:
    with pytest.raises(ValueError):
        _map_req(nonce=b"short")
    with pytest.raises(ValueError):
        Request(Opcode.MAP, 1, CLIENT).encode()
    with pytest.raises(ValueError):
        Request(Opcode.PEER, 1, CLIENT).encode()
    with pytest.raises(ValueError):
        _map_req(lifetime=-1).encode()
    with pytest.raises(ValueError):
        _map_req(options=(Option(1, b"x" * 1100),)).encode()


def _answer(result: int = 0, nonce: bytes = NONCE, internal: int = 4500,
            proto: int = Protocol.UDP, opcode: Opcode = Opcode.MAP) -> bytes:
    return pcp.encode_response(Response(
        opcode, result, 3600, 42, MapData(nonce, proto, internal, 4501, EXT)))


def test_map_answer_roundtrip() -> None:
    resp = pcp.decode_response(_answer())
    assert isinstance(resp, Response)
    assert resp.result == ResultCode.SUCCESS and resp.lifetime == 3600 and resp.epoch == 42
    assert resp.map == MapData(NONCE, Protocol.UDP, 4500, 4501, EXT)


def test_ipv6_external_address() -> None:
    v6 = ipaddress.IPv6Address("2001:db8::5")
    raw = pcp.encode_response(Response(Opcode.MAP, 0, 1, 1, MapData(NONCE, 17, 1, 1, v6)))
    resp = pcp.decode_response(raw)
    assert isinstance(resp, Response) and resp.map is not None
    assert resp.map.external_address == v6


@pytest.mark.parametrize("code", list(ResultCode))
def test_every_result_code(code: ResultCode) -> None:
    resp = pcp.answer_parser(_map_req())(_answer(result=code))
    assert isinstance(resp, Response) and resp.result == code
    assert pcp.result_text(code)
    assert "99" in pcp.result_text(99)


def test_every_opcode_answer() -> None:
    ann = pcp.encode_response(Response(Opcode.ANNOUNCE, 0, 0, 3))
    resp = pcp.decode_announce(ann)
    assert resp is not None and resp.epoch == 3
    peer = PeerData(MapData(NONCE, 17, 1, 2, EXT), 9, EXT)
    raw = pcp.encode_response(Response(Opcode.PEER, 0, 10, 4, peer.map, peer))
    resp2 = pcp.decode_response(raw)
    assert isinstance(resp2, Response) and resp2.peer == peer
    assert pcp.decode_announce(_answer()) is None
    assert pcp.decode_announce(b"\x00") is None


def test_wrong_nonce_and_other_mappings_are_ignored() -> None:
    parse = pcp.answer_parser(_map_req())
    assert parse(_answer(nonce=b"\xff" * 12)) is None
    assert parse(_answer(internal=4501)) is None
    assert parse(_answer(proto=Protocol.TCP)) is None
    assert parse(pcp.encode_response(Response(Opcode.ANNOUNCE, 0, 0, 1))) is None
    # An error answer that carries no MAP data cannot show our nonce: ignored too.
    header_only = pcp.encode_response(Response(Opcode.MAP, ResultCode.NOT_AUTHORIZED, 0, 1))
    assert parse(header_only) is None
    assert parse(_answer()) is not None


def test_natpmp_gateway_means_fall_back() -> None:
    natpmp_answer = struct.pack("!BBHI", 0, 128 + 2, 1, 77)  # opcode echoes our 2 + 128 bits
    resp = pcp.answer_parser(_map_req())(natpmp_answer)
    assert resp == NatPmpOnly(1)
    unsupp = pcp.encode_response(Response(Opcode.MAP, ResultCode.UNSUPP_VERSION, 0, 0))
    resp2 = pcp.answer_parser(_map_req())(unsupp)
    assert isinstance(resp2, Response) and resp2.result == ResultCode.UNSUPP_VERSION


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x02\x81\x00\x00",
        _answer()[:20],
        _answer() + b"\0\0",  # not a multiple of 4
        _answer() + b"\0" * 1100,  # too long
        bytes([2, 1]) + _answer()[2:],  # R bit clear
        bytes([3, 0x81, 0, 0]) + _answer()[4:],  # other version, not UNSUPP_VERSION
        bytes([2, 0x80 | 9]) + _answer()[2:],  # unknown opcode
        _answer()[:48],  # MAP data cut short on a success
        _answer() + bytes([1, 0, 0, 8, 0, 0, 0, 0]),  # option longer than the message
    ],
)
def test_malformed_answers_raise(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        pcp.decode_response(raw)


def test_malformed_request_raises() -> None:
    with pytest.raises(MalformedMessage):
        pcp.decode_request(b"\x02\x01\x00")
    with pytest.raises(MalformedMessage):
        pcp.decode_request(bytes([0]) + _map_req().encode()[1:])


def test_request_with_unknown_opcode_or_cut_data_raises_malformed() -> None:
    """Found by fuzzing (fuzz/ pcp target): an unknown opcode raised ValueError and a MAP or
    PEER request cut after the header raised struct.error, not MalformedMessage."""
    header = _map_req().encode()[:24]
    with pytest.raises(MalformedMessage, match="unknown opcode"):
        pcp.decode_request(bytes([2, 0x25]) + header[2:])
    with pytest.raises(MalformedMessage, match="too short"):
        pcp.decode_request(header)  # MAP opcode, no MAP data
    with pytest.raises(MalformedMessage, match="too short"):
        pcp.decode_request(bytes([2, Opcode.PEER]) + _map_req().encode()[2:])  # no peer data
