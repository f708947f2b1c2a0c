"""The stub resolver's core (issue 16): answers for the zone from the daemon's state, forwards
or refuses the rest, never forwards a private name, and turns bad input into FORMERR or a
counted drop. Plus the resolv.conf / resolvectl helpers."""

from __future__ import annotations

import ipaddress
import random
import struct
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.reversename
import dns.rrset
import pytest

from btmm_core.daemon.config import load_config
from btmm_core.errors import ConfigError
from btmm_core.names.dnssd import is_dnssd_name
from btmm_core.names.stub import (
    MAX_QUERY,
    AskRegistry,
    Dropped,
    Forward,
    HostRecords,
    Reply,
    StubCore,
    StubDrop,
    Transport,
    host_records,
)
from btmm_core.names.system import (
    choose_upstreams,
    parse_stub,
    points_at_stub,
    resolvectl_commands,
)

ZONE = dns.name.from_text("alice.members.example.")
DESKTOP = dns.name.from_text("desktop", origin=ZONE)
ULA = ipaddress.IPv6Address("fd77:e649:7e31:e9bb:f2b6:ae08:d850:ed53")


def core(forwarding: bool = True) -> StubCore:
    c = StubCore(ZONE, forwarding=forwarding)
    c.replace(host_records({DESKTOP: ULA}))
    return c


def ask(c: StubCore, name: str | dns.name.Name, rdtype: str = "AAAA",
        transport: Transport = Transport.UDP) -> dns.message.Message:
    out = c.receive(dns.message.make_query(name, rdtype).to_wire(), transport, 0.0)
    assert isinstance(out, Reply), out
    return dns.message.from_wire(out.wire)


def test_a_peer_is_answered_with_its_ula_and_its_reverse_name() -> None:
    r = ask(core(), DESKTOP)
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA and r.flags & dns.flags.RA
    assert [rd.address for rd in r.answer[0]] == [str(ULA)] and r.answer[0].ttl == 5
    r = ask(core(), dns.reversename.from_address(str(ULA)), "PTR")
    assert r.answer[0][0].target == DESKTOP


def test_unknown_names_and_types_in_the_zone_are_negative_here_not_forwarded() -> None:
    c = core()
    r = ask(c, "nohost." + ZONE.to_text())
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == dns.rdatatype.SOA
    r = ask(c, DESKTOP, "A")  # getent ahosts asks A too: NODATA, not NXDOMAIN
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    r = ask(c, dns.reversename.from_address("fd00::99"), "PTR")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert c.stats["forwarded"] == 0


def test_a_removed_peer_is_gone_at_once() -> None:
    c = core()
    c.replace(host_records({}))
    assert ask(c, DESKTOP).rcode() == dns.rcode.NXDOMAIN


def test_records_built_again_for_a_growing_account_answer_as_if_built_afresh() -> None:
    """The daemon replaces the stub's records for every peer it adds: an unchanged host's
    records and names are reused (the same objects), a changed or removed one's are not."""
    laptop = dns.name.from_text("laptop", origin=ZONE)
    moved = ipaddress.IPv6Address("fd77:e649:7e31:e9bb::2")
    built: dict[tuple[dns.name.Name, ipaddress.IPv6Address], HostRecords] = {}
    c = StubCore(ZONE, forwarding=False)
    c.replace(host_records({DESKTOP: ULA}, built))
    first = built[(DESKTOP, ULA)]
    c.replace(host_records({DESKTOP: ULA, laptop: ULA + 1}, built))
    assert built[(DESKTOP, ULA)] is first and len(built) == 2
    c.replace(host_records({laptop: moved}, built))  # desktop left, the laptop moved
    assert set(built) == {(laptop, moved)}
    fresh = StubCore(ZONE, forwarding=False)
    fresh.replace(host_records({laptop: moved}))
    for name, rdtype in [(laptop, "AAAA"), (DESKTOP, "AAAA"),
                         (dns.reversename.from_address(str(moved)), "PTR"),
                         (dns.reversename.from_address(str(ULA)), "PTR"),
                         (dns.reversename.from_address(str(ULA)).parent(), "PTR"),
                         (dns.reversename.from_address(str(moved)).parent(), "PTR")]:
        a, b = ask(c, name, rdtype), ask(fresh, name, rdtype)
        assert (a.rcode(), a.answer) == (b.rcode(), b.answer), name
    assert ask(c, DESKTOP).rcode() == dns.rcode.NXDOMAIN
    # an empty non-terminal above the laptop's reverse name: NODATA, not NXDOMAIN
    ent = ask(c, dns.reversename.from_address(str(moved)).parent(), "PTR")
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer


