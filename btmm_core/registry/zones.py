"""The registry's zones in memory, backed by a ``Storage``; the "RRset changed" hook lives here.

Every committed change (an update or a lease expiry) is first made durable by the storage, then
applied in memory, then announced to observers as one ``RRsetChange`` per RRset. LLQ (RFC 8764)
subscribes with ``ZoneStore.add_observer``. Changes other servers made to a shared database
(``sync_external``) reach memory and the observers the same way, by reloading the zones they
name.

Server-managed records are synthesized, not stored: the SOA (its serial is the zone's), the
apex NS, and the discovery SRVs ``_dns-update._udp`` and ``_dns-llq._udp``, ``_stun._udp``
when the server answers STUN and ``_dns-push-tls._tcp`` when it serves DNS Push
(docs/architecture.md section 6).

Who may read what: the server's records are public, everything else in a user zone needs a
key of its user. A zone whose user opted in (``ZoneConfig.public_browse``, ``btmm serve
--public-browse``) also lets anyone read its DNS-SD browse records (RFC 6763 sections 4, 9,
11 and 12; ``is_browse_record``), because DNS-SD clients such as mDNSResponder never sign
their queries.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.SRV

from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.registry.model import (
    Cause,
    ChangeSet,
    DeviceKey,
    Entry,
    RecordKey,
    RecordRow,
    RRsetChange,
    SeenMac,
)
from btmm_core.registry.storage import Notices, StaleZone, Storage, ZoneBusy

Observer = Callable[[RRsetChange], None]

UPDATE_SRV = dns.name.from_text("_dns-update._udp", origin=None)
LLQ_SRV = dns.name.from_text("_dns-llq._udp", origin=None)
STUN_SRV = dns.name.from_text("_stun._udp", origin=None)
#: Where DNS Push Notifications for the zone are served (RFC 8765 6.1): the DoT port.
PUSH_SRV = dns.name.from_text("_dns-push-tls._tcp", origin=None)

#: RFC 6763 section 11: the browse/registration domain enumeration names under ``_dns-sd._udp``.
DOMAIN_ENUM_LABELS = frozenset({b"b", b"db", b"lb", b"r", b"dr"})
#: Service types that are btmm's own plumbing (the tunnel endpoints and path candidates):
#: never readable without a key, even in a zone that opted in to public browsing.
PRIVATE_SERVICE_LABELS = frozenset({b"_autotunnel", b"_btmm-path"})
#: Discovery SRVs a DNS-SD client asks for before it browses (RFC 8764 section 6.1 for LLQ,
#: RFC 8765 section 6.1 for DNS Push); absent ones then answer NXDOMAIN instead of REFUSED.
DISCOVERY_SRVS = frozenset(
    dns.name.from_text(t, origin=None)
    for t in ("_dns-llq._udp", "_dns-llq._tcp", "_dns-llq-tls._tcp", "_dns-push-tls._tcp")
)
_BROWSE_TYPES = frozenset({dns.rdatatype.PTR, dns.rdatatype.SRV, dns.rdatatype.TXT})

#: Question types that ask for a zone transfer or a mailbox set: never answered (RFC 1035
#: 3.2.3, RFC 5936 asks for a transfer protocol we do not offer).
TRANSFER_TYPES = frozenset(
    {dns.rdatatype.AXFR, dns.rdatatype.IXFR, dns.rdatatype.MAILA, dns.rdatatype.MAILB}
)
#: Types that never name a stored record: the transfer types and the pseudo-records of a
#: message (OPT, TSIG, TKEY). No update may add one and no LLQ may watch one. ANY is a
#: question type too, but one may watch it and an update may delete with it.
NOT_RECORD_TYPES = TRANSFER_TYPES | {dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY}


@dataclass(frozen=True)
class ZoneConfig:
    """What the synthesized records say and the bounds of a zone."""

    parent: dns.name.Name
    ns_name: dns.name.Name
    ns_addresses: tuple[str, ...] = ()
    public_port: int = 53
    #: The STUN responder's port for the ``_stun._udp`` SRV; None: no STUN, no SRV.
    stun_port: int | None = None
    #: The DNS-over-TLS port serving DNS Push for the ``_dns-push-tls._tcp`` SRV; None: none.
    push_port: int | None = None
    soa_ttl: int = 3600
    negative_ttl: int = 60
    max_records: int = 2000
    #: Users whose zones let anyone read their DNS-SD browse records (off for all by default:
    #: it shows the world the zone's service instances and their host names and ports).
    public_browse: frozenset[str] = frozenset()


def next_serial(serial: int) -> int:
    """RFC 1982 increment; 0 is skipped because some tools read it as "unset"."""
    s = (serial + 1) & 0xFFFFFFFF
    return s or 1


@dataclass
class Zone:
    name: dns.name.Name
    user: str | None
    serial: int
    config: ZoneConfig
    rrsets: dict[tuple[dns.name.Name, int], dict[dns.rdata.Rdata, Entry]] = field(
        default_factory=dict
    )
    #: names outside a device's own subtree that the device put records at (authority.py)
    owners: dict[dns.name.Name, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Indexes over ``rrsets`` so lookups do not scan the zone: the stored types at each
        # owner name, and for each name how many owner names lie at or below it (so that an
        # empty non-terminal is told apart from a name that does not exist).
        self._types: dict[dns.name.Name, set[int]] = {}
        self._below: dict[dns.name.Name, int] = {}
        for name, rdtype in self.rrsets:
            self._index(name, rdtype, True)
        c = self.config
        ns = dns.rdtypes.ANY.NS.NS(dns.rdataclass.IN, dns.rdatatype.NS, c.ns_name)  # type: ignore[no-untyped-call]
        self.synth: dict[tuple[dns.name.Name, int], tuple[int, tuple[dns.rdata.Rdata, ...]]] = {
            (self.name, dns.rdatatype.NS): (c.soa_ttl, (ns,))
        }
        if self.user is not None:
            srv = dns.rdtypes.IN.SRV.SRV(  # type: ignore[no-untyped-call]
                dns.rdataclass.IN, dns.rdatatype.SRV, 0, 0, c.public_port, c.ns_name
            )
            for label in (UPDATE_SRV, LLQ_SRV):
                self.synth[(label.concatenate(self.name), dns.rdatatype.SRV)] = (
                    c.soa_ttl,
                    (srv,),
                )
            for label, port in ((STUN_SRV, c.stun_port), (PUSH_SRV, c.push_port)):
                if port is None:
                    continue
                target = dns.rdtypes.IN.SRV.SRV(  # type: ignore[no-untyped-call]
                    dns.rdataclass.IN, dns.rdatatype.SRV, 0, 0, port, c.ns_name
                )
                self.synth[(label.concatenate(self.name), dns.rdatatype.SRV)] = (
                    c.soa_ttl,
                    (target,),
                )
        elif c.ns_name.is_subdomain(self.name):
            for addr in c.ns_addresses:
                rdtype = dns.rdatatype.AAAA if ":" in addr else dns.rdatatype.A
                rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, addr)
                ttl, old = self.synth.get((c.ns_name, rdtype), (c.soa_ttl, ()))
                self.synth[(c.ns_name, rdtype)] = (ttl, (*old, rd))

    def _index(self, name: dns.name.Name, rdtype: int, present: bool) -> None:
        types = self._types.get(name)
        if present:
            if types is None:
                types = self._types[name] = set()
                self._count_owner(name, 1)
            types.add(rdtype)
        elif types is not None:
            types.discard(rdtype)
            if not types:
                del self._types[name]
                self._count_owner(name, -1)

    def _count_owner(self, name: dns.name.Name, delta: int) -> None:
        n = name
        while True:
            count = self._below.get(n, 0) + delta
            if count:
                self._below[n] = count
            else:
                self._below.pop(n, None)
            if n == self.name or len(n) <= 1:
                return
            n = n.parent()

    def put(self, name: dns.name.Name, rdtype: int, rdata: dns.rdata.Rdata, entry: Entry) -> None:
        rs = self.rrsets.get((name, rdtype))
        if rs is None:
            rs = self.rrsets[(name, rdtype)] = {}
            self._index(name, rdtype, True)
        rs[rdata] = entry

    def drop(self, name: dns.name.Name, rdtype: int, rdata: dns.rdata.Rdata) -> None:
        rs = self.rrsets.get((name, rdtype))
        if rs is None:
            return
        rs.pop(rdata, None)
        if not rs:
            del self.rrsets[(name, rdtype)]
            self._index(name, rdtype, False)

    def stored_types(self, name: dns.name.Name) -> set[int]:
        return set(self._types.get(name, ()))

    def soa(self) -> dns.rdata.Rdata:
        c = self.config
        return dns.rdtypes.ANY.SOA.SOA(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            c.ns_name,
            dns.name.from_text("hostmaster", origin=c.parent),
            self.serial,
            3600,
            600,
            86400,
            c.negative_ttl,
        )

    def is_static(self, name: dns.name.Name, rdtype: int) -> bool:
        """Readable by anyone and never changed by UPDATE: everything in the parent zone, and
        in a user zone the apex SOA/NS and the discovery SRVs (any type at their names)."""
        if self.user is None:
            return True
        if name == self.name and rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS):
            return True
        if self.config.stun_port is not None and name == STUN_SRV.concatenate(self.name):
            return True
        if self.config.push_port is not None and name == PUSH_SRV.concatenate(self.name):
            return True
        return name in (UPDATE_SRV.concatenate(self.name), LLQ_SRV.concatenate(self.name))

    def is_browse_record(self, name: dns.name.Name, rdtype: int) -> bool:
        """A DNS-SD record a browser reads (RFC 6763): PTR at ``_type._tcp|_udp`` and at a
        subtype ``_sub._type._proto``, SRV/TXT at an instance ``<instance>._type._proto``, the
        service type list ``_services._dns-sd._udp`` and the domain enumeration PTRs of section
        11 (``b``, ``db``, ``lb``, ``r``, ``dr`` under ``_dns-sd._udp``), and the LLQ and DNS Push
        discovery SRVs. btmm's own ``_autotunnel`` and ``_btmm-path`` are not among them."""
        if rdtype not in _BROWSE_TYPES or not name.is_subdomain(self.name):
            return False
        rel = [label.lower() for label in name.relativize(self.name).labels]
        if len(rel) < 2 or rel[-1] not in (b"_tcp", b"_udp"):
            return False
        if rdtype == dns.rdatatype.SRV and len(rel) == 2:
            return dns.name.Name(rel) in DISCOVERY_SRVS
        if rel[-2:] == [b"_dns-sd", b"_udp"]:
            return rdtype == dns.rdatatype.PTR and (
                (len(rel) == 3 and rel[0] in DOMAIN_ENUM_LABELS)
                or rel == [b"_services", b"_dns-sd", b"_udp"]
            )
        if not rel[-2].startswith(b"_") or rel[-2] in PRIVATE_SERVICE_LABELS:
            return False
        if rdtype == dns.rdatatype.PTR:
            return len(rel) == 2 or (len(rel) == 4 and rel[1] == b"_sub")
        return len(rel) == 3

    def is_public(self, name: dns.name.Name, rdtype: int) -> bool:
        """Readable (and watchable) without the zone's key: the static records, and the browse
        records of a zone whose user opted in to public browsing."""
        if self.is_static(name, rdtype):
            return True
        return self.user in self.config.public_browse and self.is_browse_record(name, rdtype)

    def may_read(self, name: dns.name.Name, rdtype: int, key: TsigKey | None) -> bool:
        """Public records, or a request signed by the zone's account or device key (an invite
        key may only enrol)."""
        if self.is_public(name, rdtype):
            return True
        return key is not None and key.zone == self.name and key.role != KeyRole.INVITE

    def is_protected(self, name: dns.name.Name, rdtype: int) -> bool:
        """Records the server manages itself: updates may not touch them."""
        if rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS):
            return True
        return (name, rdtype) in self.synth

    def is_server_name(self, name: dns.name.Name) -> bool:
        """The apex and every owner of a synthesized record: no CNAME may sit there."""
        return name == self.name or any(n == name for n, _ in self.synth)

    def get(self, name: dns.name.Name, rdtype: int) -> list[tuple[dns.rdata.Rdata, int]]:
        if rdtype == dns.rdatatype.SOA and name == self.name:
            return [(self.soa(), self.config.soa_ttl)]
        synth = self.synth.get((name, rdtype))
        if synth is not None:
            return [(rd, synth[0]) for rd in synth[1]]
        stored = self.rrsets.get((name, rdtype))
        if not stored:
            return []
        return [(rd, e.ttl) for rd, e in stored.items()]

    def types_at(self, name: dns.name.Name) -> list[int]:
        types = self.stored_types(name)
        types.update(t for (n, t) in self.synth if n == name)
        if name == self.name:
            types.add(dns.rdatatype.SOA)
        return sorted(types)

    def name_exists(self, name: dns.name.Name) -> bool:
        """True for owner names and for empty non-terminals above them."""
        if name == self.name or name in self._below:
            return True
        return any(n.is_subdomain(name) for n, _ in self.synth)

    def record_count(self) -> int:
        return sum(len(v) for v in self.rrsets.values())


