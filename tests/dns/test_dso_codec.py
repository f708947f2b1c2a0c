"""DSO framing (RFC 8490 sections 5.4, 7, 8.1) and the DNS Push TLVs (RFC 8765 section 6),
checked byte for byte against the layouts the RFCs draw (they give figures, not hex examples),
and every malformed form refused."""

from __future__ import annotations

import struct

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from btmm_core.dns.dso import (
    TLV,
    DSOMessage,
    DSOType,
    Keepalive,
    Kind,
    Rcode,
    RetryDelay,
    is_dso,
    padding,
)
from btmm_core.dns.push import (
    ANY,
    REMOVE_COLLECTIVE,
    REMOVE_RR,
    Change,
    Reconfirm,
    Subscribe,
    Unsubscribe,
    parse_push,
    push_tlv,
)
from btmm_core.errors import DSOError

NAME = dns.name.from_text("laptop.bob.members.example.")
AAAA = dns.rdata.from_text("IN", "AAAA", "fd00::1")


def header(msg_id: int, qr: bool, rcode: int = 0, counts: tuple[int, ...] = (0, 0, 0, 0)) -> bytes:
    return struct.pack("!HH4H", msg_id, (0x8000 if qr else 0) | 6 << 11 | rcode, *counts)


# ---- RFC 8490 framing ------------------------------------------------------------------------


def test_keepalive_request_matches_the_rfc_layout() -> None:
    # 5.4: header with OPCODE 6 and zero counts; 7.1: TYPE 1, LENGTH 8, two 32-bit timeouts.
    wire = DSOMessage(0x1234, (Keepalive(15_000, 3_600_000).tlv(),)).to_bytes()
    assert wire == header(0x1234, False) + bytes.fromhex("0001 0008 00003a98 0036ee80")
    msg = DSOMessage.parse(wire)
    assert msg.kind == Kind.REQUEST and msg.primary is not None
    assert Keepalive.from_tlv(msg.primary) == Keepalive(15_000, 3_600_000)
    assert is_dso(wire)


def test_kinds_follow_qr_and_message_id() -> None:
    # 8.1: QR=0 id!=0 request, QR=0 id=0 unidirectional, QR=1 id!=0 response, QR=1 id=0 fatal.
    assert DSOMessage.parse(header(0, False) + RetryDelay(5).tlv().to_bytes()).kind == (
        Kind.UNIDIRECTIONAL
    )
    assert DSOMessage.parse(header(7, True, Rcode.DSOTYPENI)).kind == Kind.RESPONSE
    with pytest.raises(DSOError) as e:
        DSOMessage.parse(header(0, True))
    assert e.value.rcode is None


def test_retry_delay_and_padding() -> None:
    assert RetryDelay(300_000).tlv().to_bytes() == bytes.fromhex("0002 0004 000493e0")
    assert RetryDelay.from_tlv(TLV(DSOType.RETRY_DELAY, b"\0\0\0\5")) == RetryDelay(5)
    assert padding(0).to_bytes() == bytes.fromhex("0003 0000")
    assert padding(3).to_bytes() == bytes.fromhex("0003 0003 000000")
    # any padding bytes are accepted
    msg = DSOMessage.parse(header(1, True) + bytes.fromhex("0003 0002 abcd"))
    assert msg.tlvs == (TLV(DSOType.ENCRYPTION_PADDING, b"\xab\xcd"),)


@pytest.mark.parametrize(
    ("tlv", "parse"),
    [
        (TLV(DSOType.KEEPALIVE, bytes(7)), Keepalive.from_tlv),
        (TLV(DSOType.KEEPALIVE, bytes(9)), Keepalive.from_tlv),
        (TLV(DSOType.RETRY_DELAY, bytes(3)), RetryDelay.from_tlv),
        (TLV(DSOType.RETRY_DELAY, bytes(5)), RetryDelay.from_tlv),
    ],
)
def test_base_tlvs_of_the_wrong_length_are_refused(tlv: TLV, parse: object) -> None:
    with pytest.raises(DSOError):
        parse(tlv)  # type: ignore[operator]


