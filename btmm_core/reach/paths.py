"""Per-peer path manager: connectivity checks, path selection, upgrade and liveness (core).

References: RFC 8445 (ICE) sections 6.1.2 (forming and pruning candidate pairs), 6.1.4
(pacing of checks), 7.2.5 (processing a response: symmetric addresses, peer-reflexive
candidates), 7.3.1.4 (triggered checks); RFC 6298 section 2 (smoothed round-trip time);
RFC 4787 sections 4 and 5 (NAT mapping and filtering behaviour hole punching relies on).

Used by ``btmm up`` through ``daemon/pathset.py``: the daemon routes probe messages here by
their sender id, calls ``note_outbound`` and ``note_authenticated_packet`` from the engine's
per-peer counters (packets out, packets in at the endpoint the engine holds, which follows
roaming), and points the peer's endpoint where ``UsePath`` says. Messages and their
authentication are those of ``reach.probe``.

Pairs
-----
Every probe leaves by one socket (the engine's UDP port), so a candidate pair is that socket
with one candidate of the peer: the local candidates only say which address families we can
send on (and are never probed themselves). A remote endpoint published under several kinds
keeps the best one. At most ``max_pairs`` pairs are kept, best first; peer-reflexive pairs
(an authenticated request came from an address the peer never published) join as REFLEXIVE
and push the least preferred pair out when the table is full.

Pacing
------
An attempt probes each pair ``probes_per_attempt`` times, ``probe_interval`` apart, pairs in
preference order, and every probe spends a token of one bucket (``probe_rate`` per second,
``probe_burst`` at once), so no configuration can send faster. Both peers start an attempt
when the other's candidates appear or change (DNS delivers the change within a second), and
an authenticated request from the peer triggers a check of its source at once: a NAT that
only lets in packets from destinations it has sent to (RFC 4787 address-dependent filtering)
lets the peer's probe in once our own probe to the peer has left. When an attempt ends with no
path, the next one waits ``backoff_initial`` seconds, doubling up to ``backoff_max``; with a
path, better pairs (and the path itself, for its RTT) are re-checked every
``recheck_interval``; a request that comes on the path in use while our own checks of it are
that fresh is answered and triggers no check back (the peer's re-checks would otherwise
double ours).

A peer with no tunnel (``set_idle``: on demand, nothing to carry) whose path holds no NAT or
firewall state (LAN, MAPPED: ``QUIET_KINDS``) is re-checked every ``idle_recheck_interval``
only: in an account of 100 hosts, two checks of each of 99 peers every 30 s were most of a
daemon's idle CPU and packets. Punched, IPv6 and relayed paths keep ``recheck_interval``,
which keeps their pinholes and permissions open. When the tunnel opens, a path last checked
more than ``recheck_interval`` ago is checked at once.

Selection
---------
A pair may be chosen only after it answered an authenticated probe (a reply with our txid,
from the endpoint we sent it to) or carried authenticated ESP (``note_authenticated_packet``,
which only the engine calls); a request proves nothing about the path back, so it only
triggers a check. Among such pairs: LAN > IPV6 > MAPPED > REFLEXIVE (punched) > RELAY, then a
clearly lower RTT (below ``rtt_switch_ratio`` of the path in use). A better pair that answers
a re-check replaces the path in use (``UsePath``): only the outer endpoint changes. When the
endpoint in use is republished under another kind (a gateway began to map the pinhole's own
port), the path keeps its endpoint and takes the kind (``UsePath`` to the same endpoint).

Liveness
--------
The path in use is expected to answer once traffic is pending (``note_outbound``), one of
its probes was lost, or the peer's own traffic on it stopped (``note_authenticated_packet``,
then nothing for ``quiet_after``): a host that only receives (a TCP sink sends nothing but
ACKs for what arrives) would otherwise never notice that its NAT dropped the pinhole, and the
peer's probes cannot tell it, since they die at that very NAT; our own probe re-opens the
pinhole from inside, so the peer's traffic flows again within about ``quiet_after`` plus a
round trip. A peer that simply stopped sending answers that one probe and nothing changes.
Quiet for ``quiet_after`` seconds while expected: it is probed every
``liveness_interval``; for ``stale_after``: ``PathStale`` (still used; a search starts); for
``down_after``: ``PathDown`` with why, and the search goes on with backoff. Any authenticated
packet from it first brings it back (``PathRecovered``).
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from btmm_core.dataplane.api import Endpoint
from btmm_core.errors import ConfigError, MalformedMessage
from btmm_core.keyex.keys import StaticKey
from btmm_core.reach.candidates import Candidate, CandidateKind
from btmm_core.reach.probe import (
    DROP_NAMES,
    TXID_LEN,
    GuardConfig,
    ProbeDrop,
    ProbeKeys,
    ProbeReply,
    ProbeRequest,
    RequestGuard,
    parse_probe,
)

RandomSource = Callable[[int], bytes]
INF = float("inf")
TOKEN_SLACK = 1e-9

#: what ``btmm status`` calls a path of each kind
PATH_NAMES: dict[CandidateKind, str] = {
    CandidateKind.LAN: "lan",
    CandidateKind.IPV6: "ipv6",
    CandidateKind.MAPPED: "mapped",
    CandidateKind.REFLEXIVE: "punched",
    CandidateKind.RELAY: "relay",
}


@dataclass(frozen=True)
class PathConfig:
    probes_per_attempt: int = 5
    probe_interval: float = 0.2
    #: a probe unanswered this long is lost
    probe_timeout: float = 1.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_pairs: int = 16
    #: token bucket every probe draws from: a hard cap on probes per second
    probe_rate: float = 20.0
    probe_burst: float = 20.0
    recheck_interval: float = 30.0
    #: the re-check of an idle peer's path of a ``QUIET_KINDS`` kind
    idle_recheck_interval: float = 300.0
    quiet_after: float = 1.0
    liveness_interval: float = 0.5
    stale_after: float = 5.0
    down_after: float = 10.0
    #: a pair of the same kind replaces the path in use only below this fraction of its RTT
    rtt_switch_ratio: float = 0.75
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if not (
            self.probes_per_attempt >= 1
            and self.max_pairs >= 1
            and self.probe_rate > 0
            and self.probe_burst >= 1
            and 0 < self.backoff_initial <= self.backoff_max
            and 0 < self.quiet_after < self.stale_after < self.down_after
            and self.probe_interval > 0
            and self.probe_timeout > 0
            and self.liveness_interval > 0
            and 0 < self.recheck_interval <= self.idle_recheck_interval
        ):
            raise ConfigError("inconsistent path probing configuration", hint=repr(self))


class PathState(enum.IntEnum):
    SEARCHING = 1  #: no path yet
    UP = 2  #: a path answers
    STALE = 3  #: the path in use stopped answering; still used while a search runs
    DOWN = 4  #: the path in use was given up; searching


#: paths that keep no NAT or firewall state open on either side: a LAN, a gateway's mapping or
#: a host's own public address (our NAT's filter for the peer's mapped endpoint, if any, is
#: the peer's path to us: REFLEXIVE on its side, re-checked by the peer)
QUIET_KINDS = frozenset({CandidateKind.LAN, CandidateKind.MAPPED})


# --- outputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendProbe:
    """Send ``data`` as a control message (after the non-ESP marker) to ``destination``."""

    destination: Endpoint
    data: bytes


@dataclass(frozen=True)
class UsePath:
    """Send the peer's tunnel traffic to ``endpoint`` from now on."""

    endpoint: Endpoint
    kind: CandidateKind
    rtt: float | None


