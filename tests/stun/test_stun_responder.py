"""The STUN server core: what it answers, what it drops, what it counts; nothing makes it raise."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from btmm_core.stun.message import (
    MAGIC_COOKIE,
    Attribute,
    ErrorCode,
    Message,
    MessageClass,
    Method,
    TransportAddress,
    binding_request,
    parse,
)
from btmm_core.stun.responder import DEFAULT_MAX_REQUEST, StunResponder

SRC4 = TransportAddress("198.51.100.7", 40123)
SRC6 = TransportAddress("2001:db8::7", 61000)
TXID = bytes(range(12))


def _answer(r: StunResponder, data: bytes, src: TransportAddress = SRC4) -> Message:
    out = r.receive(data, src, 0.0)
    assert out is not None
    m = parse(out)
    assert m.transaction_id == data[8:20] and m.fingerprint
    return m


def test_binding_request_gets_the_source_as_xor_mapped_address() -> None:
    r = StunResponder(software="btmm test")
    for src in (SRC4, SRC6):
        m = _answer(r, binding_request(TXID), src)
        assert (m.method, m.cls, m.xor_mapped) == (Method.BINDING, MessageClass.SUCCESS, src)
        assert m.software == "btmm test"
    # without FINGERPRINT or SOFTWARE too (section 7.3: FINGERPRINT is optional)
    assert _answer(r, binding_request(TXID, fingerprint=False)).xor_mapped == SRC4
    assert r.stats.as_dict() == {"answered": 3, "unknown": 0, "malformed": 0, "oversized": 0,
                                 "ignored": 0}


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    r = StunResponder()
    others = tuple(_a(t) for t in (0x0024, 0x8029, 0x7777, 0x0024))
    req = Message(Method.BINDING, MessageClass.REQUEST, TXID, others=others,
                  fingerprint=True).to_bytes()
    m = _answer(r, req)
    assert m.cls is MessageClass.ERROR and m.error is not None
    assert m.error.code == ErrorCode.UNKNOWN_ATTRIBUTE
    assert m.unknown_attributes == (0x0024, 0x7777)  # optional 0x8029 is not listed, no repeats
    assert r.stats.unknown == 1 and r.stats.answered == 0


def _a(t: int) -> Attribute:
    return Attribute(t, b"\0\0\0\0")


def test_rfc8489_attributes_without_credentials_are_understood() -> None:
    # USERNAME and MESSAGE-INTEGRITY: no credentials to check (a Binding needs none), no 420.
    req = Message(Method.BINDING, MessageClass.REQUEST, TXID,
                  others=(_a(0x0006), _a(0x0008))).to_bytes()
    assert _answer(StunResponder(), req).cls is MessageClass.SUCCESS


def test_bad_attributes_of_a_request_get_400_with_the_reason() -> None:
    r = StunResponder()
    body = struct.pack("!HH", 0x0020, 3) + b"\0\0\0\0"  # XOR-MAPPED-ADDRESS of 3 bytes
    req = struct.pack("!HHI", 0x0001, len(body), MAGIC_COOKIE) + TXID + body
    m = _answer(r, req)
    assert m.error is not None and m.error.code == ErrorCode.BAD_REQUEST
    assert "XOR-MAPPED-ADDRESS" in m.error.reason
    over = struct.pack("!HH", 0x8022, 40) + b"abcd"  # runs past the end
    m = _answer(r, struct.pack("!HHI", 0x0001, len(over), MAGIC_COOKIE) + TXID + over)
    assert m.error is not None and m.error.code == ErrorCode.BAD_REQUEST
    assert r.stats.malformed == 2


def test_another_method_gets_400() -> None:
    r = StunResponder()
    m = _answer(r, Message(0x003, MessageClass.REQUEST, TXID).to_bytes())
    assert (m.method, m.cls) == (0x003, MessageClass.ERROR)
    assert m.error is not None and m.error.code == ErrorCode.BAD_REQUEST


def test_dropped_silently() -> None:
    r = StunResponder()
    good = binding_request(TXID)
    for data in (
        b"",  # empty
        b"\x00\x00\x00\x00hello",  # a key-exchange control message
        b"\xff",  # a NAT keepalive
        b"GET / HTTP/1.1\r\n\r\n",
        Message(Method.BINDING, MessageClass.SUCCESS, TXID).to_bytes(),  # a response
        Message(Method.BINDING, MessageClass.ERROR, TXID).to_bytes(),
        Message(Method.BINDING, MessageClass.INDICATION, TXID).to_bytes(),
    ):
        assert r.receive(data, SRC4, 0.0) is None
    assert r.stats.ignored == 7
    for data in (
        good[:-1] + bytes([good[-1] ^ 0x80]),  # wrong FINGERPRINT: 7.3 says discard
        good + b"\0\0\0\0",  # length field does not match
        good[:-2],
    ):
        assert r.receive(data, SRC4, 0.0) is None
    assert r.stats.malformed == 3 and r.stats.answered == 0


def test_oversized_is_dropped_unread() -> None:
    r = StunResponder()
    pad = b"\x80\x30" + struct.pack("!H", DEFAULT_MAX_REQUEST) + b"\0" * DEFAULT_MAX_REQUEST
    big = struct.pack("!HHI", 0x0001, len(pad), MAGIC_COOKIE) + TXID + pad
    assert r.receive(big, SRC4, 0.0) is None
    assert r.receive(b"\0" * 65507, SRC4, 0.0) is None
    assert r.stats.oversized == 2
    # just under the limit is answered
    fill = DEFAULT_MAX_REQUEST - 20 - 4
    ok = struct.pack("!HH", 0x8030, fill)
    req = struct.pack("!HHI", 0x0001, fill + 4, MAGIC_COOKIE) + TXID + ok + b"\0" * fill
    assert len(req) == DEFAULT_MAX_REQUEST
    assert _answer(r, req).cls is MessageClass.SUCCESS


@settings(max_examples=500)
@given(st.binary(max_size=1400))
def test_never_raises_on_random_datagrams(data: bytes) -> None:
    StunResponder().receive(data, SRC4, 0.0)


@settings(max_examples=500)
@given(st.integers(0, 0x3FFF), st.binary(max_size=200))
def test_never_raises_on_stun_headers_with_random_attributes(t: int, body: bytes) -> None:
    body += b"\0" * (-len(body) % 4)
    r = StunResponder()
    out = r.receive(struct.pack("!HHI", t, len(body), MAGIC_COOKIE) + TXID + body, SRC6, 0.0)
    if out is not None:
        assert parse(out).transaction_id == TXID
    assert sum(r.stats.as_dict().values()) == 1