def test_names_outside_are_forwarded_or_refused_never_answered_from_the_zone() -> None:
    c = core()
    q = dns.message.make_query("desktop.example.", "AAAA").to_wire()
    out = c.receive(q, Transport.UDP, 0.0)
    assert isinstance(out, Forward) and out.wire == q
    r = ask(core(forwarding=False), "desktop.example.")
    assert r.rcode() == dns.rcode.REFUSED and not r.answer
    # a suffix match that is not a subdomain is outside
    out = c.receive(dns.message.make_query("xalice.members.example.", "A").to_wire(),
                    Transport.UDP, 0.0)
    assert isinstance(out, Forward)


def test_records_outside_the_served_zones_are_ignored() -> None:
    c = StubCore(ZONE, forwarding=False)
    c.replace(host_records({dns.name.from_text("github.com."): ULA}))
    assert ask(c, "github.com.").rcode() == dns.rcode.REFUSED


def test_upstream_answers_must_match_the_query() -> None:
    c = core()
    q = dns.message.make_query("www.example.", "A")
    good = dns.message.make_response(q)
    assert c.upstream_answer(q.to_wire(), good.to_wire()) == good.to_wire()
    other = dns.message.make_response(dns.message.make_query("evil.example.", "A"))
    other.id = q.id
    assert c.upstream_answer(q.to_wire(), other.to_wire()) is None
    assert c.upstream_answer(q.to_wire(), q.to_wire()) is None  # not a response
    assert c.stats["upstream_mismatch"] == 2
    fail = dns.message.from_wire(c.upstream_failed(q.to_wire()))
    assert fail.rcode() == dns.rcode.SERVFAIL and fail.id == q.id


def test_bad_input_is_formerr_or_a_counted_drop() -> None:
    c = core()
    assert c.receive(b"\x00" * 5, Transport.UDP, 0.0) == Dropped(StubDrop.SHORT)
    resp = dns.message.make_response(dns.message.make_query(DESKTOP, "AAAA")).to_wire()
    assert c.receive(resp, Transport.UDP, 0.0) == Dropped(StubDrop.RESPONSE)
    q = dns.message.make_query(DESKTOP, "AAAA").to_wire()
    for bad in (q[:-3], q + b"\x00" * (MAX_QUERY + 1 - len(q)),
                q[:4] + b"\x00\x02" + q[6:],  # two questions claimed, one present
                q[:12] + b"\xc0\x0c" + q[-4:]):  # a compression loop
        out = c.receive(bad, Transport.UDP, 0.0)
        assert isinstance(out, Reply)
        assert dns.message.from_wire(out.wire).rcode() == dns.rcode.FORMERR
    update = dns.message.make_query(DESKTOP, "SOA")
    update.set_opcode(5)
    out = c.receive(update.to_wire(), Transport.UDP, 0.0)
    assert isinstance(out, Reply) and out.wire[3] & 0xF == dns.rcode.NOTIMP
    assert c.stats["formerr"] == 4 and c.stats["drop_short"] == c.stats["drop_response"] == 1


def test_random_bytes_never_crash_the_core() -> None:
    c = core()
    rng = random.Random(16)
    q = dns.message.make_query(DESKTOP, "AAAA").to_wire()
    for _ in range(3000):
        data = bytearray(q)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        out = c.receive(bytes(data[: rng.randint(0, len(data))]), Transport.UDP, 0.0)
        assert isinstance(out, Reply | Forward | Dropped)


def test_a_large_answer_is_truncated_over_udp_whole_over_tcp() -> None:
    c = StubCore(ZONE, forwarding=False)
    many = {DESKTOP: ULA}
    records = host_records(many)
    big = tuple(records[(DESKTOP, dns.rdatatype.AAAA)][0].replace(address=f"fd00::{i:x}")
                for i in range(1, 60))
    records[(DESKTOP, dns.rdatatype.AAAA)] = big
    c.replace(records)
    r = ask(c, DESKTOP)
    assert r.flags & dns.flags.TC and not r.answer
    r = ask(c, DESKTOP, transport=Transport.TCP)
    assert len(r.answer[0]) == 59


def test_stub_address_must_be_loopback_and_upstreams_skip_the_stub() -> None:
    assert parse_stub("127.0.0.153:53") == ("127.0.0.153", 53)
    assert parse_stub("[::1]:5353") == ("::1", 5353)
    for bad in ("192.0.2.1:53", "127.0.0.1", "localhost:53", "127.0.0.1:99999"):
        with pytest.raises(ConfigError):
            parse_stub(bad)
    conf = "# x\nnameserver 127.0.0.153\nnameserver 192.0.2.1\nsearch example\n"
    stub = ("127.0.0.153", 53)
    assert choose_upstreams("", conf, stub) == [("192.0.2.1", 53)]
    assert choose_upstreams("none", conf, stub) == []
    assert choose_upstreams("192.0.2.7:5353, 192.0.2.8", conf, stub) == [
        ("192.0.2.7", 5353), ("192.0.2.8", 53)]
    with pytest.raises(ConfigError):
        choose_upstreams("resolver.example", conf, stub)
    assert points_at_stub(conf, stub) and not points_at_stub("nameserver 192.0.2.1\n", stub)


