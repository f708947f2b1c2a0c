"""Thin asyncio driver: runs a ``session.KeyExchange`` against a data-plane engine.

It carries bytes between the engine's control channel (``send_control`` / ``drain()``; the
engine adds and strips the 4-zero-byte non-ESP marker of RFC 3948 section 2.2) and the
sans-I/O key exchange, turns the key exchange's actions into engine calls (``install_rx_sa``
before ``install_tx_sa``, ``retire_rx_sa``), runs its timers on the event loop's clock, and
polls the engine's per-peer packet counters for the rekey packet budget (or is given them by
an owner that reads them anyway: ``observe``). No protocol logic lives here.

The engine also hands over STUN messages (RFC 8489) that arrive on its socket, because the
daemon runs STUN from that socket to learn the tunnel port's reflexive address. They are no
business of the key exchange: the driver passes each to ``on_stun`` when one is set and
ignores it otherwise (``btmm up`` sets it: daemon/host.py).

Path probes (types 6 and 7, ``reach.probe``) ride the control channel too; ``KeyExchange.receive``
ignores them, so the driver hands each to ``on_path_message`` when one is set (the daemon routes
it to the sending peer's path manager). A session with no endpoint yet is not started on
demand (outbound packets dropped for want of an SA): there is nowhere to send the initiation,
and whoever learns a path (``move_peer``) starts it then.

On-demand tunnels (issue 16): the engine holds packets for a peer without a transmit SA and
reports ``PeerWanted``. With ``on_peer_wanted`` set, the driver hands it over and starts no
session by itself (not on a new path either): the owner opens one with ``connect`` and closes
it with ``idle`` (``daemon/ondemand.py`` decides when). Without it, tunnels are always on and
``PeerWanted`` brings a given-up session back, as the ``no_sa`` drops did before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import structlog

from btmm_core.dataplane.api import (
    ControlPacket,
    DropReason,
    Endpoint,
    Engine,
    PeerInfo,
    PeerRoamed,
    PeerWanted,
    StunPacket,
    TxSaExhausted,
)
from btmm_core.errors import BtmmError
from btmm_core.keyex.noise import is_path_message
from btmm_core.keyex.session import (
    Action,
    ClearTx,
    Established,
    HandshakeFailed,
    InstallRx,
    InstallTx,
    KeyExchange,
    RemovePeer,
    ResetPeer,
    RetireRx,
    SendControl,
    SendKeepalive,
    SetEndpoint,
)

log = structlog.get_logger("btmm.keyex")

#: events reported to the owner of the driver
Report = Established | HandshakeFailed


class KeyExchangeDriver:
    """Binds one ``KeyExchange`` to one started engine on the running event loop."""

    def __init__(
        self,
        engine: Engine,
        kx: KeyExchange,
        *,
        wall: Callable[[], float] = time.time,
        poll_interval: float | None = 1.0,
        on_report: Callable[[Report], None] | None = None,
        on_stun: Callable[[StunPacket], None] | None = None,
        on_path_message: Callable[[ControlPacket], None] | None = None,
        on_peer_wanted: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.kx = kx
        self.wall = wall
        self.poll_interval = poll_interval
        self.on_report = on_report
        #: gets each STUN message the engine received (see the module docstring)
        self.on_stun = on_stun
        #: gets each path probe message (see the module docstring)
        self.on_path_message = on_path_message
        #: on-demand tunnels: gets the inner address of each ``PeerWanted`` (module docstring)
        self.on_peer_wanted = on_peer_wanted
        self.errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._poller: asyncio.Task[None] | None = None
        self._no_sa: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Register with the running loop and add the key exchange's peers to the engine."""
        self._loop = asyncio.get_running_loop()
        known = {p.inner for p in self.engine.peers()}
        for inner, s in self.kx.by_inner.items():
            if inner not in known:
                self.engine.add_peer(inner, s.endpoint)
        self._loop.add_reader(self.engine.fileno(), self._on_readable)
        if self.poll_interval is not None:
            self._poller = self._loop.create_task(self._poll(self.poll_interval))
        self._reschedule()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.engine.fileno())
        if self._timer is not None:
            self._timer.cancel()
        if self._poller is not None:
            self._poller.cancel()
        self._loop = None

    def add_peer(self, public: bytes, inner: str, endpoint: Endpoint | None = None) -> None:
        """Trust a new peer: add it to the key exchange and to the engine."""
        self.kx.add_peer(public, inner, endpoint)
        self.engine.add_peer(inner, endpoint)

    def remove_peer(self, inner: str) -> None:
        """Stop trusting a peer; its SAs leave the engine at once."""
        self._apply(self.kx.remove_peer(inner))

    def connect(self, inner: str) -> None:
        """Bring up (and keep up) the session with this peer."""
        self._apply(self.kx.connect(inner, self._now(), self.wall()))

    def idle(self, inner: str) -> None:
        """Close the tunnel to this peer (on-demand): its transmit SA leaves the engine."""
        self._apply(self.kx.idle(inner))

    def move_peer(self, inner: str, endpoint: Endpoint) -> None:
        """Send the peer's traffic (and handshakes) to ``endpoint`` from now on, and bring the
        session up if it is not. The caller vouches for the endpoint: it answered an
        authenticated probe or carried authenticated ESP."""
        s = self.kx.by_inner[inner]
        if s.endpoint != endpoint:
            s.endpoint = endpoint
            try:
                self.engine.update_peer(inner, endpoint)
            except BtmmError as err:
                self.errors += 1
                log.error("engine refused an endpoint", inner=inner, error=str(err))
        if s.tx is None and not s.busy() and (self.on_peer_wanted is None or s.want):
            self.connect(inner)

    # -- plumbing --------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_readable(self) -> None:
        for event in self.engine.drain():
            if isinstance(event, ControlPacket):
                if is_path_message(event.payload):
                    if self.on_path_message is not None:
                        self.on_path_message(event)
                    continue
                self._apply(self.kx.receive(event.payload, event.source, self._now(), self.wall()))
            elif isinstance(event, StunPacket):
                if self.on_stun is not None:
                    self.on_stun(event)
            elif isinstance(event, PeerRoamed):
                # authenticated ESP came from another outer address: the engine now sends
                # there (a NAT can answer from a pinhole other than the path chosen)
                old = event.old
                log.info("peer roamed", inner=event.inner,
                         old=None if old is None else f"{old.host}:{old.port}",
                         new=f"{event.new.host}:{event.new.port}")
                s = self.kx.by_inner.get(event.inner)
                if s is not None:
                    s.endpoint = event.new
            elif isinstance(event, PeerWanted):
                if self.on_peer_wanted is not None:
                    self.on_peer_wanted(event.inner)
                else:
                    self._want_again(event.inner)
            elif isinstance(event, TxSaExhausted):
                # the packet budget should have rekeyed long before; rekey now
                log.warning("tx SA exhausted before rekey", inner=event.inner, spi=event.spi)
                s = self.kx.by_inner.get(event.inner)
                if s is not None and s.tx is not None:
                    # count its budget as spent: the next tick starts a handshake
                    s.note_packets_out(s.tx.packets_base + self.kx.config.rekey_after_messages)
        self._tick()

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                infos = self.engine.peers()
            except BtmmError as err:
                log.warning("reading engine counters failed", error=str(err))
                continue
            self.observe(infos)

    def observe(self, infos: Sequence[PeerInfo]) -> None:
        """The engine's per-peer counters as read now: packets sent count against each
        session's budget (a rekey when it runs low). Called by the driver's own poll, or,
        with ``poll_interval`` None, by an owner that reads the counters for more than this."""
        for info in infos:
            if info.inner not in self.kx.by_inner:
                continue
            self.kx.note_packets_out(info.inner, info.counters.packets_out)
            # outbound packets dropped for want of an SA: traffic wants this peer, so a
            # session that was given up (or never asked for) is brought up on demand
            no_sa = info.counters.drop(DropReason.NO_SA)
            if no_sa > self._no_sa.get(info.inner, 0) and self.on_peer_wanted is None:
                self._want_again(info.inner)
            self._no_sa[info.inner] = no_sa
        self._tick()

    def _want_again(self, inner: str) -> None:
        s = self.kx.by_inner.get(inner)
        if s is not None and s.tx is None and not s.busy() and s.endpoint is not None:
            self._apply(self.kx.connect(inner, self._now(), self.wall()))

    def _tick(self) -> None:
        if self._loop is None:
            return
        self._apply(self.kx.tick(self._now(), self.wall()))

    def _reschedule(self) -> None:
        if self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.kx.next_deadline()
        if deadline is not None:
            self._timer = self._loop.call_at(max(deadline, self._loop.time()), self._tick)

    def _apply(self, actions: list[Action]) -> None:
        for act in actions:
            try:
                self._do(act)
            except BtmmError as err:
                # an engine refusal must not stop the key exchange; it is logged and counted
                self.errors += 1
                log.error("engine refused a key-exchange action", action=repr(act), error=str(err))
        self._reschedule()

    def _do(self, act: Action) -> None:
        e = self.engine
        if isinstance(act, SendControl):
            e.send_control(act.destination, act.message)
        elif isinstance(act, InstallRx):
            e.install_rx_sa(act.inner, act.spi, act.keymat)
        elif isinstance(act, InstallTx):
            e.install_tx_sa(act.inner, act.spi, act.keymat)
        elif isinstance(act, RetireRx):
            e.retire_rx_sa(act.inner, act.spi)
        elif isinstance(act, ResetPeer):
            e.remove_peer(act.inner)
            e.add_peer(act.inner, act.endpoint)
        elif isinstance(act, RemovePeer):
            e.remove_peer(act.inner)
        elif isinstance(act, ClearTx):
            e.clear_tx_sa(act.inner)
        elif isinstance(act, SetEndpoint):
            e.update_peer(act.inner, act.endpoint)
        elif isinstance(act, SendKeepalive):
            e.send_keepalive(act.inner)
        elif isinstance(act, Established):
            log.info(
                "SA pair in use",
                inner=act.inner,
                tx_spi=act.tx_spi,
                rx_spi=act.rx_spi,
                initiator=act.initiator,
            )
            if self.on_report is not None:
                self.on_report(act)
        elif isinstance(act, HandshakeFailed):
            log.warning("handshake failed", inner=act.inner, what=act.what)
            if self.on_report is not None:
                self.on_report(act)
