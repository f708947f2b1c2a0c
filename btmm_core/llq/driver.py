"""Thin asyncio driver for the LLQ client state machine (RFC 8764) over UDP.

``Watcher`` owns one UDP socket connected to the server, feeds datagrams and timer expiries to
``LLQClient`` and puts what the user should see (``Changes``, ``StateChanged``) on a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from pathlib import Path

import dns.name

from btmm_core.errors import ConfigError
from btmm_core.llq.client import (
    Changes,
    ClientConfig,
    LLQClient,
    Output,
    Send,
    StateChanged,
)
from btmm_core.registry.tsig import HMAC_MD5, HMAC_SHA256, TsigKey

_KEY_RE = re.compile(
    r'key\s+"?(?P<name>[^"\s{]+)"?\s*\{\s*algorithm\s+"?(?P<alg>[\w.-]+)"?\s*;'
    r'\s*secret\s+"(?P<secret>[A-Za-z0-9+/=]+)"\s*;\s*\}\s*;',
    re.S,
)


def read_key_file(path: Path) -> TsigKey:
    """The TSIG key of a BIND key statement file (the registry's credentials file)."""
    import base64

    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e}") from e
    m = _KEY_RE.search(text)
    if m is None:
        raise ConfigError(
            f"{path} holds no key statement",
            hint='expected key "NAME" { algorithm hmac-sha256; secret "BASE64"; };',
        )
    algorithms = {"hmac-sha256": HMAC_SHA256, "hmac-md5": HMAC_MD5}
    alg = algorithms.get(m["alg"].lower().rstrip("."))
    if alg is None:
        alg_text = m["alg"]
        raise ConfigError(f"{path}: algorithm {alg_text} is not supported (hmac-sha256, hmac-md5)")
    name = dns.name.from_text(m["name"])
    # The key's zone is not known to a client; the name stands in (it is unused here).
    return TsigKey(name, alg, base64.b64decode(m["secret"]), name)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, inbox: asyncio.Queue[bytes]) -> None:
        self.inbox = inbox

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable while the server is down: the state machine's timers handle it.
        pass


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
    ) -> None:
        self.server = server
        self.local_addr = local_addr
        self.client = LLQClient(qname, qtype, rng or random.SystemRandom(), config, key)
        self.events: asyncio.Queue[Changes | StateChanged] = asyncio.Queue()
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._inbox),
            remote_addr=self.server,
            local_addr=self.local_addr,
        )
        self._transport = transport
        self._emit(self.client.start(time.time()))
        self._task = asyncio.create_task(self._run())

    @property
    def local_address(self) -> tuple[str, int]:
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def _emit(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Send):
                if self._transport is not None:
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
        if self._transport is not None:
            self._transport.close()

    async def __aenter__(self) -> Watcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
