"""Thin asyncio driver for the DNS Push client core (``push/client.py``) over DNS over TLS
(RFC 7858 framing: a two-byte length before each message).

``PushWatcher`` opens the TLS connection when the core says ``Connect``, feeds it messages,
connection loss and timer expiries, writes what it sends, and puts what the user should see
(``Changes``, ``StateChanged``) on ``events``. One connection at a time; reconnection and its
backoff are the core's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
import time

import dns.name

from btmm_core.dns.tsig import TsigKey
from btmm_core.push.client import (
    Changes,
    Connect,
    Disconnect,
    Output,
    PushClient,
    PushClientConfig,
    Record,
    Send,
    StateChanged,
)


class PushWatcher:
    """Keep a DNS Push subscription on (``qname``, ``qtype``) at ``server`` (its DoT port)."""

    def __init__(
        self,
        server: tuple[str, int],
        qname: dns.name.Name,
        qtype: int,
        *,
        key: TsigKey | None = None,
        config: PushClientConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        rng: random.Random | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.server = server
        self._ssl = ssl_context or ssl.create_default_context()
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self.client = PushClient(qname, qtype, rng or random.SystemRandom(), config, key)
        self.events: asyncio.Queue[Changes | StateChanged] = asyncio.Queue()
        #: (connection number, message); None: that connection closed; b"": wake up. The
        #: number keeps a late item of a connection already dropped from counting.
        self._inbox: asyncio.Queue[tuple[int, bytes | None]] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: Connections made so far.
        self.connections = 0

    def client_records(self) -> list[Record]:
        """The RRset as the watcher knows it now."""
        return [Record(n, t, rd, ttl) for (n, t, rd), ttl in self.client.known.items()]

    async def start(self) -> None:
        self._emit(self.client.start(time.time()))
        self._task = asyncio.create_task(self._run())

    async def _connect(self) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.server[0],
                    self.server[1],
                    ssl=self._ssl,
                    server_hostname=self._server_hostname or self.server[0],
                )
        except (OSError, TimeoutError, ssl.SSLError) as e:
            self.events.put_nowait(StateChanged(self.client.state, f"cannot connect: {e}"))
            self._emit(self.client.connection_lost(time.time()))
            self._inbox.put_nowait((self.connections, b""))
            return
        self._writer = writer
        self.connections += 1
        self._reader_task = asyncio.create_task(self._read(reader, self.connections))
        self._emit(self.client.connected(time.time()))
        self._inbox.put_nowait((self.connections, b""))

    async def _read(self, reader: asyncio.StreamReader, conn: int) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                self._inbox.put_nowait((conn, await reader.readexactly(length)))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            pass
        if not self._closing:
            self._inbox.put_nowait((conn, None))

    def _drop_connection(self, abort: bool) -> None:
        writer, self._writer = self._writer, None
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        if writer is None:
            return
        if abort:
            sock = writer.get_extra_info("socket")
            if sock is not None:  # RFC 8490 5.3: a reset, not a FIN
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    def _emit(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Send):
                if self._writer is not None and not self._writer.is_closing():
                    self._writer.write(struct.pack("!H", len(o.wire)) + o.wire)
            elif isinstance(o, Connect):
                if not self._closing:
                    self._connecting = asyncio.create_task(self._connect())
            elif isinstance(o, Disconnect):
                self._drop_connection(o.abort)
            else:
                self.events.put_nowait(o)

    async def _run(self) -> None:
        while not self._closing:
            deadline = self.client.next_deadline()
            delay = None if deadline is None else max(0.0, deadline - time.time())
            try:
                async with asyncio.timeout(delay):
                    conn, data = await self._inbox.get()
            except TimeoutError:
                self._emit(self.client.tick(time.time()))
                continue
            if self._closing:
                return
            if conn != self.connections or (data is not None and self._writer is None):
                continue  # from a connection already dropped
            if data is None:
                self._drop_connection(abort=False)
                self._emit(self.client.connection_lost(time.time()))
            elif data:
                self._emit(self.client.receive(data, time.time()))

    async def close(self) -> None:
        """Unsubscribe, close the session and stop."""
        self._closing = True
        self._emit(self.client.cancel(time.time()))
        if self._task is not None:
            self._inbox.put_nowait((-1, b""))
            try:
                async with asyncio.timeout(2.0):
                    await self._task
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        self._drop_connection(abort=False)

    async def __aenter__(self) -> PushWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