@dataclass(frozen=True)
class PathStale:
    endpoint: Endpoint
    reason: str


@dataclass(frozen=True)
class PathRecovered:
    endpoint: Endpoint


@dataclass(frozen=True)
class PathDown:
    endpoint: Endpoint
    reason: str


@dataclass(frozen=True)
class ReflexiveSeen:
    """The peer saw our probes come from ``endpoint``: a peer-reflexive candidate of ours."""

    endpoint: Endpoint


Output = SendProbe | UsePath | PathStale | PathRecovered | PathDown | ReflexiveSeen


@dataclass(frozen=True)
class PathStatus:
    state: PathState
    endpoint: Endpoint | None
    kind: CandidateKind | None
    rtt: float | None
    last_heard: float | None


# --- state --------------------------------------------------------------------------------


@dataclass
class _Pair:
    remote: Candidate
    order: int
    probing: bool = False
    sent: int = 0  #: probes sent in the current run
    next_probe: float = INF
    heard: float = -INF  #: last authenticated reply or ESP packet from this endpoint
    rtt: float | None = None
    lost: int = 0  #: probes lost since it last answered

    @property
    def endpoint(self) -> Endpoint:
        return self.remote.endpoint

    @property
    def kind(self) -> CandidateKind:
        return self.remote.kind

    def rank(self) -> tuple[int, float, int]:
        return (self.kind, INF if self.rtt is None else self.rtt, self.order)


