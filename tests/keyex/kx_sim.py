"""A virtual-clock simulation of two hosts running ``KeyExchange`` over a lossy network, with a
model of the engine's SA table (at most two receive SAs; a third install retires the oldest)."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from kx_helpers import A_ADDR, B_ADDR, PSK, WALL0, CountingRandom, key

from btmm_core.dataplane.api import Endpoint
from btmm_core.keyex.keys import ula_of
from btmm_core.keyex.noise import HandshakeConfig, Handshaker
from btmm_core.keyex.session import (
    Action,
    Established,
    HandshakeFailed,
    InstallRx,
    InstallTx,
    KeyExchange,
    ResetPeer,
    RetireRx,
    SendControl,
    SendKeepalive,
    SessionConfig,
    SetEndpoint,
)

#: each host's inner address is bound to its key
A_INNER = str(ula_of(key("a").public))
B_INNER = str(ula_of(key("b").public))


@dataclass
class ModelEngine:
    """What the engine would hold for its one peer."""

    rx: list[int] = field(default_factory=list)
    tx: int | None = None
    endpoint: Endpoint | None = None
    evicted: list[int] = field(default_factory=list)  #: rx SAs pushed out by a third install
    keepalives: list[float] = field(default_factory=list)

    def apply(self, a: Action, now: float) -> None:
        if isinstance(a, InstallRx):
            self.rx.append(a.spi)
            if len(self.rx) > 2:
                self.evicted.append(self.rx.pop(0))
        elif isinstance(a, InstallTx):
            self.tx = a.spi
        elif isinstance(a, RetireRx):
            if a.spi in self.rx:
                self.rx.remove(a.spi)
        elif isinstance(a, ResetPeer):
            self.rx, self.tx = [], None
        elif isinstance(a, SetEndpoint):
            self.endpoint = a.endpoint
        elif isinstance(a, SendKeepalive):
            self.keepalives.append(now)


@dataclass
class Host:
    name: str
    addr: Endpoint
    kx: KeyExchange
    peer_inner: str
    engine: ModelEngine = field(default_factory=ModelEngine)
    events: list[tuple[float, Action]] = field(default_factory=list)


#: decides the fate of a control message: None drops it, a float delays it
Network = Callable[[str, bytes, float], float | None]


def always(delay: float = 0.01) -> Network:
    return lambda src, msg, now: delay


class Sim:
    def __init__(
        self,
        config: SessionConfig | None = None,
        network: Network | None = None,
        hs_config: HandshakeConfig | None = None,
    ) -> None:
        cfg = config or SessionConfig()
        a_key, b_key = key("a"), key("b")
        self.a = Host(
            "a",
            A_ADDR,
            KeyExchange(Handshaker(a_key, PSK, CountingRandom("a"), hs_config), cfg),
            B_INNER,
        )
        self.b = Host(
            "b",
            B_ADDR,
            KeyExchange(Handshaker(b_key, PSK, CountingRandom("b"), hs_config), cfg),
            A_INNER,
        )
        self.a.kx.add_peer(b_key.public, B_INNER, B_ADDR)
        self.b.kx.add_peer(a_key.public, A_INNER, A_ADDR)
        self.network = network or always()
        self.now = 0.0
        self.queue: list[tuple[float, int, str, bytes, Endpoint]] = []
        self.seq = 0
        self.violations: list[str] = []
        self.sent: list[tuple[float, str, bytes]] = []

    def host(self, name: str) -> Host:
        return self.a if name == "a" else self.b

    def other(self, h: Host) -> Host:
        return self.b if h is self.a else self.a

    def apply(self, h: Host, actions: list[Action]) -> None:
        for act in actions:
            h.events.append((self.now, act))
            if isinstance(act, SendControl):
                dst = self.other(h)
                assert act.destination == dst.addr, act
                self.sent.append((self.now, h.name, act.message))
                delay = self.network(h.name, act.message, self.now)
                if delay is not None:
                    self.seq += 1
                    heapq.heappush(
                        self.queue, (self.now + delay, self.seq, dst.name, act.message, h.addr)
                    )
            else:
                h.engine.apply(act, self.now)
        self.check()

    def check(self) -> None:
        """Make-before-break: whenever a side transmits, the other holds the receive SA."""
        for h in (self.a, self.b):
            o = self.other(h)
            if h.engine.tx is not None and h.engine.tx not in o.engine.rx:
                self.violations.append(
                    f"t={self.now:.2f} {h.name} sends on {h.engine.tx:#x} "
                    f"but {o.name} holds {[hex(s) for s in o.engine.rx]}"
                )
            if h.engine.evicted:
                self.violations.append(f"t={self.now:.2f} {h.name} evicted {h.engine.evicted}")
                h.engine.evicted.clear()

    def connect(self, *names: str) -> None:
        for n in names:
            h = self.host(n)
            self.apply(h, h.kx.connect(h.peer_inner, self.now, WALL0 + self.now))

    def run_until(self, t_end: float, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            times = [self.queue[0][0]] if self.queue else []
            for h in (self.a, self.b):
                d = h.kx.next_deadline()
                if d is not None:
                    times.append(max(d, self.now))
            nxt = min(times, default=float("inf"))
            if nxt > t_end:
                self.now = t_end
                return
            self.now = nxt
            if self.queue and self.queue[0][0] <= self.now:
                _, _, dst, msg, src = heapq.heappop(self.queue)
                h = self.host(dst)
                self.apply(h, h.kx.receive(msg, src, self.now, WALL0 + self.now))
                continue
            for h in (self.a, self.b):
                d = h.kx.next_deadline()
                if d is not None and d <= self.now:
                    self.apply(h, h.kx.tick(self.now, WALL0 + self.now))
        raise AssertionError("simulation did not reach its end time (timer loop?)")

    def established(self, h: Host) -> list[tuple[float, Established]]:
        return [(t, a) for t, a in h.events if isinstance(a, Established)]

    def failures(self, h: Host) -> list[tuple[float, HandshakeFailed]]:
        return [(t, a) for t, a in h.events if isinstance(a, HandshakeFailed)]
