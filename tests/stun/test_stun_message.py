"""The STUN codec (RFC 8489) against the RFC 5769 test vectors, round trips, and every fault."""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btmm_core.errors import MalformedMessage
from btmm_core.stun.message import (
    MAGIC_COOKIE,
    Attribute,
    AttributeType,
    ErrorAttribute,
    ErrorCode,
    Fault,
    Message,
    MessageClass,
    Method,
    TransportAddress,
    binding_request,
    binding_success,
    error_response,
    looks_like_stun,
    parse,
    parse_header,
)


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769, section 2, as the RFC prints them. Their FINGERPRINTs are CRC-32s we compute
# independently, so a vector that parses (FINGERPRINT checked) was copied right.
TXID = _hex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
SAMPLE_REQUEST = _hex("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf""")
SAMPLE_IPV4_RESPONSE = _hex("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96""")
SAMPLE_IPV6_RESPONSE = _hex("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c""")


def test_rfc5769_sample_request() -> None:
    m = parse(SAMPLE_REQUEST)
    assert (m.method, m.cls, m.transaction_id) == (Method.BINDING, MessageClass.REQUEST, TXID)
    assert m.software == "STUN test client" and m.fingerprint
    # PRIORITY (ICE) is comprehension-required and unknown here; ICE-CONTROLLED is optional;
    # USERNAME and MESSAGE-INTEGRITY are RFC 8489's own.
    assert [a.type for a in m.others] == [0x0024, 0x8029, AttributeType.USERNAME,
                                          AttributeType.MESSAGE_INTEGRITY]
    assert m.others[2].value == b"evtj:h6vY"  # its padding (spaces) is not part of it
    assert m.unknown_required() == (0x0024,)
    assert looks_like_stun(SAMPLE_REQUEST)


@pytest.mark.parametrize(("wire", "host"), [
    (SAMPLE_IPV4_RESPONSE, "192.0.2.1"),
    (SAMPLE_IPV6_RESPONSE, "2001:db8:1234:5678:11:2233:4455:6677"),
])
def test_rfc5769_sample_responses(wire: bytes, host: str) -> None:
    m = parse(wire)
    assert m.cls is MessageClass.SUCCESS and m.transaction_id == TXID
    assert m.xor_mapped == TransportAddress(host, 32853)
    assert m.software == "test vector" and m.fingerprint
    assert m.unknown_required() == ()


def test_the_header_interleaves_method_and_class() -> None:
    # RFC 8489 section 5: Binding request 0x0001, success 0x0101, error 0x0111.
    t = b"\x00" * 12
    assert binding_request(t, fingerprint=False)[:2] == b"\x00\x01"
    assert binding_success(t, TransportAddress("10.0.0.1", 1))[:2] == b"\x01\x01"
    assert error_response(Method.BINDING, t, ErrorCode.BAD_REQUEST, "x")[:2] == b"\x01\x11"
    for method in (0x001, 0x003, 0xABC, 0xFFF):
        for cls in MessageClass:
            h = parse_header(Message(method, cls, t).to_bytes())
            assert (h.method, h.cls) == (method, cls)


def test_fingerprint_is_crc32_xor_stun() -> None:
    wire = binding_request(b"\x07" * 12)
    assert wire[-8:-4] == struct.pack("!HH", AttributeType.FINGERPRINT, 4)
    crc = (zlib.crc32(wire[:-8]) ^ 0x5354554E) & 0xFFFFFFFF
    assert wire[-4:] == struct.pack("!I", crc)
    assert struct.unpack_from("!H", wire, 2)[0] == len(wire) - 20


def test_xor_mapped_address_bytes() -> None:
    # RFC 8489 14.2: port ^ 0x2112, IPv4 ^ cookie.
    wire = binding_success(b"\x00" * 12, TransportAddress("192.0.2.1", 32853))
    assert wire[20:32] == _hex("00 20 00 08 00 01 a1 47 e1 12 a6 43")


addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)
).flatmap(lambda h: st.integers(0, 65535).map(lambda p: TransportAddress(h, p)))
txids = st.binary(min_size=12, max_size=12)
texts = st.text(max_size=40)


@given(txid=txids, mapped=addresses, software=st.none() | texts)
def test_success_round_trip(txid: bytes, mapped: TransportAddress, software: str | None) -> None:
    m = parse(binding_success(txid, mapped, software=software))
    assert m == Message(Method.BINDING, MessageClass.SUCCESS, txid, xor_mapped=mapped,
                        software=software, fingerprint=True)


