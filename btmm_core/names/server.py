"""The stub resolver's asyncio driver: UDP and TCP (RFC 7766) on a loopback address, and the
forwarding of names outside the zone to the upstream resolvers. All decisions are the core's
(``names/stub.py``); this module only moves bytes."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

import dns.name
import dns.rrset
import structlog

from btmm_core.aio import within
from btmm_core.names.stub import AskRegistry, Dropped, Forward, Reply, StubCore, Transport

#: How the stub asks the registry (the daemon's signed ``RegistryClient.query``).
RegistryLookup = Callable[[dns.name.Name, int], Awaitable[dns.rrset.RRset | None]]

log = structlog.get_logger("btmm.names")

#: Seconds to wait for one upstream before the next is asked.
UPSTREAM_TIMEOUT = 2.0
#: Forwarded queries in flight at once; beyond, queries are dropped (counted), so a flood of
#: local queries cannot open unbounded sockets.
MAX_FORWARDS = 64
#: TCP clients at once, and how long one may stay silent.
MAX_TCP = 16
TCP_IDLE = 10.0


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: StubServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio's; it has the same methods
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.on_udp(data, addr)


class _OneAnswer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes] = asyncio.Queue(maxsize=8)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.answers.put_nowait(data)


class StubServer:
    """Runs ``core`` on ``address`` (UDP and TCP); forwards to ``upstreams`` in order."""

    def __init__(
        self,
        core: StubCore,
        address: tuple[str, int],
        upstreams: Sequence[tuple[str, int]],
        registry: RegistryLookup | None = None,
    ) -> None:
        self.core = core
        self.registry = registry
        self.address = address
        self.upstreams = tuple(upstreams)
        self._udp: _Udp | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_clients = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        #: called with each zone name whose addresses a program asked (``Reply.looked_up``)
        self.on_lookup: Callable[[dns.name.Name], None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._udp = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=self.address
        )
        try:
            self._tcp = await asyncio.start_server(
                self._on_tcp, self.address[0], self.address[1], reuse_address=True
            )
        except OSError:
            assert self._udp.transport is not None
            self._udp.transport.close()
            raise

    async def close(self) -> None:
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._tcp is not None:
            self._tcp.close()
            # closing a client's stream ends its handler (a read fails), which frees the port
            for writer in list(self._writers):
                writer.close()
            await self._tcp.wait_closed()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=1.0)
        # the UDP socket is closed on the loop's next turn; the address is free after it
        await asyncio.sleep(0)
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        if len(self._tasks) >= MAX_FORWARDS:
            self.core.stats["drop_busy"] += 1
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- UDP -------------------------------------------------------------------------

    def on_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.core.receive(data, Transport.UDP, asyncio.get_running_loop().time())
        if isinstance(out, Reply):
            self._send_udp(out.wire, addr)
            self._looked_up(out)
        elif isinstance(out, Forward):
            self._spawn(self._forward_udp(out, addr))
        elif isinstance(out, AskRegistry):
            self._spawn(self._registry_udp(out, addr))

    def _looked_up(self, reply: Reply) -> None:
        if reply.looked_up is not None and self.on_lookup is not None:
            self.on_lookup(reply.looked_up)

    def _send_udp(self, wire: bytes, addr: tuple[str, int]) -> None:
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.sendto(wire, addr)

    async def _forward_udp(self, fwd: Forward, addr: tuple[str, int]) -> None:
        answer = await self._ask(fwd.wire, tcp=False)
        self._send_udp(answer, addr)

    async def _registry_udp(self, ask: AskRegistry, addr: tuple[str, int]) -> None:
        self._send_udp(await self._ask_registry(ask, Transport.UDP), addr)

    async def _ask_registry(self, ask: AskRegistry, transport: Transport) -> bytes:
        if self.registry is None:
            return self.core.upstream_failed(ask.wire)
        try:
            rrset = await within(self.registry(ask.qname, ask.qtype), UPSTREAM_TIMEOUT)
        except Exception as err:  # the registry's errors (BtmmError), timeouts, OSError
            log.debug("registry lookup failed", name=ask.qname.to_text(), error=str(err))
            return self.core.upstream_failed(ask.wire)
        return self.core.registry_answer(ask.wire, rrset, transport)

    # ---- TCP -------------------------------------------------------------------------

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_clients >= MAX_TCP:
            self.core.stats["drop_busy"] += 1
            writer.close()
            return
        self._tcp_clients += 1
        self._writers.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            while True:
                try:
                    head = await within(reader.readexactly(2), TCP_IDLE)
                    (n,) = struct.unpack("!H", head)
                    data = await within(reader.readexactly(n), TCP_IDLE)
                except (asyncio.IncompleteReadError, TimeoutError, OSError):
                    return
                out = self.core.receive(data, Transport.TCP, asyncio.get_running_loop().time())
                if isinstance(out, Dropped):
                    return
                if isinstance(out, Reply):
                    wire = out.wire
                    self._looked_up(out)
                elif isinstance(out, AskRegistry):
                    wire = await self._ask_registry(out, Transport.TCP)
                else:
                    wire = await self._ask(out.wire, tcp=True)
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            self._tcp_clients -= 1
            self._writers.discard(writer)
            self._handlers.discard(handler)
            writer.close()

    # ---- upstream --------------------------------------------------------------------

    async def _ask(self, query: bytes, *, tcp: bool) -> bytes:
        """The first matching answer of the upstreams, in order; SERVFAIL if none answers."""
        for upstream in self.upstreams:
            if upstream == self.address:
                continue  # never ourselves
            try:
                raw = await within(
                    self._tcp_once(query, upstream) if tcp else self._udp_once(query, upstream),
                    UPSTREAM_TIMEOUT,
                )
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
                log.debug("upstream did not answer", upstream=upstream, error=str(err))
                continue
            if raw is not None:
                return raw
        return self.core.upstream_failed(query)

    async def _udp_once(self, query: bytes, upstream: tuple[str, int]) -> bytes | None:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(_OneAnswer, remote_addr=upstream)
        try:
            transport.sendto(query)
            while True:
                answer = self.core.upstream_answer(query, await proto.answers.get())
                if answer is not None:
                    return answer
        finally:
            transport.close()

    async def _tcp_once(self, query: bytes, upstream: tuple[str, int]) -> bytes | None:
        reader, writer = await asyncio.open_connection(*upstream)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            (n,) = struct.unpack("!H", await reader.readexactly(2))
            return self.core.upstream_answer(query, await reader.readexactly(n))
        finally:
            writer.close()
