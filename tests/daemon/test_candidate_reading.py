"""A peer's candidates read back from its records, sans-I/O (daemon/records.py): what the
publisher's UPDATE adds parses back to the same candidates, and a hostile or broken record
set is refused or bounded with a reason, never an exception."""

from __future__ import annotations

import ipaddress

import dns.name
import dns.rdatatype
import dns.rrset

from btmm_core.daemon.identity import HostIdentity
from btmm_core.daemon.records import (
    CandidateRead,
    Publication,
    address_types,
    candidate_refs,
    candidate_srv_name,
    peer_from_answers,
    publish_update,
    read_candidates,
)
from btmm_core.dataplane.api import Endpoint
from btmm_core.reach.candidates import MAX_CANDIDATES, Candidate, CandidateKind

ZONE = dns.name.from_text("bob.members.example.")
LAPTOP = dns.name.from_text("laptop", origin=ZONE)
SRV = candidate_srv_name("laptop", ZONE)
ULA = ipaddress.IPv6Address("fd12:3456:789a:1:5054:ff:fe12:3456")


def read(srv: dns.rrset.RRset | None, *addresses: dns.rrset.RRset) -> CandidateRead:
    refs, refused = candidate_refs(LAPTOP, srv)
    found: dict[dns.name.Name, list[dns.rrset.RRset | None]] = {}
    for rrset in addresses:
        found.setdefault(rrset.name, []).append(rrset)
    return read_candidates(refs, found, refused)