def test_resolvectl_routes_only_the_zone_and_the_ula_reverse_zone_to_the_stub() -> None:
    cmds = resolvectl_commands("btmm0", ("127.0.0.153", 53), ZONE)
    assert cmds == [
        ["resolvectl", "dns", "btmm0", "127.0.0.153:53"],
        ["resolvectl", "domain", "btmm0", "~alice.members.example", "~d.f.ip6.arpa"],
        ["resolvectl", "default-route", "btmm0", "false"],
    ]


def test_query_header_fields_are_echoed() -> None:
    q = dns.message.make_query(DESKTOP, "AAAA")
    q.flags &= ~dns.flags.RD
    out = core().receive(q.to_wire(), Transport.UDP, 0.0)
    assert isinstance(out, Reply)
    (qid, flags) = struct.unpack("!HH", out.wire[:4])
    assert qid == q.id and not flags & dns.flags.RD


def test_names_section_of_the_daemon_config(tmp_path: Path) -> None:
    path = tmp_path / "btmm.toml"
    path.write_text('[host]\nhost = "laptop"\n[names]\nstub = "127.0.0.9:5353"\n'
                    'upstream = "192.0.2.1"\nresolv_conf = "/tmp/r.conf"\n')
    cfg = load_config(path)
    assert (cfg.stub, cfg.upstream, cfg.resolv_conf) == (
        "127.0.0.9:5353", "192.0.2.1", Path("/tmp/r.conf"))
    path.write_text('[host]\nhost = "laptop"\n')
    assert load_config(path).stub == "127.0.0.153:53"
    path.write_text('[host]\nhost = "laptop"\n[names]\nstub = "0.0.0.0:53"\n')
    with pytest.raises(ConfigError):
        load_config(path)


def test_dnssd_names_are_asked_of_the_registry_and_nothing_else_of_the_zone() -> None:
    c = StubCore(ZONE, forwarding=True, registry=True)
    c.replace(host_records({DESKTOP: ULA}))
    ptr = dns.name.from_text("_ssh._tcp", origin=ZONE)
    q = dns.message.make_query(ptr, "PTR")
    out = c.receive(q.to_wire(), Transport.UDP, 0.0)
    assert isinstance(out, AskRegistry) and (out.qname, out.qtype) == (ptr, dns.rdatatype.PTR)
    rrset = dns.rrset.from_text(ptr, 3600, "IN", "PTR", "desktop._ssh._tcp." + ZONE.to_text())
    r = dns.message.from_wire(c.registry_answer(out.wire, rrset, Transport.UDP))
    assert r.id == q.id and r.answer[0][0].target.to_text().startswith("desktop._ssh._tcp")
    assert r.answer[0].ttl == 60  # capped
    r = dns.message.from_wire(c.registry_answer(out.wire, None, Transport.UDP))
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority
    for name, rdtype in (("_autotunnel._udp", "PTR"), ("desktop", "TXT"),
                         ("_btmm-path._udp.desktop", "SRV"), ("_ssh._tcp", "AAAA")):
        out = c.receive(dns.message.make_query(dns.name.from_text(name, origin=ZONE),
                                               rdtype).to_wire(), Transport.UDP, 0.0)
        assert isinstance(out, Reply), name
    # without a registry lookup: answered here (NXDOMAIN), never forwarded
    r = ask(core(), ptr, "PTR")
    assert r.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize(("rel", "yes"), [
    ("_ssh._tcp", True), ("laptop._ssh._tcp", True), ("_printer._sub._ipp._tcp", True),
    ("b._dns-sd._udp", True), ("_services._dns-sd._udp", True), ("laptop", False),
    ("_autotunnel._udp", False), ("_btmm-path._udp.laptop", False), ("a.b._ssh._tcp", False),
    ("ssh._tcp", False),
])
def test_dnssd_names(rel: str, yes: bool) -> None:
    assert is_dnssd_name(dns.name.from_text(rel, origin=ZONE), ZONE) is yes


def test_an_address_lookup_of_a_zone_name_is_reported_for_on_demand_tunnels() -> None:
    """``Reply.looked_up`` names the host a program is about to reach (the daemon opens its
    tunnel, daemon/ondemand.py); other questions report nothing."""
    c = core()

    def looked_up(name: str | dns.name.Name, rdtype: str) -> dns.name.Name | None:
        out = c.receive(dns.message.make_query(name, rdtype).to_wire(), Transport.UDP, 0.0)
        assert isinstance(out, Reply), out
        return out.looked_up

    assert looked_up(DESKTOP, "AAAA") == DESKTOP
    assert looked_up(DESKTOP, "ANY") == DESKTOP
    assert looked_up(DESKTOP, "TXT") is None
    assert looked_up(dns.reversename.from_address(str(ULA)), "PTR") is None
    # an unknown name of the zone is reported too (NXDOMAIN): the daemon ignores it
    assert looked_up(dns.name.from_text("nobody", origin=ZONE), "AAAA") is not None
