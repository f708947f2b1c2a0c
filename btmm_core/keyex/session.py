"""Per-peer SA lifecycle on a virtual clock: handshakes, rekeys, expiry, retries, keepalives.

Timers follow WireGuard (Donenfeld, NDSS 2017, section 6.1; the constants are
REKEY-AFTER-TIME 120 s, REJECT-AFTER-TIME 180 s, REKEY-TIMEOUT 5 s, REKEY-ATTEMPT-TIME 90 s)
and the ESP rule that a sequence number never wraps (RFC 4303 section 3.3.3: rekey first).
Messages are those of ``noise``.

The engine keeps at most two receive SAs per peer and retires the oldest when a third is
installed, so this module manages the receive SAs explicitly, make-before-break:

* the responder installs the new receive SA *before* it sends its response, and switches its
  transmit SA only when the initiator's confirm arrives (then acknowledges it);
* the initiator, on the response, installs the new receive SA and then the new transmit SA
  (the responder already holds the matching receive SA), then sends the confirm, repeating
  it every ``rekey_timeout`` until it is acknowledged; only the acknowledgement tells it that
  the responder now sends on the new SA;
* before installing a receive SA, every receive SA except the one the peer is known to be
  sending on is retired, so the peer's current SA is never pushed out;
* no rekey starts while a confirm is unacknowledged or an answered handshake unconfirmed.

If both sides initiate at once, the side with the lower public key yields: it abandons its
own initiation and answers; the other side ignores the crossing initiation (its own will be
answered), also when it arrives just after that side's own handshake completed (until the
acknowledgement and for ``rekey_timeout`` after completion: the abandoned initiation may
still be in flight). An answered handshake whose confirm never comes is dropped after
``RESPONDED_PATIENCE`` repeat intervals, so that it cannot hold up our own rekeys.

Where a peer is (its endpoint) is learnt only from messages that prove the account PSK: the
response (initiator side, ``on_complete``), the confirm (responder side, ``on_confirmed``),
and, in the engine, authenticated ESP packets (roaming). An initiation proves only the
static key, so a thief of a device key without the account secret could otherwise move the
peer's endpoint to itself; the response to an initiation goes to its source, and the stored
endpoint stays as it was until the confirm. (An attacker on the path that races a copy of a
genuine confirm from another address can still move it, as it can with any authenticated
packet: source addresses are not authenticated.)

Each peer's inner address must be the one derived from its public key
(``keys.ula_of``): ``KeyExchange.add_peer`` refuses any other, so the engine's check of
inner source addresses accepts from a peer only the address its key proves.

A transmit key older than ``reject_after_time`` (or past ``reject_after_messages``) is never
used: the engine API cannot delete a lone transmit SA, so the peer's SAs are reset.

Sans-I/O: every entry point takes ``now`` (monotonic seconds) and ``wall`` (Unix seconds, for
the handshake timestamps) and returns actions for a driver to carry out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from btmm_core.dataplane.api import SEQ_MAX, Endpoint
from btmm_core.errors import ConfigError
from btmm_core.keyex.keys import ula_of
from btmm_core.keyex.noise import (
    SPI_MAX,
    SPI_MIN,
    ConfirmAcked,
    Confirmed,
    CookieStored,
    HandshakeComplete,
    Handshaker,
    PeerInitiation,
    Refused,
    SaKeys,
    SendReply,
    is_path_message,
)

#: an answered handshake waits this many ``rekey_timeout`` intervals for its confirm (the
#: initiator repeats the confirm once per interval) before it is dropped
RESPONDED_PATIENCE = 3.5


@dataclass(frozen=True)
class SessionConfig:
    rekey_after_time: float = 120.0
    reject_after_time: float = 180.0
    #: rekey once this many packets were sent under one key, far from the 2**64 sequence end
    rekey_after_messages: int = 2**60
    reject_after_messages: int = SEQ_MAX - 2**13
    rekey_timeout: float = 5.0
    rekey_attempt_time: float = 90.0
    #: random extra delay added to each retry, up to this many seconds
    rekey_jitter: float = 0.333
    #: NAT keepalive interval; None (the default) sends none, for hosts not behind a NAT
    keepalive_interval: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.rekey_timeout < self.rekey_after_time:
            raise ConfigError(
                "rekey_timeout must be positive and below rekey_after_time",
                hint=f"got {self.rekey_timeout} and {self.rekey_after_time}",
            )
        if self.reject_after_time <= self.responder_rekey_after:
            raise ConfigError(
                "reject_after_time must exceed rekey_after_time + 2 * rekey_timeout, or keys "
                "would expire before the backstop rekey",
                hint=f"got reject {self.reject_after_time}, rekey {self.rekey_after_time}, "
                f"timeout {self.rekey_timeout}",
            )
        if not 0 < self.rekey_after_messages < self.reject_after_messages <= SEQ_MAX:
            raise ConfigError("need 0 < rekey_after_messages < reject_after_messages <= 2**64-1")
        if self.keepalive_interval is not None and self.keepalive_interval <= 0:
            raise ConfigError("keepalive_interval must be positive or None (off)")

    @property
    def responder_rekey_after(self) -> float:
        """The side that answered the last handshake rekeys only as a backstop, later than the
        initiator, so that the two rarely start crossing handshakes."""
        return self.rekey_after_time + 2 * self.rekey_timeout


# --- actions for the driver ------------------------------------------------------------------


@dataclass(frozen=True)
class SendControl:
    destination: Endpoint
    message: bytes


@dataclass(frozen=True)
class InstallRx:
    inner: str
    spi: int
    keymat: bytes = field(repr=False)


@dataclass(frozen=True)
class InstallTx:
    inner: str
    spi: int
    keymat: bytes = field(repr=False)


@dataclass(frozen=True)
class RetireRx:
    inner: str
    spi: int


@dataclass(frozen=True)
class ResetPeer:
    """Remove every SA of the peer (its transmit key expired) and re-add it at ``endpoint``."""

    inner: str
    endpoint: Endpoint | None


@dataclass(frozen=True)
class RemovePeer:
    """The peer is no longer trusted: remove it and all its SAs from the engine."""

    inner: str


@dataclass(frozen=True)
class ClearTx:
    """The session went idle (on-demand tunnels): remove the peer's transmit SA only."""

    inner: str