def test_nonzero_counts_are_formerr_for_a_request_and_fatal_otherwise() -> None:
    tlv = Keepalive(0, 10_000).tlv().to_bytes()
    with pytest.raises(DSOError) as e:
        DSOMessage.parse(header(9, False, counts=(1, 0, 0, 0)) + tlv)
    assert e.value.rcode == Rcode.FORMERR and e.value.msg_id == 9
    with pytest.raises(DSOError) as e:
        DSOMessage.parse(header(0, False, counts=(0, 0, 0, 1)) + tlv)
    assert e.value.rcode is None


@pytest.mark.parametrize(
    "wire",
    [
        header(1, False)[:11],  # shorter than a header
        header(1, False),  # a request without a Primary TLV
        header(1, False) + b"\x00\x01\x00",  # truncated TLV header
        header(1, False) + bytes.fromhex("0001 0008 0000"),  # TLV longer than the message
        struct.pack("!HH4H", 1, 0, 0, 0, 0, 0) + Keepalive(0, 0).tlv().to_bytes(),  # OPCODE 0
    ],
)
def test_malformed_messages_are_fatal(wire: bytes) -> None:
    with pytest.raises(DSOError) as e:
        DSOMessage.parse(wire)
    assert e.value.rcode is None


def test_builder_refuses_what_the_rfc_forbids() -> None:
    with pytest.raises(ValueError):
        DSOMessage(0, (), response=True).to_bytes()  # response with id 0
    with pytest.raises(ValueError):
        DSOMessage(1, ()).to_bytes()  # request without primary
    with pytest.raises(ValueError):
        TLV(DSOType.PUSH, bytes(0x10000)).to_bytes()


def test_unknown_tlvs_parse_as_opaque() -> None:
    msg = DSOMessage.parse(header(3, False) + bytes.fromhex("f00d 0001 ff"))
    assert msg.primary == TLV(0xF00D, b"\xff")


# ---- RFC 8765 TLVs ---------------------------------------------------------------------------


def test_subscribe_layout_and_round_trip() -> None:
    # 6.2.1 Figure 1: NAME (uncompressed), TYPE, CLASS after TYPE 0x40 and LENGTH.
    sub = Subscribe(NAME, dns.rdatatype.AAAA)
    body = NAME.to_wire() + b"\x00\x1c\x00\x01"
    assert sub.tlv().to_bytes() == struct.pack("!HH", 0x40, len(body)) + body
    assert Subscribe.from_tlv(sub.tlv()) == sub


def test_subscribe_any_matches_all_types_and_names_case_insensitively() -> None:
    sub = Subscribe(NAME, ANY, ANY)
    assert sub.matches(dns.name.from_text("LAPTOP.bob.members.example."), 16, 1)
    assert not Subscribe(NAME, dns.rdatatype.AAAA).matches(NAME, dns.rdatatype.TXT, 1)


@pytest.mark.parametrize(
    "data",
    [
        NAME.to_wire() + b"\x00\x1c",  # CLASS missing
        NAME.to_wire() + b"\x00\x1c\x00\x01\x00",  # a byte too many
        b"\x06laptop\xc0\x0c\x00\x1c\x00\x01",  # compressed name
        b"\x3flaptop",  # label runs past the data
    ],
)
def test_malformed_subscribe_is_refused(data: bytes) -> None:
    with pytest.raises(DSOError):
        Subscribe.from_tlv(TLV(DSOType.SUBSCRIBE, data))


def test_unsubscribe_is_two_bytes_of_message_id() -> None:
    # 6.4.1 Figure 4: LENGTH 2, the SUBSCRIBE's MESSAGE ID.
    assert Unsubscribe(0xBEEF).tlv().to_bytes() == bytes.fromhex("0042 0002 beef")
    for bad in (b"\x01", b"\x00\x01\x02"):
        with pytest.raises(DSOError):
            Unsubscribe.from_tlv(TLV(DSOType.UNSUBSCRIBE, bad))


