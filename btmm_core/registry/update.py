"""DNS UPDATE processing for one zone, sans-I/O: a parsed request in, a change set or rcode out.

RFC 2136 (Dynamic Updates in the Domain Name System): section 3.2 prerequisites, 3.4.1 prescan,
3.4.2 processing, 3.6 serial increment; RFC 9664 update leases (deadline per RR). Nothing here
touches the zone: the result is a ``ChangeSet`` the caller commits atomically, or an rcode.
The caller has already checked the zone section and the requester's right to the zone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from btmm_core.registry.model import ChangeSet, Entry, RecordKey, RecordRow, SeenMac
from btmm_core.registry.zones import NOT_RECORD_TYPES, Zone, next_serial

#: Types no RR of an update may carry, except ANY where RFC 2136 3.4.1.3 gives it a meaning.
_META = NOT_RECORD_TYPES | {dns.rdatatype.ANY}


class NoLeasePolicy(enum.Enum):
    """What to do with an update that carries no lease option."""

    PERMANENT = "permanent"
    DEFAULT_LEASE = "default-lease"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Grant:
    """Granted lease durations in seconds (``None``: RRs without deadline)."""

    lease: int | None
    key_lease: int | None


@dataclass(frozen=True)
class UpdateOutcome:
    rcode: dns.rcode.Rcode
    change: ChangeSet | None = None
    why: str = ""


def _fail(rcode: dns.rcode.Rcode, why: str) -> UpdateOutcome:
    return UpdateOutcome(rcode, None, why)


def _check_prerequisites(zone: Zone, prereqs: list[dns.rrset.RRset]) -> UpdateOutcome | None:
    wanted: dict[tuple[dns.name.Name, int], set[dns.rdata.Rdata]] = {}
    for rr in prereqs:
        if rr.ttl != 0:
            return _fail(dns.rcode.FORMERR, "prerequisite with non-zero TTL")
        if not rr.name.is_subdomain(zone.name):
            return _fail(dns.rcode.NOTZONE, f"prerequisite name {rr.name} outside the zone")
        if rr.deleting == dns.rdataclass.ANY:
            if len(rr) != 0:
                return _fail(dns.rcode.FORMERR, "class ANY prerequisite with RDATA")
            if rr.rdtype == dns.rdatatype.ANY:
                if not zone.name_exists(rr.name):
                    return _fail(dns.rcode.NXDOMAIN, f"{rr.name} is not in use")
            elif not zone.get(rr.name, rr.rdtype):
                return _fail(
                    dns.rcode.NXRRSET, f"no {dns.rdatatype.to_text(rr.rdtype)} at {rr.name}"
                )
        elif rr.deleting == dns.rdataclass.NONE:
            if len(rr) != 0:
                return _fail(dns.rcode.FORMERR, "class NONE prerequisite with RDATA")
            if rr.rdtype == dns.rdatatype.ANY:
                if zone.name_exists(rr.name):
                    return _fail(dns.rcode.YXDOMAIN, f"{rr.name} is in use")
            elif zone.get(rr.name, rr.rdtype):
                return _fail(
                    dns.rcode.YXRRSET, f"{dns.rdatatype.to_text(rr.rdtype)} exists at {rr.name}"
                )
        elif rr.deleting is None and rr.rdclass == dns.rdataclass.IN:
            if rr.rdtype in _META or len(rr) == 0:
                return _fail(dns.rcode.FORMERR, "bad value-dependent prerequisite")
            wanted.setdefault((rr.name, rr.rdtype), set()).update(rr)
        else:
            return _fail(dns.rcode.FORMERR, "prerequisite of an unknown class")
    for (name, rdtype), rdatas in wanted.items():
        if {rd for rd, _ in zone.get(name, rdtype)} != rdatas:
            return _fail(
                dns.rcode.NXRRSET,
                f"{dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))} at {name} differs",
            )
    return None


def _prescan(zone: Zone, updates: list[dns.rrset.RRset]) -> UpdateOutcome | None:
    for rr in updates:
        if not rr.name.is_subdomain(zone.name):
            return _fail(dns.rcode.NOTZONE, f"update name {rr.name} outside the zone")
        if rr.deleting is None:
            if rr.rdclass != dns.rdataclass.IN or rr.rdtype in _META or len(rr) == 0:
                return _fail(dns.rcode.FORMERR, "bad add")
        elif rr.deleting == dns.rdataclass.ANY:
            if (
                rr.ttl != 0
                or len(rr) != 0
                or (rr.rdtype in _META and rr.rdtype != dns.rdatatype.ANY)
            ):
                return _fail(dns.rcode.FORMERR, "bad delete-RRset/delete-name")
        elif rr.deleting == dns.rdataclass.NONE:
            if rr.ttl != 0 or rr.rdtype in _META or len(rr) == 0:
                return _fail(dns.rcode.FORMERR, "bad delete-RR")
        else:
            return _fail(dns.rcode.FORMERR, "update of an unknown class")
        if rr.rdtype != dns.rdatatype.ANY and zone.is_protected(rr.name, rr.rdtype):
            return _fail(
                dns.rcode.REFUSED,
                f"{dns.rdatatype.to_text(rr.rdtype)} at {rr.name} is managed by the server",
            )
        # A CNAME would hide the SOA/NS at the apex or a discovery SRV (RFC 2181 10.1).
        if rr.rdtype == dns.rdatatype.CNAME and rr.deleting is None and zone.is_server_name(
            rr.name
        ):
            return _fail(
                dns.rcode.REFUSED, f"no CNAME at {rr.name}: the server publishes records there"
            )
    return None


_Work = dict[tuple[dns.name.Name, int], dict[dns.rdata.Rdata, Entry]]


def _apply_updates(zone: Zone, updates: list[dns.rrset.RRset], now: float, grant: Grant) -> _Work:
    """The RRsets the update section touches, as they are after it (RFC 2136 3.4.2)."""
    # Linear in the number of RRs (issue 11 item 5): the RRsets touched are indexed by
    # (name, type), the types present at each touched name are kept up to date as we go, and
    # an RRset's TTL is set once at the end instead of on every add.
    work: _Work = {}
    present: dict[dns.name.Name, set[int]] = {}
    ttls: dict[tuple[dns.name.Name, int], int] = {}

    def rrset(name: dns.name.Name, rdtype: int) -> dict[dns.rdata.Rdata, Entry]:
        key = (name, rdtype)
        target = work.get(key)
        if target is None:
            target = work[key] = dict(zone.rrsets.get(key, {}))
        return target

    def types_at(name: dns.name.Name) -> set[int]:
        types = present.get(name)
        if types is None:
            types = present[name] = zone.stored_types(name)
        return types

    for rr in updates:
        if rr.deleting is None:
            types = types_at(rr.name)
            # RFC 2136 3.4.2.2: CNAME and other data never share a name; such adds are ignored.
            if rr.rdtype == dns.rdatatype.CNAME and len(types) > (dns.rdatatype.CNAME in types):
                continue
            if rr.rdtype != dns.rdatatype.CNAME and dns.rdatatype.CNAME in types:
                continue
            lease = grant.key_lease if rr.rdtype == dns.rdatatype.KEY else grant.lease
            expires = None if lease is None else now + lease
            # A cache must not keep a record longer than the registry does: the TTL never
            # exceeds the granted lease.
            ttl = rr.ttl if lease is None else min(rr.ttl, lease)
            target = rrset(rr.name, rr.rdtype)
            for rd in rr:
                target[rd] = Entry(ttl, expires)
            if target:
                types.add(rr.rdtype)
            # One TTL per RRset (RFC 2181 5.2): the newest add sets it for all (applied below).
            ttls[(rr.name, rr.rdtype)] = ttl
        elif rr.deleting == dns.rdataclass.ANY:
            types = types_at(rr.name)
            if rr.rdtype == dns.rdatatype.ANY:
                for t in types:
                    rrset(rr.name, t).clear()
                types.clear()
            else:
                rrset(rr.name, rr.rdtype).clear()
                types.discard(rr.rdtype)
        else:
            target = rrset(rr.name, rr.rdtype)
            for rd in rr:
                target.pop(rd, None)
            if not target:
                types_at(rr.name).discard(rr.rdtype)
    for key, ttl in ttls.items():
        target = work[key]
        for rd, e in target.items():
            if e.ttl != ttl:
                target[rd] = Entry(ttl, e.expires)

    return work


def _diff(zone: Zone, work: _Work) -> tuple[list[RecordRow], list[RecordKey], bool]:
    """Rows to write and keys to delete so the zone holds ``work``, and whether the data
    changed (a new deadline alone does not bump the serial)."""
    upserts: list[RecordRow] = []
    deletes: list[RecordKey] = []
    data_changed = False
    for (name, rdtype), new in work.items():
        old = zone.rrsets.get((name, rdtype), {})
        for rd in old:
            if rd not in new:
                deletes.append(RecordKey(zone.name, name, rdtype, rd))
                data_changed = True
        for rd, e in new.items():
            if old.get(rd) != e:
                upserts.append(RecordRow(zone.name, name, rdtype, rd, e))
                if rd not in old or old[rd].ttl != e.ttl:
                    data_changed = True
    return upserts, deletes, data_changed


def plan_update(
    zone: Zone,
    request: dns.message.Message,
    *,
    now: float,
    grant: Grant,
    seen: SeenMac | None = None,
) -> UpdateOutcome:
    """Check and apply an UPDATE's prerequisite and update sections to a copy of ``zone``.

    ``request`` must be parsed with ``one_rr_per_rrset=True`` so the update order is kept.
    """
    prereqs = list(request.sections[1])
    updates = list(request.sections[2])
    failed = _check_prerequisites(zone, prereqs) or _prescan(zone, updates)
    if failed is not None:
        return failed

    work = _apply_updates(zone, updates, now, grant)
    upserts, deletes, data_changed = _diff(zone, work)
    growth = sum(len(v) for v in work.values()) - sum(len(zone.rrsets.get(k, {})) for k in work)
    if growth > 0 and zone.record_count() + growth > zone.config.max_records:
        return _fail(dns.rcode.REFUSED, f"zone would exceed {zone.config.max_records} records")
    serial = next_serial(zone.serial) if data_changed else zone.serial
    change = ChangeSet(
        zone.name,
        serial,
        tuple(upserts),
        tuple(deletes),
        (seen,) if seen is not None else (),
    )
    return UpdateOutcome(dns.rcode.NOERROR, change)