class ZoneStore:
    """Zones and keys in memory, every change durable first, observers told after."""

    def __init__(self, storage: Storage, config: ZoneConfig) -> None:
        self.storage = storage
        self.config = config
        self.zones: dict[dns.name.Name, Zone] = {}
        self.keys: dict[dns.name.Name, TsigKey] = {}
        self.loaded_seen: tuple[SeenMac, ...] = ()
        self._observers: list[Observer] = []
        self._leases: list[tuple[float, int, dns.name.Name, dns.name.Name, int, bytes]] = []
        self._tiebreak = 0
        self._generation = -1
        #: No expiry before this time: another server held a zone at the last attempt.
        self._hold_expiry = 0.0
        #: A reload after other servers' notices failed (database gone): do a full one.
        self._must_resync = False
        #: Bumped on every change of zone data or accounts; cached answers carry it.
        self.version = 0
        #: Group commit: change sets applied in memory (so the next update is planned on
        #: them) but not yet durable, and the observer events they will give once they are.
        self._staged: list[ChangeSet] = []
        self._staged_events: list[RRsetChange] = []
        self.storage.ensure_zone(config.parent, None)
        self.reload()

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer`` for every RRset change after it is durable (updates and expiry)."""
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._observers.remove(observer)

    def reload(self) -> None:
        self.version += 1
        snap = self.storage.load()
        self._generation = self.storage.generation()
        self.zones = {z.name: Zone(z.name, z.user, z.serial, self.config) for z in snap.zones}
        self.keys = {k.name: k for k in snap.keys}
        self._leases = []
        for r in snap.records:
            zone = self.zones.get(r.zone)
            if zone is None:
                continue
            zone.put(r.name, r.rdtype, r.rdata, r.entry)
            self._track_lease(r)
        for zname, name, device in snap.owners:
            zone = self.zones.get(zname)
            if zone is not None:
                zone.owners[name] = device
        self.loaded_seen = snap.seen

    def accounts_changed(self) -> bool:
        return self.storage.generation() != self._generation

    def refresh_accounts(self) -> None:
        """Pick up users added, removed or re-keyed by ``btmm serve user`` in another process."""
        if not self.accounts_changed():
            return
        self.resync()

    def resync(self) -> None:
        """Reload everything and announce what changed: after accounts changed elsewhere, or
        when notices from other servers may have been lost."""
        # Everything this process committed is in the database already, so a full reload
        # loses nothing and also covers a user removed and re-added between two polls.
        before = {z.name: {k: dict(v) for k, v in z.rrsets.items()} for z in self.zones.values()}
        self.reload()
        # Records another process deleted (``btmm serve user revoke`` removes the device's
        # records) are announced like any change, so watchers drop a revoked device at once.
        for zone in self.zones.values():
            self._announce(zone, before.get(zone.name, {}))

    def _announce(
        self,
        zone: Zone,
        old_sets: dict[tuple[dns.name.Name, int], dict[dns.rdata.Rdata, Entry]],
    ) -> list[RRsetChange]:
        """Tell the observers how ``zone`` differs from ``old_sets`` (its RRsets before)."""
        events = []
        for key in old_sets.keys() | zone.rrsets.keys():
            old, new = old_sets.get(key, {}), zone.rrsets.get(key, {})
            added = tuple(rd for rd in new if rd not in old)
            removed = tuple(rd for rd in old if rd not in new)
            ttl_changed = any(old[rd].ttl != new[rd].ttl for rd in new if rd in old)
            if not added and not removed and not ttl_changed:
                continue
            events.append(
                RRsetChange(
                    zone.name,
                    key[0],
                    key[1],
                    added,
                    removed,
                    tuple((rd, e.ttl) for rd, e in new.items()),
                    zone.serial,
                    Cause.UPDATE,
                )
            )
        for event in events:
            for observer in list(self._observers):
                observer(event)
        return events

    def reload_zone(self, name: dns.name.Name) -> list[RRsetChange]:
        """Load one zone again from the storage (another server changed it) and announce the
        difference; a zone gone from the database waits for the accounts reload."""
        state = self.storage.load_zone(name)
        old = self.zones.get(name)
        if state is None or old is None:
            return []
        self.version += 1
        zone = Zone(name, state.row.user, state.row.serial, self.config)
        for r in state.records:
            zone.put(r.name, r.rdtype, r.rdata, r.entry)
            # Leases already tracked need no new heap entry; a changed or new one does.
            was = old.rrsets.get((r.name, r.rdtype), {}).get(r.rdata)
            if was is None or was.expires != r.entry.expires:
                self._track_lease(r)
        zone.owners = dict(state.owners)
        self.zones[name] = zone
        return self._announce(zone, old.rrsets)

    def sync_external(self) -> int:
        """Apply what other servers committed to a shared database (``Storage.take_notices``);
        returns how many RRsets changed."""
        return self._absorb(self.storage.take_notices())

    def open_group(self) -> None:
        """Before the first update of a group is planned: let the storage take its write
        lock and apply what other processes committed before it (``Storage.begin_group``),
        so that the group is planned on the latest state and its commit cannot be stale."""
        notices = self.storage.begin_group()
        if notices is not None:
            self._absorb(notices)

    def _absorb(self, notices: Notices) -> int:
        full = self._must_resync or notices.resync
        # Until this pass succeeds, what the notices said is known only here: should a reload
        # fail (the database went away), the next pass reloads everything instead.
        self._must_resync = True
        if full or (notices.accounts and self.accounts_changed()):
            self.resync()
            changed = 1
        else:
            # deltas first, in commit order; then the zones whose deltas could not be used
            changed = sum(len(self._apply(change)) for change in notices.changes)
            changed += sum(len(self.reload_zone(name)) for name in sorted(notices.zones))
        self._must_resync = False
        return changed

    def enrol(
        self, device: DeviceKey, *, invite: dns.name.Name | None, replace: bool, seen: SeenMac
    ) -> None:
        """Store a device key made by enrolment (durable first), then use it at once."""
        gen = self.storage.generation()
        self.storage.enrol_device(device, invite=invite, replace=replace, seen=seen)
        self.version += 1
        if invite is not None:
            self.keys.pop(invite, None)
        for name in [
            k.name
            for k in self.keys.values()
            if k.zone == device.key.zone and k.device == device.device and k.role == device.key.role
        ]:
            del self.keys[name]
        self.keys[device.key.name] = device.key
        if self.storage.generation() == gen + 1 and self._generation == gen:
            # only our own change: no reload needed
            self._generation = gen + 1

    def find_zone(self, name: dns.name.Name) -> Zone | None:
        """The most specific zone containing ``name``."""
        n = name
        while True:
            zone = self.zones.get(n)
            if zone is not None:
                return zone
            if n == dns.name.root or len(n) <= 1:
                return None
            n = n.parent()

    def _track_lease(self, row: RecordRow) -> None:
        if row.entry.expires is not None:
            self._tiebreak += 1
            heapq.heappush(
                self._leases,
                (
                    row.entry.expires,
                    self._tiebreak,
                    row.zone,
                    row.name,
                    row.rdtype,
                    row.rdata.to_digestable(),
                ),
            )

    def commit(self, change: ChangeSet) -> list[RRsetChange]:
        """Make ``change`` durable, apply it in memory, tell the observers.

        ``StaleZone`` (another server changed the zone first) comes back to the caller after
        the zone was reloaded, so that it can plan the change again on the new state. Staged
        change sets must have been flushed first: this one could otherwise be durable
        before them and their answers would not know that their group failed.
        """
        if self._staged:
            raise RuntimeError("a group of staged change sets is open: flush it first")
        try:
            self.storage.commit(change)
        except StaleZone:
            self.reload_zone(change.zone)
            raise
        return self._apply(change)

    @property
    def staged(self) -> int:
        """Change sets applied in memory that are not durable yet (``stage``)."""
        return len(self._staged)

    def stage(self, change: ChangeSet) -> None:
        """Apply ``change`` in memory now, durable at the next ``flush`` (group commit).

        Until then the memory is ahead of the disk: the caller must answer nobody from it
        (RegistryCore holds every answer while a group is open). Observers hear of the
        change only after ``flush`` made it durable.
        """
        if not self.storage.groups_commits:
            raise TypeError(f"{type(self.storage).__name__} does not commit change sets together")
        self._staged.append(change)
        self._staged_events += self._apply(change, announce=False)

    def flush(self) -> int:
        """Make the staged change sets durable in one transaction, then tell the observers;
        returns how many there were. On failure the memory is reloaded from the storage (it
        forgets them all) and the error is raised."""
        changes, events = self._staged, self._staged_events
        self._staged, self._staged_events = [], []
        if not changes:
            self.storage.end_group()
            return 0
        try:
            self.storage.commit_group(changes)
        except BaseException:
            # Should this reload fail too, the next ``sync_external`` (every timer pass)
            # reloads everything; until one succeeds the memory is ahead of the disk.
            self._must_resync = True
            with contextlib.suppress(Exception):
                self.reload()
                self._must_resync = False
            raise
        for event in events:
            for observer in list(self._observers):
                observer(event)
        return len(changes)

    def _apply(self, change: ChangeSet, *, announce: bool = True) -> list[RRsetChange]:
        """Apply a committed change (this server's or another's) in memory; tell observers
        (unless not ``announce``: a staged change, told at ``flush``)."""
        self.version += 1
        zone = self.zones.get(change.zone)
        if zone is None:
            return []
        before: dict[tuple[dns.name.Name, int], dict[dns.rdata.Rdata, Entry]] = {}
        for key in [(d.name, d.rdtype) for d in change.deletes] + [
            (u.name, u.rdtype) for u in change.upserts
        ]:
            if key not in before:
                before[key] = dict(zone.rrsets.get(key, {}))
        for d in change.deletes:
            zone.drop(d.name, d.rdtype, d.rdata)
        for u in change.upserts:
            zone.put(u.name, u.rdtype, u.rdata, u.entry)
            self._track_lease(u)
        for name, device in change.claims:
            zone.owners[name] = device
        zone.serial = change.serial
        events = []
        for (name, rdtype), old in before.items():
            new = zone.rrsets.get((name, rdtype), {})
            added = tuple(rd for rd in new if rd not in old)
            removed = tuple(rd for rd in old if rd not in new)
            ttl_changed = any(old[rd].ttl != new[rd].ttl for rd in new if rd in old)
            if added or removed or ttl_changed:
                events.append(
                    RRsetChange(
                        change.zone,
                        name,
                        rdtype,
                        added,
                        removed,
                        tuple((rd, e.ttl) for rd, e in new.items()),
                        change.serial,
                        change.cause,
                    )
                )
        if announce:
            for event in events:
                for observer in list(self._observers):
                    observer(event)
        return events

    def next_expiry(self) -> float | None:
        if not self._leases:
            return None
        return max(self._leases[0][0], self._hold_expiry)

    def expire(self, now: float) -> list[RRsetChange]:
        """Remove every RR whose lease ran out by ``now``; one commit (serial bump) per zone."""
        # no group is open when this runs: one begun for nothing must not hold the lock
        self.storage.end_group()
        if now < self._hold_expiry:
            return []
        due: dict[dns.name.Name, list[RecordKey]] = {}
        while self._leases and self._leases[0][0] <= now:
            expires, _, zname, name, rdtype, digest = heapq.heappop(self._leases)
            zone = self.zones.get(zname)
            if zone is None:
                continue
            for rd, entry in zone.rrsets.get((name, rdtype), {}).items():
                # A refreshed RR has a later deadline in the heap; this entry is stale then.
                if rd.to_digestable() == digest and entry.expires == expires:
                    due.setdefault(zname, []).append(RecordKey(zname, name, rdtype, rd))
        events: list[RRsetChange] = []
        failed: Exception | None = None
        for zname, keys in due.items():
            zone = self.zones[zname]
            try:
                events += self.commit(
                    ChangeSet(
                        zname, next_serial(zone.serial), deletes=tuple(keys), cause=Cause.EXPIRY
                    )
                )
                continue
            except (StaleZone, ZoneBusy) as e:
                # Another server is on this zone (it may be expiring the same records): look
                # again shortly. The zone was reloaded on StaleZone, so records that are gone
                # or refreshed by then are skipped by the check above.
                if isinstance(e, ZoneBusy):
                    self._hold_expiry = now + 0.2
            except Exception as e:  # the database is gone: nothing expired, try again later
                failed = e
                self._hold_expiry = now + 0.5
            zone = self.zones.get(zname, zone)
            for k in keys:
                kept = zone.rrsets.get((k.name, k.rdtype), {}).get(k.rdata)
                if kept is not None and kept.expires is not None:
                    self._track_lease(RecordRow(zname, k.name, k.rdtype, k.rdata, kept))
        if failed is not None:
            raise failed
        return events
