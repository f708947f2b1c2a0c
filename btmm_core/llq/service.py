"""The asyncio side of the LLQ server (RFC 8764) inside ``btmm serve``: runs ``LLQServer.tick``
when it has work and sends what it produced: from the registry's UDP socket, or on the TCP/TLS
connection the LLQ was set up on (whose closing ends the LLQ). All protocol work is in
``btmm_core.llq.server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time

import structlog

from btmm_core.llq.server import LLQConfig, LLQServer, Outgoing
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.server import RegistryServer

log = structlog.get_logger("btmm.llq")


def _address(peer: str) -> tuple[str, int]:
    host, port = peer.rsplit("#", 1)
    return host, int(port)


class LLQService:
    def __init__(self, core: RegistryCore, config: LLQConfig) -> None:
        # A fresh secret per process: challenge ids and LLQ ids of an earlier run are void, so
        # clients of a restarted server get NO-SUCH-LLQ and set up again.
        self.server = LLQServer(core, config, os.urandom(32), random.SystemRandom())
        self.server.attach()
        self._wake = asyncio.Event()
        self.server.notify = self._wake.set
        self._task: asyncio.Task[None] | None = None
        self._registry: RegistryServer | None = None
        self._closing = False

    def start(self, registry: RegistryServer) -> None:
        self._registry = registry
        registry.stream_closed_handlers.append(self._connection_closed)
        registry.keep_open = self.server.holds_llq
        # Room for an acknowledgement from every LLQ at once (about 1 KiB of kernel memory
        # each on loopback), so that a burst of events does not come back as lost acks.
        wanted = min(max(self.server.config.max_total * 1024, 1 << 20), 64 << 20)
        granted = registry.set_udp_receive_buffer(wanted)
        if granted < wanted:
            log.warning(
                "udp receive buffer smaller than asked: acknowledgements of large event "
                "bursts may be lost and resent; raise net.core.rmem_max or run as root",
                asked=wanted,
                granted=granted,
            )
        self._task = asyncio.create_task(self._run())
        c = self.server.config
        log.info(
            "llq ready",
            lease=f"{c.lease_min}..{c.lease_max}",
            max_total=c.max_total,
            max_per_client=c.max_per_client,
        )

    def _send(self, out: Outgoing) -> None:
        assert self._registry is not None
        if out.transport != Transport.UDP:
            # A connection that is gone already told connection_closed; nothing to do here.
            if not self._registry.send_stream(out.transport, out.peer, out.wire):
                log.debug("llq event not sent: connection gone", peer=out.peer)
            return
        try:
            self._registry.send_udp(out.wire, _address(out.peer))
        except OSError as e:
            log.debug("llq event not sent", peer=out.peer, error=str(e))

    def _connection_closed(self, transport: Transport, peer: str) -> None:
        if self.server.connection_closed(transport, peer):
            self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            try:
                self.server.tick(time.time())
                for out in self.server.take_outbox():
                    self._send(out)
            except Exception:
                log.exception("llq timer work failed; retrying")
            deadline = self.server.next_deadline()
            delay = 1.0 if deadline is None else min(max(deadline - time.time(), 0.0), 1.0)
            self._wake.clear()
            if self.server.outbox or self.server.next_deadline() == 0.0:
                continue
            # asyncio.timeout, not wait_for: see Watcher._run (a lost cancellation).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self._task
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        log.info("llq stopped", **{k: v for k, v in sorted(self.server.stats.items())})