@given(txid=txids, code=st.integers(300, 699), reason=texts,
       unknown=st.lists(st.integers(0, 0x7FFF), max_size=5).map(tuple),
       others=st.lists(st.builds(Attribute, st.integers(0x8030, 0xFFFF), st.binary(max_size=9)),
                       max_size=3).map(tuple),
       mapped=st.none() | addresses, fingerprint=st.booleans())
def test_any_message_round_trips(txid: bytes, code: int, reason: str, unknown: tuple[int, ...],
                                 others: tuple[Attribute, ...], mapped: TransportAddress | None,
                                 fingerprint: bool) -> None:
    m = Message(Method.BINDING, MessageClass.ERROR, txid, mapped=mapped,
                error=ErrorAttribute(code, reason), unknown_attributes=unknown, others=others,
                fingerprint=fingerprint)
    wire = m.to_bytes()
    assert looks_like_stun(wire)
    assert parse(wire) == m


def _msg(*attrs: bytes, txid: bytes = b"\x01" * 12, cls: int = 0x0001) -> bytes:
    body = b"".join(attrs)
    return struct.pack("!HHI", cls, len(body), MAGIC_COOKIE) + txid + body


def _attr(t: int, value: bytes) -> bytes:
    return struct.pack("!HH", t, len(value)) + value + b"\0" * (-len(value) % 4)


GOOD = binding_request(b"\x02" * 12, software="btmm test")


@pytest.mark.parametrize(("wire", "fault"), [
    (b"", Fault.TRUNCATED),
    (GOOD[:19], Fault.TRUNCATED),
    (b"\x80" + GOOD[1:], Fault.NOT_STUN),
    (b"\x40" + GOOD[1:], Fault.NOT_STUN),
    (GOOD[:4] + b"\x21\x12\xa4\x43" + GOOD[8:], Fault.BAD_COOKIE),
    (GOOD[:4] + b"\x00\x00\x00\x00" + GOOD[8:], Fault.BAD_COOKIE),  # RFC 3489: no cookie
    (GOOD + b"\0\0\0\0", Fault.BAD_LENGTH),  # length field no longer matches
    (GOOD[:-4], Fault.BAD_LENGTH),  # truncated
    (GOOD[:2] + b"\x00\x05" + GOOD[4:25], Fault.BAD_LENGTH),  # not a multiple of 4
    (_msg(b"\x80\x22\x00\x08abcd"), Fault.ATTRIBUTE_OVERRUN),  # value runs past the end
    (_msg(b"\x80\x22\x00\x00", b"\x00\x20\x00\x09"), Fault.ATTRIBUTE_OVERRUN),
    (_msg(_attr(0x0020, b"\x00\x01\x00")), Fault.BAD_ATTRIBUTE),  # XOR-MAPPED too short
    (_msg(_attr(0x0020, b"\x00\x03" + b"\0" * 6)), Fault.BAD_ATTRIBUTE),  # family 3
    (_msg(_attr(0x0020, b"\x00\x02" + b"\0" * 6)), Fault.BAD_ATTRIBUTE),  # IPv6, 4 bytes
    (_msg(_attr(0x0001, b"\x00\x01" + b"\0" * 18)), Fault.BAD_ATTRIBUTE),  # IPv4, 16 bytes
    (_msg(_attr(0x0009, b"\x00\x00\x02\x00")), Fault.BAD_ATTRIBUTE),  # class 2
    (_msg(_attr(0x0009, b"\x00\x00\x04\x64")), Fault.BAD_ATTRIBUTE),  # number 100
    (_msg(_attr(0x0009, b"\x00\x00\x04")), Fault.BAD_ATTRIBUTE),  # too short
    (_msg(_attr(0x000A, b"\x00\x01\x00")), Fault.BAD_ATTRIBUTE),  # odd UNKNOWN-ATTRIBUTES
    (_msg(_attr(0x8022, b"\xff\xfe")), Fault.BAD_ATTRIBUTE),  # SOFTWARE not UTF-8
    (_msg(_attr(0x8022, b"a" * 764)), Fault.BAD_ATTRIBUTE),  # SOFTWARE too long
    (_msg(_attr(0x8028, b"\0" * 8)), Fault.BAD_ATTRIBUTE),  # FINGERPRINT of 8 bytes
    (GOOD[:-1] + bytes([GOOD[-1] ^ 1]), Fault.BAD_FINGERPRINT),
    (GOOD[:24] + b"X" + GOOD[25:], Fault.BAD_FINGERPRINT),  # a byte the CRC covers
])
def test_malformed(wire: bytes, fault: Fault) -> None:
    with pytest.raises(MalformedMessage) as info:
        parse(wire)
    assert info.value.reason is fault, info.value.what
    assert info.value.what.startswith("STUN: ")


