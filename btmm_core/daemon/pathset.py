"""The path managers of every verified peer, as the daemon holds them (core).

``reach.paths.PathManager`` runs the connectivity checks of one peer; this module keeps one per
peer and does the daemon's bookkeeping around them, without I/O, so it is tested on a virtual
clock (tests/daemon/test_pathset.py):

* routes each probe message to its peer's manager by the sender id in it
  (``reach.probe.peek_sender``): no MAC is tried per peer, and a message naming no peer of
  ours is counted and dropped;
* tells each manager whether its peer has a tunnel (an SA, or packets held for one): an idle
  peer's quiet path is re-checked less often (``PathManager.set_idle``);
* turns the engine's per-peer counters into the managers' liveness evidence: packets sent
  since the last look are ``note_outbound``, packets received (authenticated ESP: the engine
  counts only what opened under one of our SAs) are ``note_authenticated_packet`` from the
  endpoint the engine holds for the peer, which follows the last authenticated packet;
* brings the engine back to the path in use when they part and the peer falls quiet: the
  engine sends to where the peer's last authenticated packet came from, and a NAT that maps a
  port for inbound traffic may send the peer's outbound traffic from another port (its own
  masquerade). When that NAT forgets its connections (a reboot) the engine's endpoint dies
  while the manager's path still answers its probes; once we send and hear nothing for
  ``quiet_after``, the manager's ``UsePath`` is said again (``PathManager.repoint``), at most
  once per ``quiet_after``, and the peer's answers move the engine on from there;
* remembers why a path went stale or down, for ``btmm status``.

Outputs are the managers', each tagged with the peer's inner address; the daemon
(``daemon/host.py``) carries them out. Security rule (issue 13): nothing here moves an
endpoint; only a manager's ``UsePath`` does, and a manager says it only for a pair that
answered an authenticated probe or carried authenticated ESP.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from btmm_core.dataplane.api import Endpoint, PeerInfo
from btmm_core.keyex.keys import StaticKey
from btmm_core.reach.candidates import Candidate, CandidateKind
from btmm_core.reach.paths import (
    PATH_NAMES,
    Output,
    PathConfig,
    PathDown,
    PathManager,
    PathRecovered,
    PathStale,
    PathState,
    UsePath,
    canonical,
)
from btmm_core.reach.probe import key_id, peek_sender

#: an output of one peer's manager: (the peer's inner address, the output)
Tagged = tuple[str, Output]


@dataclass
class _Entry:
    manager: PathManager
    remote: tuple[Candidate, ...]
    why: str | None = None  #: why the path went stale or down
    packets_in: int = 0
    packets_out: int = 0
    heard_at: float = float("-inf")  #: when the engine last counted a packet in
    repointed_at: float = float("-inf")
    #: the manager's next deadline as of the last call into it (only calls move it)
    deadline: float | None = None


class PathSet:
    """One ``PathManager`` per verified peer, keyed by the peer's inner address."""

    def __init__(self, static: StaticKey, psk: bytes, random: Callable[[int], bytes],
                 config: PathConfig | None = None) -> None:
        self.static = static
        self.psk = psk
        self.random = random
        self.config = config
        self.local: tuple[Candidate, ...] = ()
        self._peers: dict[str, _Entry] = {}
        self._by_id: dict[bytes, str] = {}
        self.drops: Counter[str] = Counter()
        #: the kind of a peer-reflexive endpoint (``PathManager.peer_reflexive_kind``)
        self.peer_reflexive_kind: Callable[[Endpoint], CandidateKind] | None = None

    def __contains__(self, inner: str) -> bool:
        return inner in self._peers

    def manager(self, inner: str) -> PathManager:
        return self._peers[inner].manager

    # -- peers and candidates ---------------------------------------------------------------

    def add(self, inner: str, public: bytes, remote: Iterable[Candidate], now: float,
            wall: float) -> list[Tagged]:
        """A verified peer: start checking its candidates at once."""
        self.remove(inner)
        manager = PathManager(self.static, public, self.psk, self.random, self.config)
        if self.peer_reflexive_kind is not None:
            manager.peer_reflexive_kind = self.peer_reflexive_kind
        entry = _Entry(manager, tuple(remote))
        self._peers[inner] = entry
        self._by_id[key_id(public)] = inner
        manager.set_candidates(self.local, entry.remote)
        return self._tag(inner, manager.start(now, wall))

    def remove(self, inner: str) -> None:
        entry = self._peers.pop(inner, None)
        if entry is not None:
            self._by_id = {k: v for k, v in self._by_id.items() if v != inner}

    def set_remote(self, inner: str, remote: Iterable[Candidate], now: float,
                   wall: float) -> list[Tagged]:
        """The peer's candidates as read now; a change starts a new round of checks."""
        entry = self._peers.get(inner)
        remote = tuple(remote)
        if entry is None or remote == entry.remote:
            return []
        entry.remote = remote
        return self._tag(inner, entry.manager.update_candidates(self.local, remote, now, wall))

    def set_local(self, local: Iterable[Candidate], now: float, wall: float) -> list[Tagged]:
        """Our own candidates; a change re-checks every peer (our paths may have changed)."""
        local = tuple(local)
        if local == self.local:
            return []
        self.local = local
        out: list[Tagged] = []
        for inner, entry in self._peers.items():
            out += self._tag(inner, entry.manager.update_candidates(local, entry.remote, now,
                                                                     wall))
        return out

    # -- events -------------------------------------------------------------------------------

    def receive(self, data: bytes, source: Endpoint, now: float,
                wall: float) -> list[Tagged]:
        """A probe message from ``source``, routed to its peer's manager by its sender id."""
        sender = peek_sender(data)
        inner = None if sender is None else self._by_id.get(sender)
        if inner is None:
            self.drops["unknown_sender"] += 1
            return []
        return self._tag(inner, self._peers[inner].manager.receive(data, source, now, wall))

    def observe(self, infos: Sequence[PeerInfo], now: float) -> list[Tagged]:
        """The engine's per-peer counters, read on the poll tick."""
        out: list[Tagged] = []
        for info in infos:
            entry = self._peers.get(info.inner)
            if entry is None:
                continue
            c = info.counters
            sending = c.packets_out > entry.packets_out
            if sending:
                entry.manager.note_outbound(now)
            no_tunnel = info.tx_spi is None and not info.rx_spis and not info.held
            if entry.manager.set_idle(no_tunnel, now) or sending:
                entry.deadline = entry.manager.next_deadline()
            if c.packets_in > entry.packets_in:
                entry.heard_at = now
                if info.endpoint is not None:
                    out += self._tag(info.inner,
                                     entry.manager.note_authenticated_packet(info.endpoint, now))
            entry.packets_in, entry.packets_out = c.packets_in, c.packets_out
            out += self._repoint(info, entry, sending, now)
        return out

    def _repoint(self, info: PeerInfo, entry: _Entry, sending: bool,
                 now: float) -> list[Tagged]:
        quiet = entry.manager.config.quiet_after
        if (not sending or info.endpoint is None
                or now - entry.heard_at < quiet or now - entry.repointed_at < quiet):
            return []  # the common case, decided without the manager's status
        st = entry.manager.status()
        if st.endpoint is None or canonical(info.endpoint) == st.endpoint:
            return []
        out = self._tag(info.inner, entry.manager.repoint())
        if out:
            entry.repointed_at = now
        return out

    def next_deadline(self) -> float | None:
        # the cached deadlines: asking every manager on every wake made a daemon's idle
        # CPU grow with the square of its peers (each peer's timers wake it)
        return min((e.deadline for e in self._peers.values() if e.deadline is not None),
                   default=None)

    def tick(self, now: float, wall: float) -> list[Tagged]:
        out: list[Tagged] = []
        for inner, entry in self._peers.items():
            if entry.deadline is not None and entry.deadline <= now:
                out += self._tag(inner, entry.manager.tick(now, wall))
        return out

    # -- status -------------------------------------------------------------------------------

    def status(self, inner: str, now: float) -> dict[str, object]:
        """``path``, ``rtt_ms``, ``last_answer`` (seconds ago), ``path_state`` and ``why``."""
        entry = self._peers.get(inner)
        if entry is None:
            return {"path": None, "path_endpoint": None, "rtt_ms": None, "last_answer": None,
                    "path_state": None, "why": None, "probe_drops": {}}
        st = entry.manager.status()
        return {
            "path": None if st.kind is None else PATH_NAMES[st.kind],
            "path_endpoint": None if st.endpoint is None else str(st.endpoint),
            "rtt_ms": None if st.rtt is None else round(st.rtt * 1000, 1),
            "last_answer": None if st.last_heard is None else round(now - st.last_heard, 1),
            "path_state": st.state.name.lower(),
            "why": entry.why if st.state in (PathState.STALE, PathState.DOWN) else None,
            "probe_drops": dict(entry.manager.drops),
        }

    def state(self, inner: str) -> PathState | None:
        entry = self._peers.get(inner)
        return None if entry is None else entry.manager.state

    def _tag(self, inner: str, outputs: list[Output]) -> list[Tagged]:
        """Every call into a manager ends here: its outputs tagged, its deadline noted."""
        entry = self._peers[inner]
        entry.deadline = entry.manager.next_deadline()
        for o in outputs:
            if isinstance(o, (PathStale, PathDown)):
                entry.why = o.reason
            elif isinstance(o, (PathRecovered, UsePath)):
                entry.why = None
        return [(inner, o) for o in outputs]


def tunnel_state(has_tx_sa: bool, state: PathState | None) -> str:
    """What ``btmm status`` says of a tunnel: ``up`` only while its path answers."""
    if not has_tx_sa:
        return "down"
    if state is None or state == PathState.UP:
        return "up"
    return {PathState.STALE: "stale", PathState.DOWN: "down",
            PathState.SEARCHING: "searching"}[state]
