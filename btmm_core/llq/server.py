"""Long-lived query server state, sans-I/O (RFC 8764 sections 5 to 7).

A registry plug-in (``btmm_core.registry.plugin``): requests come in through ``receive`` (the
registry core gives it those carrying EDNS option 1), event acknowledgements through
``receive_response`` (messages with QR set), RRset changes through ``on_changes``, and
``tick(now)`` does the timed work (event retransmission, lease expiry). The events each of these
sends are returned from it as ``Outgoing`` messages. Nothing here opens a socket, reads a clock
or draws randomness of its own: the secret and the ``random.Random`` come from the composition
root (``btmm_core.serve.compose``).

Why the challenge id looks the way it does: RFC 8764 5.2 wants no state for a setup request
until the client echoes the challenge, so the id is self-certifying: 32 bits of issue time and
32 bits of an HMAC (server secret) over that time, the client's address and port, the question
and the TSIG key name. A challenge response is accepted only if its id verifies and is recent;
a spoofed request therefore costs one answer and nothing else. The secret is drawn afresh at
each start, so after a restart every old id is NO-SUCH-LLQ and clients set their LLQs up again.

Events are sent one at a time per LLQ, in order: changes that arrive while an event is waiting
for its acknowledgement are merged (last change of a record wins) and go out in the next event.
That keeps the client's view right under loss and retransmission. An event not acknowledged
after ``len(resend_after)`` transmissions (2 s, 4 s, 8 s) drops the LLQ (RFC 8764 section 7);
the client notices at its next refresh (NO-SUCH-LLQ) and sets up again with a full answer.
An acknowledgement counts only when it is signed as a TSIG response to the event in flight
(the event's MAC is its request MAC): the header ID is not covered by the MAC, so a captured
acknowledgement re-sent with a later event's ID must not acknowledge that event.

Over TCP and DNS over TLS (RFC 8764 section 4 lets LLQ run over TCP; RFC 7766/7858 framing)
the setup, refresh and cancel are the same messages on one connection, and events are pushed
on that connection. The LLQ belongs to the connection (its peer is the connection's
address#port): the challenge must be answered and the LLQ refreshed on it, and when it closes
the driver calls ``connection_closed`` and its LLQs go. A reliable transport delivers the
event or the connection fails, so events are never resent there; the acknowledgement is still
required and keeps one event in flight (the same merging as over UDP), and an event not
acknowledged within ``sum(resend_after)`` (14 s, what UDP allows for all its transmissions)
drops the LLQ as over UDP. Answers over a stream are not limited to the UDP payload.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import random
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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

from btmm_core.dns.llq_option import (
    LLQ_CODE,
    LLQ_LENGTH,
    REMOVED_TTL,
    LLQError,
    LLQOpcode,
    LLQOption,
    find_llq,
)
from btmm_core.dns.tsig import (
    MAX_FUDGE,
    TsigKey,
    expected_mac,
    record_of,
    rr_size,
    sign,
    strip_tsig,
)
from btmm_core.llq.fastwire import Ack, AckTsig, EventTemplate, KeyWire, canonical, parse_ack
from btmm_core.registry.handler import RegistryCore, RequestContext, Transport
from btmm_core.registry.limits import client_prefix
from btmm_core.registry.model import RRsetChange
from btmm_core.registry.plugin import Outgoing
from btmm_core.registry.zones import NOT_RECORD_TYPES

log = structlog.get_logger("btmm.llq")

RecordKey = tuple[dns.name.Name, int, dns.rdata.Rdata]
#: One queued change: the record's identity (``_record_id``), the record and its TTL.
_Item = tuple[bytes, tuple[RecordKey, int]]


def _record_id(name: dns.name.Name, rdtype: int, rd: dns.rdata.Rdata) -> bytes:
    """Bytes equal exactly when the records are (names compared without case, RDATA in
    canonical form): hashed once, where a (Name, type, Rdata) tuple is hashed by dnspython
    at every look-up."""
    wire = rd.to_digestable()
    return canonical(name) + struct.pack("!HH", rdtype, len(wire)) + wire


@dataclass(frozen=True)
class LLQConfig:
    """Server policy. Lease bounds default to RFC 8764's 15 min .. 2 h."""

    lease_min: int = 900
    lease_max: int = 7200
    max_total: int = 20000
    #: LLQs per client: per IPv4 address, per /64 for IPv6 (see ``client_of``).
    max_per_client: int = 256
    #: LLQ-LEASE of a SERV-FULL answer: when the client may try again (RFC 8764 5.2.2).
    full_retry: int = 300
    #: How long a challenge id stays valid for the challenge response.
    challenge_window: int = 60
    #: Wait after each transmission of an event; its length is the number of transmissions.
    resend_after: tuple[float, ...] = (2.0, 4.0, 8.0)
    max_records_per_event: int = 32
    #: Events sent for the first time and not yet acknowledged, across all LLQs; more wait.
    #: 0: no limit. An event stops counting when acknowledged or when its first wait ends.
    max_unacked: int = 1000
    fudge: int = 300
    udp_payload: int = 1232

    def __post_init__(self) -> None:
        if not 0 < self.lease_min <= self.lease_max:
            raise ValueError(
                f"LLQ lease bounds {self.lease_min}..{self.lease_max}: need 0 < min <= max"
            )
        if self.max_total < 1 or self.max_per_client < 1:
            raise ValueError("LLQ limits must be at least 1")
        if not self.resend_after or any(t <= 0 for t in self.resend_after):
            raise ValueError("resend_after needs at least one positive wait")
        if self.max_unacked < 0:
            raise ValueError("max_unacked must be 0 (no limit) or more")


