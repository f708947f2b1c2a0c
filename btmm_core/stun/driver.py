"""Binding transactions over asyncio UDP: the driver of ``stun.client.BindingTransaction``.

``query`` sends one Binding request to each server from ONE local socket and waits until each
transaction is answered, refused or out of retransmissions. One socket matters: the NAT's
mapping is per local port, so only answers to the same socket can show whether it maps per
destination. Used by ``btmm netcheck``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from typing import cast

from btmm_core.aio import within
from btmm_core.stun.client import RC, RM, BindingTransaction
from btmm_core.stun.message import DEFAULT_PORT, TransportAddress


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


def resolve(host: str, port: int) -> TransportAddress:
    """A server name or address as the address answers will come from (IPv4 first)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return TransportAddress.of(cast(tuple[str, int], infos[0][4]))


async def query(servers: Sequence[TransportAddress], *, local: tuple[str, int] | None = None,
                rc: int = RC, rm: int = RM) -> tuple[tuple[str, int], list[BindingTransaction]]:
    """Ask every server from one socket; returns the socket's local address and the finished
    transactions, in the order of ``servers``."""
    if not servers:
        return ("", 0), []
    family = socket.AF_INET6 if ":" in servers[0].host else socket.AF_INET
    loop = asyncio.get_running_loop()
    bind = local or (("::" if family == socket.AF_INET6 else "0.0.0.0"), 0)
    transport, proto = await loop.create_datagram_endpoint(_Udp, local_addr=bind, family=family)
    try:
        sockname = cast(tuple[str, int], transport.get_extra_info("sockname")[:2])
        txs = [BindingTransaction(s, os.urandom, rc=rc, rm=rm) for s in servers]
        now = time.monotonic()
        for tx in txs:
            transport.sendto(tx.start(now), (tx.server.host, tx.server.port))
        while not all(tx.finished for tx in txs):
            now = time.monotonic()
            for tx in txs:
                out = tx.tick(now)
                if out is not None:
                    transport.sendto(out, (tx.server.host, tx.server.port))
            deadlines = [d for tx in txs if (d := tx.next_deadline()) is not None]
            if not deadlines:
                break
            try:
                data, addr = await within(
                    proto.queue.get(), max(0.0, min(deadlines) - time.monotonic()))
            except TimeoutError:
                continue
            source = TransportAddress.of(addr)
            for tx in txs:
                if source == tx.server:
                    tx.receive(data, source, time.monotonic())
        return sockname, txs
    finally:
        transport.close()


def parse_servers(spec: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT2...]`` (IPv6 in brackets) as (host, port) pairs. A HOST alone
    means port 3478; a PORT alone means the previous host, so ``198.51.100.1:3478,3479``
    names two ports of one server. Raises ``ValueError``."""
    out: list[tuple[str, int]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ValueError(f"empty server in {spec!r}")
        if item.isdigit():
            if not out:
                raise ValueError(f"{item!r}: a port alone needs a host before it")
            host, port_text = out[-1][0], item
        elif item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":") if sep and rest.startswith(":") else ""
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"{item!r}: write an IPv6 server as [ADDRESS]:PORT")
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        else:
            host, port_text = item, ""
        port = int(port_text) if port_text.isdigit() else -1 if port_text else DEFAULT_PORT
        if not host or not 1 <= port <= 65535:
            raise ValueError(f"{item!r} is not HOST:PORT")
        out.append((host, port))
    return out
