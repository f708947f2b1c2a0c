"""Endpoint candidates in the zone, end to end through the sans-I/O registry core: the UPDATE
``daemon/records.py`` builds passes the registry's per-device authority and limits, reads back
into the same candidates, replaces the previous set in one step, costs no serial when nothing
changed, and a device cannot put candidate names into another host's subtree."""

from __future__ import annotations

import ipaddress
import time

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.update
from registry_helpers import PARENT, make_core, parse, sign, tsig_error

from btmm_core.daemon.identity import HostIdentity
from btmm_core.daemon.records import (
    Publication,
    address_types,
    candidate_refs,
    candidate_srv_name,
    left_candidate_targets,
    publish_update,
    read_candidates,
    withdraw_update,
)
from btmm_core.dataplane.api import Endpoint
from btmm_core.dns.enrol import EnrolClient
from btmm_core.dns.tsig import TsigKey
from btmm_core.reach.candidates import MAX_CANDIDATES, Candidate, CandidateKind, bound
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.limits import UpdateLimits

BOB = dns.name.from_text("bob", origin=PARENT)
ULAS = {"laptop": ipaddress.IPv6Address("fd12:3456:789a:1:5054:ff:fe12:3456"),
        "desktop": ipaddress.IPv6Address("fd12:3456:789a:1:5054:ff:fe12:3457")}


class Clock:
    """Each signed request one second after the last (the registry's replay rule)."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        self.t += 1
        return self.t


def enrol(core: RegistryCore, signer: TsigKey, device: str, now: float) -> TsigKey:
    client = EnrolClient(BOB, device)
    wire = sign(client.request(), signer, int(now))
    mac = parse(wire).tsig[0].mac  # type: ignore[index]
    answer = parse(core.receive(wire, now, Transport.UDP, "test"))
    assert answer.rcode() == dns.rcode.NOERROR
    return client.finish(answer, mac)


def send(core: RegistryCore, msg: dns.message.Message, key: TsigKey, now: float) -> int:
    out = parse(core.receive(sign(msg, key, int(now)), now, Transport.UDP, "test"))
    assert out.tsig is not None and tsig_error(out) == 0
    return out.rcode()


def query(core: RegistryCore, key: TsigKey, now: float, name: dns.name.Name,
          rdtype: int) -> dns.rrset.RRset | None:
    out = parse(core.receive(sign(dns.message.make_query(name, rdtype), key, int(now)), now,
                             Transport.UDP, "test"))
    for rrset in out.answer:
        if rrset.name == name and rrset.rdtype == rdtype:
            return rrset
    return None


def pub(host: str, *cands: Candidate) -> Publication:
    ula = ULAS[host]
    return Publication(host, ula, HostIdentity(ula).autotunnel_label(), "K" * 43 + "=",
                       ipaddress.IPv4Address("203.0.113.3"), 4500, candidates=cands)


def read_back(core: RegistryCore, key: TsigKey, clock: Clock, host: str) -> tuple[
        tuple[Candidate, ...], tuple[str, ...]]:
    """What a peer's daemon reads: the candidate SRV, then the address at each target."""
    peer = dns.name.from_text(host, origin=BOB)
    srv = query(core, key, clock(), candidate_srv_name(host, BOB), dns.rdatatype.SRV)
    refs, refused = candidate_refs(peer, srv)
    found = {ref.target: [query(core, key, clock(), ref.target, t)
                          for t in address_types(ref.kind)] for ref in refs}
    got = read_candidates(refs, found, refused)
    return got.candidates, got.refused


LAN1 = Candidate(CandidateKind.LAN, Endpoint("192.168.2.10", 4500))
LAN2 = Candidate(CandidateKind.LAN, Endpoint("10.0.0.7", 4500))
MAPPED = Candidate(CandidateKind.MAPPED, Endpoint("203.0.113.3", 61000))
REFLEXIVE = Candidate(CandidateKind.REFLEXIVE, Endpoint("203.0.113.3", 4500))
V6 = Candidate(CandidateKind.IPV6, Endpoint("2a00:1450:4001:80b::200e", 4500))


def _laptop_published() -> tuple[RegistryCore, Clock, TsigKey, TsigKey, Publication]:
    """A registry where bob's laptop published every kind of candidate; its and the
    desktop's device keys."""
    core, accounts = make_core()
    clock = Clock()
    laptop = enrol(core, accounts["bob"].key, "laptop", clock())
    desktop = enrol(core, accounts["bob"].key, "desktop", clock())
    first = pub("laptop", LAN1, LAN2, V6, MAPPED, REFLEXIVE)
    assert send(core, publish_update(BOB, first, None, 3600), laptop, clock()) == 0
    return core, clock, laptop, desktop, first