@dataclass
class _Event:
    msg_id: int
    wire: bytes
    sent: int
    next_at: float
    #: Counts against ``max_unacked``.
    in_window: bool = False
    #: The event's TSIG MAC: its acknowledgement must be signed as a response to it.
    mac: bytes | None = None


@dataclass
class LLQ:
    """One established long-lived query."""

    llq_id: int
    qname: dns.name.Name
    qtype: int
    peer: str
    transport: Transport
    key_name: dns.name.Name | None
    expires: float
    payload: int
    #: Changes not sent yet, by the record's identity (``_record_id``), latest last.
    queued: dict[bytes, tuple[RecordKey, int]] = field(default_factory=dict)
    inflight: _Event | None = None
    #: Time Signed of the last event: never goes back, even if the clock does, because the
    #: client refuses an event signed earlier than the newest it applied.
    signed: int = 0
    #: The question in canonical wire form and its type (the key of its event templates).
    qkey: bytes = b""
    #: ``key_name`` in canonical wire form (b"": none).
    key_canonical: bytes = b""

    @property
    def client(self) -> str:
        return client_of(self.peer)

    @property
    def stream(self) -> bool:
        return self.transport != Transport.UDP


def client_of(peer: str) -> str:
    """What the per-client limit counts against, from "address#port": the IPv4 address, or
    the /64 of an IPv6 address (one host or site usually holds a whole /64, so counting per
    IPv6 address would let it take as many LLQs as it picks addresses)."""
    return client_prefix(peer.rsplit("#", 1)[0])


#: Event message ids drawn at once from the server's random generator.
_ID_BATCH = 512

#: Answers a request with an LLQ option: (opcode, error, llq id, lease).
_Reply = Callable[..., dns.message.Message]