def srv(*lines: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(SRV, 60, "IN", "SRV", list(lines))


def a(name: str, *addresses: str, rdtype: str = "A") -> dns.rrset.RRset:
    return dns.rrset.from_text_list(dns.name.from_text(name, origin=ZONE), 60, "IN", rdtype,
                                    list(addresses))


def test_what_is_published_reads_back() -> None:
    cands = (
        Candidate(CandidateKind.LAN, Endpoint("192.168.2.10", 4500)),
        Candidate(CandidateKind.IPV6, Endpoint("2a00:1450:4001:80b::200e", 4500)),
        Candidate(CandidateKind.MAPPED, Endpoint("203.0.113.3", 61000)),
        Candidate(CandidateKind.REFLEXIVE, Endpoint("203.0.113.3", 4500)),
    )
    pub = Publication("laptop", ULA, HostIdentity(ULA).autotunnel_label(), "K" * 43 + "=",
                      None, None, candidates=cands)
    msg = publish_update(ZONE, pub, None, 3600)
    added = [r for r in msg.update if r.deleting is None]  # type: ignore[attr-defined]
    srv_rrset = dns.rrset.RRset(SRV, 1, dns.rdatatype.SRV)
    for r in added:
        if r.name == SRV:
            srv_rrset.union_update(r)
    # SRV priority = kind; every target is one label below the host's own name
    assert sorted(rd.priority for rd in srv_rrset) == [1, 2, 3, 4]
    assert all(rd.target.parent() == LAPTOP for rd in srv_rrset)
    got = read(srv_rrset, *[r for r in added if r.rdtype in (dns.rdatatype.A,
                                                             dns.rdatatype.AAAA)
                            and r.name.parent() == LAPTOP])
    assert got == CandidateRead(cands, ())
    # the kind says which family to ask first
    assert address_types(CandidateKind.IPV6)[0] == dns.rdatatype.AAAA
    assert address_types(CandidateKind.LAN)[0] == dns.rdatatype.A
    # and the peer carries them, beside its seed endpoint
    rec = peer_from_answers(LAPTOP, ZONE, dns.rrset.from_text(LAPTOP, 60, "IN", "AAAA", str(ULA)),
                            dns.rrset.from_text(LAPTOP, 60, "IN", "TXT", '"btmm=1" "pk=K="'),
                            None, None, got)
    assert rec is not None and rec.candidates == cands and rec.endpoint is None
    # an older peer publishes no candidate SRV: nothing to read, nothing refused
    assert read(None) == CandidateRead((), ())


def test_targets_outside_the_peers_subtree_are_refused() -> None:
    got = read(
        srv(
            f"1 0 4500 desktop.{ZONE}",  # another host's name
            f"1 0 4500 c1-x.desktop.{ZONE}",  # a name in another host's subtree
            "1 0 4500 www.example.com.",  # outside the zone
            f"1 0 4500 {LAPTOP}",  # the host name itself (its AAAA is the ULA)
            f"1 0 4500 a.b.{LAPTOP}",  # deeper than one label
            f"1 0 4500 AutoTunnel-00-01.{ZONE}",
            f"3 0 61000 c1-ok.{LAPTOP}",
        ),
        a("desktop", "198.51.100.66"), a("c1-x.desktop", "198.51.100.66"),
        a("c1-ok.laptop", "203.0.113.3"),
    )
    assert got.candidates == (Candidate(CandidateKind.MAPPED, Endpoint("203.0.113.3", 61000)),)
    assert len(got.refused) == 6 and all("outside" in why for why in got.refused)


def test_malformed_candidates_are_refused_with_a_reason() -> None:
    got = read(
        srv(
            f"9 0 4500 c1-new.{LAPTOP}",  # a kind this version does not know
            f"1 0 0 c2-port.{LAPTOP}",
            f"1 0 4500 c3-none.{LAPTOP}",  # no address record
            f"1 0 4500 c4-two.{LAPTOP}",  # two addresses for one candidate
            f"1 0 4500 c5-lo.{LAPTOP}",
            f"1 0 4500 c6-mc.{LAPTOP}",
            f"2 0 4500 c7-v4.{LAPTOP}",  # an IPV6 candidate with an IPv4 address
            f"1 0 4500 c8-ok.{LAPTOP}",
        ),
        a("c1-new.laptop", "192.168.2.10"), a("c2-port.laptop", "192.168.2.11"),
        a("c4-two.laptop", "192.168.2.12", "192.168.2.13"), a("c5-lo.laptop", "127.0.0.1"),
        a("c6-mc.laptop", "ff02::1", rdtype="AAAA"), a("c7-v4.laptop", "192.168.2.14"),
        a("c8-ok.laptop", "192.168.2.15"),
        # an address RRset handed in under a name it does not have is ignored
        a("c3-other.laptop", "192.168.2.16"),
    )
    assert got.candidates == (Candidate(CandidateKind.LAN, Endpoint("192.168.2.15", 4500)),)
    assert len(got.refused) == 7


def test_a_hundred_candidates_are_bounded() -> None:
    lines = [f"1 0 {4000 + i} c{i}-x.{LAPTOP}" for i in range(100)]
    addrs = [a(f"c{i}-x.laptop", f"10.0.{i // 250}.{i % 250 + 1}") for i in range(100)]
    refs, refused = candidate_refs(LAPTOP, srv(*lines))
    assert len(refs) == MAX_CANDIDATES and len(refused) == 100 - MAX_CANDIDATES
    got = read(srv(*lines), *addrs)
    assert 0 < len(got.candidates) <= MAX_CANDIDATES
    assert all(c.kind == CandidateKind.LAN for c in got.candidates)
    # the same endpoint under two kinds counts once, as the more preferred one
    got = read(srv(f"4 0 4500 c1-r.{LAPTOP}", f"3 0 4500 c2-m.{LAPTOP}",
                   f"3 0 4500 c2-m.{LAPTOP}".replace("c2-m", "c3-m")),
               a("c1-r.laptop", "203.0.113.3"), a("c2-m.laptop", "203.0.113.3"),
               a("c3-m.laptop", "203.0.113.3"))
    assert got.candidates == (Candidate(CandidateKind.MAPPED, Endpoint("203.0.113.3", 4500)),)
    assert len(got.refused) == 1