def test_candidates_round_trip_and_replace_the_previous_set() -> None:
    core, clock, laptop, desktop, first = _laptop_published()
    cands, refused = read_back(core, desktop, clock, "laptop")
    assert cands == bound(first.candidates) and refused == ()
    # the seed's records are still there, as they were
    srv = query(core, desktop, clock(), dns.name.from_text("_autotunnel._udp.laptop", BOB),
                dns.rdatatype.SRV)
    assert srv is not None and [(r.priority, r.port) for r in srv] == [(0, 4500)]
    # a refresh with the same set changes no data: no new serial, so no LLQ event either
    serial = core.store.zones[BOB].serial
    assert send(core, publish_update(BOB, first, first, 3600), laptop, clock()) == 0
    assert core.store.zones[BOB].serial == serial
    # a moved LAN address: the set is replaced, the old address name is gone
    second = pub("laptop", Candidate(CandidateKind.LAN, Endpoint("192.168.3.11", 4500)), MAPPED)
    assert send(core, publish_update(BOB, second, first, 3600), laptop, clock()) == 0
    cands, refused = read_back(core, desktop, clock, "laptop")
    assert cands == second.candidates and refused == ()
    names = {n for (n, _) in core.store.zones[BOB].rrsets}
    below = {n for n in names if n.is_subdomain(dns.name.from_text("laptop", origin=BOB))}
    assert len([n for n in below if n.labels[0].startswith(b"c")]) == 2
    # a restart (no previous publication) after a crash still leaves no stale candidate
    assert send(core, publish_update(BOB, pub("laptop", MAPPED), None, 3600), laptop,
                clock()) == 0
    assert read_back(core, desktop, clock, "laptop") == ((MAPPED,), ())
    # a clean shutdown removes them all
    assert send(core, withdraw_update(BOB, pub("laptop", MAPPED)), laptop, clock()) == 0
    assert read_back(core, desktop, clock, "laptop") == ((), ())


def _candidate_names(core: RegistryCore, host: str) -> set[dns.name.Name]:
    own = dns.name.from_text(host, origin=BOB)
    return {n for (n, _) in core.store.zones[BOB].rrsets
            if len(n) == len(own) + 1 and n.is_subdomain(own)}


def test_a_restart_after_a_crash_deletes_the_addresses_the_crashed_run_left() -> None:
    """The daemon reads its candidate SRV before its first publish and deletes the address
    names it points at: a SIGKILLed run's addresses go at once, not with their lease. Names
    outside the host's own subtree in that SRV are never deleted."""
    core, accounts = make_core()
    clock = Clock()
    laptop = enrol(core, accounts["bob"].key, "laptop", clock())
    desktop = enrol(core, accounts["bob"].key, "desktop", clock())
    crashed = pub("laptop", LAN1, MAPPED, REFLEXIVE)
    assert send(core, publish_update(BOB, crashed, None, 3600), laptop, clock()) == 0
    assert send(core, publish_update(BOB, pub("desktop", LAN2), None, 3600), desktop,
                clock()) == 0
    assert len(_candidate_names(core, "laptop")) == 3
    srv = query(core, laptop, clock(), candidate_srv_name("laptop", BOB), dns.rdatatype.SRV)
    left = left_candidate_targets(srv, "laptop", BOB)
    assert len(left) == 3
    # the new run keeps the mapping (same name: same data), its LAN address moved
    moved = Candidate(CandidateKind.LAN, Endpoint("192.168.3.11", 4500))
    restarted = pub("laptop", moved, MAPPED)
    assert send(core, publish_update(BOB, restarted, None, 3600, left), laptop, clock()) == 0
    assert read_back(core, desktop, clock, "laptop") == (restarted.candidates, ())
    assert len(_candidate_names(core, "laptop")) == 2
    # only names one label below the host's own are taken from a (hostile) SRV
    foreign = dns.rrset.from_text(candidate_srv_name("laptop", BOB), 60, "IN", "SRV",
                                  f"1 0 4500 c1-00000000.desktop.{BOB}",
                                  f"1 0 4500 laptop.{BOB}",
                                  f"1 0 4500 x.c1.laptop.{BOB}")
    assert left_candidate_targets(foreign, "laptop", BOB) == ()
    assert send(core, publish_update(BOB, restarted, restarted, 3600,
                                     list(_candidate_names(core, "desktop"))), laptop,
                clock()) == 0
    assert read_back(core, laptop, clock, "desktop") == ((LAN2,), ())


