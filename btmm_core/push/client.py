"""DNS Push Notification client, sans-I/O (RFC 8765 section 6 over RFC 8490 sessions).

Feed it ``start(now)``, ``connected(now)`` / ``connection_lost(now)`` (the driver's TLS
connection), ``receive(wire, now)`` (one message from the stream) and ``tick(now)``; each
returns outputs: ``Connect`` (open a new DNS-over-TLS connection), ``Send``, ``Disconnect``,
``Changes`` (records added or removed, for the user) and ``StateChanged``. ``now`` is Unix
time (TSIG signs with it). Randomness (message IDs, backoff jitter) comes from the caller.

On each new connection the client sends a TSIG-signed query for the watched name (with a key:
it binds the session to the key's user, since RFC 8490 5.4.6 allows no TSIG inside DSO) and a
DSO Keepalive request (asking for ``keepalive_ms``); once the binding is answered, the
SUBSCRIBE and a second signed query whose answer is the full current RRset (the server handles
one connection's messages in order). That answer replaces what the client knew (the user sees the
difference, so nothing missed while disconnected is lost); PUSH messages before and after it
are applied as they come (adds and removes are idempotent, so a change seen in both is seen
once). TLS carries the integrity of the answers; their TSIG is not checked here.

A lost connection, a fatal protocol error from the server, or a request unanswered for 30 s
(RFC 8490 5.1) ends the session; the client reconnects after a backoff (0.5 s doubling to 30
s, with up to 25 % jitter; reset once subscribed), or after the server's Retry Delay. A
refused SUBSCRIBE, or a subscription the server cancels (RFC 8490 5.6), is retried after the
Retry Delay TLV's time (5 minutes without one, RFC 8765 6.2.2).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from btmm_core.dns.dso import (
    ESTABLISH_TIMEOUT,
    INFINITE,
    TLV,
    DSOMessage,
    DSOType,
    Keepalive,
    Kind,
    Rcode,
    RetryDelay,
    find,
    is_dso,
)
from btmm_core.dns.push import ANY, Subscribe, Unsubscribe, parse_push
from btmm_core.dns.tsig import TsigKey, sign
from btmm_core.errors import DSOError


class PushState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    SUBSCRIBING = "subscribing"
    SUBSCRIBED = "subscribed"
    WAITING = "waiting"
    CLOSED = "closed"


@dataclass(frozen=True)
class Record:
    name: dns.name.Name
    rdtype: int
    rdata: dns.rdata.Rdata
    ttl: int

    def to_text(self) -> str:
        rdtype = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(self.rdtype))
        return f"{self.name.to_text()} {self.ttl} IN {rdtype} {self.rdata.to_text()}"


@dataclass(frozen=True)
class Connect:
    """Open a DNS-over-TLS connection to the server, then call ``connected``."""


@dataclass(frozen=True)
class Send:
    wire: bytes


@dataclass(frozen=True)
class Disconnect:
    #: True: reset at once (a protocol error); False: close gracefully.
    abort: bool


@dataclass(frozen=True)
class Changes:
    added: tuple[Record, ...]
    removed: tuple[Record, ...]
    #: True when computed from a full answer (after each (re)subscription).
    full: bool


@dataclass(frozen=True)
class StateChanged:
    state: PushState
    why: str


Output = Connect | Send | Disconnect | Changes | StateChanged


@dataclass(frozen=True)
class PushClientConfig:
    #: Keepalive interval asked for (RFC 8490 6.5.2 recommends 60 min; NATs need less).
    keepalive_ms: int = 600_000
    inactivity_ms: int = 15_000
    backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
    jitter_fraction: float = 0.25
    #: Wait after a refusal without a Retry Delay TLV (RFC 8765 6.2.2: 5 minutes).
    refused_retry: float = 300.0
    fudge: int = 300

    def __post_init__(self) -> None:
        if not self.backoff or any(t <= 0 for t in self.backoff):
            raise ValueError("backoff needs at least one positive wait")


_Key = tuple[dns.name.Name, int, dns.rdata.Rdata]


class PushClient:
    def __init__(
        self,
        qname: dns.name.Name,
        qtype: int,
        rng: random.Random,
        config: PushClientConfig | None = None,
        key: TsigKey | None = None,
    ) -> None:
        self.qname = qname
        self.qtype = qtype
        self.config = config or PushClientConfig()
        self.key = key
        self._rng = rng
        self.state = PushState.IDLE
        self.question = Subscribe(qname, qtype, dns.rdataclass.IN)
        #: The RRset as the client knows it: record -> TTL.
        self.known: dict[_Key, int] = {}
        self.interval_ms = 15_000
        self._attempt = 0
        self._reconnect_at: float | None = None
        self._last_sent = 0.0
        #: DSO requests awaiting an answer: message id -> sent at; and which is which.
        self._waiting: dict[int, float] = {}
        self._subscribe_id = 0
        self._keepalive_id = 0
        #: Signed queries awaiting an answer: id -> ("bind" | "full", sent at).
        self._queries: dict[int, tuple[str, float]] = {}
        self._tries = 0
        self._connected = False

    # ---- helpers --------------------------------------------------------------------------

    def _set(self, state: PushState, why: str, out: list[Output]) -> None:
        self.state = state
        out.append(StateChanged(state, why))

    def _new_id(self) -> int:
        while True:
            i = self._rng.randrange(1, 0x10000)
            if i not in self._waiting and i not in self._queries and i != self._subscribe_id:
                return i

    def _send(self, wire: bytes, now: float, out: list[Output]) -> None:
        self._last_sent = now
        out.append(Send(wire))

    def _query(self, now: float) -> tuple[int, bytes]:
        q = dns.message.make_query(self.qname, dns.rdatatype.RdataType.make(self.qtype))
        q.id = self._new_id()
        wire = q.to_wire()
        if self.key is not None:
            wire, _ = sign(wire, self.key, time_signed=int(now), fudge=self.config.fudge)
        return q.id, wire

    def _lose(self, now: float, why: str, out: list[Output], *, wait: float | None = None) -> None:
        """The session is over: reconnect after ``wait`` or the next backoff step."""
        self._connected = False
        self._waiting.clear()
        self._subscribe_id = 0
        self._queries.clear()
        if wait is None:
            c = self.config
            wait = c.backoff[min(self._attempt, len(c.backoff) - 1)]
            wait *= 1 + self._rng.uniform(0, c.jitter_fraction)
            self._attempt += 1
        self._reconnect_at = now + wait
        self._set(PushState.WAITING, f"{why}; reconnecting in {wait:.1f} s", out)

    def _fatal(self, now: float, why: str, out: list[Output]) -> None:
        out.append(Disconnect(abort=True))
        self._lose(now, f"protocol error from the server: {why}", out)

    # ---- public ---------------------------------------------------------------------------

    def start(self, now: float) -> list[Output]:
        out: list[Output] = []
        self._set(PushState.CONNECTING, "starting", out)
        out.append(Connect())
        return out

    def connected(self, now: float) -> list[Output]:
        """The TLS connection is up: bind (with a key), ask for timeouts, then subscribe."""
        out: list[Output] = []
        self._connected = True
        self._reconnect_at = None
        self._tries = 0
        self._keepalive_id = self._new_id()
        self._waiting[self._keepalive_id] = now
        c = self.config
        ka = Keepalive(c.inactivity_ms, c.keepalive_ms).tlv()
        if self.key is not None:
            self._ask("bind", now, out)
        self._send(DSOMessage(self._keepalive_id, (ka,)).to_bytes(), now, out)
        if self.key is None:
            self._subscribe(now, out)
        self._set(PushState.SUBSCRIBING, "connected; subscribing", out)
        return out

    def _ask(self, kind: str, now: float, out: list[Output]) -> None:
        """Send the binding or the full query (they are the same signed query)."""
        qid, wire = self._query(now)
        self._queries[qid] = (kind, now)
        self._send(wire, now, out)

    def _subscribe(self, now: float, out: list[Output]) -> None:
        """SUBSCRIBE, then the query whose answer is the full RRset (handled after it)."""
        self._subscribe_id = self._new_id()
        self._waiting[self._subscribe_id] = now
        sub = DSOMessage(self._subscribe_id, (self.question.tlv(),)).to_bytes()
        self._send(sub, now, out)
        self._tries = 0
        self._ask("full", now, out)

    def connection_lost(self, now: float) -> list[Output]:
        out: list[Output] = []
        if self.state != PushState.CLOSED and self._connected:
            self._lose(now, "connection lost", out)
        elif self.state == PushState.CONNECTING:
            self._lose(now, "cannot connect", out)
        return out

    def cancel(self, now: float) -> list[Output]:
        """Unsubscribe and close the session gracefully."""
        out: list[Output] = []
        if self._connected and self.state == PushState.SUBSCRIBED:
            self._send(DSOMessage(0, (Unsubscribe(self._subscribe_id).tlv(),)).to_bytes(), now, out)
        out.append(Disconnect(abort=False))
        self._connected = False
        self._reconnect_at = None
        self._set(PushState.CLOSED, "cancelled", out)
        return out

    def next_deadline(self) -> float | None:
        times: list[float] = []
        if self._reconnect_at is not None:
            times.append(self._reconnect_at)
        if self._connected:
            pending = [*self._waiting.values(), *(t for _, t in self._queries.values())]
            if pending:
                times.append(min(pending) + ESTABLISH_TIMEOUT)
            if self.interval_ms != INFINITE and self.state == PushState.SUBSCRIBED:
                times.append(self._last_sent + self.interval_ms / 1000)
        return min(times) if times else None

    def tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        if self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            self._set(PushState.CONNECTING, "reconnecting", out)
            out.append(Connect())
            return out
        if not self._connected:
            return out
        pending = [*self._waiting.values(), *(t for _, t in self._queries.values())]
        if pending and now >= min(pending) + ESTABLISH_TIMEOUT:
            out.append(Disconnect(abort=True))
            self._lose(now, "no answer from the server in 30 s", out)
            return out
        if (
            self.state == PushState.SUBSCRIBED
            and self.interval_ms != INFINITE
            and now >= self._last_sent + self.interval_ms / 1000
            and self._keepalive_id not in self._waiting
        ):
            self._keepalive_id = self._new_id()
            self._waiting[self._keepalive_id] = now
            c = self.config
            ka = Keepalive(c.inactivity_ms, c.keepalive_ms).tlv()
            self._send(DSOMessage(self._keepalive_id, (ka,)).to_bytes(), now, out)
        return out

    # ---- messages -------------------------------------------------------------------------

    def receive(self, wire: bytes, now: float) -> list[Output]:
        out: list[Output] = []
        if not self._connected:
            return out
        if not is_dso(wire):
            self._answer(wire, now, out)
            return out
        try:
            msg = DSOMessage.parse(wire)
            self._dso(msg, wire, now, out)
        except DSOError as e:
            self._fatal(now, e.what, out)
        return out

    def _dso(self, msg: DSOMessage, wire: bytes, now: float, out: list[Output]) -> None:
        if msg.kind == Kind.RESPONSE:
            self._response(msg, now, out)
            return
        primary = msg.primary
        assert primary is not None
        if msg.kind == Kind.REQUEST:
            raise DSOError(f"DSO request of type {primary.dso_type:#06x} from the server")
        if primary.dso_type == DSOType.PUSH:
            if self.state not in (PushState.SUBSCRIBING, PushState.SUBSCRIBED):
                return  # a PUSH for a subscription just ended (RFC 8765 6.2)
            self._push(wire, primary, out)
        elif primary.dso_type == DSOType.KEEPALIVE:
            ka = Keepalive.from_tlv(primary)
            self._timeouts(ka)
        elif primary.dso_type == DSOType.RETRY_DELAY:
            delay = RetryDelay.from_tlv(primary).delay_ms / 1000
            out.append(Disconnect(abort=False))
            self._lose(now, f"the server ends the session (rcode {msg.rcode})", out, wait=delay)
        else:
            raise DSOError(f"unidirectional message of type {primary.dso_type:#06x}")

    def _timeouts(self, ka: Keepalive) -> None:
        if ka.interval_ms < 10_000:
            raise DSOError(f"keepalive interval {ka.interval_ms} ms: under 10 s (RFC 8490 6.5.2)")
        self.interval_ms = ka.interval_ms

    def _response(self, msg: DSOMessage, now: float, out: list[Output]) -> None:
        mid = msg.msg_id
        if mid == self._subscribe_id and mid not in self._waiting and msg.rcode:
            # RFC 8490 5.6: the server cancelled the subscription.
            self._refused(msg, now, "the server cancelled the subscription", out)
            return
        if mid not in self._waiting:
            raise DSOError(f"DSO response to no request of ours (id {mid})")
        del self._waiting[mid]
        if mid == self._keepalive_id:
            if msg.rcode != Rcode.NOERROR:
                raise DSOError(f"Keepalive answered with rcode {msg.rcode}")
            tlvs = find(msg.tlvs, DSOType.KEEPALIVE)
            if len(tlvs) != 1:
                raise DSOError("Keepalive response without exactly one Keepalive TLV")
            self._timeouts(Keepalive.from_tlv(tlvs[0]))
        elif mid == self._subscribe_id:
            if msg.rcode != Rcode.NOERROR:
                self._refused(msg, now, "subscription refused", out)
                return
            self._attempt = 0
            self._set(PushState.SUBSCRIBED, "subscribed", out)

    def _refused(self, msg: DSOMessage, now: float, why: str, out: list[Output]) -> None:
        delays = find(msg.tlvs, DSOType.RETRY_DELAY)
        wait = RetryDelay.from_tlv(delays[0]).delay_ms / 1000 if delays else None
        if wait is None:
            wait = self.config.refused_retry
        try:
            rcode = Rcode(msg.rcode).name
        except ValueError:
            rcode = str(msg.rcode)
        out.append(Disconnect(abort=False))
        self._lose(now, f"{why} ({rcode})", out, wait=wait)

    def _push(self, wire: bytes, tlv: TLV, out: list[Output]) -> None:
        added: list[Record] = []
        removed: list[Record] = []
        for ch in parse_push(wire, tlv):
            if not ch.covers(self.question):
                continue  # RFC 8765 6.3.1: not ours (perhaps just unsubscribed)
            if ch.is_collective:
                for k in list(self.known):
                    n, t, _ = k
                    if n == ch.name and (ch.rdtype in (ANY, t) or ch.rdclass == ANY):
                        removed.append(Record(n, t, k[2], self.known.pop(k)))
                continue
            assert ch.rdata is not None
            k = (ch.name, ch.rdtype, ch.rdata)
            if ch.is_add:
                if self.known.get(k) != ch.ttl:
                    self.known[k] = ch.ttl
                    added.append(Record(ch.name, ch.rdtype, ch.rdata, ch.ttl))
            elif k in self.known:
                removed.append(Record(ch.name, ch.rdtype, ch.rdata, self.known.pop(k)))
        if added or removed:
            out.append(Changes(tuple(added), tuple(removed), False))

    def _answer(self, wire: bytes, now: float, out: list[Output]) -> None:
        """The answer to the binding query (then subscribe) or to the full query (it replaces
        the known RRset). NOTAUTH means the registry refused our TSIG; BADTIME happens when
        several hosts share a key and their signatures cross a second boundary out of order
        (its replay rule), so the query is signed afresh, up to three times."""
        try:
            msg = dns.message.from_wire(wire, keyring=False)
        except dns.exception.DNSException:
            return
        asked = self._queries.pop(msg.id, None)
        if asked is None:
            return  # a stray answer
        kind = asked[0]
        if msg.rcode() == dns.rcode.NOTAUTH:
            self._tries += 1
            if self._tries < 3:
                self._ask(kind, now, out)
                return
            out.append(Disconnect(abort=False))
            self._lose(now, "the registry refuses our key (NOTAUTH)", out,
                       wait=self.config.refused_retry)  # fmt: skip
            return
        if kind == "bind":
            self._subscribe(now, out)
            return
        if msg.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            out.append(StateChanged(self.state, f"full answer: {dns.rcode.to_text(msg.rcode())}"))
            return
        now_known: dict[_Key, int] = {}
        for rrset in msg.answer:
            if rrset.name != self.qname or self.qtype not in (ANY, rrset.rdtype):
                continue
            for rd in rrset:
                now_known[(rrset.name, rrset.rdtype, rd)] = rrset.ttl
        added = tuple(Record(*k, ttl) for k, ttl in now_known.items() if self.known.get(k) != ttl)
        removed = tuple(Record(*k, ttl) for k, ttl in self.known.items() if k not in now_known)
        self.known = now_known
        out.append(Changes(added, removed, True))
