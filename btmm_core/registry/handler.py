"""The registry's message handler, sans-I/O: request bytes and ``now`` in, response bytes out.

RFC 1034/1035 (authoritative answers), RFC 2136 (UPDATE), RFC 8945 (TSIG), RFC 6891 (EDNS0),
RFC 9664 (update lease). The order of work for every request: parse (FORMERR on any failure),
EDNS version, TSIG key/MAC/time/replay, then the opcode. Nothing in a zone changes before the
TSIG checks pass, and an update is answered NOERROR only after ``ZoneStore.commit`` returned,
i.e. after it is durable.

Features served beside the registry plug in through ``plug`` (``registry/plugin.py``): a
request carrying one of a plug-in's EDNS options is given to it after the TSIG checks. Messages
with QR set are not requests: the core sends nothing back, the driver gives them to the
plug-ins. Enrolment (EDNS option ``ENROL_CODE``) is the registry's own option handler.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import structlog

from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.dns.enrol import ENROL_CODE
from btmm_core.dns.fastpath import PlainQuery, scan
from btmm_core.dns.tsig import (
    MAX_FUDGE,
    RawKey,
    ReplayGuard,
    TsigError,
    TsigKey,
    TsigVerdict,
    append_tsig,
    record_from_rdata,
    record_of,
    rr_size,
    time_other_data,
    verify,
)
from btmm_core.dns.wire import last_rr_offset
from btmm_core.registry.authority import check_update
from btmm_core.registry.enrolment import handle_enrolment
from btmm_core.registry.limits import KeyBudget, UpdateLimits, update_too_big
from btmm_core.registry.model import ChangeSet, SeenMac
from btmm_core.registry.plugin import Outgoing, Plugin
from btmm_core.registry.storage import Replayed, StaleZone, StorageError
from btmm_core.registry.update import Grant, NoLeasePolicy, plan_update
from btmm_core.registry.zones import TRANSFER_TYPES, Zone, ZoneStore

log = structlog.get_logger("btmm.registry")

#: Plans of one UPDATE before it gives up (SERVFAIL) when other servers keep changing the zone.
_PLAN_ATTEMPTS = 4


class Transport(enum.IntEnum):
    UDP = 1
    TCP = 2
    TLS = 3


@dataclass(frozen=True)
class Policy:
    """Server policy. Lease bounds default to the draft's 30 min .. 2 h."""

    fudge: int = MAX_FUDGE
    lease_min: int = 1800
    lease_max: int = 7200
    no_lease: NoLeasePolicy = NoLeasePolicy.PERMANENT
    default_lease: int = 5400
    udp_payload: int = 1232
    update_limits: UpdateLimits = field(default_factory=UpdateLimits)

    def __post_init__(self) -> None:
        if not 0 < self.fudge <= MAX_FUDGE:
            raise ValueError(f"fudge {self.fudge} s: it must be 1..{MAX_FUDGE}")
        if not 0 < self.lease_min <= self.lease_max:
            raise ValueError(
                f"lease bounds {self.lease_min}..{self.lease_max}: need 0 < min <= max"
            )


@dataclass(frozen=True)
class RequestContext:
    """What an option handler gets: the parsed request and who signed it."""

    request: dns.message.Message
    now: float
    transport: Transport
    peer: str
    key: TsigKey | None
    core: RegistryCore


OptionHandler = Callable[[RequestContext], dns.message.Message | None]


@dataclass
class _Held:
    """A request that came while a group was open, in arrival order: an update staged in the
    group (its answer, rendered once the group committed), an answer made already (it did
    not read the zones), or a request not handled yet (it would read them)."""

    transport: Transport
    peer: str
    request: bytes = b""
    reply: bytes | None = None
    response: dns.message.Message | None = None
    option: UpdateLeaseOption | None = None
    verdict: TsigVerdict | None = None
    limit: int = 0


def _header_only(wire: bytes, rcode: dns.rcode.Rcode) -> bytes:
    """An answer to a message we could not parse: its ID and opcode, QR set, no sections."""
    (qid, flags) = struct.unpack("!HH", wire[:4])
    flags = dns.flags.QR | (flags & 0x7800) | (flags & dns.flags.RD) | int(rcode)
    return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)