@dataclass(frozen=True)
class SetEndpoint:
    inner: str
    endpoint: Endpoint


@dataclass(frozen=True)
class SendKeepalive:
    inner: str


@dataclass(frozen=True)
class Established:
    """A new SA pair is in use in both directions (as far as this side can tell)."""

    inner: str
    tx_spi: int
    rx_spi: int
    initiator: bool


@dataclass(frozen=True)
class HandshakeFailed:
    inner: str
    what: str


Action = (
    SendControl
    | InstallRx
    | InstallTx
    | RetireRx
    | ResetPeer
    | RemovePeer
    | ClearTx
    | SetEndpoint
    | SendKeepalive
    | Established
    | HandshakeFailed
)


@dataclass
class _Rx:
    spi: int
    keymat: bytes = field(repr=False)
    created: float


@dataclass
class _Tx:
    spi: int
    created: float
    initiator: bool
    packets_base: int


@dataclass
class _Responded:
    keys: SaKeys
    at: float


@dataclass
class _Unacked:
    rx_spi: int
    confirm: bytes
    destination: Endpoint
    since: float
    next_resend: float


class Session:
    """The lifecycle of the SAs shared with one peer."""

    def __init__(
        self, owner: KeyExchange, peer: bytes, inner: str, endpoint: Endpoint | None
    ) -> None:
        self.owner = owner
        self.peer = peer
        self.inner = inner
        self.endpoint = endpoint
        self.want = False
        self.rx: list[_Rx] = []
        self.current_rx: int | None = None
        self.tx: _Tx | None = None
        self.pending: int | None = None
        self.attempt_started: float | None = None
        self.next_retry = float("inf")
        self.responded: _Responded | None = None
        self.unacked: _Unacked | None = None
        self.completed_at = float("-inf")
        self.packets_out = 0
        self.next_keepalive = float("inf")
        self.rekeys = 0
        self.handshakes = 0
        self.retries = 0
        self.collisions = 0
        self.failures = 0

    @property
    def cfg(self) -> SessionConfig:
        return self.owner.config

    # -- helpers ---------------------------------------------------------------------

    def _send(self, message: bytes, to: Endpoint | None = None) -> list[Action]:
        dest = to or self.endpoint
        return [] if dest is None else [SendControl(dest, message)]

    def _learn_endpoint(self, source: Endpoint) -> list[Action]:
        if source == self.endpoint:
            return []
        self.endpoint = source
        return [SetEndpoint(self.inner, source)]

    def _make_room(self) -> list[Action]:
        """Retire every receive SA except the one the peer currently sends on."""
        out: list[Action] = []
        keep = [r for r in self.rx if r.spi == self.current_rx]
        for r in self.rx:
            if r.spi != self.current_rx:
                out.append(RetireRx(self.inner, r.spi))
        self.rx = keep
        return out

    def _install_tx(self, keys: SaKeys, created: float, initiator: bool) -> list[Action]:
        self.tx = _Tx(keys.tx_spi, created, initiator, self.packets_out)
        if self.cfg.keepalive_interval is not None and self.next_keepalive == float("inf"):
            # a rekey does not move the schedule: the NAT needs traffic every interval
            self.next_keepalive = created + self.cfg.keepalive_interval
        return [InstallTx(self.inner, keys.tx_spi, keys.tx_keymat)]

    def busy(self) -> bool:
        """A handshake is under way: no new one may start (except a retry of our own)."""
        return self.pending is not None or self.responded is not None

    def settling(self) -> bool:
        """Busy, or our last completed handshake is not yet acknowledged: no rekey now."""
        return self.busy() or self.unacked is not None

    def _drop_unacked(self) -> None:
        if self.unacked is not None:
            self.owner.handshaker.forget_unacked(self.unacked.rx_spi)
            self.unacked = None

    # -- initiator -------------------------------------------------------------------

    def start(self, now: float, wall: float) -> list[Action]:
        if self.responded is not None:
            return []  # the peer's handshake is about to complete; wait for it
        hs = self.owner.handshaker
        if self.pending is not None:
            hs.cancel(self.pending)
            self.retries += 1
        if self.attempt_started is None:
            self.attempt_started = now
        spi = self.owner.allocate_spi()
        msg = hs.initiate(self.peer, spi, now, self.owner.stamp(wall))
        self.pending = spi
        self.handshakes += 1
        self.next_retry = now + self.cfg.rekey_timeout + self.owner.jitter()
        return self._send(msg)

    def on_complete(self, done: HandshakeComplete, now: float) -> list[Action]:
        if done.keys.rx_spi != self.pending:
            return []
        self.pending = None
        self.attempt_started = None
        self.next_retry = float("inf")
        self.completed_at = now
        out = self._learn_endpoint(done.source)
        if self.responded is not None:
            # a crossing handshake we answered loses to ours: the peer will drop its own
            self.owner.handshaker.forget_awaiting(self.responded.keys.rx_spi)
            self.responded = None
        self._drop_unacked()
        out += self._make_room()
        keys = done.keys
        self.rx.append(_Rx(keys.rx_spi, keys.rx_keymat, now))
        out.append(InstallRx(self.inner, keys.rx_spi, keys.rx_keymat))
        if self.tx is not None:
            self.rekeys += 1
        out += self._install_tx(keys, now, initiator=True)
        # the peer keeps sending on ``current_rx`` until it has the confirm; we learn that
        # from its acknowledgement
        self.unacked = _Unacked(
            keys.rx_spi, done.confirm, done.source, now, now + self.cfg.rekey_timeout
        )
        out += self._send(done.confirm, done.source)
        out.append(Established(self.inner, keys.tx_spi, keys.rx_spi, True))
        return out

    def on_acked(self, acked: ConfirmAcked) -> list[Action]:
        if self.unacked is None or self.unacked.rx_spi != acked.rx_spi:
            return []
        self.current_rx = acked.rx_spi
        self.unacked = None
        return []

    # -- responder -------------------------------------------------------------------

    def on_initiation(self, init: PeerInitiation, now: float) -> list[Action]:
        hs = self.owner.handshaker
        higher = hs.static.public > self.peer
        crossing = self.unacked is not None or now < self.completed_at + self.cfg.rekey_timeout
        if higher and self.pending is None and crossing:
            # the initiation the peer abandoned when it yielded to ours, arriving late:
            # answering it would retire the SA the peer is about to switch to
            self.collisions += 1
            return []
        if self.pending is not None:
            if higher:
                self.collisions += 1
                return []  # ours wins; the peer yields when it sees our initiation
            hs.cancel(self.pending)
            self.pending = None
            self.attempt_started = None
            self.next_retry = float("inf")
        # the endpoint is not learnt here: an initiation does not prove the PSK (the
        # response goes to its source; ``on_confirmed`` moves the endpoint)
        out: list[Action] = []
        if self.responded is not None:
            # superseded by the initiator's retry: it dropped the state this one belonged to
            hs.forget_awaiting(self.responded.keys.rx_spi)
            self.responded = None
        # our last confirm was never acknowledged, so the peer may not have switched: keep
        # the SA it sent on before (``current_rx``) and give up on the acknowledgement
        self._drop_unacked()
        out += self._make_room()
        spi = self.owner.allocate_spi()
        msg, keys = hs.respond(init, spi, now)
        self.rx.append(_Rx(spi, keys.rx_keymat, now))
        out.append(InstallRx(self.inner, spi, keys.rx_keymat))  # before the response leaves
        self.responded = _Responded(keys, now)
        out += self._send(msg, init.source)
        return out

    def on_confirmed(self, conf: Confirmed, now: float) -> list[Action]:
        if conf.repeated:
            # our ack was lost; answer again if that SA is still the one we send on
            if self.tx is not None and self.tx.spi == conf.keys.tx_spi:
                return self._send(conf.ack, conf.source)
            return []
        if self.responded is None or self.responded.keys.rx_spi != conf.keys.rx_spi:
            return []
        out = self._learn_endpoint(conf.source)
        keys, at = self.responded.keys, self.responded.at
        self.responded = None
        if self.tx is not None:
            self.rekeys += 1
        out += self._install_tx(keys, at, initiator=False)
        self.current_rx = keys.rx_spi
        out += self._send(conf.ack, conf.source)
        out.append(Established(self.inner, keys.tx_spi, keys.rx_spi, False))
        return out

    # -- time ------------------------------------------------------------------------

    def next_deadline(self) -> float:
        cfg = self.cfg
        times = [self.next_retry, self.next_keepalive]
        if self.unacked is not None:
            times.append(self.unacked.next_resend)
        if self.responded is not None:
            times.append(self.responded.at + RESPONDED_PATIENCE * cfg.rekey_timeout)
        if self.tx is not None:
            times.append(self.tx.created + cfg.reject_after_time)
            sent = self.packets_out - self.tx.packets_base
            if sent >= cfg.reject_after_messages or (
                sent >= cfg.rekey_after_messages and not self.settling()
            ):
                times.append(float("-inf"))  # the packet budget is spent: act now
            if not self.settling():
                after = cfg.rekey_after_time if self.tx.initiator else cfg.responder_rekey_after
                times.append(self.tx.created + after)
        times += [r.created + cfg.reject_after_time for r in self.rx]
        if self.want and self.tx is None and not self.busy():
            times.append(float("-inf"))
        return min(times)

    def tick(self, now: float, wall: float) -> list[Action]:
        cfg = self.cfg
        out: list[Action] = []
        hs = self.owner.handshaker
        if self.unacked is not None and now >= self.unacked.next_resend:
            if now >= self.unacked.since + cfg.rekey_attempt_time:
                self._drop_unacked()  # the peer stays on ``current_rx`` as far as we know
            else:
                out += self._send(self.unacked.confirm, self.unacked.destination)
                self.unacked.next_resend = now + cfg.rekey_timeout
        if self.responded is not None and (
            now >= self.responded.at + RESPONDED_PATIENCE * cfg.rekey_timeout
        ):
            # the initiator repeats its confirm every rekey_timeout; none came, so it never
            # completed (or abandoned this handshake): the peer never sends on this SA
            spi = self.responded.keys.rx_spi
            hs.forget_awaiting(spi)
            self.responded = None
            self.rx = [r for r in self.rx if r.spi != spi]
            out.append(RetireRx(self.inner, spi))
        # expiry first: a key past its lifetime is never used, whatever else happens
        out += self._expire(now)
        if self.pending is not None and now >= self.next_retry:
            assert self.attempt_started is not None
            if now >= self.attempt_started + cfg.rekey_attempt_time:
                hs.cancel(self.pending)
                self.pending = None
                self.attempt_started = None
                self.next_retry = float("inf")
                self.want = False
                self.failures += 1
                out.append(
                    HandshakeFailed(
                        self.inner,
                        f"no handshake answer from {self.endpoint or 'an unknown endpoint'} in "
                        f"{cfg.rekey_attempt_time:.0f} s; check that the peer is up and its UDP "
                        "port is reachable",
                    )
                )
            else:
                out += self.start(now, wall)
        if self.tx is not None and not self.settling():
            after = cfg.rekey_after_time if self.tx.initiator else cfg.responder_rekey_after
            sent = self.packets_out - self.tx.packets_base
            # compare as ``next_deadline`` computes (created + after), never as an age: the
            # two round differently and a deadline that never fires would spin the driver
            if now >= self.tx.created + after or sent >= cfg.rekey_after_messages:
                out += self.start(now, wall)
        if self.want and self.tx is None and not self.busy():
            out += self.start(now, wall)
        if self.tx is not None and now >= self.next_keepalive:
            assert cfg.keepalive_interval is not None
            out.append(SendKeepalive(self.inner))
            self.next_keepalive = now + cfg.keepalive_interval
        if self.tx is None:
            self.next_keepalive = float("inf")
        return out

    def _expire(self, now: float) -> list[Action]:
        """Retire receive SAs past their lifetime; a spent transmit key resets the peer."""
        cfg = self.cfg
        out: list[Action] = []
        expired_rx = [r for r in self.rx if now >= r.created + cfg.reject_after_time]
        for r in expired_rx:
            out.append(RetireRx(self.inner, r.spi))
            self.rx.remove(r)
            if r.spi == self.current_rx:
                self.current_rx = None
            if self.responded is not None and self.responded.keys.rx_spi == r.spi:
                # never confirmed within a key lifetime
                self.owner.handshaker.forget_awaiting(r.spi)
                self.responded = None
            if self.unacked is not None and self.unacked.rx_spi == r.spi:
                self._drop_unacked()
        if self.tx is not None and (
            now >= self.tx.created + cfg.reject_after_time
            or self.packets_out - self.tx.packets_base >= cfg.reject_after_messages
        ):
            out += self._reset()
        return out

    def _reset(self) -> list[Action]:
        """The transmit key expired: drop every SA (the engine cannot drop the lone tx SA)."""
        self.tx = None
        self.rx = []
        self.current_rx = None
        if self.responded is not None:
            self.owner.handshaker.forget_awaiting(self.responded.keys.rx_spi)
            self.responded = None
        self._drop_unacked()
        return [ResetPeer(self.inner, self.endpoint)]

    def note_packets_out(self, total: int) -> None:
        """The engine's count of packets sent to this peer (monotonic across SAs)."""
        self.packets_out = total