def test_an_attribute_after_fingerprint_is_malformed() -> None:
    body = _attr(0x8022, b"x")
    head = struct.pack("!HHI", 1, len(body) + 8 + 8, MAGIC_COOKIE) + b"\x01" * 12 + body
    crc = (zlib.crc32(head) ^ 0x5354554E) & 0xFFFFFFFF
    wire = head + _attr(0x8028, struct.pack("!I", crc)) + _attr(0x8023, b"abcd")
    with pytest.raises(MalformedMessage) as info:
        parse(wire)
    assert info.value.reason is Fault.AFTER_FINGERPRINT


def test_padding_bytes_are_ignored_and_only_the_first_attribute_counts() -> None:
    a = TransportAddress("10.1.2.3", 4000)
    first = binding_success(b"\x03" * 12, a, software=None)[20:32]  # XOR-MAPPED-ADDRESS
    second = binding_success(b"\x03" * 12, TransportAddress("10.9.9.9", 1))[20:32]
    wire = _msg(first, second, b"\x80\x22\x00\x01zXYZ", txid=b"\x03" * 12, cls=0x0101)
    m = parse(wire)
    assert m.xor_mapped == a and m.software == "z"


def test_attributes_after_message_integrity_are_not_interpreted() -> None:
    xm = binding_success(b"\x03" * 12, TransportAddress("10.1.2.3", 4000))[20:32]
    wire = _msg(_attr(0x0008, b"\0" * 20), xm, _attr(0x0024, b"\0" * 4), txid=b"\x03" * 12)
    m = parse(wire)
    assert m.xor_mapped is None and m.unknown_required() == ()


def test_builders_refuse_what_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        binding_request(b"short")
    with pytest.raises(ValueError, match=r"300\.\.699"):
        error_response(1, b"\0" * 12, 299, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SOFTWARE"):
        binding_request(b"\0" * 12, software="é" * 400)


@pytest.mark.parametrize(("data", "expected"), [
    (GOOD, True),
    (SAMPLE_IPV6_RESPONSE, True),
    (b"\x00\x00\x00\x00" + b"\x01" * 40, False),  # the non-ESP marker of a control message
    (b"\xff", False),  # a NAT keepalive
    (b"\x00\x00\x01\x00" + GOOD[4:], False),  # length field 256 does not match
    (GOOD[:2] + b"\x00\x04" + GOOD[4:20] + b"\0\0", False),  # length 4, 2 bytes follow
    (GOOD[:2] + b"\x00\x02" + GOOD[4:20] + b"\0\0", False),  # length not a multiple of 4
    (b"\x80" + GOOD[1:], False),
])
def test_looks_like_stun(data: bytes, expected: bool) -> None:
    assert looks_like_stun(data) is expected


@settings(max_examples=400)
@given(st.binary(max_size=120))
def test_parse_raises_only_malformed_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        parse(data)


@settings(max_examples=400)
@given(st.binary(max_size=100), txids)
def test_parse_raises_only_malformed_on_random_attributes(body: bytes, txid: bytes) -> None:
    body += b"\0" * (-len(body) % 4)  # past the header checks, into the attribute walk
    try:
        m = parse(struct.pack("!HHI", 0x0101, len(body), MAGIC_COOKIE) + txid + body)
    except MalformedMessage:
        return
    assert m.transaction_id == txid


def test_error_code_text() -> None:
    m = parse(error_response(Method.BINDING, b"\0" * 12, ErrorCode.UNKNOWN_ATTRIBUTE,
                             "Unknown Attribute", unknown=(0x0024, 0x7777)))
    assert str(m.error) == "420 Unknown Attribute"
    assert m.unknown_attributes == (0x0024, 0x7777)
    assert m.error is not None and m.error.code == ErrorCode.UNKNOWN_ATTRIBUTE
