"""Address classes, the diagnoses in words, the ICMP error parser and the lab's STUN answers."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from btmm_core.lab.nat import stun_answer
from btmm_core.portmap.addresses import AddressKind, classify, is_behind_nat
from btmm_core.portmap.diagnosis import (
    Attempt,
    Outcome,
    Verdict,
    diagnose_external,
    diagnose_failure,
    diagnose_host,
)
from btmm_core.portmap.hops import (
    ICMP_TIME_EXCEEDED,
    SO_EE_ORIGIN_ICMP,
    parse_extended_error,
)


@pytest.mark.parametrize(
    ("addr", "kind"),
    [
        ("10.1.2.3", AddressKind.PRIVATE),
        ("172.16.0.1", AddressKind.PRIVATE),
        ("172.31.255.255", AddressKind.PRIVATE),
        ("172.32.0.1", AddressKind.PUBLIC),
        ("192.168.1.1", AddressKind.PRIVATE),
        ("100.64.0.1", AddressKind.SHARED),
        ("100.127.255.254", AddressKind.SHARED),
        ("100.128.0.1", AddressKind.PUBLIC),
        ("127.0.0.1", AddressKind.LOCAL),
        ("169.254.3.4", AddressKind.LOCAL),
        ("224.0.0.1", AddressKind.LOCAL),
        ("203.0.113.2", AddressKind.PUBLIC),  # documentation space is the lab's internet
        ("198.51.100.1", AddressKind.PUBLIC),
        ("192.0.2.1", AddressKind.PUBLIC),
    ],
)
def test_classify(addr: str, kind: AddressKind) -> None:
    assert classify(addr) is kind
    assert is_behind_nat(addr) is (kind is not AddressKind.PUBLIC)


def test_host_diagnoses() -> None:
    d = diagnose_host(None, None)
    assert d is not None and d.verdict is Verdict.NO_GATEWAY
    d = diagnose_host("203.0.113.5", "203.0.113.1")
    assert d is not None and d.verdict is Verdict.NO_NAT and "203.0.113.5" in d.text
    assert diagnose_host("192.168.1.5", "192.168.1.1") is None


@pytest.mark.parametrize("ext", ["10.0.0.2", "100.64.3.4", "192.168.0.9"])
def test_double_nat_from_external_address(ext: str) -> None:
    d = diagnose_external(ipaddress.IPv4Address(ext))
    assert d is not None and d.verdict is Verdict.DOUBLE_NAT and ext in d.text


def test_public_external_address_is_fine() -> None:
    assert diagnose_external(ipaddress.IPv4Address("203.0.113.9")) is None
    assert diagnose_external(ipaddress.IPv6Address("2001:db8::1")) is None


def test_failure_diagnoses() -> None:
    refused = diagnose_failure([Attempt("pcp", Outcome.REFUSED, "PCP not authorized")])
    assert refused.verdict is Verdict.REFUSED and "not authorized" in refused.text
    none = diagnose_failure([Attempt("pcp", Outcome.NO_ANSWER, "nothing listens"),
                             Attempt("natpmp", Outcome.NOT_TRIED),
                             Attempt("upnp", Outcome.NO_ANSWER, "no IGD")])
    assert none.verdict is Verdict.NO_PROTOCOL
    assert "pcp: no answer" in none.text and "upnp: no answer" in none.text
    assert "natpmp" not in none.text


def _ee(origin: int, icmp_type: int, offender: str | None) -> bytes:
    raw = struct.pack("=IBBBBII", 113, origin, icmp_type, 0, 0, 0, 0)
    if offender is not None:
        raw += struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(offender))
    return raw


def test_parse_extended_error() -> None:
    err = parse_extended_error(_ee(SO_EE_ORIGIN_ICMP, ICMP_TIME_EXCEEDED, "100.64.0.1"))
    assert err is not None
    assert (err.origin, err.icmp_type, err.offender) == (2, 11, "100.64.0.1")
    bare = parse_extended_error(_ee(SO_EE_ORIGIN_ICMP, 3, None))
    assert bare is not None and bare.offender is None
    assert parse_extended_error(b"\0" * 8) is None


def _stun_request(flags: int, cookie: int = 0x2112A442) -> bytes:
    attr = struct.pack("!HHI", 0x0003, 4, flags)
    return struct.pack("!HHI", 0x0001, len(attr), cookie) + b"T" * 12 + attr


def test_stun_answer_reports_source_and_change_flags() -> None:
    out = stun_answer(_stun_request(0x6), ("203.0.113.2", 40000))
    assert out is not None
    msg, change_ip, change_port = out
    assert change_ip and change_port
    assert msg[:2] == b"\x01\x01" and msg[8:20] == b"T" * 12
    # MAPPED-ADDRESS then XOR-MAPPED-ADDRESS
    assert msg[20:24] == struct.pack("!HH", 1, 8)
    assert struct.unpack("!H", msg[26:28])[0] == 40000 and msg[28:32] == bytes([203, 0, 113, 2])
    xport = struct.unpack("!H", msg[38:40])[0] ^ 0x2112
    assert xport == 40000
    plain = stun_answer(_stun_request(0), ("203.0.113.2", 1))
    assert plain is not None and plain[1:] == (False, False)
    assert stun_answer(b"\x01\x01" + b"\0" * 18, ("1.2.3.4", 1)) is None
    assert stun_answer(b"short", ("1.2.3.4", 1)) is None
