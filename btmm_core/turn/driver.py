"""``turn.client.TurnClient`` over asyncio UDP: one socket connected to the TURN server, the
core's timer on the event loop, its events handed to a callback (by default, a queue).

It only moves bytes: every decision is the core's. After each input (a datagram, a timer, a
call from the owner) it sends what the core queued and re-arms the one timer at
``next_timer()``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import cast

from btmm_core.aio import within
from btmm_core.errors import TurnError
from btmm_core.stun.message import TransportAddress
from btmm_core.turn.client import (
    Allocated,
    AllocationFailed,
    AllocationState,
    Event,
    TurnClient,
)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, session: TurnSession) -> None:
        self.session = session

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.session._input(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.session.socket_errors += 1


class TurnSession:
    """One allocation. ``on_event`` gets every event of the core (``PeerData`` included, on
    the event loop's thread); without one they go to ``events``."""

    def __init__(self, client: TurnClient, *, local: tuple[str, int] | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.local = local
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._on_event = on_event or self.events.put_nowait
        self._clock = clock
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._state_changed = asyncio.Event()
        self.socket_errors = 0

    async def open(self) -> None:
        """Open the socket and start allocating."""
        loop = asyncio.get_running_loop()
        server = self.client.server
        v6 = ":" in server.host
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=self.local or (("::" if v6 else "0.0.0.0"), 0),
            family=socket.AF_INET6 if v6 else socket.AF_INET)
        self._transport = transport
        self.client.start(self._clock())
        self._pump()

    @property
    def sockname(self) -> tuple[str, int]:
        assert self._transport is not None
        return cast(tuple[str, int], self._transport.get_extra_info("sockname")[:2])

    async def allocated(self, timeout: float) -> Allocated:
        """Wait until the allocation is made; raises ``TurnError`` if refused or unanswered."""
        async def wait() -> None:
            while self.client.state is AllocationState.ALLOCATING:
                self._state_changed.clear()
                await self._state_changed.wait()

        try:
            await within(wait(), timeout)
        except TimeoutError:
            raise TurnError(f"no allocation from {self.client.server} within {timeout} s") from None
        c = self.client
        if c.state is not AllocationState.ALLOCATED or c.relayed is None:
            raise TurnError(f"TURN allocation failed: {c.error}",
                            hint="check the registry's --turn-secret-file against the server's "
                                 "static-auth-secret, and the clocks")
        return Allocated(c.relayed, c.mapped, c.lifetime)

    def send(self, peer: TransportAddress, data: bytes) -> bool:
        ok = self.client.send(peer, data, self._clock())
        self._flush()
        return ok

    def permit(self, peer: TransportAddress) -> None:
        self.client.permit(peer, self._clock())
        self._pump()

    def bind(self, peer: TransportAddress) -> int:
        channel = self.client.bind(peer, self._clock())
        self._pump()
        return channel

    def refresh(self) -> None:
        """Refresh the allocation now (the core's timer does it before it expires)."""
        self.client.refresh(self._clock())
        self._pump()

    def restart(self) -> None:
        """Allocate again after a failure (with the credentials set last)."""
        self.client.start(self._clock())
        self._pump()

    def close(self, release: bool = True) -> None:
        if self._transport is None:
            return
        if release:
            self.client.release(self._clock())
            self._flush()
        if self._timer is not None:
            self._timer.cancel()
        self._transport.close()
        self._transport = None

    # ---- plumbing --------------------------------------------------------------------------

    def _input(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            source = TransportAddress.of(addr)
        except ValueError:
            self.client.drops["bad source"] += 1
            return
        self.client.receive(data, source, self._clock())
        self._pump()

    def _flush(self) -> None:
        if self._transport is None:
            return
        server = (self.client.server.host, self.client.server.port)
        for d in self.client.datagrams_to_send():
            self._transport.sendto(d, server)

    def _pump(self) -> None:
        self._flush()
        while (ev := self.client.next_event()) is not None:
            if isinstance(ev, Allocated | AllocationFailed):
                self._state_changed.set()
            self._on_event(ev)
        if self._transport is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.client.next_timer()
        if when is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, when - self._clock())
            self._timer = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.client.handle_timer(self._clock())
        self._pump()
