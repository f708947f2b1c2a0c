"""Unsigned readers of a user zone (issue 16): the SOA of any name inside a zone, TTLs no
longer than the lease, and the per-zone opt-in that lets DNS-SD clients browse unsigned."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.update
import pytest
from registry_helpers import ask, make_core, sign

from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.dns.llq_option import LLQError, LLQOpcode, LLQOption
from btmm_core.llq.server import LLQConfig, LLQServer
from btmm_core.registry.handler import Policy, Transport

NOW = 1_800_000_000.0
BOB = "bob.members.example."
ALICE = "alice.members.example."


def signed(core, accounts, msg, user="bob", now=NOW):  # type: ignore[no-untyped-def]
    return ask(core, sign(msg, accounts[user].key, int(now)), now)


def unsigned(core, name: str, rdtype: str):  # type: ignore[no-untyped-def]
    return ask(core, dns.message.make_query(name, rdtype).to_wire(), NOW)


def publish_ssh(core, accounts, zone: str = BOB, user: str = "bob") -> None:  # type: ignore[no-untyped-def]
    u = dns.update.UpdateMessage(zone)
    u.add("_ssh._tcp", 60, "PTR", "laptop._ssh._tcp." + zone)
    u.add("_services._dns-sd._udp", 60, "PTR", "_ssh._tcp." + zone)
    u.add("b._dns-sd._udp", 60, "PTR", zone)
    u.add("lb._dns-sd._udp", 60, "PTR", zone)
    u.add("laptop._ssh._tcp", 60, "SRV", "0 0 22 laptop." + zone)
    u.add("laptop._ssh._tcp", 60, "TXT", '"u=bob"')
    u.add("_sftp._sub._ssh._tcp", 60, "PTR", "laptop._ssh._tcp." + zone)
    u.add("laptop", 60, "AAAA", "fd00::1")
    u.add("_autotunnel._udp", 60, "PTR", "laptop." + zone)
    u.add("_autotunnel._udp.laptop", 60, "SRV", "0 0 4500 AutoTunnel-00." + zone)
    u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(3600)])
    assert signed(core, accounts, u, user=user).rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("name", ["laptop." + BOB, "nohost." + BOB, "a.b.c." + BOB])
def test_unsigned_soa_inside_a_zone_is_noerror_with_the_apex_soa(name: str) -> None:
    core, acc = make_core()
    u = dns.update.UpdateMessage(BOB)
    u.add("laptop", 60, "AAAA", "fd00::1")
    assert signed(core, acc, u).rcode() == dns.rcode.NOERROR
    r = unsigned(core, name, "SOA")
    # the same answer whether the name exists or not: nothing is revealed
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert not r.answer
    (soa,) = r.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name == dns.name.from_text(BOB)
    # other types stay refused
    assert unsigned(core, name, "AAAA").rcode() == dns.rcode.REFUSED


def test_signed_soa_below_the_apex_still_tells_nxdomain() -> None:
    core, acc = make_core()
    r = signed(core, acc, dns.message.make_query("nohost." + BOB, "SOA"))
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == dns.rdatatype.SOA


@pytest.mark.parametrize(("asked_ttl", "lease", "ttl"), [(60, 1800, 60), (7200, 1800, 1800)])
def test_ttl_is_never_longer_than_the_granted_lease(asked_ttl: int, lease: int, ttl: int) -> None:
    core, acc = make_core(policy=Policy(lease_min=1800, lease_max=1800))
    u = dns.update.UpdateMessage(BOB)
    u.add("laptop", asked_ttl, "AAAA", "fd00::1")
    u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(lease)])
    assert signed(core, acc, u).rcode() == dns.rcode.NOERROR
    r = signed(core, acc, dns.message.make_query("laptop." + BOB, "AAAA"), now=NOW + 1)
    assert r.answer[0].ttl == ttl


def test_browse_records_stay_private_by_default() -> None:
    core, acc = make_core()
    publish_ssh(core, acc)
    for name, rdtype in (("_ssh._tcp." + BOB, "PTR"), ("laptop._ssh._tcp." + BOB, "SRV")):
        assert unsigned(core, name, rdtype).rcode() == dns.rcode.REFUSED


BROWSABLE = [
    ("_ssh._tcp", "PTR", "laptop._ssh._tcp." + BOB),
    ("laptop._ssh._tcp", "SRV", "0 0 22 laptop." + BOB),
    ("laptop._ssh._tcp", "TXT", '"u=bob"'),
    ("_sftp._sub._ssh._tcp", "PTR", "laptop._ssh._tcp." + BOB),
    ("_services._dns-sd._udp", "PTR", "_ssh._tcp." + BOB),
    ("b._dns-sd._udp", "PTR", BOB),
    ("lb._dns-sd._udp", "PTR", BOB),
]


@pytest.mark.parametrize(("rel", "rdtype", "data"), BROWSABLE)
def test_opted_in_zone_answers_browse_records_unsigned(rel: str, rdtype: str, data: str) -> None:
    core, acc = make_core(public_browse=frozenset({"bob"}))
    publish_ssh(core, acc)
    r = unsigned(core, rel + "." + BOB, rdtype)
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert [rd.to_text() for rd in r.answer[0]] == [data]


@pytest.mark.parametrize(
    ("rel", "rdtype"),
    [
        ("laptop", "AAAA"),  # addresses stay behind the key
        ("laptop", "TXT"),  # the host's public key
        ("_autotunnel._udp", "PTR"),  # btmm's own browse list
        ("_autotunnel._udp.laptop", "SRV"),  # tunnel endpoints
        ("_ssh._tcp", "ANY"),
        ("laptop._ssh._tcp", "A"),
        ("x.laptop._ssh._tcp", "SRV"),
        ("_ssh._tcp", "SRV"),
    ],
)
def test_opted_in_zone_keeps_everything_else_private(rel: str, rdtype: str) -> None:
    core, acc = make_core(public_browse=frozenset({"bob"}))
    publish_ssh(core, acc)
    assert unsigned(core, rel + "." + BOB, rdtype).rcode() == dns.rcode.REFUSED


def test_the_opt_in_is_per_zone() -> None:
    core, acc = make_core(public_browse=frozenset({"bob"}))
    publish_ssh(core, acc, ALICE, "alice")
    assert unsigned(core, "_ssh._tcp." + ALICE, "PTR").rcode() == dns.rcode.REFUSED


def test_discovery_srvs_answer_unsigned_when_opted_in() -> None:
    core, _ = make_core(public_browse=frozenset({"bob"}))
    r = unsigned(core, "_dns-push-tls._tcp." + BOB, "SRV")
    assert r.rcode() == dns.rcode.NXDOMAIN  # no DNS Push: the client falls back to LLQ
    r = unsigned(core, "_dns-llq._udp." + BOB, "SRV")
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].port == 5300
    core, _ = make_core()
    assert unsigned(core, "_dns-push-tls._tcp." + BOB, "SRV").rcode() == dns.rcode.REFUSED


def test_unsigned_llq_on_a_browse_record_is_set_up_only_when_opted_in() -> None:
    cases = ((frozenset({"bob"}), dns.rcode.NOERROR), (frozenset[str](), dns.rcode.REFUSED))
    for public, rcode in cases:
        core, acc = make_core(public_browse=public)
        core.plug(LLQServer(core, LLQConfig(), b"s" * 32, random.Random(1)))
        publish_ssh(core, acc)
        q = dns.message.make_query("_ssh._tcp." + BOB, "PTR")
        q.use_edns(0, 0, 1232, options=[LLQOption(LLQOpcode.SETUP, LLQError.NO_ERROR, 0, 3600)])
        out = core.receive(q.to_wire(), NOW, Transport.UDP, "192.0.2.9:5353")
        assert out is not None
        r = dns.message.from_wire(out)
        assert r.rcode() == rcode
