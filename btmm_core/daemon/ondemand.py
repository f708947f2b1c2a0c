"""Tunnels on demand: open a peer's tunnel when the first packet for it arrives, close it when
idle (issue 16; the engine's half is the hold ring of ``btmm_core/dataplane/hold.py``).

No RFC defines this; the model is WireGuard's (Donenfeld, NDSS 2017, section 6: a handshake
starts when a packet is staged for a peer without a current session, and staged packets go out
when it completes) and, for the answer when it fails, RFC 4443 §3.1 (ICMPv6 Destination
Unreachable, code 3).

Per peer: ``IDLE`` → (the engine held a packet: ``PeerWanted``) → ``OPENING`` → (a transmit SA
is in the engine) → ``UP`` → (no packet in or out for ``idle_timeout``) → ``IDLE``. An opening
that takes longer than ``connect_timeout`` is given up: the held packets are answered with
ICMPv6 unreachable and the peer is idle again (its next packet tries again). A tunnel the
peer opened (we answered its handshake) is ``UP`` as soon as its SA is seen. Each side runs
its own idle timer on the same packets (in on one side is out on the other), so both close
at about the same time; a side that closed keeps its receive SAs until they expire, so a
packet the other side still sends arrives, and the answer opens the tunnel again.

Sans-I/O, like ``keyex.session``: events and observations come in with ``now`` (monotonic
seconds), actions go out for the daemon to carry out, ``next_deadline`` says when to call
``tick``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from btmm_core.errors import ConfigError

DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 15.0


class TunnelState(enum.IntEnum):
    IDLE = 0
    OPENING = 1
    UP = 2


STATE_NAMES = {s: s.name.lower() for s in TunnelState}


@dataclass(frozen=True)
class OnDemandConfig:
    """``idle_timeout``: seconds without a packet after which a tunnel closes (0: tunnels are
    always on and this core is not used); ``connect_timeout``: seconds an opening may take."""

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def __post_init__(self) -> None:
        if self.idle_timeout < 0:
            raise ConfigError(
                f"idle_timeout {self.idle_timeout} must be 0 (always on) or positive seconds",
                hint=f"the default is {DEFAULT_IDLE_TIMEOUT:.0f}",
            )
        if self.connect_timeout <= 0:
            raise ConfigError(
                f"connect_timeout {self.connect_timeout} must be positive seconds",
                hint=f"the default is {DEFAULT_CONNECT_TIMEOUT:.0f}",
            )

    @property
    def on_demand(self) -> bool:
        return self.idle_timeout > 0


@dataclass(frozen=True)
class Open:
    """Start the key exchange with the peer."""

    inner: str


@dataclass(frozen=True)
class Reject:
    """The opening failed: answer the held packets (ICMPv6 unreachable), stop trying."""

    inner: str


@dataclass(frozen=True)
class Close:
    """The tunnel is idle: remove its transmit SA and stop keeping the session up."""

    inner: str


OnDemandAction = Open | Reject | Close


@dataclass
class _Tunnel:
    state: TunnelState = TunnelState.IDLE
    #: when the opening started (OPENING) or the last packet was seen (UP)
    since: float = 0.0
    last_active: float = 0.0
    #: packets in + out as last observed
    traffic: int = -1
    opens: int = 0
    closes: int = 0
    rejects: int = 0


class OnDemand:
    """The on-demand state of every peer."""

    def __init__(self, config: OnDemandConfig | None = None) -> None:
        self.config = config or OnDemandConfig()
        self._tunnels: dict[str, _Tunnel] = {}

    def add(self, inner: str) -> None:
        self._tunnels.setdefault(inner, _Tunnel())

    def remove(self, inner: str) -> None:
        self._tunnels.pop(inner, None)

    def state(self, inner: str) -> TunnelState:
        t = self._tunnels.get(inner)
        return TunnelState.IDLE if t is None else t.state

    def wanted(self, inner: str, now: float) -> list[OnDemandAction]:
        """The engine held a packet for the peer (``PeerWanted``)."""
        t = self._tunnels.get(inner)
        if t is None or t.state is TunnelState.OPENING:
            return []
        # UP too: the engine asks only when it has no transmit SA, so the tunnel went down
        # behind our back (a key reset): open it again
        t.state, t.since = TunnelState.OPENING, now
        t.opens += 1
        return [Open(inner)]

    def observe(self, inner: str, has_tx: bool, traffic: int, now: float) -> list[OnDemandAction]:
        """What the engine says of the peer: whether it has a transmit SA, and its packets in
        plus out (a total that only grows while the peer stays in the engine)."""
        t = self._tunnels.get(inner)
        if t is None:
            return []
        moved = traffic != t.traffic
        t.traffic = traffic
        if has_tx:
            if t.state is not TunnelState.UP:
                t.state = TunnelState.UP
                t.since = t.last_active = now
            elif moved:
                t.last_active = now
        elif t.state is TunnelState.UP:
            # the SA went away without us (expired, peer reset): idle until asked again
            t.state, t.since = TunnelState.IDLE, now
        return []

    def tick(self, now: float) -> list[OnDemandAction]:
        out: list[OnDemandAction] = []
        cfg = self.config
        for inner, t in self._tunnels.items():
            if t.state is TunnelState.OPENING and now >= t.since + cfg.connect_timeout:
                t.state, t.since = TunnelState.IDLE, now
                t.rejects += 1
                out.append(Reject(inner))
            elif (
                t.state is TunnelState.UP
                and cfg.on_demand
                and now >= t.last_active + cfg.idle_timeout
            ):
                t.state, t.since = TunnelState.IDLE, now
                t.closes += 1
                out.append(Close(inner))
        return out

    def next_deadline(self) -> float | None:
        cfg = self.config
        times = [
            t.since + cfg.connect_timeout
            for t in self._tunnels.values()
            if t.state is TunnelState.OPENING
        ]
        if cfg.on_demand:
            times += [
                t.last_active + cfg.idle_timeout
                for t in self._tunnels.values()
                if t.state is TunnelState.UP
            ]
        return min(times, default=None)

    def counts(self, inner: str) -> tuple[int, int, int]:
        """Openings, closes when idle, and openings given up, of the peer's tunnel."""
        t = self._tunnels.get(inner) or _Tunnel()
        return t.opens, t.closes, t.rejects

    def status(self, inner: str, now: float) -> dict[str, object]:
        """``state`` (idle, opening, up), how often the tunnel was opened, closed when idle
        and given up, and for how long it has been idle (UP) or opening."""
        t = self._tunnels.get(inner) or _Tunnel()
        out: dict[str, object] = {
            "state": STATE_NAMES[t.state],
            "opens": t.opens,
            "closes": t.closes,
            "rejects": t.rejects,
        }
        if t.state is TunnelState.UP and self.config.on_demand:
            out["idle_for"] = round(max(now - t.last_active, 0.0), 1)
        if t.state is TunnelState.OPENING:
            out["opening_for"] = round(max(now - t.since, 0.0), 1)
        return out