@dataclass(frozen=True)
class _Sent:
    endpoint: Endpoint
    at: float


def canonical(endpoint: Endpoint) -> Endpoint:
    """One text form per address, so that endpoints compare equal when they are."""
    return Endpoint(str(ipaddress.ip_address(endpoint.host)), endpoint.port)


def _reflexive_kind(endpoint: Endpoint) -> CandidateKind:
    return CandidateKind.REFLEXIVE


def _family(endpoint: Endpoint) -> int:
    return ipaddress.ip_address(endpoint.host).version


def form_pairs(
    local: Iterable[Candidate], remote: Iterable[Candidate], max_pairs: int
) -> list[Candidate]:
    """The remote candidates worth probing, best first, at most ``max_pairs``."""
    local = [Candidate(c.kind, canonical(c.endpoint)) for c in local]
    families = {_family(c.endpoint) for c in local}
    own = {c.endpoint for c in local}
    best: dict[Endpoint, CandidateKind] = {}
    for c in remote:
        ep = canonical(c.endpoint)
        if _family(ep) not in families or ep in own:
            continue
        best[ep] = min(best.get(ep, c.kind), c.kind)
    ordered = sorted(best.items(), key=lambda item: item[1])  # stable: publication order
    return [Candidate(kind, ep) for ep, kind in ordered[:max_pairs]]