def test_the_largest_publication_fits_the_registry_limits() -> None:
    many = [Candidate(CandidateKind.LAN, Endpoint(f"10.0.0.{i}", 4500)) for i in range(1, 20)]
    old = pub("laptop", *many[:MAX_CANDIDATES])
    new = pub("laptop", *many[MAX_CANDIDATES:])
    msg = publish_update(BOB, new, old, 3600)
    rrs = sum(max(1, len(r)) for r in msg.update)  # type: ignore[attr-defined]
    assert rrs <= 40 < UpdateLimits().max_rrs
    srv = [r for r in msg.update  # type: ignore[attr-defined]
           if r.name == candidate_srv_name("laptop", BOB) and r.deleting is None]
    assert sum(len(r) for r in srv) == MAX_CANDIDATES  # at most 8 published
    core, accounts = make_core()
    clock = Clock()
    laptop = enrol(core, accounts["bob"].key, "laptop", clock())
    assert send(core, publish_update(BOB, old, None, 3600), laptop, clock()) == 0
    assert send(core, msg, laptop, clock()) == 0


def test_a_device_may_not_put_candidates_in_another_hosts_subtree() -> None:
    core, accounts = make_core()
    clock = Clock()
    laptop = enrol(core, accounts["bob"].key, "laptop", clock())
    desktop = enrol(core, accounts["bob"].key, "desktop", clock())
    assert send(core, publish_update(BOB, pub("desktop", MAPPED), None, 3600), desktop,
                clock()) == 0
    before = dict(core.store.zones[BOB].rrsets)
    # the laptop's key writing the desktop's candidate set or an address name below it
    attacks = []
    u = dns.update.UpdateMessage(BOB)
    u.add(candidate_srv_name("desktop", BOB), 60, "SRV", f"1 0 4500 c1-x.desktop.{BOB}")
    attacks.append(u)
    u = dns.update.UpdateMessage(BOB)
    u.delete(candidate_srv_name("desktop", BOB))
    attacks.append(u)
    u = dns.update.UpdateMessage(BOB)
    u.add(f"c1-x.desktop.{BOB}", 60, "A", "198.51.100.66")
    attacks.append(u)
    u = dns.update.UpdateMessage(BOB)
    u.add(f"_btmm-path._udp.{BOB}", 60, "SRV", f"1 0 4500 c1-x.laptop.{BOB}")
    attacks.append(u)
    # its own whole publication with the desktop's host name in it
    attacks.append(publish_update(BOB, pub("desktop", LAN1), None, 3600))
    for attack in attacks:
        assert send(core, attack, laptop, clock()) == dns.rcode.REFUSED, attack
    assert core.store.zones[BOB].rrsets == before
    # while its own candidates pass
    assert send(core, publish_update(BOB, pub("laptop", LAN1, MAPPED), None, 3600), laptop,
                clock()) == 0


def _raw_query(core: RegistryCore, key: TsigKey | None, now: float, name: dns.name.Name,
               rdtype: int, payload: int | None = None) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if payload is not None:
        q.use_edns(0, 0, payload)
    wire = q.to_wire() if key is None else sign(q, key, int(now))
    return parse(core.receive(wire, now, Transport.UDP, "test"))


def test_an_srv_answer_brings_its_targets_addresses() -> None:
    """One signed query reads a host's candidates: the SRV's in-zone targets' addresses come
    in the additional section (RFC 2782), the same the per-target queries read; an answer
    too big for them leaves them out (no TC), and an unsigned reader gets none."""
    core, clock, _, desktop, _ = _laptop_published()
    srv_name_ = candidate_srv_name("laptop", BOB)
    out = _raw_query(core, desktop, clock(), srv_name_, dns.rdatatype.SRV, payload=1232)
    assert out.rcode() == dns.rcode.NOERROR and not out.flags & dns.flags.TC
    (srv,) = [r for r in out.answer if r.rdtype == dns.rdatatype.SRV]
    extra = {(r.name, r.rdtype): r for r in out.additional}
    assert {t for t, _ in extra} == {rd.target for rd in srv}
    for rd in srv:
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            alone = query(core, desktop, clock(), rd.target, rdtype)
            assert extra.get((rd.target, rdtype)) == alone
    # the legacy SRV's target (AutoTunnel-...) comes with its A as well
    seed = dns.name.from_text("_autotunnel._udp.laptop", BOB)
    out = _raw_query(core, desktop, clock(), seed, dns.rdatatype.SRV, payload=1232)
    (target,) = [rd.target for r in out.answer for rd in r]
    assert [(r.name, r.rdtype) for r in out.additional] == [(target, dns.rdatatype.A)]
    # no EDNS: 512 bytes hold the SRV answer and its TSIG, not the addresses
    out = _raw_query(core, desktop, clock(), srv_name_, dns.rdatatype.SRV)
    assert out.rcode() == dns.rcode.NOERROR and not out.flags & dns.flags.TC
    assert len(out.answer[0]) == len(srv) and out.additional == []
    # unsigned: refused, nothing added
    out = _raw_query(core, None, clock(), srv_name_, dns.rdatatype.SRV, payload=1232)
    assert out.rcode() == dns.rcode.REFUSED and out.answer == [] and out.additional == []
