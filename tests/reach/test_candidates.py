"""Candidate gathering, sans-I/O: which local addresses count, the order of the kinds,
duplicates and the bounds (btmm_core/reach/candidates.py)."""

from __future__ import annotations

import ipaddress

from btmm_core.dataplane.api import Endpoint
from btmm_core.reach.candidates import (
    MAX_CANDIDATES,
    MAX_PER_KIND,
    Candidate,
    CandidateKind,
    LocalAddress,
    bound,
    gather,
    is_usable_address,
)

LAN, IPV6, MAPPED, REFLEXIVE, RELAY = (CandidateKind.LAN, CandidateKind.IPV6,
                                       CandidateKind.MAPPED, CandidateKind.REFLEXIVE,
                                       CandidateKind.RELAY)


def la(address: str, interface: str = "eth0", **kw: bool) -> LocalAddress:
    return LocalAddress(interface, address, **kw)


def kinds(cands: tuple[Candidate, ...]) -> list[tuple[CandidateKind, str, int]]:
    return [(c.kind, c.endpoint.host, c.endpoint.port) for c in cands]


def test_preference_order_is_lan_ipv6_mapped_reflexive() -> None:
    assert [int(k) for k in (LAN, IPV6, MAPPED, REFLEXIVE, RELAY)] == [1, 2, 3, 4, 5]
    got = gather(
        [la("192.168.2.10"), la("2001:db8:1::10", "eth1")], 4500,
        mapped=Endpoint("203.0.113.3", 61000), reflexive=Endpoint("203.0.113.3", 4500),
        ipv6=True,
    )
    # 2001:db8::/32 (documentation space, the lab's internet) is global unicast by format
    # (2000::/3): it is an IPV6 candidate, ranked right after the LAN
    assert kinds(got) == [(LAN, "192.168.2.10", 4500), (IPV6, "2001:db8:1::10", 4500),
                          (MAPPED, "203.0.113.3", 61000), (REFLEXIVE, "203.0.113.3", 4500)]
    got = gather([la("2a00:1450:4001:80b::200e", "eth1"), la("10.1.2.3")], 4500,
                 reflexive=Endpoint("198.51.100.9", 1234), ipv6=True)
    assert kinds(got) == [(LAN, "10.1.2.3", 4500), (IPV6, "2a00:1450:4001:80b::200e", 4500),
                          (REFLEXIVE, "198.51.100.9", 1234)]
    # an engine whose socket takes no IPv6 (ipv6=False) gets no IPv6 candidate
    assert kinds(gather([la("2a00:1450:4001:80b::200e")], 4500)) == []


def test_which_local_addresses_are_ipv6_candidates() -> None:
    local = [
        la("fd12:3456:789a:1::10"),  # ULA
        la("fe80::1%eth0"),  # link-local
        la("::1", "lo", loopback=True),
        la("::ffff:198.51.100.7"),  # v4-mapped
        la("ff02::1"),  # multicast
        la("64:ff9b::c000:221"),  # NAT64 well-known prefix: outside 2000::/3
        la("2001:db8:7::1", "btmm0"),  # the tunnel device
        la("2001:db8:7::2", up=False),  # an interface without carrier
        la("2001:db8:7::3", temporary=True),  # RFC 8981 privacy address
        la("2001:db8:7::4", deprecated=True),  # preferred lifetime over
        la("2001:db8:7::5"),
        la("2a00:1450:4001:80b::200e", "wlan0"),
    ]
    got = gather(local, 4500, tunnel="btmm0", ipv6=True)
    assert kinds(got) == [(IPV6, "2001:db8:7::5", 4500), (IPV6, "2a00:1450:4001:80b::200e", 4500)]


def test_which_local_addresses_are_lan_candidates() -> None:
    local = [
        la("127.0.0.1", "lo", loopback=True),
        la("10.9.9.9", "lo", loopback=True),  # an address on a loopback interface
        la("169.254.7.7"),  # link-local
        la("192.168.1.10", "btmm0"),  # the tunnel device
        la("172.17.0.1", "docker0", up=False),  # a bridge without carrier
        la("203.0.113.22"),  # public: it is the MAPPED endpoint, not a LAN one
        la("not an address"),
        la("172.16.5.5"),
        la("100.64.0.2", "wan0"),  # shared address space (carrier-grade NAT)
        la("fe80::1%eth0"),
        la("192.0.0.9"),  # IETF protocol assignments: "private" to Python, no LAN
    ]
    got = gather(local, 4500, tunnel="btmm0")
    assert kinds(got) == [(LAN, "172.16.5.5", 4500), (LAN, "100.64.0.2", 4500)]


def test_public_host_publishes_its_address_as_mapped() -> None:
    got = gather([la("127.0.0.1", "lo", loopback=True), la("203.0.113.22")], 4500,
                 mapped=Endpoint("203.0.113.22", 4500))
    assert kinds(got) == [(MAPPED, "203.0.113.22", 4500)]


def test_duplicates_keep_the_more_preferred_kind() -> None:
    # no gateway: the "mapping" is the host's own LAN address; and STUN saw the mapping
    got = gather([la("192.168.1.10"), la("192.168.1.10", "eth1")], 4500,
                 mapped=Endpoint("192.168.1.10", 4500),
                 reflexive=Endpoint("192.168.1.10", 4500))
    assert kinds(got) == [(LAN, "192.168.1.10", 4500)]
    got = gather([], 4500, mapped=Endpoint("203.0.113.3", 4500),
                 reflexive=Endpoint("203.0.113.3", 4500))
    assert kinds(got) == [(MAPPED, "203.0.113.3", 4500)]
    # same address, another port: the NAT kept its own port for the engine's socket
    got = gather([], 4500, mapped=Endpoint("203.0.113.3", 61000),
                 reflexive=Endpoint("203.0.113.3", 4500))
    assert kinds(got) == [(MAPPED, "203.0.113.3", 61000), (REFLEXIVE, "203.0.113.3", 4500)]


def test_many_bridges_cannot_crowd_out_the_mapping() -> None:
    bridges = [la(f"172.{17 + i}.0.1", f"br{i}") for i in range(20)]
    got = gather(bridges, 4500, mapped=Endpoint("203.0.113.3", 4500),
                 reflexive=Endpoint("203.0.113.3", 5000))
    assert [c.kind for c in got] == [LAN] * MAX_PER_KIND + [MAPPED, REFLEXIVE]
    assert [c.endpoint.host for c in got[:3]] == ["172.17.0.1", "172.18.0.1", "172.19.0.1"]
    # the total bound holds over every kind
    many = [Candidate(k, Endpoint(f"198.51.100.{i}", 4500 + int(k)))
            for k in CandidateKind for i in range(10)]
    assert len(bound(many)) == MAX_CANDIDATES
    assert len(bound(many, limit=2)) == 2
    assert gather(bridges, 4500, limit=1) == (Candidate(LAN, Endpoint("172.17.0.1", 4500)),)


def test_usable_addresses() -> None:
    for bad in ("0.0.0.0", "127.0.0.1", "169.254.1.1", "224.0.0.1", "255.255.255.255",
                "240.0.0.1", "::", "::1", "fe80::1", "ff02::1", "::ffff:10.0.0.1"):
        assert not is_usable_address(ipaddress.ip_address(bad)), bad
    for good in ("10.0.0.1", "203.0.113.7", "2a00:1450:4001:80b::200e", "fd00::1"):
        assert is_usable_address(ipaddress.ip_address(good)), good
