"""The per-host stub resolver, sans-I/O: a query's bytes in, an answer, a forward or a drop out.

RFC 1034/1035 (answers), RFC 2308 (negative answers with the SOA), RFC 6891 (EDNS0), RFC 6303
(locally served reverse zones: ``d.f.ip6.arpa``, the reverse of fd00::/8, is answered here and
never asked of anyone else), RFC 6761 section 6.3 spirit (a private name never leaves).

The stub answers for the user's zone from what the daemon's long-lived queries keep current
(``StubCore.replace``: every peer's AAAA and its reverse PTR). DNS-SD names of the zone
(``dnssd.is_dnssd_name``: service types, instances, ``_dns-sd._udp``) are asked of the
registry, signed with this device's key (``AskRegistry``), so any DNS-SD client on the host can
browse through the stub. No other resolver is ever asked about the zone: a name in it that is
neither known nor DNS-SD is NXDOMAIN here. Everything else is
forwarded to the upstream resolvers when there are some, else REFUSED. A malformed query with a
readable header is FORMERR, anything shorter or a response is dropped and counted.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.AAAA
import dns.reversename
import dns.rrset

from btmm_core.names.dnssd import is_dnssd_name

#: TTL of every answer from the zone: peers come and go within seconds, so caches (nscd,
#: resolved) must ask again soon.
ANSWER_TTL = 5
#: The largest query accepted; a question fits in far less (a name is at most 255 bytes).
MAX_QUERY = 1232
#: Our EDNS payload size (RFC 6891 section 6.2.5; the DNS flag day 2020 value).
UDP_PAYLOAD = 1232
#: The longest TTL the stub gives a record it read from the registry.
MAX_REGISTRY_TTL = 60
_DNSSD_TYPES = frozenset({dns.rdatatype.PTR, dns.rdatatype.SRV, dns.rdatatype.TXT})
#: RFC 6303 section 4.5: the reverse zone of fd00::/8 (locally assigned ULAs).
ULA_REVERSE = dns.name.from_text("d.f.ip6.arpa.")


class Transport(enum.IntEnum):
    UDP = 1
    TCP = 2


class StubDrop(enum.IntEnum):
    """Why a datagram got no answer at all."""

    SHORT = 1  # under 12 bytes: no header to answer
    RESPONSE = 2  # QR set: answering a response could loop


@dataclass(frozen=True)
class Reply:
    """Send ``wire`` back to the client."""

    wire: bytes
    #: the zone name whose addresses were asked (AAAA or ANY) and answered from the local
    #: records: a program is about to reach that host (the daemon opens an on-demand tunnel)
    looked_up: dns.name.Name | None = None


@dataclass(frozen=True)
class Forward:
    """Ask the upstream resolvers ``wire`` (the client's query, unchanged) and hand their
    answer to ``StubCore.upstream_answer`` before it goes back."""

    wire: bytes
    qname: dns.name.Name


@dataclass(frozen=True)
class AskRegistry:
    """Ask the registry (signed) for ``qname``/``qtype`` and give the answer to
    ``StubCore.registry_answer`` with ``wire``, the client's query."""

    wire: bytes
    qname: dns.name.Name
    qtype: int


@dataclass(frozen=True)
class Dropped:
    reason: StubDrop


Output = Reply | Forward | AskRegistry | Dropped

Records = Mapping[tuple[dns.name.Name, int], tuple[dns.rdata.Rdata, ...]]


#: one host's records as ``host_records`` builds them: its AAAA, its reverse name and PTR
HostRecords = tuple[dns.rdata.Rdata, dns.name.Name, dns.rdata.Rdata]


def host_records(
    hosts: Mapping[dns.name.Name, ipaddress.IPv6Address],
    built: dict[tuple[dns.name.Name, ipaddress.IPv6Address], HostRecords] | None = None,
) -> dict[tuple[dns.name.Name, int], tuple[dns.rdata.Rdata, ...]]:
    """AAAA for each host and the PTR of its address (so ``ping`` and ``ssh`` print names).

    ``built``: each host's records from the last call, taken again where the host's name and
    address are the same and left holding this call's hosts only (the daemon calls this for
    every peer it adds, each time with every host: an account of 100 built 10,000 hosts'
    records to start)."""
    out: dict[tuple[dns.name.Name, int], tuple[dns.rdata.Rdata, ...]] = {}
    fresh: dict[tuple[dns.name.Name, ipaddress.IPv6Address], HostRecords] = {}
    for name, ula in hosts.items():
        one = None if built is None else built.get((name, ula))
        if one is None:
            one = (
                dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, str(ula)),  # type: ignore[no-untyped-call]
                dns.reversename.from_address(str(ula)),
                dns.rdtypes.ANY.PTR.PTR(dns.rdataclass.IN, dns.rdatatype.PTR, name),  # type: ignore[no-untyped-call]
            )
        fresh[(name, ula)] = one
        aaaa, rev, ptr = one
        out[(name, dns.rdatatype.AAAA)] = (*out.get((name, dns.rdatatype.AAAA), ()), aaaa)
        out[(rev, dns.rdatatype.PTR)] = (*out.get((rev, dns.rdatatype.PTR), ()), ptr)
    if built is not None:
        built.clear()
        built.update(fresh)
    return out


