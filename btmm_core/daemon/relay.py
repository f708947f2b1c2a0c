"""The daemon's TURN relay: one allocation on the account's TURN server, and loopback proxies
that carry the engine's ESP (and path probes) through it. UNFINISHED beyond what is listed
here: see docs/architecture.md section 14.

How a relayed packet travels (A relays, B is the peer behind a NAT that maps per destination):

* our relayed address R is published as a RELAY candidate; for every peer we permit the IP
  addresses of its published candidates (a TURN permission is per IP, any port), so what the
  peer's engine sends straight to R from its own socket reaches us;
* the server hands it to us as a Data indication (or ChannelData) from the peer's address
  P as the server saw it (the peer's NAT mapping towards R). For each such P we open one UDP
  socket on 127.0.0.1 (a proxy) and give the payload to our engine from it, so the engine
  sees the peer at 127.0.0.1:<proxy port>, and its path manager checks that endpoint like any
  peer-reflexive one;
* what the engine sends to that proxy goes back through the allocation to P, as ChannelData
  once a channel to P is bound (4 bytes of framing instead of 36).

The engines carry no TURN framing themselves: this costs a trip through the daemon per packet
(slow, but a path where there was none). The relay is the last choice of the path managers
(RELAY ranks below every direct kind), and its packets stay end-to-end ESP.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable

import structlog

from btmm_core.dataplane.api import Endpoint
from btmm_core.stun.message import TransportAddress
from btmm_core.stun.turn import TurnOffer
from btmm_core.turn.client import (
    Allocated,
    AllocationFailed,
    AllocationLost,
    AllocationState,
    Event,
    PeerData,
    TurnClient,
)
from btmm_core.turn.driver import TurnSession

log = structlog.get_logger("btmm.relay")

#: proxies (peer addresses seen through the relay) at most; more are dropped and counted
MAX_PROXIES = 64
#: seconds between two Refreshes asked for because a path went quiet
CHECK_INTERVAL = 10.0


class _Proxy:
    """One loopback socket standing for one peer address on the far side of the relay."""

    def __init__(self, relay: Relay, peer: TransportAddress) -> None:
        self.peer = peer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.endpoint = Endpoint("127.0.0.1", self.sock.getsockname()[1])
        self.to_engine = 0
        self.from_engine = 0
        asyncio.get_running_loop().add_reader(self.sock.fileno(), relay._from_engine, self)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


class Relay:
    def __init__(self, offer: TurnOffer, engine_port: int,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.offer = offer
        self.engine_port = engine_port
        self._on_change = on_change
        client = TurnClient(TransportAddress(offer.host, offer.port), offer.username,
                            offer.password, os.urandom)
        self.session = TurnSession(client, on_event=self._event)
        self.proxies: dict[TransportAddress, _Proxy] = {}
        self._by_endpoint: dict[Endpoint, _Proxy] = {}
        self._permitted: set[str] = set()
        self.drops: Counter[str] = Counter()
        #: set when the allocation failed for good (refused or unanswered, also after a
        #: loss): the daemon starts over with fresh credentials
        self.failed = asyncio.Event()
        self._checked = float("-inf")

    @property
    def client(self) -> TurnClient:
        return self.session.client

    async def open(self, timeout: float) -> Allocated:
        """Allocate; raises ``TurnError`` when refused or unanswered."""
        await self.session.open()
        return await self.session.allocated(timeout)

    @property
    def relayed(self) -> Endpoint | None:
        c = self.client
        if c.state is not AllocationState.ALLOCATED or c.relayed is None:
            return None
        return Endpoint(c.relayed.host, c.relayed.port)

    @property
    def server(self) -> str:
        return self.offer.server()

    def is_proxy(self, endpoint: Endpoint) -> bool:
        return endpoint in self._by_endpoint

    def permit(self, hosts: Iterable[str]) -> None:
        """Let the peers at these IPv4 addresses send to our relayed address."""
        for host in hosts:
            if host not in self._permitted and ":" not in host:
                self._permitted.add(host)
                self.session.permit(TransportAddress(host, 0))

    def check(self, now: float) -> None:
        """Refresh now (at most every ``CHECK_INTERVAL`` seconds): the answer, or 437, tells
        whether the server still holds our allocation for this socket."""
        if now - self._checked >= CHECK_INTERVAL:
            self._checked = now
            self.session.refresh()

    def close(self) -> None:
        for p in self.proxies.values():
            p.close()
        self.proxies.clear()
        self._by_endpoint.clear()
        self.session.close()

    def status(self) -> dict[str, object]:
        c = self.client
        return {
            "server": self.server,
            "state": c.state.value,
            "relayed": None if c.relayed is None else str(c.relayed),
            "error": c.error,
            "expires": self.offer.expiry,
            "permitted": sorted(self._permitted),
            "proxies": {str(p.peer): f"{p.endpoint.host}:{p.endpoint.port}"
                        for p in self.proxies.values()},
            "drops": dict(c.drops + self.drops),
            "allocations": c.allocations,
            "losses": c.losses,
        }

    # ---- events ---------------------------------------------------------------------------

    def _event(self, ev: Event) -> None:
        if isinstance(ev, PeerData):
            self._to_engine(ev.peer, ev.data)
        elif isinstance(ev, Allocated):
            log.info("relay allocated", server=self.server, relayed=str(ev.relayed),
                     lifetime=ev.lifetime)
            self._on_change()
        elif isinstance(ev, AllocationLost):
            log.warning("relay allocation lost; allocating again", server=self.server,
                        why=ev.reason)
            self._on_change()
        elif isinstance(ev, AllocationFailed):
            log.warning("relay allocation failed", server=self.server, why=ev.reason)
            self.failed.set()
            self._on_change()

    def _to_engine(self, peer: TransportAddress, data: bytes) -> None:
        proxy = self.proxies.get(peer)
        if proxy is None:
            if len(self.proxies) >= MAX_PROXIES:
                self.drops["too many peers"] += 1
                return
            try:
                proxy = _Proxy(self, peer)
            except OSError as err:
                self.drops["proxy socket"] += 1
                log.warning("cannot open a relay proxy socket", error=str(err))
                return
            self.proxies[peer] = proxy
            self._by_endpoint[proxy.endpoint] = proxy
            self.session.bind(peer)  # ChannelData from now on, both ways
            log.info("relay peer", peer=str(peer),
                     proxy=f"{proxy.endpoint.host}:{proxy.endpoint.port}")
        try:
            proxy.sock.sendto(data, ("127.0.0.1", self.engine_port))
            proxy.to_engine += 1
        except OSError:
            self.drops["engine unreachable"] += 1

    def _from_engine(self, proxy: _Proxy) -> None:
        for _ in range(64):  # a batch per wake-up, then let others run
            try:
                data, addr = proxy.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.drops["proxy socket"] += 1
                return
            if addr != ("127.0.0.1", self.engine_port):
                self.drops["not from the engine"] += 1
                continue
            if self.session.send(proxy.peer, data):
                proxy.from_engine += 1
