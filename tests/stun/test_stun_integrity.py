"""MESSAGE-INTEGRITY and FINGERPRINT against the test vectors of RFC 5769, and the TURN
attributes of RFC 8656 section 18 (stun/message.py)."""

from __future__ import annotations

import pytest

from btmm_core.errors import MalformedMessage
from btmm_core.stun.message import (
    Attribute,
    AttributeType,
    Fault,
    Message,
    MessageClass,
    Method,
    TransportAddress,
    TurnAttributeType,
    add_integrity,
    channel_attribute,
    check_integrity,
    data_attribute,
    lifetime_attribute,
    long_term_key,
    parse,
    text_attribute,
    transport_attribute,
    turn_attributes,
    xor_address_attribute,
)


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 2.1: a request with a short-term credential (the key is the password itself).
REQUEST = _hex("""
    00010058 2112a442 b7e7a701 bc34d686 fa87dfae 80220010 5354554e 20746573
    7420636c 69656e74 00240004 6e0001ff 80290008 932ff9b1 51263b36 00060009
    6576746a 3a683676 59202020 00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249
    c1b571a2 80280004 e57a3bcf""")
# RFC 5769 2.2: the IPv4 response to it.
RESPONSE = _hex("""
    0101003c 2112a442 b7e7a701 bc34d686 fa87dfae 8022000b 74657374 20766563
    746f7220 00200008 0001a147 e112a643 00080014 2b91f599 fd9e90c3 8c7489f9
    2af9ba53 f06be7d7 80280004 c07d4c96""")
SHORT_TERM = b"VOkJxbRl1RmTxUk/WvJxBt"
# RFC 5769 2.4: a request with a long-term credential (USERNAME, NONCE, REALM).
LONG_TERM = _hex("""
    00010060 2112a442 78ad3433 c6ad72c0 29da412e 00060012 e3839ee3 8388e383
    aae38383 e382afe3 82b90000 0015001c 662f2f34 39396b39 35346436 4f4c3334
    6f4c3946 53547679 36347341 0014000b 6578616d 706c652e 6f726700 00080014
    f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666""")


def test_rfc5769_short_term_request_and_response() -> None:
    req = parse(REQUEST)
    assert req.fingerprint and req.software == "STUN test client"
    assert check_integrity(REQUEST, SHORT_TERM)
    assert not check_integrity(REQUEST, b"wrong")
    resp = parse(RESPONSE)
    assert resp.fingerprint and resp.xor_mapped == TransportAddress("192.0.2.1", 32853)
    assert check_integrity(RESPONSE, SHORT_TERM)


def test_rfc5769_long_term_request() -> None:
    msg = parse(LONG_TERM)
    a = turn_attributes(msg)
    assert (a.username, a.realm, a.nonce) == ("マトリックス", "example.org",
                                              "f//499k954d6OL34oL9FSTvy64sA")
    assert a.integrity
    # The password after SASLprep is "TheMatrIX" (section 2.4).
    assert a.username is not None and a.realm is not None
    assert check_integrity(LONG_TERM, long_term_key(a.username, a.realm, "TheMatrIX"))
    assert not check_integrity(LONG_TERM, long_term_key(a.username, a.realm, "TheMatrix"))


def test_a_changed_byte_breaks_the_integrity() -> None:
    for i in (3, 9, 30, len(REQUEST) - 20):  # length, txid, an attribute, the MAC itself
        bad = bytearray(REQUEST[:-8])  # without FINGERPRINT, so only the HMAC can catch it
        bad[i] ^= 0x01
        assert not check_integrity(bytes(bad), SHORT_TERM), i
    assert not check_integrity(b"\x00" * 7, SHORT_TERM)
    assert not check_integrity(parse_free_request(), SHORT_TERM)  # none present


def parse_free_request() -> bytes:
    return Message(Method.BINDING, MessageClass.REQUEST, b"\x01" * 12).to_bytes()


@pytest.mark.parametrize("fingerprint", [True, False])
def test_add_integrity_round_trip(fingerprint: bool) -> None:
    txid = bytes(range(12))
    peer = TransportAddress("2001:db8::7", 4500)
    msg = Message(Method.CHANNEL_BIND, MessageClass.REQUEST, txid, others=(
        channel_attribute(0x4001),
        xor_address_attribute(TurnAttributeType.XOR_PEER_ADDRESS, peer, txid),
        text_attribute(AttributeType.USERNAME, "1800000000:alice"),
        text_attribute(AttributeType.REALM, "btmm.test"),
        text_attribute(AttributeType.NONCE, "abc"),
    )).to_bytes()
    key = long_term_key("1800000000:alice", "btmm.test", "pw")
    wire = add_integrity(msg, key, fingerprint=fingerprint)
    parsed = parse(wire)
    assert parsed.fingerprint is fingerprint
    assert check_integrity(wire, key)
    a = turn_attributes(parsed)
    assert a.channel == 0x4001 and a.peers == (peer,) and a.integrity


def test_turn_attributes_read_and_refuse() -> None:
    txid = b"\x07" * 12
    relayed = TransportAddress("203.0.113.5", 50000)
    msg = parse(Message(Method.ALLOCATE, MessageClass.SUCCESS, txid, others=(
        xor_address_attribute(TurnAttributeType.XOR_RELAYED_ADDRESS, relayed, txid),
        lifetime_attribute(600), transport_attribute(), data_attribute(b"\x01\x02\x03"),
    )).to_bytes())
    a = turn_attributes(msg)
    assert (a.relayed, a.lifetime, a.requested_transport, a.data) == (relayed, 600, 17,
                                                                      b"\x01\x02\x03")
    for t, value in ((TurnAttributeType.LIFETIME, b"\x00\x01"),
                     (TurnAttributeType.CHANNEL_NUMBER, b"\x40"),
                     (TurnAttributeType.XOR_PEER_ADDRESS, b"\x00\x01\x00"),
                     (TurnAttributeType.REQUESTED_TRANSPORT, b"\x11"),
                     (AttributeType.NONCE, b"\xff\xfe")):
        bad = parse(Message(Method.ALLOCATE, MessageClass.SUCCESS, txid,
                            others=(Attribute(t, value),)).to_bytes())
        with pytest.raises(MalformedMessage) as e:
            turn_attributes(bad)
        assert e.value.reason is Fault.BAD_ATTRIBUTE


def test_the_binding_responder_still_refuses_turn_attributes() -> None:
    # TURN attributes are comprehension-required and unknown to a Binding server (a 420).
    msg = parse(Message(Method.BINDING, MessageClass.REQUEST, b"\x02" * 12,
                        others=(lifetime_attribute(1),)).to_bytes())
    assert msg.unknown_required() == (TurnAttributeType.LIFETIME,)