def _is_update(wire: bytes) -> bool:
    return len(wire) >= 12 and not wire[2] & 0x80 and (wire[2] >> 3) & 0xF == dns.opcode.UPDATE


def _codes(reply: bytes) -> int:
    """``opcode << 8 | rcode`` of a reply we made. Only BADVERS (16) needs the OPT record's
    upper bits, and only a reply with no answer and no authority records can be one, so
    nothing is walked for the answers that matter for speed."""
    rcode = reply[3] & 0xF
    if rcode == 0 and reply[6:10] == b"\0\0\0\0" and reply[10:12] != b"\0\0":
        try:
            p = last_rr_offset(reply)
            p += dns.name.from_wire(reply, p)[1]
            rdtype, ttl = struct.unpack_from("!H2xI", reply, p)
            if rdtype == dns.rdatatype.OPT:
                rcode |= (ttl >> 24) << 4
        except (dns.exception.DNSException, struct.error, IndexError):
            pass
    return ((reply[2] >> 3) & 0xF) << 8 | rcode


class RegistryCore:
    def __init__(
        self, store: ZoneStore, policy: Policy | None = None, replay: ReplayGuard | None = None
    ) -> None:
        self.store = store
        self.policy = policy or Policy()
        #: seen MACs and newest Time Signed per key; ``replay``: one shared with other
        #: processes (``registry/replay.py``: workers on one SQLite file)
        self.replay = replay if replay is not None else ReplayGuard.empty(self.policy.fudge)
        for s in store.loaded_seen:
            self.replay.remember(s.key, s.time_signed, s.mac)
        self.option_handlers: dict[int, OptionHandler] = {ENROL_CODE: handle_enrolment}
        #: Plugged in by the composition root; the driver runs their timers and pushes.
        self.plugins: list[Plugin] = []
        self._next_prune = 0.0
        #: Rendered answers to plain queries (before TSIG), by ``PlainQuery.key``, each with
        #: the ``ZoneStore.version`` it was computed at. 0 turns the cache off.
        self.answer_cache_size = 20000
        self._answers: dict[bytes, tuple[int, bytes]] = {}
        #: Keys ready for the fast path, by the canonical wire form of their name, valid
        #: while ``store.version`` is ``_raw_version`` (keys change only with a new version).
        self._raw_keys: dict[bytes, RawKey] = {}
        self._raw_version = -1
        self._raw_source = store.keys
        #: Queries answered from the cache since start (signed ones verified on bytes).
        self.cached_answers = 0
        limits = self.policy.update_limits
        self.update_budget = KeyBudget(limits.key_rate, limits.key_burst)
        #: Updates refused by ``_over_limits`` since start.
        self.updates_over_limit = 0
        #: Answers since start by ``opcode << 8 | rcode`` (extended rcodes included), TSIG
        #: refusals by kind (``TsigError`` name, or FORMERR), RRsets whose lease ran out: what
        #: ``btmm serve --metrics`` shows.
        self.responses: Counter[int] = Counter()
        self.tsig_errors: Counter[str] = Counter()
        self.leases_expired = 0
        #: Group commit (set by the composition root when ``store.storage.groups_commits``):
        #: an update is planned on the zones in memory and staged there; its answer waits
        #: for ``flush``, which makes the whole group durable in one transaction. While a
        #: group is open, nothing is answered: other requests wait in ``_held`` too.
        self.group_commit = False
        #: Requests held at most in one group (the driver flushes when ``group_full``).
        self.group_max = 256
        #: Seconds a group stays open after its first update (0: the driver's turn only).
        self.group_window = 0.0
        self._held: list[_Held] = []
        self._group_opened = 0.0
        #: Groups committed and updates in them, since start (their ratio: updates per fsync).
        self.groups = 0
        self.grouped_updates = 0

    def plug(self, plugin: Plugin) -> None:
        """Give ``plugin`` the requests carrying its EDNS options (see ``registry/plugin.py``)."""
        for code in plugin.option_codes:
            if code in self.option_handlers:
                raise ValueError(f"EDNS option {code} is taken already")
            self.option_handlers[code] = plugin.receive
        self.plugins.append(plugin)

    # ---- entry point -------------------------------------------------------------------

    def receive(
        self, wire: bytes, now: float, transport: Transport, peer: str = ""
    ) -> bytes | None:
        """Answer one DNS request; ``None`` means send nothing now: a QR message, or (group
        commit) a request whose answer ``flush`` will give once the open group committed."""
        if self._held and not _is_update(wire):
            # It would read zones that are ahead of the disk: handle it after the commit.
            if len(wire) >= 12 and not wire[2] & 0x80:
                self._held.append(_Held(transport, peer, request=wire))
            return None
        reply = self._receive(wire, now, transport, peer)
        if reply is not None:
            if self._held:
                self._held.append(_Held(transport, peer, reply=reply))
                return None
            self.responses[_codes(reply)] += 1
        return reply

    # ---- group commit ---------------------------------------------------------------------

    @property
    def group_open(self) -> bool:
        """Whether answers are held for a group to commit (``flush`` at ``next_deadline``)."""
        return bool(self._held)

    @property
    def group_full(self) -> bool:
        """Whether the open group holds ``group_max`` requests: ``flush`` it now."""
        return len(self._held) >= self.group_max

    def flush(self, now: float) -> list[Outgoing]:
        """Commit the open group in one transaction, then release every answer held, in
        arrival order: each staged update with its own rcode once the group is durable, or
        SERVFAIL if the commit failed (the zones were reloaded from the storage, so the
        requests handled after it never see what it would have written)."""
        held, self._held = self._held, []
        if not held:
            return []
        ok = True
        try:
            updates = self.store.flush()
            self.groups += 1
            self.grouped_updates += updates
        except Exception as e:  # sqlite3 errors too: none of the group is durable, say so
            log.error("group commit failed", requests=len(held), error=repr(e))
            ok = False
        out: list[Outgoing] = []
        for h in held:
            reply = h.reply
            if h.response is not None:
                if not ok:
                    h.response.set_rcode(dns.rcode.SERVFAIL)
                elif h.option is not None:
                    h.response.use_edns(0, 0, self.policy.udp_payload, options=[h.option])
                reply = self._render(h.response, h.verdict, now, h.limit)
            elif reply is None:
                out_reply = self.receive(h.request, now, h.transport, h.peer)
                if out_reply is not None:
                    out.append(Outgoing(h.transport, h.peer, out_reply))
                continue
            self.responses[_codes(reply)] += 1
            out.append(Outgoing(h.transport, h.peer, reply))
        return out

    def _receive(
        self, wire: bytes, now: float, transport: Transport, peer: str
    ) -> bytes | None:
        if len(wire) < 12:
            return None
        plain = scan(wire, transport != Transport.UDP) if self.answer_cache_size else None
        if plain is not None:
            fast = self._cached(wire, plain, now, transport, peer)
            if fast is not None:
                return fast
        (flags,) = struct.unpack("!H", wire[2:4])
        if flags & dns.flags.QR:
            return None
        opcode = (flags >> 11) & 0xF
        if opcode == dns.opcode.UPDATE:
            too_big = update_too_big(wire, self.policy.update_limits)
            if too_big is not None:
                return self._refuse_unparsed(wire, now, peer, too_big)
        try:
            request = dns.message.from_wire(
                wire,
                keyring=False,
                one_rr_per_rrset=opcode == dns.opcode.UPDATE,
            )
        except Exception as e:  # any parse failure of untrusted input is FORMERR
            log.debug("formerr", peer=peer, error=str(e) or type(e).__name__)
            return _header_only(wire, dns.rcode.FORMERR)
        limit = self._limit(request, transport)
        if request.edns > 0:
            response = dns.message.make_response(request, our_payload=self.policy.udp_payload)
            response.use_edns(0, 0, self.policy.udp_payload)
            response.set_rcode(dns.rcode.BADVERS)
            return self._render(response, None, now, limit)

        verdict: TsigVerdict | None = None
        if request.had_tsig:
            verdict = self._verify(wire, request, now)
            if not verdict.ok:
                return self._tsig_failure(request, verdict, now, limit)
        key = verdict.key if verdict is not None else None
        if key is not None:
            self._signed(transport, peer, key, now)

        for option in request.options:
            handler = self.option_handlers.get(int(option.otype))
            if handler is not None:
                taken = handler(RequestContext(request, now, transport, peer, key, self))
                if taken is not None:
                    return self._render(taken, verdict, now, limit)

        op = request.opcode()
        if op == dns.opcode.QUERY:
            return self._query(request, key, verdict, plain, now, limit)
        if op == dns.opcode.UPDATE:
            replayed: list[TsigVerdict] = []
            staged: list[UpdateLeaseOption | None] = []
            response = self._update(request, verdict, now, peer, replayed, staged)
            verdict = replayed[0] if replayed else verdict
            if staged:
                if not self._held:
                    self._group_opened = now
                self._held.append(
                    _Held(transport, peer, response=response, option=staged[0],
                          verdict=verdict, limit=limit)
                )
                return None
        else:
            response = self._response(request)
            response.set_rcode(dns.rcode.NOTIMP)
        return self._render(response, verdict, now, limit)

    def _query(
        self,
        request: dns.message.Message,
        key: TsigKey | None,
        verdict: TsigVerdict | None,
        plain: PlainQuery | None,
        now: float,
        limit: int,
    ) -> bytes:
        """Answer a QUERY; a plain query's unsigned answer is kept for ``_cached``."""
        body = self._body(self.answer(request, key), verdict, limit)
        if plain is not None:
            if len(self._answers) >= self.answer_cache_size:
                self._answers.clear()
            self._answers[plain.key] = (self.store.version, body)
        return self._sign(body, verdict, now)

    def _refuse_unparsed(self, wire: bytes, now: float, peer: str, why: str) -> bytes:
        """REFUSED for an oversized UPDATE without parsing its RRs (issue 11 item 5).

        Parsing 3,000 RRs costs tens of ms; only the zone section and the last RR are read.
        When that RR is a TSIG that verifies, the answer is signed (so nsupdate reports
        REFUSED rather than a missing signature); nothing is changed or remembered.
        """
        self.updates_over_limit += 1
        log.warning("update over limit", peer=peer, why=why)
        try:
            (qdcount, arcount) = struct.unpack("!HxxxxH", wire[4:12])
            p = 12
            for _ in range(qdcount):
                p += dns.name.from_wire(wire, p)[1] + 4
            header = _header_only(wire, dns.rcode.REFUSED)
            body = header[:4] + struct.pack("!H", qdcount) + header[6:] + wire[12:p]
            if arcount == 0:
                return body
            start = last_rr_offset(wire)
            key_name, used = dns.name.from_wire(wire, start)
            q = start + used
            (rdtype, rdlen) = struct.unpack("!H6xH", wire[q : q + 10])
            if rdtype != dns.rdatatype.TSIG or q + 10 + rdlen != len(wire):
                return body
            rdata = dns.rdata.from_wire(
                dns.rdataclass.ANY, dns.rdatatype.TSIG, wire, q + 10, rdlen
            )
            record = record_from_rdata(key_name, rdata, start)
        except Exception:  # malformed: any parse failure of untrusted input is FORMERR
            return _header_only(wire, dns.rcode.FORMERR)
        verdict = verify(wire, record, self.store.keys.get, now=int(now), fudge=self.policy.fudge)
        if not verdict.ok or verdict.key is None:
            return body
        return self._sign(body, verdict, now)

    def _signed(self, transport: Transport, peer: str, key: TsigKey, now: float) -> None:
        """Tell the plug-ins that ``key`` signed a request on this TCP/TLS connection."""
        if transport == Transport.UDP:
            return
        for plugin in self.plugins:
            plugin.on_signed(transport, peer, key, now)

    def _cached(
        self,
        wire: bytes,
        plain: PlainQuery,
        now: float,
        transport: Transport = Transport.UDP,
        peer: str = "",
    ) -> bytes | None:
        """The cached answer for a plain query, or None to take the full path.

        A signed query is verified on bytes (``RawKey``): the key, its algorithm, a
        full-length MAC, the time window and replay are all checked as on the full path, and
        any failure goes the full path too, which answers it (nothing is remembered before
        every check passed). The answer is signed on bytes; it is the full path's, byte for
        byte (tests/registry/test_query_fastpath.py).
        """
        version = self.store.version
        cached = self._answers.get(plain.key)
        if cached is None or cached[0] != version:
            return None
        rec = plain.tsig
        if rec is None:
            self.cached_answers += 1
            return wire[:2] + cached[1][2:]
        if self._raw_version != version or self._raw_source is not self.store.keys:
            # keys may have changed (a reload or an enrolment bumps the version): prepare again
            self._raw_keys.clear()
            self._raw_version = version
            self._raw_source = self.store.keys
        lowered = rec.key_wire.lower()
        raw = self._raw_keys.get(lowered)
        if raw is None:
            key = self.store.keys.get(dns.name.from_wire(lowered, 0)[0])
            raw = None if key is None else RawKey.of(key)
            if raw is None:
                return None
            if len(self._raw_keys) >= self.answer_cache_size:
                self._raw_keys.clear()
            self._raw_keys[lowered] = raw
        t = int(now)
        if not raw.verify(
            wire,
            alg_wire=rec.alg_wire,
            time_signed=rec.time_signed,
            fudge=rec.fudge,
            mac=rec.mac,
            original_id=rec.original_id,
            error=rec.error,
            other=rec.other,
            start=rec.start,
            now=t,
            server_fudge=self.policy.fudge,
        ):
            return None
        if not self.replay.admit_raw(raw.name_wire, rec.time_signed, rec.mac):
            return None
        if transport != Transport.UDP:
            self._signed(transport, peer, raw.key, now)
        self.cached_answers += 1
        return raw.sign(
            wire[:2] + cached[1][2:],
            key_wire=rec.key_wire,
            alg_wire=rec.alg_wire,
            request_mac=rec.mac,
            now=t,
            fudge=self.policy.fudge,
        )

    # ---- TSIG ----------------------------------------------------------------------------

    def _verify(self, wire: bytes, request: dns.message.Message, now: float) -> TsigVerdict:
        record = record_of(wire, request)
        verdict = verify(wire, record, self.store.keys.get, now=int(now), fudge=self.policy.fudge)
        if not verdict.ok or verdict.key is None:
            return verdict
        if not self.replay.admit(record.key_name, record.time_signed, record.mac):
            log.warning("tsig replay or older time signed", key=str(record.key_name))
            return TsigVerdict(TsigError.BADTIME, verdict.key, record)
        return verdict

    def _tsig_failure(
        self, request: dns.message.Message, verdict: TsigVerdict, now: float, limit: int
    ) -> bytes:
        response = self._response(request)
        if verdict.formerr:
            self.tsig_errors["FORMERR"] += 1
            response.set_rcode(dns.rcode.FORMERR)
            return self._render(response, None, now, limit)
        response.set_rcode(dns.rcode.NOTAUTH)
        self.tsig_errors[verdict.error.name] += 1
        log.warning(
            "tsig refused",
            key=str(verdict.record.key_name),
            error=verdict.error.name,
        )
        return self._render(response, verdict, now, limit)

    # ---- queries ---------------------------------------------------------------------------

    def _response(self, request: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(request, our_payload=self.policy.udp_payload)
        response.flags &= ~dns.flags.AA
        return response

    def answer(self, request: dns.message.Message, key: TsigKey | None) -> dns.message.Message:
        """The standard authoritative answer to a query (also usable by option handlers)."""
        response = self._response(request)
        if len(request.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        q = request.question[0]
        if q.rdclass != dns.rdataclass.IN or q.rdtype in TRANSFER_TYPES:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        zone = self.store.find_zone(q.name)
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        if not zone.may_read(q.name, q.rdtype, key):
            if q.rdtype == dns.rdatatype.SOA:
                # A resolver looking for the zone cut asks SOA at each name on the way up; the
                # apex SOA in the authority section tells it where the zone is and reveals
                # nothing about the name (the same answer whether it exists or not).
                response.flags |= dns.flags.AA
                response.authority.append(self._negative_soa(zone))
                return response
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.flags |= dns.flags.AA
        types = zone.types_at(q.name) if q.rdtype == dns.rdatatype.ANY else [q.rdtype]
        found = False
        for t in types:
            found |= self._add(response.answer, zone, q.name, t)
        if not found and q.rdtype != dns.rdatatype.CNAME:
            found = self._add(response.answer, zone, q.name, dns.rdatatype.CNAME)
        if found:
            if q.rdtype == dns.rdatatype.SRV:
                self._add_target_addresses(response, zone, key)
            return response
        if not zone.name_exists(q.name):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(self._negative_soa(zone))
        return response

    @staticmethod
    def _negative_soa(zone: Zone) -> dns.rrset.RRset:
        """The apex SOA for the authority section of a negative answer (RFC 2308 section 3)."""
        rrset = dns.rrset.RRset(zone.name, dns.rdataclass.IN, dns.rdatatype.SOA)
        rrset.add(zone.soa(), min(zone.config.soa_ttl, zone.config.negative_ttl))
        return rrset

    @staticmethod
    def _add(section: list[dns.rrset.RRset], zone: Zone, name: dns.name.Name,
             rdtype: int) -> bool:
        """Append the zone's RRset at (name, rdtype) to a section of a response, if any."""
        rrs = zone.get(name, rdtype)
        if not rrs:
            return False
        rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype))
        ttl = min(t for _, t in rrs)
        for rd, _ in rrs:
            rrset.add(rd, ttl)
        section.append(rrset)
        return True

    def _add_target_addresses(self, response: dns.message.Message, zone: Zone,
                              key: TsigKey | None) -> None:
        """The addresses of the answer's SRV targets, in the additional section (RFC 2782
        asks for them): one exchange where a reader of a host's candidates needed one more
        per target. Only targets in this zone that the request may read; a response too big
        for them drops them before it truncates (``_body``)."""
        seen: set[dns.name.Name] = set()
        for rrset in response.answer:
            if rrset.rdtype != dns.rdatatype.SRV:
                continue
            for rd in rrset:
                target = rd.target
                if target in seen or not target.is_subdomain(zone.name):
                    continue
                seen.add(target)
                for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    if zone.may_read(target, rdtype, key):
                        self._add(response.additional, zone, target, rdtype)

    # ---- updates -----------------------------------------------------------------------------

    def _grant(self, request: dns.message.Message) -> tuple[Grant | None, UpdateLeaseOption | None]:
        p = self.policy
        for option in request.options:
            if isinstance(option, UpdateLeaseOption):
                lease = min(max(option.lease, p.lease_min), p.lease_max)
                if option.key_lease is None:
                    return Grant(lease, lease), UpdateLeaseOption(lease)
                key_lease = min(max(option.key_lease, p.lease_min), p.lease_max)
                return Grant(lease, key_lease), UpdateLeaseOption(lease, key_lease)
        if p.no_lease == NoLeasePolicy.PERMANENT:
            return Grant(None, None), None
        if p.no_lease == NoLeasePolicy.DEFAULT_LEASE:
            return Grant(p.default_lease, p.default_lease), None
        return None, None

    def _update(
        self,
        request: dns.message.Message,
        verdict: TsigVerdict | None,
        now: float,
        peer: str,
        replayed: list[TsigVerdict],
        staged: list[UpdateLeaseOption | None],
    ) -> dns.message.Message:
        """Plan and commit an UPDATE; a replay found at commit appends the BADTIME verdict
        its answer must be signed with to ``replayed``. With group commit the change is
        staged instead and its lease option (given once it is durable) goes to ``staged``."""
        response = self._response(request)
        if len(request.question) != 1 or request.question[0].rdtype != dns.rdatatype.SOA:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        zq = request.question[0]
        zone = self.store.zones.get(zq.name)
        if zq.rdclass != dns.rdataclass.IN or zone is None:
            response.set_rcode(dns.rcode.NOTAUTH)
            return response
        key = verdict.key if verdict is not None else None
        if key is None or zone.user is None or key.zone != zone.name:
            log.warning(
                "update refused",
                zone=str(zone.name),
                peer=peer,
                key=None if key is None else str(key.name),
            )
            response.set_rcode(dns.rcode.REFUSED)
            return response
        assert verdict is not None
        seen = SeenMac(key.name, verdict.record.time_signed, verdict.record.mac)
        grant, option = self._grant(request)
        if self.group_commit and not self._held:
            # The group's first update: workers sharing a SQLite file take its write lock and
            # catch up first, so that the group is planned on the latest committed state.
            try:
                self.store.open_group()
            except Exception as e:  # sqlite3 errors (locked too long): nothing planned yet
                log.error("commit failed", zone=str(zone.name), error=repr(e))
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            fresh = self.store.zones.get(zone.name)
            if fresh is None:
                self.store.flush()  # nothing staged: lets go of the lock
                response.set_rcode(dns.rcode.NOTAUTH)
                return response
            zone = fresh
        # Another server on a shared database may change the zone between planning and
        # commit (StaleZone: the store reloaded it): plan again on the new state, a few times.
        for attempt in range(1, _PLAN_ATTEMPTS + 1):
            outcome_rcode, planned, why = self._plan(
                zone, request, key, seen, grant, now, peer, first=attempt == 1
            )
            # The MAC must stay spent even though nothing changed: a replay after a restart
            # could otherwise succeed once the prerequisites happen to hold.
            change = planned or ChangeSet(zone.name, zone.serial, seen=(seen,))
            if self.group_commit:
                self.store.stage(change)
                staged.append(option if outcome_rcode == dns.rcode.NOERROR else None)
                break
            try:
                self.store.commit(change)
                break
            except StaleZone as e:
                fresh = self.store.zones.get(zone.name)
                if fresh is None or attempt == _PLAN_ATTEMPTS:
                    log.error("commit failed", zone=str(zone.name), error=str(e))
                    response.set_rcode(dns.rcode.SERVFAIL)
                    return response
                zone = fresh
            except Replayed as e:
                # another server accepted this very message (or a newer one of its key)
                log.warning("tsig replay seen by another server", key=str(key.name), why=str(e))
                response.set_rcode(dns.rcode.NOTAUTH)
                replayed.append(TsigVerdict(TsigError.BADTIME, key, verdict.record))
                return response
            except (StorageError, OSError) as e:
                log.error("commit failed", zone=str(zone.name), error=str(e))
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            except Exception as e:  # sqlite3 errors: the update is not durable, say so
                log.error("commit failed", zone=str(zone.name), error=repr(e))
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
        response.set_rcode(outcome_rcode)
        log.info(
            "update",
            zone=str(zone.name),
            peer=peer,
            rcode=dns.rcode.to_text(outcome_rcode),
            why=why or None,
            serial=zone.serial,
            added=len(change.upserts),
            removed=len(change.deletes),
        )
        if outcome_rcode == dns.rcode.NOERROR and option is not None and not staged:
            response.use_edns(0, 0, self.policy.udp_payload, options=[option])
        return response

    def _plan(
        self,
        zone: Zone,
        request: dns.message.Message,
        key: TsigKey,
        seen: SeenMac,
        grant: Grant | None,
        now: float,
        peer: str,
        *,
        first: bool = True,
    ) -> tuple[dns.rcode.Rcode, ChangeSet | None, str]:
        """The update's rcode, the change it makes (None: nothing to change) and why.

        ``first``: the first plan of this update; a plan again (the zone was stale) does not
        spend the key's budget twice."""
        # the limits first: they bound the work that the authority check and planning do
        over = self._over_limits(zone, request, key, now, peer) if first else None
        if over is not None:
            return dns.rcode.REFUSED, None, over
        authority = check_update(zone, key, request)
        if authority.refused is not None:
            return dns.rcode.REFUSED, None, authority.refused
        if grant is None:
            return dns.rcode.REFUSED, None, "updates without a lease are refused by policy"
        outcome = plan_update(zone, request, now=now, grant=grant, seen=seen)
        change = outcome.change
        if change is not None and authority.claims:
            change = dataclasses.replace(change, claims=authority.claims)
        return outcome.rcode, change, outcome.why

    def _over_limits(
        self, zone: Zone, request: dns.message.Message, key: TsigKey, now: float, peer: str
    ) -> str | None:
        """Why an update is refused before any planning (issue 11 item 5), or None.

        The RR count of the message was checked on the header before parsing (``receive``).
        Cheap checks only, each O(RRs in the message): the adds against the zone's record
        limit, then the key's budget of RRs per second (spent only when the update gets this
        far). The exact zone size check follows planning.
        """
        limits = self.policy.update_limits
        # parsed one RR per RRset: a delete-RRset/name entry is an RRset with no RR
        changes = sum(max(len(rs), 1) for rs in request.sections[2])
        adds = sum(len(rs) for rs in request.sections[2] if rs.deleting is None)
        why = None
        if adds > zone.config.max_records:
            why = f"{adds} RRs added at once, a zone holds at most {zone.config.max_records}"
        elif not self.update_budget.take(key.name, changes, now):
            why = (
                f"key over its budget of {limits.key_rate:g} RRs/s"
                f" (burst {limits.key_burst}); {changes} RRs asked"
            )
        if why is not None:
            self.updates_over_limit += 1
            log.warning(
                "update over limit", zone=str(zone.name), key=str(key.name), peer=peer, why=why
            )
        return why

    # ---- rendering ----------------------------------------------------------------------------

    def _limit(self, request: dns.message.Message, transport: Transport) -> int:
        if transport != Transport.UDP:
            return 65535
        if request.edns < 0:
            return 512
        return max(512, min(request.payload, self.policy.udp_payload))

    def _render(
        self,
        response: dns.message.Message,
        verdict: TsigVerdict | None,
        now: float,
        limit: int,
    ) -> bytes:
        return self._sign(self._body(response, verdict, limit), verdict, now)

    def _body(
        self, response: dns.message.Message, verdict: TsigVerdict | None, limit: int
    ) -> bytes:
        """The response's wire form within ``limit`` (room kept for the TSIG), else TC."""
        reserve = 0
        if verdict is not None:
            reserve = rr_size(verdict.record.key_name, verdict.record.algorithm)
        try:
            wire = self._wire_within(response, limit - reserve)
        except dns.exception.TooBig:
            # RFC 1035 4.2.1 / RFC 7766: tell the client to retry over TCP.
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            wire = response.to_wire()
        return wire

    @staticmethod
    def _wire_within(response: dns.message.Message, size: int) -> bytes:
        """The response within ``size`` bytes; additional records are a courtesy and go first
        (RFC 2181 section 9: no TC for them), then TooBig."""
        try:
            wire = response.to_wire(max_size=size)
            if len(wire) > size:
                raise dns.exception.TooBig
            return wire
        except dns.exception.TooBig:
            if not response.additional:
                raise
        response.additional.clear()
        wire = response.to_wire(max_size=size)
        if len(wire) > size:
            raise dns.exception.TooBig
        return wire

    def _sign(self, wire: bytes, verdict: TsigVerdict | None, now: float) -> bytes:
        if verdict is None:
            return wire
        rec = verdict.record
        t = int(now)
        key, time_signed, other = verdict.key, t, b""
        if verdict.error in (TsigError.BADKEY, TsigError.BADSIG):
            # RFC 8945 5.3.2: never signed, MAC empty.
            key, time_signed = None, rec.time_signed
        elif verdict.error == TsigError.BADTIME:
            time_signed, other = rec.time_signed, time_other_data(t)
        return append_tsig(
            wire,
            key=key,
            key_name=rec.key_name,
            algorithm=rec.algorithm,
            request_mac=rec.mac,
            time_signed=time_signed,
            fudge=self.policy.fudge,
            error=verdict.error,
            other=other,
        )

    # ---- timers -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        expiry = self.store.next_expiry()
        if not self._held:
            return expiry
        group = self._group_opened + self.group_window
        return group if expiry is None else min(expiry, group)

    def tick(self, now: float) -> int:
        """Drop RRs whose lease ran out (observers hear of each RRset); returns how many
        RRsets changed. An open group must have been flushed first."""
        if self._held:
            raise RuntimeError("a group commit is open: flush it before tick")
        events = self.store.expire(now)
        self.leases_expired += len(events)
        if now >= self._next_prune:
            self.replay.prune(int(now))
            self._next_prune = now + 10.0
        if events:
            log.info("leases expired", rrsets=len(events))
        return len(events)
