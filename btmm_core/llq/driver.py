"""Thin asyncio driver for the LLQ client state machine (RFC 8764) over UDP, TCP or DNS over
TLS (RFC 7858).

``Watcher`` owns one UDP socket connected to the server, or one TCP/TLS connection (messages
with a two-byte length prefix, RFC 7766), feeds messages and timer expiries to ``LLQClient``
and puts what the user should see (``Changes``, ``StateChanged``) on a queue. When the
connection closes, the LLQ on it is gone: the driver reconnects when the state machine next
sends, and the state machine sets up again. Over UDP, a message the state machine wants sent
over TCP (a full answer too large for a datagram) goes on a connection of its own, closed once
its answer came; the answer joins the other messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import struct
import time

import dns.name

from btmm_core.dns.tsig import TsigKey
from btmm_core.errors import ConfigError
from btmm_core.llq.client import (
    Changes,
    ClientConfig,
    LLQClient,
    Output,
    Send,
    StateChanged,
)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, inbox: asyncio.Queue[bytes | None]) -> None:
        self.inbox = inbox

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable while the server is down: the state machine's timers handle it.
        pass


TRANSPORTS = ("udp", "tcp", "tls")


class Watcher:
    """Keep an LLQ on (``qname``, ``qtype``) at ``server`` and report changes on ``events``."""

    def __init__(
        self,
        server: tuple[str, int],
        qname: dns.name.Name,
        qtype: int,
        *,
        key: TsigKey | None = None,
        config: ClientConfig | None = None,
        local_addr: tuple[str, int] | None = None,
        rng: random.Random | None = None,
        transport: str = "udp",
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ConfigError(f"LLQ transport {transport!r}: use one of {', '.join(TRANSPORTS)}")
        self.server = server
        self.local_addr = local_addr
        self.transport = transport
        if transport == "tls" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self._ssl = ssl_context if transport == "tls" else None
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        #: The last message that found no connection: sent first on the next one.
        self._unsent: bytes | None = None
        #: Connections made so far (the first included).
        self.connections = 0
        self.client = LLQClient(qname, qtype, rng or random.SystemRandom(), config, key)
        self.events: asyncio.Queue[Changes | StateChanged] = asyncio.Queue()
        #: Messages from the server; None means the connection closed.
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        #: queries over TCP in flight for a UDP watcher (``Send.stream``)
        self._asking: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        if self.transport == "udp":
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self._inbox),
                remote_addr=self.server,
                local_addr=self.local_addr,
            )
            self._transport = transport
        else:
            # A first connection that fails is not fatal: the state machine's retries and
            # polling reconnect, as they would resend over UDP.
            await self._connect()
        self._emit(self.client.start(time.time()))
        self._task = asyncio.create_task(self._run())

    @property
    def local_address(self) -> tuple[str, int]:
        source = self._transport if self.transport == "udp" else self._writer
        assert source is not None
        host, port = source.get_extra_info("sockname")[:2]
        return str(host), int(port)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _connect(self) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.server[0],
                    self.server[1],
                    ssl=self._ssl,
                    server_hostname=self._server_hostname if self._ssl is not None else None,
                    local_addr=self.local_addr,
                )
        except (OSError, TimeoutError, ssl.SSLError) as e:
            self.events.put_nowait(
                StateChanged(self.client.state, f"cannot connect to the server: {e}")
            )
            return
        self._writer = writer
        self.connections += 1
        self._reader_task = asyncio.create_task(self._read(reader))
        if self._unsent is not None:
            wire, self._unsent = self._unsent, None
            self._write(wire)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                self._inbox.put_nowait(await reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            pass
        if not self._closing:
            self._inbox.put_nowait(None)

    def _write(self, wire: bytes) -> None:
        if not self.connected:
            self._unsent = wire
            if self._connecting is None or self._connecting.done():
                self._connecting = asyncio.create_task(self._connect())
            return
        assert self._writer is not None
        self._writer.write(struct.pack("!H", len(wire)) + wire)

    async def _ask_over_tcp(self, wire: bytes) -> None:
        """One request on a TCP connection of its own; its answer goes to the state machine
        with the datagrams."""
        host = None if self.local_addr is None else (self.local_addr[0], 0)
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.server[0], self.server[1], local_addr=host)
            try:
                writer.write(struct.pack("!H", len(wire)) + wire)
                async with asyncio.timeout(self._connect_timeout):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    answer = await reader.readexactly(length)
            finally:
                writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            why = str(e) or type(e).__name__
            self.events.put_nowait(
                StateChanged(self.client.state, f"cannot read the full answer over TCP: {why}"))
            return
        if not self._closing:
            self._inbox.put_nowait(answer)

    def _emit(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Send):
                if o.stream and self.transport == "udp":
                    if not self._closing:
                        task = asyncio.create_task(self._ask_over_tcp(o.wire))
                        self._asking.add(task)
                        task.add_done_callback(self._asking.discard)
                elif self.transport != "udp":
                    if not self._closing or self.connected:
                        self._write(o.wire)
                elif self._transport is not None:
                    self._transport.sendto(o.wire)
            else:
                self.events.put_nowait(o)

    async def _run(self) -> None:
        # asyncio.timeout rather than wait_for: Python 3.11's wait_for can swallow a
        # cancellation that meets a timeout, and close() would then wait forever.
        while not self._closing:
            deadline = self.client.next_deadline()
            delay = None if deadline is None else max(0.0, deadline - time.time())
            try:
                async with asyncio.timeout(delay):
                    data = await self._inbox.get()
            except TimeoutError:
                self._emit(self.client.tick(time.time()))
                continue
            if self._closing:
                return
            if data is None:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                self._emit(self.client.connection_lost(time.time()))
                continue
            self._emit(self.client.receive(data, time.time()))
            deadline = self.client.next_deadline()
            if deadline is not None and deadline <= time.time():
                self._emit(self.client.tick(time.time()))

    async def close(self) -> None:
        """Cancel the LLQ at the server (lease 0) and stop."""
        self._closing = True
        if self._task is not None:
            self._inbox.put_nowait(b"")  # wakes the loop, which sees _closing
            try:
                async with asyncio.timeout(2.0):
                    await self._task
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._emit(self.client.cancel(time.time()))
        for task in list(self._asking):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._transport is not None:
            self._transport.close()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._writer is not None:
            # Let the cancel go out; closing the connection ends the LLQ at the server anyway.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._writer.drain()
            self._writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task

    async def __aenter__(self) -> Watcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