def test_reconfirm_has_no_rdlen_and_refuses_any() -> None:
    # 6.5.1 Figure 5: NAME, TYPE, CLASS, RDATA (its length from DSO-LENGTH).
    r = Reconfirm(NAME, dns.rdatatype.AAAA, dns.rdataclass.IN, AAAA)
    assert r.tlv().data == NAME.to_wire() + b"\x00\x1c\x00\x01" + AAAA.to_wire()
    assert Reconfirm.from_tlv(r.tlv()) == r
    with pytest.raises(DSOError):
        Reconfirm.from_tlv(TLV(DSOType.RECONFIRM, NAME.to_wire() + b"\x00\xff\x00\x01"))
    with pytest.raises(DSOError):  # 15 bytes of AAAA rdata
        Reconfirm.from_tlv(TLV(DSOType.RECONFIRM, r.tlv().data[:-1]))


def push_message(notifications: bytes) -> bytes:
    return DSOMessage(0, (push_tlv(notifications),)).to_bytes()


def parsed(wire: bytes) -> list[Change]:
    msg = DSOMessage.parse(wire)
    assert msg.primary is not None
    return parse_push(wire, msg.primary)


def test_push_ttl_conventions_round_trip() -> None:
    # 6.3.1: add (TTL <= 0x7FFFFFFF), remove one RR (0xFFFFFFFF), remove collectively
    # (0xFFFFFFFE, RDLEN 0): an RRset, all RRsets of a class (TYPE ANY), everything (CLASS ANY).
    changes = [
        Change.add(NAME, AAAA, 60),
        Change.remove(NAME, AAAA),
        Change.remove_rrset(NAME, dns.rdatatype.AAAA),
        Change(NAME, ANY, dns.rdataclass.IN, REMOVE_COLLECTIVE),
        Change.remove_name(NAME),
    ]
    wire = push_message(b"".join(c.to_bytes() for c in changes))
    assert parsed(wire) == changes
    # the removal of one RR as drawn in Figure 3
    assert Change.remove(NAME, AAAA).to_bytes() == (
        NAME.to_wire() + struct.pack("!HHIH", 28, 1, REMOVE_RR, 16) + AAAA.to_wire()
    )
    assert Change.remove_name(NAME).to_bytes() == NAME.to_wire() + struct.pack(
        "!HHIH", 0, 255, 0xFFFFFFFE, 0
    )


def test_push_with_compressed_owner_names_is_read() -> None:
    # 6.3.1 asks servers to compress against the start of the message: clients must read it.
    first = Change.add(NAME, AAAA, 60).to_bytes()
    pointer = struct.pack("!H", 0xC000 | 16)  # the first name starts after header and TLV header
    second = pointer + struct.pack("!HHIH", 28, 1, 60, 16) + bytes(16)
    changes = parsed(push_message(first + second))
    assert [c.name for c in changes] == [NAME, NAME]


def test_push_notification_with_a_meaningless_ttl_is_skipped() -> None:
    odd = NAME.to_wire() + struct.pack("!HHIH", 28, 1, 0x80000000, 16) + AAAA.to_wire()
    assert parsed(push_message(odd + Change.add(NAME, AAAA, 5).to_bytes())) == [
        Change.add(NAME, AAAA, 5)
    ]


@pytest.mark.parametrize(
    "notification",
    [
        NAME.to_wire() + struct.pack("!HHIH", 255, 1, 60, 0),  # add with TYPE ANY
        NAME.to_wire() + struct.pack("!HHIH", 28, 255, REMOVE_RR, 0),  # remove with CLASS ANY
        NAME.to_wire() + struct.pack("!HHIH", 28, 1, REMOVE_COLLECTIVE, 1) + b"\0",  # RDATA
        NAME.to_wire() + struct.pack("!HHI", 28, 1, 60),  # truncated
        NAME.to_wire() + struct.pack("!HHIH", 28, 1, 60, 17) + bytes(16),  # RDLEN past the end
        NAME.to_wire() + struct.pack("!HHIH", 28, 1, 60, 15) + bytes(15),  # bad AAAA
    ],
)
def test_malformed_push_is_fatal(notification: bytes) -> None:
    with pytest.raises(DSOError):
        parsed(push_message(notification))


def test_empty_or_oversized_push_is_fatal() -> None:
    with pytest.raises(DSOError):
        parsed(header(0, False) + bytes.fromhex("0041 0000"))
    many = Change.add(NAME, AAAA, 1).to_bytes() * 400  # 400 x 54 bytes > 16,382
    with pytest.raises(DSOError):
        parsed(push_message(many))