class KeyExchange:
    """All sessions of one host: dispatches handshake messages and timers to them."""

    def __init__(
        self,
        handshaker: Handshaker,
        config: SessionConfig | None = None,
        random: Callable[[int], bytes] | None = None,
    ) -> None:
        self.handshaker = handshaker
        self.config = config or SessionConfig()
        self.random = random or handshaker.random
        self.sessions: dict[bytes, Session] = {}
        self.by_inner: dict[str, Session] = {}
        self._last_stamp = float("-inf")
        self.refusals: list[Refused] = []

    # -- configuration ---------------------------------------------------------------

    def add_peer(self, public: bytes, inner: str, endpoint: Endpoint | None = None) -> Session:
        """Trust ``public`` as the peer at ``inner``, which must be ``ula_of(public)``."""
        want = ula_of(public)
        try:
            claimed = ipaddress.IPv6Address(inner)
        except ValueError as exc:
            raise ConfigError(
                f"peer address {inner!r} is not an IPv6 address", hint=f"use {want}"
            ) from exc
        if claimed != want:
            raise ConfigError(
                f"peer address {inner} is not the one bound to its key",
                hint=f"a peer's inner address is derived from its public key: {want}",
            )
        if public in self.sessions or inner in self.by_inner:
            raise ConfigError(f"peer {inner} is configured twice", hint="each key and address once")
        self.handshaker.add_peer(public)
        s = Session(self, public, inner, endpoint)
        self.sessions[public] = s
        self.by_inner[inner] = s
        return s

    def remove_peer(self, inner: str) -> list[Action]:
        """Stop trusting a peer: its handshakes are refused from now on (unknown key)."""
        s = self.by_inner.pop(inner)
        del self.sessions[s.peer]
        self.handshaker.remove_peer(s.peer)
        return [RemovePeer(inner)]

    def session(self, inner: str) -> Session:
        return self.by_inner[inner]

    def allocate_spi(self) -> int:
        used = set(self.handshaker.pending) | set(self.handshaker.awaiting)
        for s in self.sessions.values():
            used.update(r.spi for r in s.rx)
        while True:
            spi = int.from_bytes(self.random(4), "big")
            if SPI_MIN <= spi <= SPI_MAX and spi not in used:
                return spi

    def jitter(self) -> float:
        return int.from_bytes(self.random(2), "big") / 65535 * self.config.rekey_jitter

    def stamp(self, wall: float) -> float:
        """Strictly increasing handshake timestamps even if the wall clock stalls or steps."""
        self._last_stamp = max(wall, self._last_stamp + 1e-6)
        return self._last_stamp

    # -- entry points ------------------------------------------------------------------

    def connect(self, inner: str, now: float, wall: float) -> list[Action]:
        """Keep a session with this peer up from now on (start a handshake if none)."""
        s = self.by_inner[inner]
        s.want = True
        if s.tx is None and not s.busy():
            return s.start(now, wall)
        return []

    def idle(self, inner: str) -> list[Action]:
        """Stop keeping the session up (on-demand tunnels, ``daemon/ondemand.py``): give up
        any handshake of ours and forget the transmit SA, so the engine holds the next packet
        and asks again. Receive SAs stay until they expire: a packet the peer still sends
        arrives, and a handshake it starts is answered as usual."""
        s = self.by_inner[inner]
        s.want = False
        if s.pending is not None:
            self.handshaker.cancel(s.pending)
            s.pending = None
            s.attempt_started = None
            s.next_retry = float("inf")
        s._drop_unacked()
        s.tx = None
        s.next_keepalive = float("inf")
        return [ClearTx(inner)]

    def receive(self, payload: bytes, source: Endpoint, now: float, wall: float) -> list[Action]:
        if is_path_message(payload):
            # connectivity checks belong to reach.paths; the daemon routes them there
            return []
        out = self.handshaker.receive(payload, source, now, wall)
        if isinstance(out, Refused):
            self.refusals = [*self.refusals[-63:], out]
            return []
        if isinstance(out, SendReply):
            return [SendControl(out.destination, out.message)]
        if isinstance(out, CookieStored):
            return []  # the next retry carries mac2
        if isinstance(out, PeerInitiation):
            return self.sessions[out.peer].on_initiation(out, now)
        if isinstance(out, HandshakeComplete):
            return self.sessions[out.keys.peer].on_complete(out, now)
        if isinstance(out, Confirmed):
            return self.sessions[out.keys.peer].on_confirmed(out, now)
        if isinstance(out, ConfirmAcked):
            return self.sessions[out.peer].on_acked(out)
        raise AssertionError(f"unhandled outcome {out!r}")

    def next_deadline(self) -> float | None:
        times = [s.next_deadline() for s in self.sessions.values()]
        t = min(times, default=float("inf"))
        return None if t == float("inf") else t

    def tick(self, now: float, wall: float) -> list[Action]:
        out: list[Action] = []
        for s in self.sessions.values():
            if s.next_deadline() <= now:
                out += s.tick(now, wall)
        return out

    def note_packets_out(self, inner: str, total: int) -> None:
        self.by_inner[inner].note_packets_out(total)