class PathManager:
    """Connectivity checks and the path in use for one peer. See the module docstring."""

    def __init__(
        self,
        static: StaticKey,
        peer_public: bytes,
        psk: bytes,
        random: RandomSource,
        config: PathConfig | None = None,
    ) -> None:
        self.config = config or PathConfig()
        #: the kind a peer-reflexive endpoint takes: REFLEXIVE, unless the owner knows
        #: better (the daemon says RELAY for the loopback proxies of its TURN relay, so that
        #: a punched path still wins over them)
        self.peer_reflexive_kind: Callable[[Endpoint], CandidateKind] = _reflexive_kind
        self.keys = ProbeKeys.derive(static, peer_public, psk)
        self.guard = RequestGuard(self.keys, self.config.guard)
        self.random = random
        self.pairs: dict[Endpoint, _Pair] = {}
        self._order = 0
        self._local: list[Candidate] = []
        self._outstanding: dict[bytes, _Sent] = {}
        self._started = False
        self._attempt = False
        self._attempt_until = -INF
        self._next_attempt = INF
        #: when the last round of checks ended with a path up (or one was chosen)
        self._checked_at = -INF
        #: the peer has no tunnel (``set_idle``)
        self.idle = False
        self._backoff = self.config.backoff_initial
        self._tokens = self.config.probe_burst
        self._token_stamp = -INF
        self.active: _Pair | None = None
        self.state = PathState.SEARCHING
        self._expect_since: float | None = None  # answer expected from the active path since
        self._next_liveness = -INF
        #: last authenticated ESP on the active path that no check has followed yet
        self._inbound_at: float | None = None
        #: our endpoints as the peer saw them, one per path (bounded, oldest first out)
        self.observed: dict[Endpoint, None] = {}
        self.drops: Counter[str] = Counter()
        self.probes_sent = 0
        self.replies_sent = 0

    # -- entry points -----------------------------------------------------------------------

    def set_candidates(self, local: Iterable[Candidate], remote: Iterable[Candidate]) -> None:
        """Both candidate lists, before ``start`` (or use ``update_candidates`` after)."""
        self._local = list(local)
        wanted = form_pairs(self._local, remote, self.config.max_pairs)
        keep = {c.endpoint for c in wanted}
        for ep in list(self.pairs):
            if ep not in keep and self.pairs[ep] is not self.active:
                del self.pairs[ep]
        for c in wanted:
            p = self.pairs.get(c.endpoint)
            if p is None:
                self._add_pair(c)
            else:
                p.remote = c

    def start(self, now: float, wall: float) -> list[Output]:
        """Begin: probe every pair."""
        self._started = True
        self._token_stamp = now
        self._begin_attempt(now, full=True)
        return self.tick(now, wall)

    def update_candidates(
        self, local: Iterable[Candidate], remote: Iterable[Candidate], now: float, wall: float
    ) -> list[Output]:
        """Either side's candidates changed: re-pair and probe at once, backoff reset.

        When the endpoint in use is now published under another kind (a gateway began to map
        the very port the pinhole used, or stopped), the path in use keeps its endpoint and
        takes the kind: ``UsePath`` says so, and moves nothing; the round of checks that
        follows may then find a better pair."""
        active = self.active
        kind = None if active is None else active.kind
        self.set_candidates(local, remote)
        self._backoff = self.config.backoff_initial
        if not self._started:
            return self.start(now, wall)
        out: list[Output] = []
        if active is not None and active is self.active and active.kind != kind:
            out.append(UsePath(active.endpoint, active.kind, active.rtt))
        self._begin_attempt(now, full=True)
        return out + self.tick(now, wall)

    def set_idle(self, idle: bool, now: float) -> bool:
        """Whether the peer's tunnel is closed (nothing to carry): see Pacing above. True if
        that is news (the next deadline may have moved)."""
        if idle == self.idle:
            return False
        self.idle = idle
        if not self._attempt and self.state == PathState.UP:
            self._next_attempt = max(self._checked_at + self._recheck_interval(), now)
        return True

    def note_outbound(self, now: float) -> None:
        """Tunnel traffic to the peer is pending (the engine sent packets)."""
        if self.active is not None and self._expect_since is None:
            self._expect_since = now

    def note_authenticated_packet(self, endpoint: Endpoint, now: float) -> list[Output]:
        """An authenticated packet (ESP) of the peer arrived from ``endpoint``."""
        ep = canonical(endpoint)
        pair = self.pairs.get(ep)
        if pair is None:
            # a peer-reflexive endpoint, proven by ESP: the engine roams to it anyway
            pair = self._add_pair(Candidate(self.peer_reflexive_kind(ep), ep))
        if pair is None:
            return []
        out = self._on_evidence(pair, now)
        if pair is self.active:
            self._inbound_at = now
        return out

    def receive(self, data: bytes, source: Endpoint, now: float, wall: float) -> list[Output]:
        """A probe message from ``source``. Anything wrong is counted and dropped."""
        try:
            message = parse_probe(data)
            source = canonical(source)
        except (MalformedMessage, ValueError):
            return self._drop(ProbeDrop.MALFORMED)
        if isinstance(message, ProbeRequest):
            return self._on_request(message, source, now, wall)
        return self._on_reply(message, source, now)

    def next_deadline(self) -> float | None:
        if not self._started:
            return None
        times = [s.at + self.config.probe_timeout for s in self._outstanding.values()]
        probing = [p.next_probe for p in self.pairs.values() if p.probing]
        if probing:
            times.append(max(min(probing), self._token_time()))
        if self._attempt:
            times.append(self._attempt_until)
        else:
            times.append(self._next_attempt)
        times += self._liveness_deadlines()
        t = min(times, default=INF)
        return None if t == INF else t

    def tick(self, now: float, wall: float) -> list[Output]:
        if not self._started:
            return []
        out: list[Output] = []
        self._expire(now)
        out += self._liveness(now, wall)
        probing = any(p.probing for p in self.pairs.values())
        if self._attempt and not probing and now >= self._attempt_until:
            self._end_attempt(now)
        if not self._attempt and now >= self._next_attempt:
            self._begin_attempt(now, full=self.state != PathState.UP)
        out += self._send_due(now, wall)
        return out

    def repoint(self) -> list[Output]:
        """``UsePath`` again for the path in use, while it answers: for a caller that saw the
        engine send elsewhere (it follows the source of the peer's last authenticated packet,
        which a NAT may give a port of its own) and the peer fall quiet there."""
        a = self.active
        if a is None or self.state != PathState.UP:
            return []
        return [UsePath(a.endpoint, a.kind, a.rtt)]

    def status(self) -> PathStatus:
        a = self.active
        if a is None:
            return PathStatus(self.state, None, None, None, None)
        return PathStatus(self.state, a.endpoint, a.kind, a.rtt, a.heard)

    # -- receiving ------------------------------------------------------------------------

    def _drop(self, reason: ProbeDrop) -> list[Output]:
        self.drops[DROP_NAMES[reason]] += 1
        return []

    def _on_request(
        self, req: ProbeRequest, source: Endpoint, now: float, wall: float
    ) -> list[Output]:
        refused = self.guard.check(req, now, wall)
        if refused is not None:
            return self._drop(refused)
        reply = ProbeReply(self.keys.own_id, req.txid, source).sealed(self.keys.mac_key)
        self.replies_sent += 1
        out: list[Output] = [SendProbe(source, reply.to_bytes())]
        if _family(source) in {_family(c.endpoint) for c in self._local}:
            self._trigger(source, now)
            out += self._send_due(now, wall)
        return out

    def _trigger(self, source: Endpoint, now: float) -> None:
        """Check the path back to where an authenticated request came from (RFC 8445
        7.3.1.4); it becomes usable only if it answers."""
        pair = self.pairs.get(source)
        if pair is None:
            pair = self._add_pair(Candidate(self.peer_reflexive_kind(source), source))
        if pair is None or pair.probing or now - pair.heard <= self.config.quiet_after:
            return
        if (pair is self.active and self.state == PathState.UP
                and now - pair.heard < self._recheck_interval()):
            return  # our own re-checks of it are this fresh
        pair.probing, pair.sent, pair.next_probe = True, 0, now

    def _on_reply(self, reply: ProbeReply, source: Endpoint, now: float) -> list[Output]:
        if reply.sender != self.keys.peer_id:
            return self._drop(ProbeDrop.UNKNOWN_SENDER)
        if not reply.verify(self.keys.mac_key):
            return self._drop(ProbeDrop.BAD_MAC)
        sent = self._outstanding.get(reply.txid)
        if sent is None:
            return self._drop(ProbeDrop.UNSOLICITED)
        if sent.endpoint != source:
            return self._drop(ProbeDrop.WRONG_SOURCE)
        del self._outstanding[reply.txid]
        pair = self.pairs.get(source)
        if pair is None:  # pruned while the probe was in flight
            return []
        sample = max(now - sent.at, 0.0)
        pair.rtt = sample if pair.rtt is None else 0.875 * pair.rtt + 0.125 * sample
        pair.probing = False
        out: list[Output] = []
        if reply.observed not in self.observed:
            self.observed[reply.observed] = None
            while len(self.observed) > self.config.max_pairs:
                del self.observed[next(iter(self.observed))]
            out.append(ReflexiveSeen(reply.observed))
        return out + self._on_evidence(pair, now)

    def _on_evidence(self, pair: _Pair, now: float) -> list[Output]:
        """``pair`` proved itself (authenticated reply or ESP): recover, switch or note it."""
        pair.heard = max(pair.heard, now)
        pair.lost = 0
        active = self.active
        if pair is active:
            self._expect_since = None
            if self.state == PathState.STALE:
                self.state = PathState.UP
                return [PathRecovered(pair.endpoint)]
            return []
        if active is None or self.state == PathState.STALE or self._better(pair, active):
            return self._use(pair, now)
        return []

    def _better(self, pair: _Pair, than: _Pair) -> bool:
        if pair.kind != than.kind:
            return pair.kind < than.kind
        return (
            pair.rtt is not None
            and than.rtt is not None
            and pair.rtt < than.rtt * self.config.rtt_switch_ratio
        )

    def _use(self, pair: _Pair, now: float) -> list[Output]:
        self.active = pair
        self.state = PathState.UP
        self._expect_since = None
        self._inbound_at = None
        self._checked_at = now
        if not self._attempt:
            self._next_attempt = now + self._recheck_interval()
        return [UsePath(pair.endpoint, pair.kind, pair.rtt)]

    # -- sending ----------------------------------------------------------------------------

    def _add_pair(self, candidate: Candidate) -> _Pair | None:
        """A new pair; when the table is full it replaces the least preferred pair that is
        not in use (None if there is none)."""
        if len(self.pairs) >= self.config.max_pairs:
            victims = [p for p in self.pairs.values() if p is not self.active]
            if not victims:
                return None
            worst = max(victims, key=_Pair.rank)
            del self.pairs[worst.endpoint]
        self._order += 1
        pair = self.pairs[candidate.endpoint] = _Pair(candidate, self._order)
        return pair

    def _begin_attempt(self, now: float, *, full: bool) -> None:
        active = self.active
        for p in self.pairs.values():
            # same kind too: a lower RTT may win (``_better``)
            if full or active is None or p.kind <= active.kind:
                p.probing, p.sent, p.next_probe = True, 0, now
        self._attempt = True
        self._attempt_until = now
        self._next_attempt = INF

    def _end_attempt(self, now: float) -> None:
        self._attempt = False
        if self.state == PathState.UP:
            self._backoff = self.config.backoff_initial
            self._checked_at = now
            self._next_attempt = now + self._recheck_interval()
        else:
            self._next_attempt = now + self._backoff
            self._backoff = min(self._backoff * 2, self.config.backoff_max)

    def _recheck_interval(self) -> float:
        a = self.active
        if self.idle and a is not None and a.kind in QUIET_KINDS:
            return self.config.idle_recheck_interval
        return self.config.recheck_interval

    def _token_time(self) -> float:
        if self._tokens >= 1.0:
            return -INF
        return self._token_stamp + (1.0 - self._tokens) / self.config.probe_rate

    def _take_token(self, now: float) -> bool:
        cfg = self.config
        self._tokens = min(
            cfg.probe_burst, self._tokens + (now - self._token_stamp) * cfg.probe_rate
        )
        self._token_stamp = now
        if self._tokens < 1.0 - TOKEN_SLACK:  # slack: float refill may fall a hair short
            return False
        self._tokens = max(self._tokens - 1.0, 0.0)
        return True

    def _probe(self, endpoint: Endpoint, now: float, wall: float) -> SendProbe:
        txid = self.random(TXID_LEN)
        req = ProbeRequest(self.keys.own_id, txid, int(wall * 1000), endpoint)
        self._outstanding[txid] = _Sent(endpoint, now)
        self.probes_sent += 1
        return SendProbe(endpoint, req.sealed(self.keys.mac_key).to_bytes())

    def _send_due(self, now: float, wall: float) -> list[Output]:
        out: list[Output] = []
        cfg = self.config
        due = sorted(
            (p for p in self.pairs.values() if p.probing and p.next_probe <= now), key=_Pair.rank
        )
        for p in due:
            if not self._take_token(now):
                break
            out.append(self._probe(p.endpoint, now, wall))
            p.sent += 1
            p.next_probe = now + cfg.probe_interval
            if p.sent >= cfg.probes_per_attempt:
                p.probing = False
            if self._attempt:
                self._attempt_until = max(self._attempt_until, now + cfg.probe_timeout)
        return out

    def _expire(self, now: float) -> None:
        timeout = self.config.probe_timeout
        for txid, sent in list(self._outstanding.items()):
            if sent.at + timeout <= now:
                del self._outstanding[txid]
                pair = self.pairs.get(sent.endpoint)
                if pair is None:
                    continue
                pair.lost += 1
                if pair is self.active and self._expect_since is None and sent.at > pair.heard:
                    self._expect_since = sent.at

    # -- liveness ---------------------------------------------------------------------------

    def _liveness_deadlines(self) -> list[float]:
        if self.active is None:
            return []
        if self._expect_since is None:
            inbound = self._inbound_at
            return [] if inbound is None else [inbound + self.config.quiet_after]
        a, cfg, since = self.active, self.config, self._expect_since
        times = []
        if not a.probing:
            times.append(max(since + cfg.quiet_after, self._next_liveness, self._token_time()))
        if a.lost > 0:  # stale and down need a probe lost, not only silence
            if self.state == PathState.UP:
                times.append(since + cfg.stale_after)
            times.append(since + cfg.down_after)
        return times

    def _liveness(self, now: float, wall: float) -> list[Output]:
        active, since, cfg = self.active, self._expect_since, self.config
        inbound = self._inbound_at
        if active is not None and since is None and inbound is not None \
                and now >= inbound + cfg.quiet_after:
            # the peer's traffic stopped: check the path once (see Liveness above)
            self._expect_since = since = inbound
            self._inbound_at = None
        if active is None or since is None:
            return []
        quiet = now - since
        out: list[Output] = []
        why = (
            f"no authenticated packet from {active.endpoint} for "
            f"{quiet:.1f} s while an answer was due ({active.lost} probes lost)"
        )
        # compared as the deadlines are computed (since + limit), so that a tick at a
        # deadline never falls a rounding error short of it and spins
        if now >= since + cfg.down_after and active.lost > 0:
            self.active = None
            self.state = PathState.DOWN
            self._expect_since = None
            self._inbound_at = None
            out.append(PathDown(active.endpoint, why))
            self._backoff = cfg.backoff_initial
            self._begin_attempt(now, full=True)
            return out
        if now >= since + cfg.stale_after and self.state == PathState.UP and active.lost > 0:
            self.state = PathState.STALE
            out.append(PathStale(active.endpoint, why))
            self._backoff = cfg.backoff_initial
            self._begin_attempt(now, full=True)
        due = now >= since + cfg.quiet_after and not active.probing and now >= self._next_liveness
        if due and self._take_token(now):
            out.append(self._probe(active.endpoint, now, wall))
            self._next_liveness = now + cfg.liveness_interval
        return out
