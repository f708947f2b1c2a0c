"""Long-lived query client state machine, sans-I/O (RFC 8764 sections 5 to 7).

Feed it ``start(now)``, ``receive(wire, now)`` and ``tick(now)`` (when ``next_deadline()`` has
come); each returns outputs: ``Send`` (a datagram for the server), ``Changes`` (records added to
or removed from the answer, for the user) and ``StateChanged``. Randomness (message ids, refresh
jitter) comes from the ``random.Random`` the caller passes in.

Behaviour, with the reasons:
- Setup is sent at 0 s, again after 2 s and 4 s, then the client listens 8 s more
  (``retry = (2, 4, 8)``); the challenge response is retried the same way. No answer means the
  server cannot be reached: the client polls (a plain query every ``poll_interval``, each with a
  new setup attempt) until an LLQ can be set up again, so the user still sees changes.
- The refresh goes out at half the granted lease plus up to ``jitter_fraction`` of it, so that
  many clients set up at once do not refresh at once; a lost refresh is retried like a setup.
- NO-SUCH-LLQ or no answer to a refresh means the LLQ is gone (the server restarted, or dropped
  it after unacknowledged events): the client sets up again, and the ACK's full answer is
  compared with what it knew, so the user gets exactly the changes it missed.
- Events are acknowledged every time they arrive (the acknowledgement may have been lost) but
  applied once. With a TSIG key an event is known by what its MAC covers (TSIG original ID,
  Time Signed, MAC), never by the header ID, which the MAC does not cover (RFC 8945 4.3.1): a
  captured event re-sent with another ID is the same event, acknowledged and not applied again.
  The server sends an LLQ's events one at a time, the next only after the previous one was
  acknowledged, so an event signed earlier than the newest one applied for the LLQ is a replay
  (or a stale copy) and is dropped without an acknowledgement.
- A setup acknowledgement or poll answer that did not fit a datagram (TC) is asked again as a
  plain query over TCP (``Send.stream``; RFC 7766 section 5): the LLQ itself stays on UDP, but a
  client that only took the events would not know the records that were there before it came
  (a daemon joining an account of 100 hosts waited half a minute for its first peer). Events
  applied while that query was out may be older or newer than its answer, so it is asked again
  (``_STREAM_ASKS`` times at most) until no event came between question and answer.
- With a TSIG key, requests are signed and every answer and event must carry a valid MAC with a
  time inside the fudge; anything else is dropped. An acknowledgement is signed as a TSIG
  response to its event (the event's MAC is the request MAC), so it acknowledges that event
  and no other.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import random
import struct
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
import dns.rrset

from btmm_core.dns.llq_option import REMOVED_TTL, LLQError, LLQOpcode, LLQOption, find_llq
from btmm_core.dns.tsig import TsigKey, expected_mac, record_of, sign
from btmm_core.dns.wire import rrs


class ClientState(enum.Enum):
    IDLE = "idle"
    SETUP = "setup"
    CHALLENGED = "challenged"
    ESTABLISHED = "established"
    POLLING = "polling"
    STATIC = "static"
    CLOSED = "closed"


class _Kind(enum.Enum):
    SETUP = 1
    CHALLENGE_RESPONSE = 2
    REFRESH = 3
    POLL = 4
    CANCEL = 5


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
class Send:
    wire: bytes
    #: over TCP (a new connection) even when the LLQ runs over UDP: its answer did not fit a
    #: datagram. A driver on a stream sends it like any other message.
    stream: bool = False


@dataclass(frozen=True)
class Changes:
    added: tuple[Record, ...]
    removed: tuple[Record, ...]
    #: True when the change was computed from a full answer (setup ACK or a poll).
    full: bool


@dataclass(frozen=True)
class StateChanged:
    state: ClientState
    why: str


Output = Send | Changes | StateChanged

#: Events of one LLQ applied within one second of Time Signed that are remembered to tell
#: replays apart; the server sends one event per round trip, so this is far above real use.
#: (Without a key the oldest is forgotten instead: unsigned events prove nothing anyway.)
_MAX_EVENTS_PER_SECOND = 4096

#: asks over TCP for one truncated answer, while events keep coming between question and answer
_STREAM_ASKS = 3


@dataclass(frozen=True)
class ClientConfig:
    lease: int = 7200
    #: Wait after each transmission of a setup, challenge response or refresh.
    retry: tuple[float, ...] = (2.0, 4.0, 8.0)
    poll_interval: float = 60.0
    refresh_fraction: float = 0.5
    jitter_fraction: float = 0.1
    fudge: int = 300
    payload: int = 1232

    def __post_init__(self) -> None:
        if not self.retry or any(t <= 0 for t in self.retry):
            raise ValueError("retry needs at least one positive wait")
        if self.poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if not 0 < self.lease <= 0xFFFFFFFF:
            raise ValueError("lease must be 1..2^32-1 seconds")


@dataclass
class _Pending:
    kind: _Kind
    mac: bytes | None
    stream: bool = False
    #: ``LLQClient._events_applied`` when it was sent
    events: int = 0


_Key = tuple[dns.name.Name, int, dns.rdata.Rdata]


def answer_ttls(wire: bytes) -> list[int]:
    """The TTLs of the answer RRs as sent, in order.

    dnspython reads a TTL above 2^31 - 1 as 0 (RFC 2181 section 8), but RFC 8764 marks a removal
    with 0xFFFFFFFF, so the raw value is needed.
    """
    (an,) = struct.unpack_from("!H", wire, 6)
    return [rr.ttl for rr in rrs(wire, an)]


class LLQClient:
    def __init__(
        self,
        qname: dns.name.Name,
        qtype: int,
        rng: random.Random,
        config: ClientConfig | None = None,
        key: TsigKey | None = None,
    ) -> None:
        self.qname = qname
        self.qtype = qtype
        self.config = config or ClientConfig()
        self.key = key
        self._rng = rng
        self.state = ClientState.IDLE
        self.llq_id = 0
        self.lease = 0
        #: The current answer as the client knows it: record -> TTL.
        self.known: dict[_Key, int] = {}
        self._pending: dict[int, _Pending] = {}
        self._attempt = 0
        self._retry_at: float | None = None
        self._refresh_at: float | None = None
        self._refreshing = False
        self._next_poll: float | None = None
        self._next_setup: float | None = None
        #: Replay state of the LLQ ``_events_of``: the newest Time Signed applied and the
        #: identities (original ID, Time Signed, MAC) of the events applied with that time.
        self._events_of = 0
        self._newest_event = -1
        self._seen_events: dict[bytes, None] = {}
        #: events that changed ``known``; and the asks over TCP for the current full answer
        self._events_applied = 0
        self._stream_asks = 0

    # ---- public ---------------------------------------------------------------------------

    def start(self, now: float) -> list[Output]:
        out: list[Output] = []
        self._begin_setup(now, "starting", out)
        return out

    def next_deadline(self) -> float | None:
        times = [
            t
            for t in (self._retry_at, self._refresh_at, self._next_poll, self._next_setup)
            if t is not None
        ]
        return min(times) if times else None

    def tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._retry(now, out)
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._refreshing = True
            self._attempt = 0
            self._send_refresh(now, out)
        if self._next_poll is not None and now >= self._next_poll:
            self._next_poll = now + self.config.poll_interval
            self._send_poll(now, out)
        if self._next_setup is not None and now >= self._next_setup:
            polling = self.state == ClientState.POLLING
            if polling:
                self._next_setup = now + self.config.poll_interval
            self._send_setup(now, out, arm_retry=not polling)
        return out

    def cancel(self, now: float) -> list[Output]:
        """End the LLQ: a refresh with lease 0 (not retried; the lease ends it anyway)."""
        out: list[Output] = []
        if self.llq_id and self.state == ClientState.ESTABLISHED:
            self._send(
                _Kind.CANCEL,
                self._query(LLQOption(LLQOpcode.REFRESH, LLQError.NO_ERROR, self.llq_id, 0)),
                now,
                out,
            )
        self._set_state(ClientState.CLOSED, "cancelled", out)
        self._retry_at = self._refresh_at = self._next_poll = self._next_setup = None
        return out

    def connection_lost(self, now: float) -> list[Output]:
        """The TCP/TLS connection to the server closed: an LLQ on it is gone with it.

        The driver reconnects; the new setup's full answer is compared with what was known, as
        after a server restart, so no change made meanwhile is missed.
        """
        out: list[Output] = []
        self._pending.clear()
        if self.state in (
            ClientState.SETUP,
            ClientState.CHALLENGED,
            ClientState.ESTABLISHED,
        ):
            self._begin_setup(now, "connection closed: LLQ lost", out)
        return out

    def receive(self, wire: bytes, now: float) -> list[Output]:
        out: list[Output] = []
        if self.state == ClientState.CLOSED:
            return out
        try:
            msg = dns.message.from_wire(wire, keyring=False, one_rr_per_rrset=True)
        except (dns.exception.DNSException, ValueError):
            return out
        if not msg.flags & dns.flags.QR or msg.opcode() != dns.opcode.QUERY:
            return out
        options = find_llq(msg.options)
        if options and options[0].opcode == LLQOpcode.EVENT:
            self._event(wire, msg, options[0], now, out)
            return out
        pending = self._pending.get(msg.id)
        if pending is None or not self._question_ok(msg):
            return out
        if not self._verified(wire, msg, pending.mac, now):
            return out
        for mid in [m for m, p in self._pending.items() if p.kind == pending.kind]:
            del self._pending[mid]
        self._answer(msg, pending, options, now, out)
        return out

    # ---- building and sending -------------------------------------------------------------

    def _query(self, option: LLQOption | None) -> dns.message.Message:
        msg = dns.message.make_query(
            self.qname,
            dns.rdatatype.RdataType.make(self.qtype),
            use_edns=0,
            payload=self.config.payload,
            options=[option] if option is not None else [],
        )
        msg.flags = 0  # an authoritative server is asked: no recursion
        msg.id = self._rng.randrange(0x10000)
        return msg

    def _sign(
        self, wire: bytes, now: float, request_mac: bytes | None = None
    ) -> tuple[bytes, bytes | None]:
        if self.key is None:
            return wire, None
        return sign(
            wire, self.key, time_signed=int(now), fudge=self.config.fudge, request_mac=request_mac
        )

    def _send(
        self,
        kind: _Kind,
        msg: dns.message.Message,
        now: float,
        out: list[Output],
        *,
        stream: bool = False,
    ) -> None:
        wire, mac = self._sign(msg.to_wire(), now)
        # An answer to any transmission counts; the oldest are forgotten past a few.
        while len(self._pending) >= 16:
            del self._pending[next(iter(self._pending))]
        self._pending[msg.id] = _Pending(kind, mac, stream, self._events_applied)
        out.append(Send(wire, stream))

    def _send_setup(self, now: float, out: list[Output], *, arm_retry: bool = True) -> None:
        opt = LLQOption(LLQOpcode.SETUP, LLQError.NO_ERROR, 0, self.config.lease)
        self._send(_Kind.SETUP, self._query(opt), now, out)
        if arm_retry:
            self._arm_retry(now)

    def _send_challenge_response(self, now: float, out: list[Output]) -> None:
        opt = LLQOption(LLQOpcode.SETUP, LLQError.NO_ERROR, self.llq_id, self.lease)
        self._send(_Kind.CHALLENGE_RESPONSE, self._query(opt), now, out)
        self._arm_retry(now)

    def _send_refresh(self, now: float, out: list[Output]) -> None:
        opt = LLQOption(LLQOpcode.REFRESH, LLQError.NO_ERROR, self.llq_id, self.config.lease)
        self._send(_Kind.REFRESH, self._query(opt), now, out)
        self._arm_retry(now)

    def _send_poll(self, now: float, out: list[Output], *, stream: bool = False) -> None:
        self._send(_Kind.POLL, self._query(None), now, out, stream=stream)

    def _ask_over_stream(self, now: float, out: list[Output], *, first: bool) -> None:
        """The full answer over TCP (a truncated one came, or events crossed the last ask)."""
        self._stream_asks = 1 if first else self._stream_asks + 1
        self._send_poll(now, out, stream=True)

    def _arm_retry(self, now: float) -> None:
        self._retry_at = now + self.config.retry[min(self._attempt, len(self.config.retry) - 1)]
        self._attempt += 1

    # ---- state changes ----------------------------------------------------------------------

    def _set_state(self, state: ClientState, why: str, out: list[Output]) -> None:
        if state != self.state:
            self.state = state
            out.append(StateChanged(state, why))

    def _begin_setup(self, now: float, why: str, out: list[Output]) -> None:
        self.llq_id = 0
        self._attempt = 0
        self._refreshing = False
        self._refresh_at = None
        self._next_poll = None
        self._next_setup = None
        self._set_state(ClientState.SETUP, why, out)
        self._send_setup(now, out)

    def _enter_polling(
        self, now: float, why: str, out: list[Output], setup_in: float | None = None
    ) -> None:
        self.llq_id = 0
        self._retry_at = None
        self._refresh_at = None
        self._refreshing = False
        self._set_state(ClientState.POLLING, why, out)
        self._send_poll(now, out)
        self._next_poll = now + self.config.poll_interval
        self._next_setup = now + (setup_in if setup_in is not None else self.config.poll_interval)

    def _retry(self, now: float, out: list[Output]) -> None:
        exhausted = self._attempt >= len(self.config.retry)
        if self.state == ClientState.SETUP:
            if exhausted:
                self._enter_polling(now, "no answer to the LLQ setup", out)
            else:
                self._send_setup(now, out)
        elif self.state == ClientState.CHALLENGED:
            if exhausted:
                self._enter_polling(now, "no answer to the challenge response", out)
            else:
                self._send_challenge_response(now, out)
        elif self.state == ClientState.ESTABLISHED and self._refreshing:
            if exhausted:
                self._begin_setup(now, "no answer to the refresh: LLQ lost", out)
            else:
                self._send_refresh(now, out)

    def _schedule_refresh(self, now: float) -> None:
        lease = max(self.lease, 1)
        jitter = self._rng.uniform(0, lease * self.config.jitter_fraction)
        self._refresh_at = now + lease * self.config.refresh_fraction + jitter
        self._refreshing = False
        self._retry_at = None
        self._attempt = 0

    # ---- answers --------------------------------------------------------------------------

    def _question_ok(self, msg: dns.message.Message) -> bool:
        if len(msg.question) != 1:
            return False
        q = msg.question[0]
        return q.name == self.qname and q.rdtype == self.qtype and q.rdclass == dns.rdataclass.IN

    def _verified(
        self, wire: bytes, msg: dns.message.Message, request_mac: bytes | None, now: float
    ) -> bool:
        key = self.key
        if key is None:
            return True
        if msg.tsig is None:
            return False
        rec = record_of(wire, msg)
        if rec.key_name != key.name or rec.algorithm != key.algorithm or rec.error != 0:
            return False
        if abs(rec.time_signed - now) > self.config.fudge:
            return False
        return hmac.compare_digest(expected_mac(key, wire, rec, request_mac=request_mac), rec.mac)

    def _answer(
        self,
        msg: dns.message.Message,
        pending: _Pending,
        options: list[LLQOption],
        now: float,
        out: list[Output],
    ) -> None:
        rcode = msg.rcode()
        kind = pending.kind
        if kind == _Kind.POLL:
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return
            if msg.flags & dns.flags.TC:
                if not pending.stream:
                    self._ask_over_stream(now, out, first=True)
                return
            if (pending.stream and pending.events != self._events_applied
                    and self._stream_asks < _STREAM_ASKS):
                self._ask_over_stream(now, out, first=False)
                return
            self._full_answer(msg, out)
            return
        if kind == _Kind.CANCEL:
            return
        if rcode != dns.rcode.NOERROR and not (
            rcode == dns.rcode.NXDOMAIN and kind == _Kind.CHALLENGE_RESPONSE
        ):
            self._enter_polling(now, f"server answered {dns.rcode.to_text(rcode)}", out)
            return
        if len(options) != 1 or options[0].malformed:
            self._enter_polling(now, "the server does not support LLQ", out)
            return
        opt = options[0]
        if opt.error != LLQError.NO_ERROR:
            self._llq_error(opt, kind, now, out)
            return
        if kind == _Kind.SETUP and self.state in (ClientState.SETUP, ClientState.POLLING):
            if opt.opcode != LLQOpcode.SETUP or opt.llq_id == 0:
                return
            self.llq_id = opt.llq_id
            self.lease = opt.lease
            self._attempt = 0
            self._next_setup = None
            self._set_state(ClientState.CHALLENGED, "challenge received", out)
            self._send_challenge_response(now, out)
        elif kind == _Kind.CHALLENGE_RESPONSE and self.state == ClientState.CHALLENGED:
            if opt.opcode != LLQOpcode.SETUP or opt.llq_id != self.llq_id:
                return
            self.lease = opt.lease
            self._next_poll = None
            self._next_setup = None
            self._schedule_refresh(now)
            self._set_state(ClientState.ESTABLISHED, f"lease {opt.lease} s", out)
            if msg.flags & dns.flags.TC:
                # The full answer did not fit: keep the LLQ (events still arrive) and ask for
                # the answer over TCP.
                out.append(StateChanged(ClientState.ESTABLISHED,
                                        "initial answer truncated: asking over TCP"))
                self._ask_over_stream(now, out, first=True)
            else:
                self._full_answer(msg, out)
        elif kind == _Kind.REFRESH and self.state == ClientState.ESTABLISHED:
            if opt.opcode != LLQOpcode.REFRESH or opt.llq_id != self.llq_id:
                return
            self.lease = opt.lease
            self._schedule_refresh(now)

    def _llq_error(self, opt: LLQOption, kind: _Kind, now: float, out: list[Output]) -> None:
        err = LLQError(opt.error) if opt.error in LLQError._value2member_map_ else None
        name = err.name if err is not None else str(opt.error)
        if err == LLQError.NO_SUCH_LLQ and kind in (_Kind.REFRESH, _Kind.CHALLENGE_RESPONSE):
            self._begin_setup(now, "server has no such LLQ", out)
        elif err == LLQError.SERV_FULL:
            self._enter_polling(now, "server full", out, setup_in=max(float(opt.lease), 1.0))
        elif err == LLQError.STATIC:
            self._retry_at = None
            self._set_state(ClientState.STATIC, "records are static: one plain query", out)
            self._send_poll(now, out)
        else:
            self._enter_polling(now, f"LLQ error {name}", out)

    def _full_answer(self, msg: dns.message.Message, out: list[Output]) -> None:
        new: dict[_Key, int] = {}
        for rrset in msg.answer:
            if rrset.rdclass != dns.rdataclass.IN:
                continue
            for rd in rrset:
                new[(rrset.name, rrset.rdtype, rd)] = rrset.ttl
        added = tuple(
            Record(n, t, rd, ttl) for (n, t, rd), ttl in new.items() if (n, t, rd) not in self.known
        )
        removed = tuple(
            Record(n, t, rd, ttl) for (n, t, rd), ttl in self.known.items() if (n, t, rd) not in new
        )
        self.known = new
        if added or removed:
            out.append(Changes(added, removed, True))

    # ---- events ---------------------------------------------------------------------------

    def _event(
        self,
        wire: bytes,
        msg: dns.message.Message,
        opt: LLQOption,
        now: float,
        out: list[Output],
    ) -> None:
        if opt.malformed or opt.llq_id == 0 or opt.llq_id != self.llq_id:
            return
        if not self._question_ok(msg) or not self._verified(wire, msg, None, now):
            return
        if self._events_of != opt.llq_id:
            self._events_of = opt.llq_id
            self._newest_event = -1
            self._seen_events = {}
        event_mac: bytes | None = None
        if self.key is not None and msg.tsig is not None:
            rd = msg.tsig[0]
            event_mac = rd.mac
            time_signed = int(rd.time_signed)
            # What the MAC covers; the header ID is left out on purpose.
            ident = hashlib.sha256(
                struct.pack("!HQ", rd.original_id, time_signed) + rd.mac
            ).digest()
        else:
            # Unsigned (no key configured): nothing to tell a replay from a new event but the
            # content, and the whole message is the best there is.
            time_signed = 0
            ident = hashlib.sha256(wire).digest()
        if time_signed < self._newest_event:
            return  # older than an event already applied: a replay, not acknowledged
        if ident not in self._seen_events:
            if time_signed > self._newest_event:
                self._newest_event = time_signed
                self._seen_events = {}
            if len(self._seen_events) >= _MAX_EVENTS_PER_SECOND:
                if event_mac is not None:
                    # Refuse rather than forget one: the server resends, then drops the LLQ,
                    # and the next setup's full answer brings the client up to date.
                    return
                del self._seen_events[next(iter(self._seen_events))]
            if not self._apply_event(wire, msg, out):
                return
            self._seen_events[ident] = None
        ack = dns.message.Message(id=msg.id)
        ack.flags = dns.flags.QR
        ack.question.append(
            dns.rrset.RRset(self.qname, dns.rdataclass.IN, dns.rdatatype.RdataType.make(self.qtype))
        )
        ack.use_edns(
            0,
            0,
            self.config.payload,
            options=[LLQOption(LLQOpcode.EVENT, LLQError.NO_ERROR, opt.llq_id, opt.lease)],
        )
        signed, _ = self._sign(ack.to_wire(), now, event_mac)
        out.append(Send(signed))

    def _apply_event(self, wire: bytes, msg: dns.message.Message, out: list[Output]) -> bool:
        ttls = answer_ttls(wire)
        if len(ttls) != sum(len(rrset) for rrset in msg.answer):
            return False
        added: list[Record] = []
        removed: list[Record] = []
        i = 0
        for rrset in msg.answer:
            for rd in rrset:
                k = (rrset.name, rrset.rdtype, rd)
                raw_ttl = ttls[i]
                i += 1
                if raw_ttl == REMOVED_TTL:
                    if k in self.known:
                        removed.append(Record(k[0], k[1], rd, self.known.pop(k)))
                else:
                    if k not in self.known:
                        added.append(Record(k[0], k[1], rd, rrset.ttl))
                    self.known[k] = rrset.ttl
        if added or removed:
            self._events_applied += 1
            out.append(Changes(tuple(added), tuple(removed), False))
        return True
