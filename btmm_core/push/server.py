"""DNS Push Notification server, sans-I/O (RFC 8765 section 6; DSO sessions: RFC 8490
sections 5 to 7). A registry plug-in (``btmm_core.registry.plugin``) fed the DSO messages of
DNS-over-TLS connections (``receive_message``), the TSIG keys that signed requests on them
(``on_signed``), every batch of committed RRset changes (``on_changes``, the same ones that
drive LLQ), closed connections and its timers (``tick``). What it sends comes back as
``Outgoing`` messages; ``Outgoing.close`` asks the driver to abort the connection.

Sessions. A connection becomes a DSO session when one of its DSO requests (a Keepalive or a
SUBSCRIBE) is answered NOERROR (RFC 8490 5.1). Until then a unidirectional message
(UNSUBSCRIBE, RECONFIRM) is a protocol error. Timeouts are 15 s each until a Keepalive
exchange; the server grants the asked keepalive interval within ``keepalive_min_ms`` ..
``keepalive_max_ms`` and the asked inactivity timeout up to ``inactivity_max_ms``. A session
that sends or receives nothing for twice its keepalive interval is aborted (6.5.1); one with no
subscription and nothing but keepalives for max(5 s, twice its inactivity timeout) too (6.4.1).

Who may subscribe to what: the same rule as queries (``Zone.may_read``). RFC 8490 5.4.6 puts
no TSIG inside a DSO message, so the session is *bound* instead: a request on the same TLS
connection whose TSIG verified (a signed SOA query is enough; the registry core calls
``on_signed`` before it answers, and messages on one connection are handled in order) binds
the key to the session, and a SUBSCRIBE into a user zone is accepted only if a bound key of
that user may read the name. TLS keeps anyone else from injecting into the connection, and the
registry's replay guard keeps a recorded signed query from binding another connection. An
invite key binds nothing. If a bound key is deleted (device revoked), the subscriptions it
allowed are cancelled at their next change by a DSO response carrying their MESSAGE ID and
REFUSED (RFC 8490 5.6).

Events: each committed RRset change becomes change notifications, rendered once: removed RRs
with TTL 0xFFFFFFFF, added ones with their TTL, an RRset that vanished as one collective
removal (TTL 0xFFFFFFFE, RFC 8765 6.3.1 asks for the most compact form), a TTL-only change as
the RRset re-added. Each session gets one PUSH per batch holding every notification that
concerns any of its subscriptions (each once), split at 16,382 bytes; sessions with the same
set get the same bytes. A SUBSCRIBE answered NOERROR is followed at once by a PUSH of what the
name holds now (6.3).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import structlog

from btmm_core.dns.dso import (
    DEFAULT_TIMEOUT_MS,
    INFINITE,
    MIN_KEEPALIVE_MS,
    TLV,
    DSOMessage,
    DSOType,
    Keepalive,
    Kind,
    Rcode,
    RetryDelay,
    find,
    padding,
)
from btmm_core.dns.push import (
    ANY,
    MAX_PUSH_MESSAGE,
    PUSH_OVERHEAD,
    Change,
    Reconfirm,
    Subscribe,
    Unsubscribe,
    push_tlv,
)
from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.errors import DSOError
from btmm_core.registry.handler import RegistryCore, RequestContext, Transport
from btmm_core.registry.limits import client_prefix
from btmm_core.registry.model import RRsetChange
from btmm_core.registry.plugin import Outgoing
from btmm_core.registry.zones import NOT_RECORD_TYPES

log = structlog.get_logger("btmm.push")

SessionKey = tuple[Transport, str]
_IN_OR_ANY = (dns.rdataclass.IN, ANY)


@dataclass(frozen=True)
class PushConfig:
    """Server policy. Timeouts in milliseconds, as the Keepalive TLV carries them."""

    #: Bounds of the keepalive interval granted. RFC 8490 6.5.2 forbids dictating less than
    #: 10 s; the default top is its recommended 60 minutes.
    keepalive_min_ms: int = MIN_KEEPALIVE_MS
    keepalive_max_ms: int = 3_600_000
    #: Most inactivity timeout granted (a session without subscriptions may idle this long).
    inactivity_max_ms: int = 60_000
    max_per_session: int = 1024
    #: Subscriptions per client: per IPv4 address, per /64 for IPv6 (``client_prefix``).
    max_per_client: int = 20_000
    max_total: int = 100_000
    #: Keys a session may be bound to (a host needs one; more is a client gone wrong).
    max_keys_per_session: int = 4
    #: Retry Delay appended to refusals (RFC 8765 6.2.2 recommends 5 min; SERVFAIL 1 min).
    refused_retry_ms: int = 300_000
    full_retry_ms: int = 60_000

    def __post_init__(self) -> None:
        if not 0 < self.keepalive_min_ms <= self.keepalive_max_ms:
            raise ValueError(
                f"keepalive bounds {self.keepalive_min_ms}..{self.keepalive_max_ms} ms:"
                " need 0 < min <= max"
            )
        if min(self.max_per_session, self.max_per_client, self.max_total) < 1:
            raise ValueError("DNS Push subscription limits must be at least 1")


@dataclass
class _Sub:
    msg_id: int
    question: Subscribe
    #: The bound key that allowed it (None: public records); checked again at each change.
    key_name: dns.name.Name | None


@dataclass
class _Session:
    key: SessionKey
    client: str
    established: bool = False
    inactivity_ms: int = DEFAULT_TIMEOUT_MS
    interval_ms: int = DEFAULT_TIMEOUT_MS
    #: Keepalive timer: the last message received or sent.
    last_message: float = 0.0
    #: Inactivity timer: the last message that was not a Keepalive.
    last_activity: float = 0.0
    #: A Retry Delay went out at this time: the client must close within 5 s.
    ending: float | None = None
    #: When this session's entry in the timer heap is due (None: it has none).
    timer_at: float | None = None
    subs: dict[int, _Sub] = field(default_factory=dict)
    questions: set[Subscribe] = field(default_factory=set)
    keys: dict[dns.name.Name, TsigKey] = field(default_factory=dict)

    def deadline(self) -> float | None:
        """When the session is to be aborted unless something happens first."""
        if self.ending is not None:
            return self.ending + 5.0
        if not self.established:
            return None
        times = []
        if self.interval_ms != INFINITE:
            times.append(self.last_message + 2 * self.interval_ms / 1000)
        if not self.subs and self.inactivity_ms != INFINITE:
            times.append(self.last_activity + max(5.0, 2 * self.inactivity_ms / 1000))
        return min(times) if times else None


def _response(msg_id: int, rcode: int, *tlvs: TLV) -> bytes:
    return DSOMessage(msg_id, tlvs, response=True, rcode=rcode).to_bytes()


def _push_messages(notifications: Sequence[bytes]) -> list[bytes]:
    """PUSH messages holding ``notifications`` (rendered ``Change``s), none over 16,382 bytes."""
    out: list[bytes] = []
    batch: list[bytes] = []
    size = PUSH_OVERHEAD
    for n in notifications:
        if batch and size + len(n) > MAX_PUSH_MESSAGE:
            out.append(DSOMessage(0, (push_tlv(b"".join(batch)),)).to_bytes())
            batch, size = [], PUSH_OVERHEAD
        batch.append(n)
        size += len(n)
    if batch:
        out.append(DSOMessage(0, (push_tlv(b"".join(batch)),)).to_bytes())
    return out


class PushServer:
    option_codes: tuple[int, ...] = ()
    #: DSO (RFC 8490) messages on DNS-over-TLS connections come to ``receive_message``.
    dso: bool = True

    def __init__(self, core: RegistryCore, config: PushConfig | None = None) -> None:
        self.core = core
        self.config = config or PushConfig()
        self.sessions: dict[SessionKey, _Session] = {}
        #: Subscriptions by name: (session, SUBSCRIBE message id).
        self._by_name: dict[dns.name.Name, set[tuple[SessionKey, int]]] = {}
        self._per_client: Counter[str] = Counter()
        self._total = 0
        self._timers: list[tuple[float, SessionKey]] = []
        #: Entries in ``_timers`` whose session is gone (``_compact_timers``).
        self._stale_timers = 0
        self.stats: Counter[str] = Counter()

    # ---- plug-in seam: what a DSO server does not use ---------------------------------------

    def receive(self, ctx: RequestContext) -> dns.message.Message | None:
        return None

    def receive_response(
        self, wire: bytes, now: float, transport: Transport, peer: str
    ) -> list[Outgoing]:
        return []

    # ---- sessions -----------------------------------------------------------------------------

    def _session(self, transport: Transport, peer: str, now: float) -> _Session:
        key = (transport, peer)
        s = self.sessions.get(key)
        if s is None:
            client = client_prefix(peer.rsplit("#", 1)[0])
            s = self.sessions[key] = _Session(key, client, last_message=now, last_activity=now)
        return s

    def _schedule(self, s: _Session) -> None:
        """Make sure the session's timer entry is no later than its deadline. Traffic only
        moves a deadline later, so most messages push nothing (one entry per session, not
        one per message: a chatty client must not grow the heap)."""
        d = s.deadline()
        if d is not None and (s.timer_at is None or d < s.timer_at):
            s.timer_at = d
            heapq.heappush(self._timers, (d, s.key))

    def on_signed(self, transport: Transport, peer: str, key: TsigKey, now: float) -> None:
        """A request on this connection was signed by ``key`` and verified: bind it."""
        if transport != Transport.TLS or key.role == KeyRole.INVITE:
            return
        s = self._session(transport, peer, now)
        s.last_message = s.last_activity = now
        if key.name not in s.keys and len(s.keys) >= self.config.max_keys_per_session:
            self.stats["bind_refused"] += 1
            return
        s.keys[key.name] = key
        self.stats["bound"] += 1

    def connection_closed(self, transport: Transport, peer: str) -> int:
        s = self.sessions.pop((transport, peer), None)
        if s is None:
            return 0
        for sub in list(s.subs.values()):
            self._drop(s, sub)
        if s.timer_at is not None:
            self._stale_timers += 1
            s.timer_at = None
            self._compact_timers()
        return 1

    def _compact_timers(self) -> None:
        """Drop the timer entries of closed sessions once they are most of the heap.

        A closed session's entry used to stay until its deadline: twice the keepalive
        interval, up to two hours. Sessions that come and go (clients reconnecting, a bench
        opening 10,000 at a time) piled up entries faster than they fell due.
        """
        if self._stale_timers <= 64 or self._stale_timers * 2 <= len(self._timers):
            return
        live = [
            (at, key)
            for at, key in self._timers
            if (s := self.sessions.get(key)) is not None and s.timer_at == at
        ]
        heapq.heapify(live)
        self._timers = live
        self._stale_timers = 0

    def holds_connection(self, transport: Transport, peer: str) -> bool:
        """An established session keeps its own timers; the driver's idle timeout is off."""
        s = self.sessions.get((transport, peer))
        return s is not None and s.established

    def _abort(self, s: _Session, why: str) -> list[Outgoing]:
        """Forcibly abort (RFC 8490 5.3): the driver resets the connection; state goes now."""
        self.stats[f"abort_{why}"] += 1
        log.info("dns push session aborted", peer=s.key[1], why=why)
        self.connection_closed(*s.key)
        return [Outgoing(s.key[0], s.key[1], b"", close=True)]

    def _send(self, s: _Session, wire: bytes, now: float) -> Outgoing:
        s.last_message = now
        return Outgoing(s.key[0], s.key[1], wire)

    # ---- messages -----------------------------------------------------------------------------

    def receive_message(
        self, wire: bytes, now: float, transport: Transport, peer: str
    ) -> list[Outgoing]:
        """One DSO message from a client; returns the answer and what it set off."""
        s = self._session(transport, peer, now)
        if s.ending is not None:
            return []  # RFC 8490 6.6.1.1: after a Retry Delay, requests are ignored
        s.last_message = now
        try:
            msg = DSOMessage.parse(wire)
        except DSOError as e:
            if e.rcode is not None:
                self.stats["formerr"] += 1
                return [self._send(s, _response(e.msg_id, e.rcode), now)]
            return self._abort(s, "malformed")
        try:
            out = self._dispatch(s, msg, now)
        except DSOError:
            return self._abort(s, "malformed")
        self._schedule(s)
        return out

    def _dispatch(self, s: _Session, msg: DSOMessage, now: float) -> list[Outgoing]:
        if msg.kind == Kind.RESPONSE:
            # This server sends no DSO requests, so no response can match one (5.5.2).
            return self._abort(s, "unexpected_response")
        primary = msg.primary
        assert primary is not None  # parse refuses a request without one
        if primary.dso_type != DSOType.KEEPALIVE:
            s.last_activity = now
        ptype = primary.dso_type
        request = msg.kind == Kind.REQUEST
        if ptype == DSOType.KEEPALIVE:
            if not request:
                return self._abort(s, "unidirectional_keepalive")
            return self._keepalive(s, msg, now)
        if ptype == DSOType.SUBSCRIBE:
            if not request:
                return self._abort(s, "unidirectional_subscribe")
            return self._subscribe(s, msg, now)
        if ptype in (DSOType.UNSUBSCRIBE, DSOType.RECONFIRM):
            if request:
                return self._abort(s, f"{DSOType(ptype).name.lower()}_with_id")
            if not s.established:
                # RFC 8490 5.1: no unidirectional message before the session exists.
                return self._abort(s, "before_session")
            if ptype == DSOType.UNSUBSCRIBE:
                self._unsubscribe(s, Unsubscribe.from_tlv(primary))
                return []
            return self._reconfirm(s, Reconfirm.from_tlv(primary), now)
        if ptype in (DSOType.RETRY_DELAY, DSOType.PUSH, DSOType.ENCRYPTION_PADDING):
            # Server-only (Retry Delay, PUSH) or never primary (padding): fatal (7.2.1, 6.3).
            return self._abort(s, f"client_sent_{DSOType(ptype).name.lower()}")
        if not request:
            return self._abort(s, "unknown_unidirectional")  # 5.4.5
        self.stats["dsotypeni"] += 1
        return [self._send(s, _response(msg.msg_id, Rcode.DSOTYPENI, *self._pad(msg)), now)]

    @staticmethod
    def _pad(msg: DSOMessage) -> tuple[TLV, ...]:
        # RFC 8490 7.3: a request with padding gets padding back.
        return (padding(0),) if find(msg.tlvs[1:], DSOType.ENCRYPTION_PADDING) else ()

    def _keepalive(self, s: _Session, msg: DSOMessage, now: float) -> list[Outgoing]:
        assert msg.primary is not None
        asked = Keepalive.from_tlv(msg.primary)
        c = self.config
        s.interval_ms = min(max(asked.interval_ms, c.keepalive_min_ms), c.keepalive_max_ms)
        s.inactivity_ms = min(asked.inactivity_ms, c.inactivity_max_ms)
        s.established = True
        self.stats["keepalives"] += 1
        granted = Keepalive(s.inactivity_ms, s.interval_ms).tlv()
        return [self._send(s, _response(msg.msg_id, Rcode.NOERROR, granted, *self._pad(msg)), now)]

    def _refuse(
        self, s: _Session, msg: DSOMessage, rcode: Rcode, retry_ms: int, why: str, now: float
    ) -> list[Outgoing]:
        self.stats[f"subscribe_{why}"] += 1
        log.info("dns push subscribe refused", peer=s.key[1], why=why, rcode=rcode.name)
        tlvs = (RetryDelay(retry_ms).tlv(), *self._pad(msg))
        return [self._send(s, _response(msg.msg_id, rcode, *tlvs), now)]

    def _subscribe(self, s: _Session, msg: DSOMessage, now: float) -> list[Outgoing]:
        assert msg.primary is not None
        q = Subscribe.from_tlv(msg.primary)
        if q in s.questions:
            return self._abort(s, "duplicate_subscribe")  # RFC 8765 6.2.1
        if msg.msg_id in s.subs:
            return self._abort(s, "message_id_in_use")  # RFC 8490 5.5.2
        c = self.config
        if q.rdtype in NOT_RECORD_TYPES or q.rdtype == 0:
            return self._refuse(s, msg, Rcode.FORMERR, c.refused_retry_ms, "bad_type", now)
        if q.rdclass not in (dns.rdataclass.IN, ANY):
            return self._refuse(s, msg, Rcode.NOTAUTH, c.refused_retry_ms, "not_auth", now)
        zone = self.core.store.find_zone(q.name)
        if zone is None:
            return self._refuse(s, msg, Rcode.NOTAUTH, c.refused_retry_ms, "not_auth", now)
        rdtype = dns.rdatatype.ANY if q.rdtype == ANY else q.rdtype
        allowed: dns.name.Name | None = None
        if not zone.is_public(q.name, rdtype):
            allowed = next(
                (k.name for k in s.keys.values() if zone.may_read(q.name, rdtype, k)), None
            )
            if allowed is None:
                return self._refuse(s, msg, Rcode.REFUSED, c.refused_retry_ms, "refused", now)
        if len(s.subs) >= c.max_per_session:
            return self._refuse(s, msg, Rcode.REFUSED, c.refused_retry_ms, "session_full", now)
        if self._total >= c.max_total or self._per_client[s.client] >= c.max_per_client:
            return self._refuse(s, msg, Rcode.SERVFAIL, c.full_retry_ms, "full", now)
        sub = _Sub(msg.msg_id, q, allowed)
        s.subs[msg.msg_id] = sub
        s.questions.add(q)
        self._by_name.setdefault(q.name, set()).add((s.key, msg.msg_id))
        self._per_client[s.client] += 1
        self._total += 1
        s.established = True
        self.stats["subscribed"] += 1
        out = [self._send(s, _response(msg.msg_id, Rcode.NOERROR, *self._pad(msg)), now)]
        types = zone.types_at(q.name) if q.rdtype == ANY else [q.rdtype]
        current = [
            Change.add(q.name, rd, ttl).to_bytes() for t in types for rd, ttl in zone.get(q.name, t)
        ]
        out += [self._send(s, w, now) for w in _push_messages(current)]
        return out

    def _drop(self, s: _Session, sub: _Sub) -> None:
        s.subs.pop(sub.msg_id, None)
        s.questions.discard(sub.question)
        ids = self._by_name.get(sub.question.name)
        if ids is not None:
            ids.discard((s.key, sub.msg_id))
            if not ids:
                del self._by_name[sub.question.name]
        self._per_client[s.client] -= 1
        if self._per_client[s.client] <= 0:
            del self._per_client[s.client]
        self._total -= 1

    def _unsubscribe(self, s: _Session, u: Unsubscribe) -> None:
        sub = s.subs.get(u.subscribe_id)
        if sub is None:
            self.stats["unsubscribe_unknown"] += 1  # RFC 8765 6.4.1: silently ignored
            return
        self._drop(s, sub)
        self.stats["unsubscribed"] += 1

    def _reconfirm(self, s: _Session, r: Reconfirm, now: float) -> list[Outgoing]:
        """An authoritative server's data is never stale, but the client's view may be: if the
        disputed record is gone and the client subscribes to it, tell it so (RFC 8765 6.5)."""
        self.stats["reconfirms"] += 1
        if not any(x.question.matches(r.name, r.rdtype, r.rdclass) for x in s.subs.values()):
            return []
        zone = self.core.store.find_zone(r.name)
        held = zone.get(r.name, r.rdtype) if zone is not None else []
        if any(rd == r.rdata for rd, _ in held):
            return []
        self.stats["reconfirm_removed"] += 1
        gone = _push_messages([Change.remove(r.name, r.rdata).to_bytes()])
        return [self._send(s, w, now) for w in gone]

    # ---- events -------------------------------------------------------------------------------

    @staticmethod
    def _notifications(ch: RRsetChange) -> bytes:
        if not ch.after:
            return Change.remove_rrset(ch.name, ch.rdtype).to_bytes()
        ttls = dict(ch.after)
        out = [Change.remove(ch.name, rd).to_bytes() for rd in ch.removed]
        out += [Change.add(ch.name, rd, ttls[rd]).to_bytes() for rd in ch.added]
        if not ch.added and not ch.removed:  # only TTLs changed: the RRset as it is now
            out = [Change.add(ch.name, rd, ttl).to_bytes() for rd, ttl in ch.after]
        return b"".join(out)

    def on_changes(self, changes: Sequence[RRsetChange], now: float) -> list[Outgoing]:
        """Committed RRset changes: one PUSH (or a few, when large) per concerned session."""
        # Per subscriber only look-ups on bytes and ints: the index already matched the name
        # (a dnspython name comparison per subscriber cost more than the rest together),
        # each key's presence is looked up once per batch, and the indexes of the changes a
        # session gets come in order, so they need no set and no sort.
        wanted: dict[SessionKey, list[int]] = {}
        cancel: list[tuple[_Session, _Sub]] = []
        rendered: list[bytes] = []
        keys = self.core.store.keys
        present: dict[int, bool] = {}  # by id() of the key's name, during this call only
        sessions = self.sessions
        for i, ch in enumerate(changes):
            rendered.append(b"")
            rdtype = ch.rdtype
            for skey, mid in self._by_name.get(ch.name, ()):
                s = sessions[skey]
                sub = s.subs[mid]
                q = sub.question
                if (q.rdtype != ANY and q.rdtype != rdtype) or q.rdclass not in _IN_OR_ANY:
                    continue
                if sub.key_name is not None:
                    alive = present.get(id(sub.key_name))
                    if alive is None:
                        alive = present[id(sub.key_name)] = sub.key_name in keys
                    if not alive:
                        cancel.append((s, sub))
                        continue
                if not rendered[i]:
                    rendered[i] = self._notifications(ch)
                got = wanted.get(skey)
                if got is None:
                    wanted[skey] = [i]
                elif got[-1] != i:
                    got.append(i)
        out: list[Outgoing] = []
        for s, sub in cancel:
            if sub.msg_id in s.subs:
                self._drop(s, sub)
                self.stats["cancelled_key_gone"] += 1
                out.append(self._send(s, _response(sub.msg_id, Rcode.REFUSED), now))
        messages: dict[tuple[int, ...], list[bytes]] = {}
        pushes = 0
        for skey, idx in wanted.items():
            s = sessions[skey]
            if not s.subs:
                continue
            order = tuple(idx)
            wires = messages.get(order)
            if wires is None:
                wires = messages[order] = _push_messages([rendered[i] for i in order])
            s.last_message = now
            for w in wires:
                out.append(Outgoing(skey[0], skey[1], w))
            pushes += len(wires)
        self.stats["pushes"] += pushes
        return out

    # ---- timers -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def tick(self, now: float) -> list[Outgoing]:
        """Abort sessions whose keepalive or inactivity time ran out."""
        out: list[Outgoing] = []
        while self._timers and self._timers[0][0] <= now:
            at, key = heapq.heappop(self._timers)
            s = self.sessions.get(key)
            if s is None or s.timer_at != at:
                # the session is gone, or this entry was superseded by an earlier one
                self._stale_timers = max(0, self._stale_timers - (s is None))
                continue
            s.timer_at = None
            d = s.deadline()
            if d is None:
                continue
            if d > now:
                self._schedule(s)  # it moved on since: look again then
                continue
            if s.ending is not None:
                why = "retry_delay_ignored"
            elif s.interval_ms != INFINITE and now >= s.last_message + 2 * s.interval_ms / 1000:
                why = "keepalive_timeout"
            else:
                why = "inactive"
            out += self._abort(s, why)
        return out

    def shut_down(self, now: float, delay_ms: int = 1000) -> list[Outgoing]:
        """A Retry Delay (NOERROR: routine restart) to every established session (6.6.1)."""
        out: list[Outgoing] = []
        for s in self.sessions.values():
            if s.established and s.ending is None:
                s.ending = now
                self._schedule(s)
                bye = DSOMessage(0, (RetryDelay(delay_ms).tlv(),)).to_bytes()
                out.append(self._send(s, bye, now))
        return out
