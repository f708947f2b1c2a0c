"""A host's endpoint candidates and the order it prefers them in, sans-I/O.

The idea is ICE's (RFC 8445 section 5.1.1: gathering host, server-reflexive and relayed
candidates; section 5.1.2: a preference per type), cut down to what btmm needs: one UDP
port (the engine's), no component IDs, no foundations, and a kind instead of a computed
priority, because the kinds already say everything the path selection ranks by.

Kinds, most preferred first (issue 13 "path selection": same LAN, direct IPv6, mapped,
punched, relay):

- ``LAN``: a private (RFC 1918) or shared (RFC 6598, carrier-grade NAT) IPv4 address of an
  interface that is up and running, with the engine's port. Loopback interfaces and
  addresses, the tunnel device (its traffic would loop into the tunnel), link-local
  169.254/16 and any public address are not LAN candidates.
- ``IPV6``: a global unicast IPv6 address (2000::/3, RFC 4291 §2.4; never a ULA, link-local,
  v4-mapped or other special address) of an interface that is up, with the engine's port,
  when the engine's socket takes IPv6 (``ipv6=True``: the daemon's engine listens on ``::``,
  dual-stack, issue 15). Temporary (RFC 8981 privacy) and deprecated addresses are left out
  when the kernel says so (``LocalAddress.temporary``/``deprecated``): a peer would probe
  an address that is about to go away. Such a path needs no NAT traversal, hence its rank
  right after the LAN.
- ``MAPPED``: an endpoint the host itself knows to be reachable from outside: the port
  mapping its gateway granted (PCP, NAT-PMP, UPnP IGD), *or* the host's own public address
  when it is not behind a NAT. Both are what the seed's ``_autotunnel._udp`` SRV carries, both
  need no hole punching, and path selection treats them alike, so one kind serves both
  instead of a separate PUBLIC kind (decision of issue 13 part "cands"; the status word for
  such a path is ``mapped``).
- ``REFLEXIVE``: the server-reflexive endpoint a STUN Binding to the registry saw (RFC 8489):
  reachable only once a hole is punched. Left out when it equals a MAPPED endpoint.
- ``RELAY``: an endpoint on a relay (the relay issue); ``gather`` has no input for it yet.

Duplicates (the same endpoint under two kinds, e.g. a "mapping" that is the host's own LAN
address) keep the more preferred kind. At most ``MAX_PER_KIND`` of one kind and
``MAX_CANDIDATES`` in all are kept, so a host with many bridges (containers, VMs) cannot
crowd its mapped and reflexive endpoints out of the published set.

Used by ``daemon/records.py`` (the record layout in the zone) and ``daemon/host.py`` (what
``btmm up`` publishes and shows in ``btmm status``); ``reach.paths`` pairs them for the
connectivity checks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from btmm_core.dataplane.api import Endpoint


class CandidateKind(IntEnum):
    LAN = 1
    IPV6 = 2
    MAPPED = 3
    REFLEXIVE = 4
    RELAY = 5


@dataclass(frozen=True)
class Candidate:
    kind: CandidateKind
    endpoint: Endpoint


#: most candidates a host publishes (and a reader takes from one peer)
MAX_CANDIDATES = 8
#: most candidates of one kind
MAX_PER_KIND = 3

#: private (RFC 1918 section 3) and shared address space (RFC 6598)
LAN_NETWORKS = tuple(
    ipaddress.IPv4Network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)


@dataclass(frozen=True)
class LocalAddress:
    """One address of one interface, as the caller read it from the kernel.

    ``up``: the interface is administratively up and has a carrier (IFF_UP and IFF_RUNNING);
    ``loopback``: it is a loopback interface (IFF_LOOPBACK).
    """

    interface: str
    address: str
    up: bool = True
    loopback: bool = False
    #: IPv6 only: a temporary (privacy) address, or a deprecated one (preferred lifetime over)
    temporary: bool = False
    deprecated: bool = False


#: global unicast IPv6 (RFC 4291 §2.4, IANA's allocations all lie in it)
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")


def is_global_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast IPv6 address: in 2000::/3 (so never a ULA, link-local, multicast,
    loopback or v4-mapped address). Documentation space (2001:db8::/32, the lab's internet)
    counts: it is global unicast by format, and nothing routes it outside a lab."""
    return isinstance(address, ipaddress.IPv6Address) and address in GLOBAL_UNICAST_V6


def is_lan_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An IPv4 address that can only be reached inside its own network (or its ISP's)."""
    return isinstance(address, ipaddress.IPv4Address) and any(
        address in net for net in LAN_NETWORKS
    )


def is_usable_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An address a peer could send to at all: not unspecified, loopback, link-local,
    multicast, reserved or the IPv4 broadcast address. What a peer publishes is checked with
    it too, so that no record can aim our probes at our own loopback or a multicast group."""
    if (
        address.is_unspecified
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
    ):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped is None
    return address != ipaddress.IPv4Address("255.255.255.255")


def _local_candidates(
    local: Iterable[LocalAddress], port: int, tunnel: str | None, ipv6: bool
) -> list[Candidate]:
    out: list[Candidate] = []
    for la in local:
        if not la.up or la.loopback or (tunnel is not None and la.interface == tunnel):
            continue
        try:
            addr = ipaddress.ip_address(la.address.split("%", 1)[0])
        except ValueError:
            continue
        if not is_usable_address(addr):
            continue
        if is_lan_address(addr):
            out.append(Candidate(CandidateKind.LAN, Endpoint(str(addr), port)))
        elif ipv6 and is_global_v6(addr) and not (la.temporary or la.deprecated):
            out.append(Candidate(CandidateKind.IPV6, Endpoint(str(addr), port)))
    return out


def bound(candidates: Iterable[Candidate], limit: int = MAX_CANDIDATES) -> tuple[Candidate, ...]:
    """``candidates`` in order of preference (stable within a kind), each endpoint once under
    its most preferred kind, at most ``MAX_PER_KIND`` per kind and ``limit`` in all."""
    ordered = sorted(candidates, key=lambda c: c.kind)
    seen: set[Endpoint] = set()
    per_kind: dict[CandidateKind, int] = {}
    out: list[Candidate] = []
    for c in ordered:
        if c.endpoint in seen or per_kind.get(c.kind, 0) >= MAX_PER_KIND:
            continue
        seen.add(c.endpoint)
        per_kind[c.kind] = per_kind.get(c.kind, 0) + 1
        out.append(c)
        if len(out) >= limit:
            break
    return tuple(out)


def gather(
    local: Sequence[LocalAddress],
    port: int,
    mapped: Endpoint | None = None,
    reflexive: Endpoint | None = None,
    *,
    tunnel: str | None = None,
    ipv6: bool = False,
    limit: int = MAX_CANDIDATES,
) -> tuple[Candidate, ...]:
    """This host's candidates, most preferred first.

    ``local``: every address of every interface (the caller reads them from the kernel; the
    rules above pick the usable ones); ``port``: the engine's UDP port; ``mapped``: the
    gateway's mapping or the host's own public endpoint; ``reflexive``: what STUN saw (None
    until the daemon asks a STUN server); ``tunnel``: the name of btmm's own TUN device.
    """
    found = _local_candidates(local, port, tunnel, ipv6)
    if mapped is not None:
        found.append(Candidate(CandidateKind.MAPPED, mapped))
    if reflexive is not None:
        found.append(Candidate(CandidateKind.REFLEXIVE, reflexive))
    return bound(found, limit)
