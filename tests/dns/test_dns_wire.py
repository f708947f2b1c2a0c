"""The shared DNS layer: raw RR walking (dns/wire.py) and signing/checking (dns/tsig.py),
checked against dnspython's own parser and TSIG code."""

from __future__ import annotations

import struct
import time

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.update

from btmm_core.dns.tsig import (
    HMAC_SHA256,
    MAX_FUDGE,
    TsigError,
    TsigKey,
    expected_mac,
    record_of,
    sign,
    verify,
)
from btmm_core.dns.wire import after_questions, last_rr_offset, rrs, skip_name

ZONE = dns.name.from_text("bob.members.example.")
KEY = TsigKey(ZONE, HMAC_SHA256, bytes(range(32)), ZONE)
NOW = 1_700_000_000


def _answer() -> bytes:
    q = dns.message.make_query("laptop.bob.members.example.", "AAAA")
    r = dns.message.make_response(q)
    rrset = dns.rrset.from_text("laptop.bob.members.example.", 300, "IN", "AAAA", "fd00::1",
                                "fd00::2")
    r.answer.append(rrset)
    r.additional.append(dns.rrset.from_text("ns.bob.members.example.", 60, "IN", "A", "192.0.2.1"))
    return r.to_wire()  # names compressed: the answer's owner is a pointer to the question


def test_skip_name_follows_labels_and_stops_at_a_pointer() -> None:
    wire = _answer()
    assert skip_name(wire, 12) == 12 + len(ZONE.to_wire() or b"") + len(b"\x06laptop")
    p = after_questions(wire)
    assert wire[p] & 0xC0 == 0xC0
    assert skip_name(wire, p) == p + 2


def test_rrs_gives_raw_ttls_dnspython_cannot_keep() -> None:
    wire = bytearray(_answer())
    first = next(rrs(bytes(wire)))
    struct.pack_into("!I", wire, first.rdata - 6, 0xFFFFFFFF)
    headers = list(rrs(bytes(wire)))
    assert [h.ttl for h in headers] == [0xFFFFFFFF, 300, 60]
    assert [h.rdtype for h in headers] == [dns.rdatatype.AAAA] * 2 + [dns.rdatatype.A]
    assert headers[-1].end == len(wire)
    assert dns.message.from_wire(bytes(wire)).answer[0].ttl == 0


def test_last_rr_offset_finds_the_tsig_rr() -> None:
    plain = _answer()
    signed, _ = sign(plain, KEY, time_signed=NOW, fudge=MAX_FUDGE)
    assert last_rr_offset(signed) == len(plain)
    q = dns.message.make_query("bob.members.example.", "SOA", use_edns=False).to_wire()
    assert last_rr_offset(q) == len(q)


def test_sign_matches_dnspython_and_verifies() -> None:
    upd = dns.update.UpdateMessage(ZONE)
    upd.add("laptop", 300, "AAAA", "fd00::1")
    now = int(time.time())  # dnspython checks the time against its own clock
    signed, mac = sign(upd.to_wire(), KEY, time_signed=now, fudge=MAX_FUDGE)
    keyring = {KEY.name: dns.tsig.Key(KEY.name, KEY.secret, "hmac-sha256")}
    parsed = dns.message.from_wire(signed, keyring=keyring)  # raises unless the MAC is right
    rec = record_of(signed, parsed)
    assert rec.mac == mac and rec.start == len(upd.to_wire())
    assert expected_mac(KEY, signed, rec, request_mac=None) == mac
    verdict = verify(signed, rec, {KEY.name: KEY}.get, now=now, fudge=MAX_FUDGE)
    assert verdict.ok and verdict.error == TsigError.NOERROR


def test_an_answer_is_checked_against_its_request_mac() -> None:
    q = dns.message.make_query("bob.members.example.", "SOA", use_edns=False)
    _, request_mac = sign(q.to_wire(), KEY, time_signed=NOW, fudge=MAX_FUDGE)
    r = dns.message.make_response(q)
    answer, _ = sign(r.to_wire(), KEY, time_signed=NOW, fudge=MAX_FUDGE, request_mac=request_mac)
    rec = record_of(answer, dns.message.from_wire(answer, keyring=False))
    assert expected_mac(KEY, answer, rec, request_mac=request_mac) == rec.mac
    assert expected_mac(KEY, answer, rec, request_mac=bytes(32)) != rec.mac
    assert rec.original_id == q.id and rec.error == 0 and rec.fudge == MAX_FUDGE
    assert rec.key_name == KEY.name and rec.algorithm == HMAC_SHA256
