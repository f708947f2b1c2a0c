"""A tiny simulated internet for the path manager tests: hosts, LANs and NAT gateways on a
virtual clock.

The NAT maps endpoint-independently (one public port per inside endpoint, RFC 4787 section
4.1) and filters address-and-port-dependently (section 5): a packet from outside gets in only
from a remote endpoint the inside endpoint has sent to, or through a port forward. So two
hosts behind two such NATs reach each other only by simultaneous probes (hole punching). It
does not hairpin unless told to. A port forward is also used for the inside endpoint's
outbound packets (as a PCP or NAT-PMP mapping is meant to be); ports it had mapped before
still let in the remotes they were opened for.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from reach_keys import PSK, WALL0, CountingRandom, key

from btmm_core.dataplane.api import Endpoint
from btmm_core.reach.candidates import Candidate, CandidateKind
from btmm_core.reach.paths import (
    Output,
    PathConfig,
    PathManager,
    SendProbe,
    UsePath,
)

LATENCY = 0.01
ESP = b"ESP"  # stands for an authenticated tunnel packet
TRAFFIC_INTERVAL = 0.1


def manager(me: str, peer: str, config: PathConfig | None = None, psk: bytes = PSK) -> PathManager:
    return PathManager(key(me), key(peer).public, psk, CountingRandom(me), config)


@dataclass
class Nat:
    public: str
    hairpin: bool = False
    ports: itertools.count[int] = field(default_factory=lambda: itertools.count(40000))
    mappings: dict[Endpoint, int] = field(default_factory=dict)
    inside_of: dict[int, Endpoint] = field(default_factory=dict)
    allowed: set[tuple[int, Endpoint]] = field(default_factory=set)
    forwards: dict[int, Endpoint] = field(default_factory=dict)

    def map(self, inside: Endpoint) -> Endpoint:
        """The public endpoint of an inside endpoint (what STUN would report)."""
        port = self.mappings.get(inside)
        if port is None:
            port = self.mappings[inside] = next(self.ports)
            self.inside_of[port] = inside
        return Endpoint(self.public, port)

    def outbound(self, inside: Endpoint, remote: Endpoint) -> Endpoint:
        public = self.map(inside)
        self.allowed.add((public.port, remote))
        return public

    def inbound(self, port: int, remote: Endpoint) -> Endpoint | None:
        if port in self.forwards:
            return self.forwards[port]
        if (port, remote) in self.allowed:
            return self.inside_of.get(port)
        return None

    def forward(self, port: int, inside: Endpoint) -> Endpoint:
        self.forwards[port] = inside
        self.mappings[inside] = port
        self.inside_of[port] = inside
        return Endpoint(self.public, port)


@dataclass
class Host:
    name: str
    addr: Endpoint
    lan: str
    nat: Nat | None
    pm: PathManager
    traffic: bool = False
    paths: list[tuple[float, UsePath]] = field(default_factory=list)
    events: list[tuple[float, Output]] = field(default_factory=list)
    sent: list[tuple[float, SendProbe]] = field(default_factory=list)

    def candidates(self, *extra: Candidate) -> list[Candidate]:
        own = [Candidate(CandidateKind.LAN, self.addr)]
        if self.nat is not None:
            own.append(Candidate(CandidateKind.REFLEXIVE, self.nat.map(self.addr)))
        return own + list(extra)


class Net:
    def __init__(self) -> None:
        self.now = 0.0
        self.hosts: list[Host] = []
        self.queue: list[tuple[float, int, Host, Endpoint, bytes]] = []
        self.seq = itertools.count()
        #: drop a packet when this says so: (sending host, destination) -> bool
        self.drop: Callable[[Host, Endpoint], bool] = lambda host, dst: False
        #: every delivered packet: (time, receiver, source, data)
        self.delivered: list[tuple[float, str, Endpoint, bytes]] = []
        self.next_traffic = 0.0

    def host(
        self, name: str, addr: str, lan: str, nat: Nat | None, pm: PathManager, *, port: int = 4500
    ) -> Host:
        h = Host(name, Endpoint(addr, port), lan, nat, pm)
        self.hosts.append(h)
        return h

    # -- packets ----------------------------------------------------------------------------

    def send(self, host: Host, dst: Endpoint, data: bytes) -> None:
        if self.drop(host, dst):
            return
        for h in self.hosts:
            if h is not host and h.lan == host.lan and h.addr == dst:
                self._enqueue(h, host.addr, data)
                return
        src = host.nat.outbound(host.addr, dst) if host.nat is not None else host.addr
        for h in self.hosts:
            nat = h.nat
            if nat is not None and nat.public == dst.host:
                if nat is host.nat and not nat.hairpin:
                    return
                inside = nat.inbound(dst.port, src)
                if inside == h.addr:
                    self._enqueue(h, src, data)
                    return
            elif nat is None and h.addr == dst:
                self._enqueue(h, src, data)
                return

    def inject(self, host: Host, source: Endpoint, data: bytes, at: float | None = None) -> None:
        """An attacker's datagram, arriving at ``host`` from ``source``."""
        heapq.heappush(
            self.queue, (self.now if at is None else at, next(self.seq), host, source, data)
        )

    def _enqueue(self, host: Host, source: Endpoint, data: bytes) -> None:
        heapq.heappush(self.queue, (self.now + LATENCY, next(self.seq), host, source, data))

    def apply(self, host: Host, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, SendProbe):
                host.sent.append((self.now, o))
                self.send(host, o.destination, o.data)
            elif isinstance(o, UsePath):
                host.paths.append((self.now, o))
            else:
                host.events.append((self.now, o))

    # -- time -------------------------------------------------------------------------------

    def start(self, *hosts: Host) -> None:
        for h in hosts:
            self.apply(h, h.pm.start(self.now, WALL0 + self.now))

    def run(self, until: float) -> None:
        spins = 0
        while True:
            t_queue = self.queue[0][0] if self.queue else float("inf")
            deadlines = [h.pm.next_deadline() for h in self.hosts]
            t_pm = min((d for d in deadlines if d is not None), default=float("inf"))
            t_traffic = self.next_traffic if any(h.traffic for h in self.hosts) else float("inf")
            t = min(t_queue, t_pm, t_traffic)
            if t > until:
                self.now = until
                return
            spins = spins + 1 if t <= self.now else 0
            assert spins < 1000, f"the path manager spins at t={self.now}"
            self.now = max(self.now, t)
            wall = WALL0 + self.now
            while self.queue and self.queue[0][0] <= self.now:
                _, _, h, src, data = heapq.heappop(self.queue)
                self.delivered.append((self.now, h.name, src, data))
                if data == ESP:
                    self.apply(h, h.pm.note_authenticated_packet(src, self.now))
                else:
                    self.apply(h, h.pm.receive(data, src, self.now, wall))
            for h in self.hosts:
                d = h.pm.next_deadline()
                if d is not None and d <= self.now:
                    self.apply(h, h.pm.tick(self.now, wall))
            if self.now >= self.next_traffic:
                self.next_traffic = self.now + TRAFFIC_INTERVAL
                for h in self.hosts:
                    if h.traffic and h.pm.active is not None:
                        h.pm.note_outbound(self.now)
                        self.send(h, h.pm.active.endpoint, ESP)