class LLQServer:
    option_codes: tuple[int, ...] = (LLQ_CODE,)
    dso: bool = False

    def __init__(
        self,
        core: RegistryCore,
        config: LLQConfig,
        secret: bytes,
        rng: random.Random,
        *,
        fast: bool = True,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the LLQ challenge secret needs at least 16 bytes")
        self.core = core
        self.config = config
        self._secret = secret
        self._rng = rng
        self.llqs: dict[int, LLQ] = {}
        self._by_rrset: dict[tuple[dns.name.Name, int], set[int]] = {}
        self._per_client: Counter[str] = Counter()
        self._expiry: list[tuple[float, int]] = []
        self._resends: list[tuple[float, int, int]] = []
        #: LLQs set up over TCP/TLS, by connection: they end with it.
        self._by_conn: dict[tuple[Transport, str], set[int]] = {}
        self._templates: dict[
            tuple[dns.name.Name, int, tuple[tuple[RecordKey, int], ...]], bytes
        ] = {}
        #: Events and acknowledgements as bytes (``fastwire``); False: through dnspython
        #: objects only, the reference the tests compare the fast path with.
        self.fast = fast
        self._fast_templates: dict[bytes, EventTemplate] = {}
        #: Keys prepared for signing, by name, with the bytes their TSIG RR adds.
        self._key_wires: dict[bytes, tuple[KeyWire, int]] = {}
        self.stats: Counter[str] = Counter()
        #: LLQs with changes waiting for room in the send window, in arrival order.
        self._waiting: dict[int, None] = {}
        self._unacked = 0
        #: Message ids drawn ahead (``_msg_id``): one draw from the injected generator per
        #: ``_ID_BATCH`` events instead of a draw (two getrandom calls for a SystemRandom) each.
        self._ids = b""
        self._ids_at = 0

    def _msg_id(self) -> int:
        """A random 16-bit message id for an event, from ids drawn ``_ID_BATCH`` at a time."""
        at = self._ids_at
        if at >= len(self._ids):
            self._ids = self._rng.getrandbits(16 * _ID_BATCH).to_bytes(2 * _ID_BATCH, "big")
            at = 0
        self._ids_at = at + 2
        return (self._ids[at] << 8) | self._ids[at + 1]

    # ---- requests -----------------------------------------------------------------------

    def _lease(self, asked: int) -> int:
        return min(max(asked, self.config.lease_min), self.config.lease_max)

    def challenge_id(
        self,
        issued: int,
        peer: str,
        qname: dns.name.Name,
        qtype: int,
        key_name: dns.name.Name | None,
        transport: Transport = Transport.UDP,
    ) -> int:
        t = issued & 0xFFFFFFFF
        h = hmac.new(self._secret, digestmod=hashlib.sha256)
        h.update(struct.pack("!I", t))
        if transport != Transport.UDP:
            # A TCP connection's address#port must not validate a UDP challenge or back.
            h.update(struct.pack("!B", transport))
        h.update(peer.encode())
        h.update(b"\0")
        h.update(canonical(qname))
        h.update(struct.pack("!H", qtype))
        if key_name is not None:
            h.update(canonical(key_name))
        return (t << 32) | int.from_bytes(h.digest()[:4], "big")

    def _challenge_ok(
        self,
        llq_id: int,
        now: float,
        peer: str,
        qname: dns.name.Name,
        qtype: int,
        key_name: dns.name.Name | None,
        transport: Transport = Transport.UDP,
    ) -> bool:
        issued = llq_id >> 32
        if not 0 <= int(now) - issued <= self.config.challenge_window:
            return False
        expected = self.challenge_id(issued, peer, qname, qtype, key_name, transport)
        return hmac.compare_digest(expected.to_bytes(8, "big"), llq_id.to_bytes(8, "big"))

    def _full(self, peer: str) -> bool:
        return (
            len(self.llqs) >= self.config.max_total
            or self._per_client[client_of(peer)] >= self.config.max_per_client
        )

    def receive(self, ctx: RequestContext) -> dns.message.Message | None:
        """Answer a request carrying an LLQ option (the core signs and renders it)."""
        req = ctx.request
        options = find_llq(req.options)
        response = dns.message.make_response(req, our_payload=self.config.udp_payload)
        response.flags &= ~dns.flags.AA

        def reply(
            opcode: int, error: LLQError, llq_id: int = 0, lease: int = 0
        ) -> dns.message.Message:
            response.use_edns(
                0, 0, self.config.udp_payload, options=[LLQOption(opcode, error, llq_id, lease)]
            )
            if error != LLQError.NO_ERROR:
                self.stats[f"error_{error.name.lower()}"] += 1
            return response

        if len(options) != 1 or options[0].malformed:
            return reply(LLQOpcode.SETUP, LLQError.FORMAT_ERR)
        opt = options[0]
        if opt.version != 1:
            return reply(opt.opcode, LLQError.BAD_VERS, opt.llq_id)
        if (
            len(req.question) != 1
            or req.opcode() != dns.opcode.QUERY
            or opt.opcode not in (LLQOpcode.SETUP, LLQOpcode.REFRESH)
        ):
            return reply(opt.opcode, LLQError.FORMAT_ERR, opt.llq_id)
        q = req.question[0]
        if q.rdclass != dns.rdataclass.IN or q.rdtype in NOT_RECORD_TYPES:
            return reply(opt.opcode, LLQError.FORMAT_ERR, opt.llq_id)
        zone = self.core.store.find_zone(q.name)
        key = ctx.key
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        if not zone.may_read(q.name, q.rdtype, key):
            # RFC 8764 leaves access control to the server; user zones are private: the
            # account key and every device key of the user may watch, an invite may not.
            self.stats["refused"] += 1
            log.warning("llq refused: not signed with the zone's key", peer=ctx.peer)
            response.set_rcode(dns.rcode.REFUSED)
            return response
        if zone.is_static(q.name, q.rdtype):
            # The parent zone and the server-made records never change through UPDATE.
            return reply(opt.opcode, LLQError.STATIC, opt.llq_id)
        if opt.opcode == LLQOpcode.REFRESH:
            return self._refresh(ctx, opt, reply)
        return self._setup(ctx, opt, reply)

    def _refresh(self, ctx: RequestContext, opt: LLQOption, reply: _Reply) -> dns.message.Message:
        """A refresh (or, with lease 0, a cancel) of an established LLQ."""
        q = ctx.request.question[0]
        key_name = ctx.key.name if ctx.key is not None else None
        peer, now, transport = ctx.peer, ctx.now, ctx.transport
        llq = self.llqs.get(opt.llq_id)
        if (
            llq is None
            or llq.peer != peer
            or llq.transport != transport
            or llq.qname != q.name
            or llq.qtype != q.rdtype
            or llq.key_name != key_name
        ):
            return reply(LLQOpcode.REFRESH, LLQError.NO_SUCH_LLQ, opt.llq_id)
        if opt.lease == 0:
            self._delete(llq, "cancelled")
            return reply(LLQOpcode.REFRESH, LLQError.NO_ERROR, opt.llq_id, 0)
        lease = self._lease(opt.lease)
        llq.expires = now + lease
        heapq.heappush(self._expiry, (llq.expires, llq.llq_id))
        self.stats["refreshes"] += 1
        return reply(LLQOpcode.REFRESH, LLQError.NO_ERROR, opt.llq_id, lease)

    def _setup(self, ctx: RequestContext, opt: LLQOption, reply: _Reply) -> dns.message.Message:
        """The setup request (answered with a challenge) or the challenge response."""
        req = ctx.request
        q = ctx.request.question[0]
        key_name = ctx.key.name if ctx.key is not None else None
        peer, now, transport = ctx.peer, ctx.now, ctx.transport
        if opt.llq_id == 0:
            # Setup request: answer with a challenge, keep nothing.
            if self._full(peer):
                return reply(LLQOpcode.SETUP, LLQError.SERV_FULL, 0, self.config.full_retry)
            self.stats["challenges"] += 1
            llq_id = self.challenge_id(int(now), peer, q.name, q.rdtype, key_name, transport)
            return reply(LLQOpcode.SETUP, LLQError.NO_ERROR, llq_id, self._lease(opt.lease))

        llq = self.llqs.get(opt.llq_id)
        if llq is not None:
            if (
                llq.peer != peer
                or llq.transport != transport
                or llq.qname != q.name
                or llq.qtype != q.rdtype
            ):
                return reply(LLQOpcode.SETUP, LLQError.NO_SUCH_LLQ, opt.llq_id)
            # A repeated challenge response: the ACK was lost, send it again.
            lease = max(0, int(llq.expires - now))
        else:
            if not self._challenge_ok(opt.llq_id, now, peer, q.name, q.rdtype, key_name, transport):
                return reply(LLQOpcode.SETUP, LLQError.NO_SUCH_LLQ, opt.llq_id)
            if self._full(peer):
                return reply(LLQOpcode.SETUP, LLQError.SERV_FULL, 0, self.config.full_retry)
            lease = self._lease(opt.lease)
            if transport == Transport.UDP:
                payload = max(512, min(req.payload, self.config.udp_payload))
            else:
                payload = 0xFFFF  # a stream message's length prefix is the only limit
            self._create(
                LLQ(
                    opt.llq_id,
                    q.name,
                    q.rdtype,
                    peer,
                    transport,
                    key_name,
                    now + lease,
                    payload,
                )
            )
        ack = self.core.answer(req, ctx.key)
        ack.use_edns(
            0,
            0,
            self.config.udp_payload,
            options=[LLQOption(LLQOpcode.SETUP, LLQError.NO_ERROR, opt.llq_id, lease)],
        )
        return ack

    # ---- state --------------------------------------------------------------------------

    def _create(self, llq: LLQ) -> None:
        llq.qkey = canonical(llq.qname) + struct.pack("!H", llq.qtype)
        if llq.key_name is not None:
            llq.key_canonical = canonical(llq.key_name)
            if self.fast:
                # prepared now, at setup, not for the first event: a fan-out to thousands of
                # new LLQs would otherwise prepare thousands of keys while everyone waits
                self._key_wire(llq)
        self.llqs[llq.llq_id] = llq
        self._by_rrset.setdefault((llq.qname, llq.qtype), set()).add(llq.llq_id)
        self._per_client[llq.client] += 1
        heapq.heappush(self._expiry, (llq.expires, llq.llq_id))
        if llq.stream:
            self._by_conn.setdefault((llq.transport, llq.peer), set()).add(llq.llq_id)
        self.stats["established"] += 1
        log.debug(
            "llq established",
            id=f"{llq.llq_id:016x}",
            peer=llq.peer,
            question=f"{llq.qname} {dns.rdatatype.RdataType.make(llq.qtype).name}",
        )

    def _delete(self, llq: LLQ, why: str) -> None:
        if self.llqs.pop(llq.llq_id, None) is None:
            return
        self._release(llq)
        self._waiting.pop(llq.llq_id, None)
        ids = self._by_rrset.get((llq.qname, llq.qtype))
        if ids is not None:
            ids.discard(llq.llq_id)
            if not ids:
                del self._by_rrset[(llq.qname, llq.qtype)]
        self._per_client[llq.client] -= 1
        if self._per_client[llq.client] <= 0:
            del self._per_client[llq.client]
        if llq.stream:
            conn = self._by_conn.get((llq.transport, llq.peer))
            if conn is not None:
                conn.discard(llq.llq_id)
                if not conn:
                    del self._by_conn[(llq.transport, llq.peer)]
        self.stats[why] += 1
        log.debug("llq deleted", id=f"{llq.llq_id:016x}", peer=llq.peer, why=why)

    def connection_closed(self, transport: Transport, peer: str) -> int:
        """A TCP/TLS connection ended: its LLQs end with it. Returns how many went."""
        ids = self._by_conn.pop((transport, peer), set())
        for llq_id in list(ids):
            llq = self.llqs.get(llq_id)
            if llq is not None:
                self._delete(llq, "connection_closed")
        return len(ids)

    def receive_message(
        self, wire: bytes, now: float, transport: Transport, peer: str
    ) -> list[Outgoing]:
        return []  # not a DSO plug-in

    def on_signed(self, transport: Transport, peer: str, key: TsigKey, now: float) -> None:
        return None  # LLQ checks the key of each request itself

    def holds_connection(self, transport: Transport, peer: str) -> bool:
        """Whether the connection carries an LLQ (the driver then keeps it open when idle)."""
        return (transport, peer) in self._by_conn

    # ---- events -------------------------------------------------------------------------

    def on_changes(self, changes: Sequence[RRsetChange], now: float) -> list[Outgoing]:
        """Committed RRset changes: queue them on the LLQs that watch them; returns the events
        that go out at once (one per LLQ with none in flight, as the send window allows)."""
        touched: set[int] = set()
        for ch in changes:
            ids = self._watchers(ch.name, ch.rdtype)
            if not ids:
                continue
            ttls = dict(ch.after)
            records: list[tuple[RecordKey, int]] = [
                ((ch.name, ch.rdtype, rd), ttls[rd]) for rd in ch.added
            ]
            records += [((ch.name, ch.rdtype, rd), REMOVED_TTL) for rd in ch.removed]
            if not records:  # only TTLs changed: send the RRset as it is now
                records = [((ch.name, ch.rdtype, rd), ttl) for rd, ttl in ch.after]
            items = [(_record_id(*rkey), (rkey, ttl)) for rkey, ttl in records]
            for llq_id in ids:
                queued = self.llqs[llq_id].queued
                for rid, item in items:
                    queued.pop(rid, None)  # keep the order of the latest change
                    queued[rid] = item
                touched.add(llq_id)
        out: list[Outgoing] = []
        for llq_id in touched:
            llq = self.llqs[llq_id]
            if llq.inflight is None:
                out += self._send_next(llq, now)
        return out

    def _watchers(self, name: dns.name.Name, rdtype: int) -> set[int]:
        ids = set(self._by_rrset.get((name, rdtype), ()))
        ids |= self._by_rrset.get((name, dns.rdatatype.ANY), set())
        return ids

    def _event_template(
        self, qname: dns.name.Name, qtype: int, records: tuple[tuple[RecordKey, int], ...]
    ) -> bytes:
        """The unsigned event with message id 0 and LLQ id/lease 0, rendered once per content.

        One change usually goes to many LLQs with the same question and records; only the
        message id and the last 18 bytes (the LLQ option data, the OPT RR's only option, last
        in the message) differ between them, so they are patched in instead of re-rendering.
        """
        cache_key = (qname, qtype, records)
        wire = self._templates.get(cache_key)
        if wire is not None:
            return wire
        wire = self._render_event(qname, qtype, records)
        if len(self._templates) >= 256:
            self._templates.clear()
        self._templates[cache_key] = wire
        return wire

    def _render_event(
        self, qname: dns.name.Name, qtype: int, records: Sequence[tuple[RecordKey, int]]
    ) -> bytes:
        msg = dns.message.Message(id=0)
        msg.flags = dns.flags.QR | dns.flags.AA
        msg.question.append(
            dns.rrset.RRset(qname, dns.rdataclass.IN, dns.rdatatype.RdataType.make(qtype))
        )
        for (name, rdtype, rd), ttl in records:
            rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(rdtype))
            rrset.add(rd, ttl)
            msg.answer.append(rrset)
        msg.use_edns(
            0, 0, self.config.udp_payload, options=[LLQOption(LLQOpcode.EVENT, LLQError.NO_ERROR)]
        )
        wire = msg.to_wire()
        # The patching below relies on the option data being the message's last bytes.
        assert wire[-LLQ_LENGTH:] == LLQOption(LLQOpcode.EVENT).data()
        return wire

    def _key_wire(self, llq: LLQ) -> tuple[KeyWire, int] | None:
        """The LLQ's key prepared for signing, or None if it is gone (revoked)."""
        assert llq.key_name is not None
        key = self.core.store.keys.get(llq.key_name)
        if key is None:
            return None
        cached = self._key_wires.get(llq.key_canonical)
        if cached is None or cached[0].key is not key:
            if len(self._key_wires) >= 65536:
                self._key_wires.clear()
            cached = (KeyWire(key), rr_size(key.name, key.algorithm, 0))
            self._key_wires[llq.key_canonical] = cached
        return cached

    def _event_wire(
        self, llq: LLQ, items: list[_Item], now: float
    ) -> tuple[int, bytes, bytes | None] | None:
        records = [item for _, item in items]
        if not self.fast:
            return self._event_wire_slow(llq, records, now)
        # the template's key: bytes, whose hash Python keeps (a dnspython name's it does not)
        content = b"".join(
            [llq.qkey] + [struct.pack("!HI", len(rid), ttl) + rid for rid, (_, ttl) in items]
        )
        template = self._fast_templates.get(content)
        if template is None:
            if len(self._fast_templates) >= 256:
                self._fast_templates.clear()
            rendered = self._render_event(llq.qname, llq.qtype, records)
            template = self._fast_templates[content] = EventTemplate.of(rendered)
        msg_id = self._msg_id()
        wire = template.event(msg_id, llq.llq_id, max(0, int(llq.expires - now)))
        size = len(wire)
        kw = None
        if llq.key_name is not None:
            kw = self._key_wire(llq)
            if kw is None:
                return None
            size += kw[1]
        if size > llq.payload and len(records) > 1:
            return msg_id, b"", None
        if kw is None:
            return msg_id, wire, None
        llq.signed = max(llq.signed, int(now))
        return (msg_id, *kw[0].sign(wire, time_signed=llq.signed, fudge=self.config.fudge))

    def _event_wire_slow(
        self, llq: LLQ, records: list[tuple[RecordKey, int]], now: float
    ) -> tuple[int, bytes, bytes | None] | None:
        template = self._event_template(llq.qname, llq.qtype, tuple(records))
        msg_id = self._msg_id()
        lease = max(0, int(llq.expires - now))
        option = LLQOption(LLQOpcode.EVENT, LLQError.NO_ERROR, llq.llq_id, lease)
        wire = struct.pack("!H", msg_id) + template[2:-LLQ_LENGTH] + option.data()
        key = None
        size = len(wire)
        if llq.key_name is not None:
            key = self.core.store.keys.get(llq.key_name)
            if key is None:
                return None
            size += rr_size(key.name, key.algorithm, 0)
        if size > llq.payload and len(records) > 1:
            # Too big for the client's UDP payload: the caller sends fewer.
            return msg_id, b"", None
        if key is None:
            return msg_id, wire, None
        llq.signed = max(llq.signed, int(now))
        # the MAC is kept to check the acknowledgement
        return (msg_id, *sign(wire, key, time_signed=llq.signed, fudge=self.config.fudge))

    def _release(self, llq: LLQ) -> None:
        if llq.inflight is not None and llq.inflight.in_window:
            llq.inflight.in_window = False
            self._unacked -= 1

    def _room(self) -> bool:
        return not self.config.max_unacked or self._unacked < self.config.max_unacked

    def _send_waiting(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        while self._waiting and self._room():
            llq_id = next(iter(self._waiting))
            del self._waiting[llq_id]
            llq = self.llqs.get(llq_id)
            if llq is not None and llq.inflight is None:
                out += self._send_next(llq, now, turn=True)
        return out

    def _send_next(self, llq: LLQ, now: float, *, turn: bool = False) -> list[Outgoing]:
        """The LLQ's next event, or none and the LLQ queued until the send window has room.

        Why a window: one update to a name that thousands watch makes thousands of events at
        once. Sent all together, their acknowledgements come back faster than anyone reads
        them (here or at the clients), the first resend fires for events whose ack is only
        queued, and the duplicates double the work until LLQs are dropped. Keeping at most
        ``max_unacked`` first transmissions outstanding sends the burst at the rate it is
        acknowledged.
        """
        if not llq.queued:
            return []
        if not turn and (self._waiting or not self._room()):
            self._waiting[llq.llq_id] = None  # behind those already waiting
            return []
        take = min(len(llq.queued), self.config.max_records_per_event)
        items = list(llq.queued.items())
        while True:
            built = self._event_wire(llq, items[:take], now)
            if built is None:
                self._delete(llq, "key_gone")
                return []
            msg_id, wire, mac = built
            if wire:
                break
            take = max(1, take // 2)
        for rid, _ in items[:take]:
            del llq.queued[rid]
        wait = sum(self.config.resend_after) if llq.stream else self.config.resend_after[0]
        event = _Event(msg_id, wire, 1, now + wait, in_window=True, mac=mac)
        self._unacked += 1
        llq.inflight = event
        heapq.heappush(self._resends, (event.next_at, llq.llq_id, msg_id))
        self.stats["events"] += 1
        return [Outgoing(llq.transport, llq.peer, wire)]

    def receive_response(
        self, wire: bytes, now: float, transport: Transport, peer: str
    ) -> list[Outgoing]:
        """A message with QR set: an event acknowledgement (RFC 8764 section 6.2), or noise.
        Returns the events it lets go out: this LLQ's next one, and those waiting for room."""
        if not self.fast:
            return self._receive_response_slow(wire, now, transport, peer)
        ack = parse_ack(wire)
        if ack is None:
            ack = self._ack_of(wire)  # not the usual shape: dnspython reads it
            if ack is None:
                return []
        if ack.llq_options != 1 or ack.malformed or ack.opcode != LLQOpcode.EVENT:
            return []
        llq = self.llqs.get(ack.llq_id)
        if llq is None or llq.peer != peer or llq.transport != transport:
            self.stats["ack_unknown"] += 1
            return []
        event = llq.inflight
        if event is None or event.msg_id != ack.msg_id:
            self.stats["ack_duplicate"] += 1
            return []
        if llq.key_name is not None:
            # The LLQ is private: only an acknowledgement signed with its key counts, so an
            # off-path sender cannot silence events.
            if ack.tsig is None or ack.tsig.key_name != llq.key_canonical:
                self.stats["ack_unsigned"] += 1
                return []
            if not self._ack_signed_fast(wire, ack.tsig, llq, event, now):
                self.stats["ack_bad_tsig"] += 1
                return []
        return self._acknowledged(llq, now)

    def _acknowledged(self, llq: LLQ, now: float) -> list[Outgoing]:
        self._release(llq)
        llq.inflight = None
        self.stats["acks"] += 1
        out = self._send_waiting(now)
        return out + self._send_next(llq, now)

    @staticmethod
    def _ack_of(wire: bytes) -> Ack | None:
        """An acknowledgement of an unusual shape, read by dnspython (None: not a message)."""
        try:
            msg = dns.message.from_wire(wire, keyring=False)
        except Exception:  # untrusted input; a response is never answered
            return None
        options = find_llq(msg.options)
        first = options[0] if options else None
        tsig = None
        if msg.had_tsig and msg.tsig is not None:
            rec = record_of(wire, msg)
            tsig = AckTsig(canonical(msg.tsig.name), canonical(rec.algorithm), rec.time_signed,
                           rec.fudge, rec.mac, rec.original_id, rec.error, rec.other,
                           rec.start)  # fmt: skip
        return Ack(
            msg.id,
            len(options),
            first is None or first.malformed,
            first.opcode if first is not None else 0,
            first.llq_id if first is not None else 0,
            tsig,
        )

    def _ack_signed_fast(
        self, wire: bytes, t: AckTsig, llq: LLQ, event: _Event, now: float
    ) -> bool:
        """``_ack_signed`` on bytes: the same checks, the MAC from the prepared key."""
        prepared = self._key_wire(llq)
        if prepared is None or event.mac is None:
            return False
        kw = prepared[0]
        if (
            t.algorithm != kw.algorithm_canonical
            or t.error != 0
            or t.original_id != event.msg_id
            or abs(t.time_signed - int(now)) > min(self.config.fudge, MAX_FUDGE)
        ):
            return False
        expected = kw.mac(
            strip_tsig(wire, t.start), original_id=t.original_id, time_signed=t.time_signed,
            fudge=t.fudge, error=t.error, other=t.other, request_mac=event.mac,
        )  # fmt: skip
        return hmac.compare_digest(expected, t.mac)

    def _receive_response_slow(
        self, wire: bytes, now: float, transport: Transport, peer: str
    ) -> list[Outgoing]:
        """``receive_response`` through dnspython objects (``fast`` False)."""
        try:
            msg = dns.message.from_wire(wire, keyring=False)
        except Exception:  # untrusted input; a response is never answered
            return []
        options = find_llq(msg.options)
        if len(options) != 1 or options[0].malformed or options[0].opcode != LLQOpcode.EVENT:
            return []
        llq = self.llqs.get(options[0].llq_id)
        if llq is None or llq.peer != peer or llq.transport != transport:
            self.stats["ack_unknown"] += 1
            return []
        event = llq.inflight
        if event is None or event.msg_id != msg.id:
            self.stats["ack_duplicate"] += 1
            return []
        if llq.key_name is not None:
            # The LLQ is private: only an acknowledgement signed with its key counts, so an
            # off-path sender cannot silence events.
            if not msg.had_tsig or msg.tsig is None or msg.tsig.name != llq.key_name:
                self.stats["ack_unsigned"] += 1
                return []
            if not self._ack_signed(wire, msg, llq.key_name, event, now):
                self.stats["ack_bad_tsig"] += 1
                return []
        return self._acknowledged(llq, now)

    def _ack_signed(
        self,
        wire: bytes,
        msg: dns.message.Message,
        key_name: dns.name.Name,
        event: _Event,
        now: float,
    ) -> bool:
        """Whether the acknowledgement is signed, as a TSIG response, to this very event.

        The header ID is not covered by the MAC (RFC 8945 4.3.1), so matching it alone would
        let a captured acknowledgement, re-sent with the ID of a later event, acknowledge an
        event the client never got. The MAC covers the original ID and, with the event's MAC
        as request MAC (RFC 8945 5.3), the event itself: an acknowledgement counts for the
        event it was made for and for no other.
        """
        key = self.core.store.keys.get(key_name)
        if key is None or event.mac is None:
            return False
        rec = record_of(wire, msg)
        if (
            rec.algorithm != key.algorithm
            or rec.error != 0
            or rec.original_id != event.msg_id
            or abs(rec.time_signed - int(now)) > min(self.config.fudge, MAX_FUDGE)
        ):
            return False
        return hmac.compare_digest(expected_mac(key, wire, rec, request_mac=event.mac), rec.mac)

    # ---- timers -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self._waiting and self._room():
            return 0.0
        times = []
        if self._expiry:
            times.append(self._expiry[0][0])
        if self._resends:
            times.append(self._resends[0][0])
        return min(times) if times else None

    def tick(self, now: float) -> list[Outgoing]:
        """Resend unacknowledged events, send those that waited for room, expire LLQs;
        returns what goes out."""
        out: list[Outgoing] = []
        while self._resends and self._resends[0][0] <= now:
            at, llq_id, msg_id = heapq.heappop(self._resends)
            llq = self.llqs.get(llq_id)
            if llq is None or llq.inflight is None:
                continue
            event = llq.inflight
            if event.msg_id != msg_id or event.next_at != at:
                continue
            if llq.stream or event.sent >= len(self.config.resend_after):
                log.info(
                    "llq dropped: event not acknowledged",
                    id=f"{llq_id:016x}",
                    peer=llq.peer,
                    transmissions=event.sent,
                )
                self._delete(llq, "unacknowledged")
                continue
            # An event unacknowledged after its first wait is probably lost: it no longer
            # holds back others (a sleeping client must not stall everyone's events).
            self._release(llq)
            event.next_at = now + self.config.resend_after[event.sent]
            event.sent += 1
            heapq.heappush(self._resends, (event.next_at, llq_id, msg_id))
            out.append(Outgoing(llq.transport, llq.peer, event.wire))
            self.stats["resends"] += 1
        out += self._send_waiting(now)  # after the resends: they may have made room
        self._expire(now)
        return out

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, llq_id = heapq.heappop(self._expiry)
            llq = self.llqs.get(llq_id)
            if llq is not None and llq.expires <= now:
                self._delete(llq, "expired")
