"""The STUN responder over asyncio UDP: the driver of ``stun.responder.StunResponder``.

One ``StunResponder`` (one set of counters) answers on every port given: the main port and,
when configured, the alternate port that lets a client compare the mapping its NAT makes for
two destinations. Started by ``serve/compose.py`` for ``btmm serve``.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import structlog

from btmm_core.stun.message import TransportAddress
from btmm_core.stun.responder import StunResponder

log = structlog.get_logger("btmm.stun")


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, responder: StunResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.responder.receive(data, TransportAddress.of(addr), time.monotonic())
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("stun udp error", error=str(exc))


class StunServer:
    def __init__(self, responder: StunResponder, host: str, ports: tuple[int, ...]) -> None:
        self.responder = responder
        self.host = host
        self.ports = ports
        self._transports: list[asyncio.DatagramTransport] = []
        #: What each socket is bound to (port 0 becomes the port the kernel chose).
        self.addresses: list[tuple[str, int]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for port in self.ports:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self.responder), local_addr=(self.host, port))
                self._transports.append(transport)
                self.addresses.append(transport.get_extra_info("sockname")[:2])
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        for t in self._transports:
            t.close()
        self._transports.clear()