def _header_only(wire: bytes, rcode: int) -> bytes:
    (qid, flags) = struct.unpack("!HH", wire[:4])
    flags = dns.flags.QR | dns.flags.RA | (flags & 0x7800) | (flags & dns.flags.RD) | rcode
    return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)


def _question_end(wire: bytes) -> int | None:
    """Offset just past the one question of ``wire``, or None."""
    try:
        (qdcount,) = struct.unpack("!H", wire[4:6])
        if qdcount != 1:
            return None
        _, used = dns.name.from_wire(wire, 12)
    except (dns.exception.DNSException, struct.error):
        return None
    end = 12 + used + 4
    return end if end <= len(wire) else None


class StubCore:
    """Answers for ``zone`` (and the ULA reverse zone) from ``replace``'d records.

    ``forwarding``: whether there are upstream resolvers to forward other names to (else
    REFUSED); ``registry``: whether DNS-SD names go to the registry. ``stats`` counts answers
    by kind and drops by reason.
    """

    def __init__(self, zone: dns.name.Name, *, forwarding: bool, registry: bool = False) -> None:
        self.zone = zone
        self.forwarding = forwarding
        #: whether DNS-SD names may be asked of the registry (``AskRegistry``)
        self.registry = registry
        self._records: dict[tuple[dns.name.Name, int], tuple[dns.rdata.Rdata, ...]] = {}
        self._names: set[dns.name.Name] = set()
        #: each owner's names up to its zone's apex, kept between ``replace`` calls
        self._up_to_apex: dict[dns.name.Name, tuple[dns.name.Name, ...]] = {}
        self.stats: Counter[str] = Counter()

    # ---- state -----------------------------------------------------------------------

    def replace(self, records: Records) -> None:
        """Answer from ``records`` from now on (names outside the served zones are ignored)."""
        kept = {
            (n, t): rds
            for (n, t), rds in records.items()
            if rds and (n.is_subdomain(self.zone) or n.is_subdomain(ULA_REVERSE))
        }
        self._records = kept
        names: set[dns.name.Name] = set()
        up_to_apex: dict[dns.name.Name, tuple[dns.name.Name, ...]] = {}
        for owner, _ in kept:
            # every name at or above an owner, within its zone, exists (empty non-terminals);
            # a reverse name is 34 labels deep: walked once per owner, not once per call
            above = up_to_apex.get(owner, self._up_to_apex.get(owner))
            if above is None:
                n, found = owner, []
                top = self.zone if n.is_subdomain(self.zone) else ULA_REVERSE
                while n != top and len(n) > len(top):
                    found.append(n)
                    n = n.parent()
                above = tuple(found)
            up_to_apex[owner] = above
            names.update(above)
        self._names = names
        self._up_to_apex = up_to_apex

    def serves(self, name: dns.name.Name) -> bool:
        """Whether ``name`` is answered here only (never forwarded)."""
        return name.is_subdomain(self.zone) or name.is_subdomain(ULA_REVERSE)

    # ---- queries ---------------------------------------------------------------------

    def receive(self, data: bytes, transport: Transport, now: float) -> Output:
        """One query from a local program."""
        del now  # answers do not depend on the time; kept for the common core signature
        if len(data) < 12:
            self.stats["drop_short"] += 1
            return Dropped(StubDrop.SHORT)
        (flags,) = struct.unpack("!H", data[2:4])
        if flags & dns.flags.QR:
            self.stats["drop_response"] += 1
            return Dropped(StubDrop.RESPONSE)
        if len(data) > MAX_QUERY:
            self.stats["formerr"] += 1
            return Reply(_header_only(data, dns.rcode.FORMERR))
        if (flags >> 11) & 0xF != dns.opcode.QUERY:
            self.stats["notimp"] += 1
            return Reply(_header_only(data, dns.rcode.NOTIMP))
        try:
            query = dns.message.from_wire(data)
        except Exception:  # any parse failure of untrusted input is FORMERR
            self.stats["formerr"] += 1
            return Reply(_header_only(data, dns.rcode.FORMERR))
        if len(query.question) != 1 or query.answer or query.authority:
            self.stats["formerr"] += 1
            return Reply(_header_only(data, dns.rcode.FORMERR))
        q = query.question[0]
        limit = 65535 if transport == Transport.TCP else (
            512 if query.edns < 0 else max(512, min(query.payload, UDP_PAYLOAD))
        )
        if query.edns > 0:
            response = self._response(query)
            response.set_rcode(dns.rcode.BADVERS)
            return Reply(response.to_wire())
        if not self.serves(q.name):
            if q.rdclass == dns.rdataclass.IN and self.forwarding:
                self.stats["forwarded"] += 1
                return Forward(data, q.name)
            self.stats["refused"] += 1
            response = self._response(query)
            response.set_rcode(dns.rcode.REFUSED)
            return Reply(response.to_wire())
        if (
            self.registry
            and q.rdtype in _DNSSD_TYPES
            and q.rdclass == dns.rdataclass.IN
            and (q.name, q.rdtype) not in self._records
            and is_dnssd_name(q.name, self.zone)
        ):
            self.stats["registry"] += 1
            return AskRegistry(data, q.name, q.rdtype)
        self.stats["answered"] += 1
        looked_up = (
            q.name
            if q.rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY)
            and q.name.is_subdomain(self.zone)
            else None
        )
        return Reply(self._render(self._answer(query), limit), looked_up)

    def registry_answer(
        self, query: bytes, rrset: dns.rrset.RRset | None, transport: Transport
    ) -> bytes:
        """The answer to ``query`` (an ``AskRegistry``) from what the registry returned;
        None: nothing there (NODATA: the registry's answer does not tell NXDOMAIN apart)."""
        msg = dns.message.from_wire(query)
        response = self._response(msg)
        response.flags |= dns.flags.AA
        q = msg.question[0]
        if rrset is not None and rrset.name == q.name and rrset.rdtype == q.rdtype:
            out = dns.rrset.RRset(q.name, dns.rdataclass.IN, rrset.rdtype)
            for rd in rrset:
                out.add(rd, min(rrset.ttl, MAX_REGISTRY_TTL))
            response.answer.append(out)
        else:
            response.authority.append(self._soa(self.zone))
        limit = 65535 if transport == Transport.TCP else (
            512 if msg.edns < 0 else max(512, min(msg.payload, UDP_PAYLOAD))
        )
        return self._render(response, limit)

    def upstream_answer(self, query: bytes, answer: bytes) -> bytes | None:
        """``answer`` if it answers ``query`` (same ID, a response, the same question), else
        None (counted): a stray or spoofed datagram never reaches the client."""
        end = _question_end(query)
        if (
            end is None
            or len(answer) < end
            or answer[:2] != query[:2]
            or not answer[2] & 0x80
            or answer[4:6] != query[4:6]
            or answer[12:end].lower() != query[12:end].lower()
        ):
            self.stats["upstream_mismatch"] += 1
            return None
        return answer

    def upstream_failed(self, query: bytes) -> bytes:
        """SERVFAIL for a forwarded query no upstream answered."""
        self.stats["upstream_failed"] += 1
        return _header_only(query, dns.rcode.SERVFAIL)

    # ---- answers ---------------------------------------------------------------------

    def _response(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query, our_payload=UDP_PAYLOAD)
        response.flags |= dns.flags.RA
        return response

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        q = query.question[0]
        response = self._response(query)
        response.flags |= dns.flags.AA
        if q.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        types: Iterable[int]
        if q.rdtype == dns.rdatatype.ANY:
            types = sorted(t for (n, t) in self._records if n == q.name)
        else:
            types = (q.rdtype,)
        for t in types:
            rds = self._records.get((q.name, t))
            if rds:
                rrset = dns.rrset.RRset(q.name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(t))
                for rd in rds:
                    rrset.add(rd, ANSWER_TTL)
                response.answer.append(rrset)
        if response.answer:
            return response
        apex = self.zone if q.name.is_subdomain(self.zone) else ULA_REVERSE
        if q.name != apex and q.name not in self._names:
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(self._soa(apex))
        return response

    @staticmethod
    def _soa(apex: dns.name.Name) -> dns.rrset.RRset:
        """A local SOA for negative answers (RFC 2308): caches keep the NXDOMAIN 5 s."""
        soa = dns.rdtypes.ANY.SOA.SOA(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            dns.name.from_text("localhost."),
            dns.name.from_text("nobody.invalid."),
            1,
            3600,
            600,
            86400,
            ANSWER_TTL,
        )
        rrset = dns.rrset.RRset(apex, dns.rdataclass.IN, dns.rdatatype.SOA)
        rrset.add(soa, ANSWER_TTL)
        return rrset

    @staticmethod
    def _render(response: dns.message.Message, limit: int) -> bytes:
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 7766: the client retries over TCP
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()
